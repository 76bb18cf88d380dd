"""momclip_sgd against PyTorch's clip_grad_norm_ -> clip_grad_value_ -> SGD, step for step.

The grid (momentum, dampening, nesterov, weight_decay, max_norm, clip_value) runs 100 steps on
an MLP on sklearn's digits and on a random pytree, float32. Live against torch when the
``parity`` extra is installed; always against the trajectories in ``tests/golden`` (made by
``tests/golden/make_golden.py``, which ``--report`` prints the deviation table of).
"""

import functools

import numpy as np
import pytest
from golden import make_golden as mg

import optax_momclip as omc

RTOL = 1e-5  # with atol 1e-6 for params that end near zero (see make_golden.deviation)


@functools.cache
def _ours():
  return mg.jax_all(mg.inputs())


def _assert_parity(refs):
  devs = {(pb, k): dev for pb, k, dev in mg.deviations(_ours(), refs)}
  assert len(devs) == 2 * len(mg.grid())
  bad = {k: f"{v:.2e}" for k, v in devs.items() if not v <= RTOL}
  assert not bad, f"params beyond rtol {RTOL:g}: {bad}"


def test_the_grid_is_every_combination_torch_accepts():
  assert len(mg.grid()) == 40  # 64 less the 24 Nesterov ones without momentum or with dampening
  for mu, d in [(0.0, 0.0), (0.9, 0.5), (0.0, 0.5)]:
    with pytest.raises(ValueError, match="nesterov"):
      omc.momclip_sgd(0.1, mu, nesterov=True, dampening=d)


def test_torch_rejects_what_momclip_sgd_rejects():
  torch = pytest.importorskip("torch", reason="the parity extra (torch) is not installed")
  p = [torch.zeros(2, requires_grad=True)]
  for mu, d in [(0.0, 0.0), (0.9, 0.5), (0.0, 0.5)]:
    with pytest.raises(ValueError, match="Nesterov"):
      torch.optim.SGD(p, lr=0.1, momentum=mu, dampening=d, nesterov=True)


def test_golden_inputs_are_reproducible():
  gold = mg.load_golden()
  for k, v in mg.inputs().items():
    np.testing.assert_array_equal(gold[k], v, err_msg=k)


def test_momclip_sgd_matches_golden_torch_trajectories():
  gold = mg.load_golden()
  _assert_parity(mg.golden_results(gold))
  for i, k in enumerate(gold["configs"]):
    np.testing.assert_allclose(_ours()[("mlp", str(k))]["loss"], gold["mlp/loss"][i], rtol=RTOL)
  losses = gold["mlp/loss"]
  assert np.all(losses[:, -10:].mean(1) < 0.75 * losses[:, :10].mean(1))  # it trains


def test_momclip_sgd_matches_live_torch():
  pytest.importorskip("torch", reason="the parity extra (torch) is not installed")
  _assert_parity(mg.torch_all(mg.inputs()))


def test_the_grid_exercises_each_clip():
  """Each clip changes the trajectory, so the parity above covers it."""
  ours = _ours()
  base = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
  final = lambda pb, **kw: ours[(pb, mg.key({**base, **kw}))]["params"][mg.STEPS]
  for pb in mg.PROBLEMS:
    plain = final(pb, max_norm=None, clip_value=None)
    for kw in [dict(max_norm=0.5, clip_value=None), dict(max_norm=None, clip_value=0.1)]:
      assert not np.allclose(
        plain["w1" if pb == "mlp" else "a"], final(pb, **kw)["w1" if pb == "mlp" else "a"]
      )


@pytest.mark.parametrize(
  "schedule",
  [[0.0, 0.0, 0.0, 0.9, 0.9, 0.9, 0.9], [0.9, 0.9, 0.0, 0.0, 0.8, 0.8, 0.0, 0.9]],
  ids=["warm-up from 0", "0.9, off, on again"],
)
@pytest.mark.parametrize("dampening", [0.0, 0.3])
@pytest.mark.parametrize("which", ["heavy_ball", "momclip_sgd"])
def test_a_momentum_schedule_through_zero_matches_torch(schedule, dampening, which):
  """PyTorch keeps no buffer while momentum is 0 and starts it where momentum leaves 0.

  A step with zero momentum stored g as the buffer, so the next one mixed in the old gradient.
  """
  torch = pytest.importorskip("torch", reason="the parity extra (torch) is not installed")
  import jax.numpy as jnp
  import optax

  rng = np.random.default_rng(0)
  grads = rng.normal(size=(len(schedule), 5)).astype(np.float32)
  lr = 0.1
  mu = lambda step: jnp.asarray(schedule, jnp.float32)[step]
  if which == "heavy_ball":
    tx = optax.chain(omc.heavy_ball(mu, dampening=dampening), optax.scale(-lr))
  else:
    tx = omc.momclip_sgd(lr, mu, dampening=dampening)
  w = torch.zeros(5, requires_grad=True)
  opt = torch.optim.SGD([w], lr=lr, momentum=schedule[0], dampening=dampening)
  params = jnp.zeros(5)
  state = tx.init(params)
  for t, g in enumerate(grads):
    opt.param_groups[0]["momentum"] = schedule[t]
    w.grad = torch.from_numpy(g.copy())
    opt.step()
    u, state = tx.update(jnp.asarray(g), state, params)
    params = params + u
    np.testing.assert_allclose(
      params, w.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=f"step {t}"
    )
