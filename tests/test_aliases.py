"""momclip_sgd against compositions of this library's and optax's pieces, and its statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_momclip as omc

STEPS = 8


def _grads(steps=STEPS):
  k = jax.random.split(jax.random.key(3), 2)
  size = jnp.where(jnp.arange(steps) % 2 == 0, 4.0, 0.2)
  return {
    "w": jax.random.normal(k[0], (steps, 3, 4)) * size[:, None, None],
    "b": jax.random.normal(k[1], (steps, 4)) * size[:, None],
  }


def _params():
  return {"w": jnp.full((3, 4), 0.5), "b": jnp.linspace(-1.0, 1.0, 4)}


def _run(tx, grads=None):
  """Params after each step and the final state, params updated by the step (one scan)."""
  grads = _grads() if grads is None else grads

  @jax.jit
  def run(grads):
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      return (p, s), (p, u)

    (_, state), (ps, us) = jax.lax.scan(body, (_params(), tx.init(_params())), grads)
    return ps, us, state

  return run(grads)


def _torch_sgd(grads, lr, mu, d, nesterov, wd):
  """PyTorch's SGD step as its documentation states it, in float64 NumPy: the params per step."""
  params = {k: np.asarray(v, np.float64) for k, v in _params().items()}
  buf, out = {}, []
  for t in range(STEPS):
    for k in params:
      g = np.asarray(grads[k][t], np.float64) + wd * params[k]
      buf[k] = g.copy() if t == 0 else mu * buf[k] + (1 - d) * g
      step = g + mu * buf[k] if nesterov else buf[k]
      params[k] = params[k] - lr * step
    out.append({k: v.copy() for k, v in params.items()})
  return {k: np.stack([p[k] for p in out]) for k in params}


@pytest.mark.parametrize("nesterov,d", [(False, 0.5), (True, 0.0), (False, 0.0)])
def test_without_clipping_it_is_pytorch_sgd(nesterov, d):
  """Weight decay, dampening (not on the first step) and Nesterov, against a NumPy oracle."""
  ours, _, _ = _run(omc.momclip_sgd(0.1, 0.9, nesterov=nesterov, dampening=d, weight_decay=1e-2))
  want = _torch_sgd(_grads(), 0.1, 0.9, d, nesterov, 1e-2)
  chex.assert_trees_all_close(ours, want, rtol=1e-5, atol=1e-6)


def test_clipping_is_torch_norm_clip_then_value_clip_then_sgd():
  """The norm clip divides by norm + 1e-6 (PyTorch), then the value clip, then the SGD step."""
  g = _grads()
  flat = [np.asarray(x, np.float64).reshape(STEPS, -1) for x in g.values()]
  norms = np.sqrt(sum((x**2).sum(1) for x in flat))
  coef = np.minimum(0.5 / (norms + 1e-6), 1.0)
  pre = jax.tree.map(
    lambda x: jnp.clip(
      x * jnp.asarray(coef, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)), -0.1, 0.1
    ),
    g,
  )
  ours, _, state = _run(omc.momclip_sgd(0.1, 0.9, max_norm=0.5, max_value=0.1))
  theirs, _, _ = _run(optax.chain(omc.heavy_ball(0.9), optax.scale(-0.1)), grads=pre)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.grad_norm, norms[-1], rtol=1e-6)
  np.testing.assert_allclose(state.clip_scale, coef[-1], rtol=1e-6)


def test_statistics_and_metrics():
  _, _, state = _run(omc.momclip_sgd(0.1, 0.9, max_norm=1.0))
  m = omc.metrics(state)
  assert int(m["momclip_sgd/count"]) == STEPS
  assert int(m["momclip_sgd/steps_clipped"]) == STEPS // 2  # the large steps only
  assert float(m["momclip_sgd/clip_fraction"]) == 0.5
  assert float(m["momclip_sgd/clip_threshold"]) == 1.0
  _, _, plain = _run(omc.momclip_sgd(0.1, 0.9))
  assert float(plain.grad_norm) == 0.0 and float(plain.clip_scale) == 1.0


def test_learning_rate_schedule_is_evaluated_on_the_count():
  schedule = optax.linear_schedule(0.2, 0.0, STEPS)
  _, ours, _ = _run(omc.momclip_sgd(schedule, 0.0))
  lrs = np.array([float(schedule(t)) for t in range(STEPS)])
  expected = jax.tree.map(lambda g: -lrs.reshape((-1,) + (1,) * (g.ndim - 1)) * g, _grads())
  chex.assert_trees_all_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_bf16_accumulator():
  _, us, state = _run(omc.momclip_sgd(0.1, 0.9, max_norm=1.0, accumulator_dtype=jnp.bfloat16))
  _, full, _ = _run(omc.momclip_sgd(0.1, 0.9, max_norm=1.0))
  assert all(b.dtype == jnp.bfloat16 for b in jax.tree.leaves(state.momentum_buffer))
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(us))
  chex.assert_trees_all_close(us, full, rtol=3e-2, atol=3e-3)


def test_non_finite_gradients_scale_as_torch_does():
  """An inf norm makes PyTorch's coefficient 0: finite entries become 0, inf ones NaN."""
  tx = omc.momclip_sgd(1.0, 0.0, max_norm=1.0)
  g = {"w": jnp.array([jnp.inf, 2.0])}
  u, state = tx.update(g, tx.init(g))
  assert np.isnan(u["w"][0]) and u["w"][1] == 0.0
  assert float(state.clip_scale) == 0.0


def test_weight_decay_needs_params():
  tx = omc.momclip_sgd(0.1, weight_decay=1e-4)
  g = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"momclip_sgd: weight_decay=0.0001 needs params"):
    tx.update(g, tx.init(g))
  u, _ = omc.momclip_sgd(0.1).update(g, tx.init(g))  # no decay: params optional
  chex.assert_trees_all_close(u, {"w": jnp.full(2, -0.1)})


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(learning_rate=-0.1), r"momclip_sgd: learning_rate must be in \[0, inf\), got -0.1"),
    (dict(learning_rate=0.1, momentum=1.1), r"momclip_sgd: momentum must be in \[0, 1\]"),
    (dict(learning_rate=0.1, max_norm=-1.0), r"momclip_sgd: max_norm must be in \[0, inf\]"),
    (dict(learning_rate=0.1, max_value=-1.0), r"momclip_sgd: max_value must be in"),
    (dict(learning_rate=0.1, weight_decay=-1.0), r"momclip_sgd: weight_decay must be in"),
    (dict(learning_rate=0.1, dampening=0.5, nesterov=True), r"momclip_sgd: nesterov=True"),
  ],
)
def test_bad_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    omc.momclip_sgd(**kwargs)


def test_max_value_clips_a_complex_modulus_keeping_the_phase():
  g = {"z": jnp.array([3 + 4j, 0.1 - 0.2j, -6j, 1e38 + 1e38j], jnp.complex64)}
  tx = omc.momclip_sgd(1.0, 0.0, max_value=0.5)
  u, _ = tx.update(g, tx.init(g))
  z = np.asarray(g["z"], np.complex128)
  want = -z * np.minimum(1.0, 0.5 / np.abs(z))
  np.testing.assert_allclose(u["z"], want, rtol=1e-6)
  assert u["z"].dtype == jnp.complex64
