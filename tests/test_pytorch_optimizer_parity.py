"""MARS, AdaGC and cautious masking against pytorch-optimizer 4.1.0, step for step.

Each runs 50 steps on three models' parameter shapes (an MLP, a conv layer with a scalar, an
embedding with a projection), float32, in closed loop: each side's gradient at a step is
computed from its own params (a quadratic pull towards a target plus noise whose scale
cycles and spikes, so clips engage on some steps and not others). Params must agree to
rtol 1e-5 (atol 1e-6 for params near zero) at every step. Needs the ``parity`` extra
(torch and pytorch-optimizer); skipped with that reason without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_momclip as omc

STEPS = 50
RTOL, ATOL = 1e-5, 1e-6
SHAPES = {
  "mlp": {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "b2": (10,)},
  "conv": {"kernel": (3, 3, 4, 8), "bias": (8,), "scale": ()},
  "embedding": {"table": (100, 16), "proj": (16, 1)},
}
SIZES = (0.01, 0.1, 1.0)  # the gradient's size cycles over steps ...
SPIKES = {20: 30.0, 35: 10.0}  # ... and spikes at these


def _torch_optimizer():
  pytest.importorskip("torch", reason="the parity extra (torch) is not installed")
  return pytest.importorskip(
    "pytorch_optimizer", reason="the parity extra (pytorch-optimizer) is not installed"
  )


def _problem(model, seed=0):
  """Initial params, a far target, and per step a size and a sign flip for some elements.

  The target lies 3 or more away along a fixed sign per element, so the pull towards it
  never crosses zero within 50 steps; the noise is bounded, and the sizes of consecutive
  steps differ 10× or more. So no component of a gradient, of MARS's correction or of a
  moment lies near zero, where the two sides' different but legitimate roundings (and
  pytorch-optimizer's 1e-15 under Adam's square root) would decide a sign or dominate.
  """
  rng = np.random.default_rng(seed)
  shapes = SHAPES[model]
  init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  away = {
    k: np.sign(rng.normal(size=s)) * (3 + np.abs(rng.normal(size=s))) for k, s in shapes.items()
  }
  target = {k: (init[k] + away[k]).astype(np.float32) for k in shapes}
  steps = []
  for _ in range(STEPS):
    noise = {k: 1 + 0.1 * np.clip(rng.normal(size=s), -2, 2) for k, s in shapes.items()}
    flip = {k: np.where(rng.random(size=s) < 0.3, -1.0, 1.0) for k, s in shapes.items()}
    steps.append({k: (noise[k] * flip[k]).astype(np.float32) for k in shapes})
  return init, target, steps


def _cycling(t):
  return SIZES[t % 3] * SPIKES.get(t, 1.0)


def _grad(params, target, steps, t, size_at=_cycling):
  size = np.float32(size_at(t))
  return {k: size * np.float32(0.5) * (params[k] - target[k]) * steps[t][k] for k in params}


def _ours(tx, model, size_at=_cycling):
  init, target, steps = _problem(model)
  params = {k: jnp.asarray(v) for k, v in init.items()}
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  trajectory, states = [], []
  for t in range(STEPS):
    g = _grad({k: np.asarray(v) for k, v in params.items()}, target, steps, t, size_at)
    params, state = step(params, state, {k: jnp.asarray(v) for k, v in g.items()})
    trajectory.append({k: np.asarray(v) for k, v in params.items()})
    states.append(state)
  return trajectory, states


def _theirs(make, model, size_at=_cycling):
  import torch

  init, target, steps = _problem(model)
  params = {k: torch.tensor(v) for k, v in init.items()}
  opt = make(list(params.values()))
  trajectory = []
  for t in range(STEPS):
    g = _grad({k: v.numpy() for k, v in params.items()}, target, steps, t, size_at)
    for k, p in params.items():
      p.grad = torch.tensor(g[k])
    opt.step()
    trajectory.append({k: v.numpy().copy() for k, v in params.items()})
  return trajectory


def _assert_same(ours, theirs):
  for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=f"step {t}, {k}")
  moved = [np.abs(ours[-1][k] - theirs[0][k]).max() for k in ours[0]]
  assert min(moved) > 1e-4  # every tensor trained


@pytest.mark.parametrize("model", list(SHAPES))
def test_mars_then_adamw_is_pytorch_optimizer_mars(model):
  po = _torch_optimizer()
  tx = optax.chain(
    omc.mars(0.025, 0.95), optax.adamw(3e-3, b1=0.95, b2=0.99, eps=1e-8, weight_decay=0.01)
  )
  ours, states = _ours(tx, model)
  theirs = _theirs(
    lambda p: po.MARS(
      p,
      lr=3e-3,
      betas=(0.95, 0.99),
      gamma=0.025,
      mars_type="adamw",
      optimize_1d=True,
      weight_decay=0.01,
      eps=1e-8,
    ),
    model,
  )
  _assert_same(ours, theirs)
  clipped = [int(s[0].tensors_clipped) for s in states]
  assert max(clipped) > 0 and min(clipped) < len(SHAPES[model])  # clipped on some steps only


def test_mars_on_matrices_and_adamw_elsewhere_is_its_default():
  """``optimize_1d=False``: tensors of rank < 2 get plain AdamW with their own settings."""
  po = _torch_optimizer()
  label = lambda p: jax.tree.map(lambda x: "mars" if x.ndim >= 2 else "1d", p)
  tx = optax.multi_transform(
    {
      "mars": optax.chain(omc.mars(), optax.adamw(3e-3, b1=0.95, b2=0.99, weight_decay=0.0)),
      "1d": optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1),
    },
    label,
  )
  ours, _ = _ours(tx, "conv")
  theirs = _theirs(lambda p: po.MARS(p, lr=3e-3, lr_1d=1e-3), "conv")
  _assert_same(ours, theirs)


@pytest.mark.parametrize("model", list(SHAPES))
def test_adagc_then_adam_is_pytorch_optimizer_adagc(model):
  po = _torch_optimizer()
  tx = optax.chain(
    omc.adagc(1.05, beta=0.98, lambda_abs=1.0, warmup_steps=10, eps=1e-8),
    optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8),
  )
  ours, states = _ours(tx, model)
  theirs = _theirs(
    lambda p: po.AdaGC(
      p,
      lr=1e-3,
      betas=(0.9, 0.999),
      beta=0.98,
      lambda_abs=1.0,
      lambda_rel=1.05,
      warmup_steps=10,
      weight_decay=0.0,
      eps=1e-8,
    ),
    model,
  )
  _assert_same(ours, theirs)
  warm = [int(s[0].steps_clipped) for s in states]
  assert warm[8] > 0  # the warm-up clipped the global norm ...
  assert warm[-1] > warm[9]  # ... and the per-tensor rule clipped after it


@pytest.mark.parametrize("model", list(SHAPES))
def test_cautious_lion_is_pytorch_optimizer_cautious_lion(model):
  """The decay outside the mask, as the reference decays the params unmasked."""
  po = _torch_optimizer()
  lr, wd = 1e-3, 0.1
  tx = optax.chain(
    omc.cautious(optax.lion(lr, b1=0.9, b2=0.99, weight_decay=0.0)),
    optax.add_decayed_weights(-lr * wd),
  )
  ours, states = _ours(tx, model)
  theirs = _theirs(
    lambda p: po.Lion(p, lr=lr, betas=(0.9, 0.99), weight_decay=wd, cautious=True), model
  )
  _assert_same(ours, theirs)
  masked = [float(s[0].masked_fraction) for s in states]
  assert max(masked) > 0.1  # the mask did work


@pytest.mark.parametrize("model", list(SHAPES))
def test_cautious_mars_adamw_is_pytorch_optimizer_cautious_mars(model):
  po = _torch_optimizer()
  lr, wd = 3e-3, 0.01
  tx = optax.chain(
    omc.cautious(optax.chain(omc.mars(), optax.adam(lr, b1=0.95, b2=0.99))),
    optax.add_decayed_weights(-lr * wd),
  )
  ours, states = _ours(tx, model)
  theirs = _theirs(
    lambda p: po.MARS(
      p, lr=lr, betas=(0.95, 0.99), optimize_1d=True, weight_decay=wd, cautious=True
    ),
    model,
  )
  _assert_same(ours, theirs)
  assert max(float(s[0].masked_fraction) for s in states) > 0.1


def test_cautious_adamw_is_pytorch_optimizer_cautious_adamw():
  """``cautious(optax.adamw(...))``, decay masked with the rest, where the reference is AdamW.

  pytorch-optimizer's MARS with ``gamma=0`` is AdamW on gradients it clips to norm 1 per
  tensor; on gradients whose tensors stay below norm 1 it is AdamW itself, and with
  ``cautious=True`` the cautious AdamW of the paper.
  """
  po = _torch_optimizer()
  size_at = lambda t: 0.004  # every tensor's gradient below norm 1
  tx = omc.cautious(optax.adamw(3e-3, b1=0.9, b2=0.99, weight_decay=0.0))
  ours, states = _ours(tx, "mlp", size_at)
  theirs = _theirs(
    lambda p: po.MARS(p, lr=3e-3, betas=(0.9, 0.99), gamma=0.0, optimize_1d=True, cautious=True),
    "mlp",
    size_at,
  )
  init, target, steps = _problem("mlp")
  norms = [
    max(np.linalg.norm(g) for g in _grad(params, target, steps, t, size_at).values())
    for t, params in enumerate([init, *ours[:-1]])
  ]
  assert max(norms) < 1.0, max(norms)  # the premise
  _assert_same(ours, theirs)
  assert max(float(s.masked_fraction) for s in states) > 0.1
