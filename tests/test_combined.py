"""clipped_momentum and normalized_momentum against identities, NumPy and invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec

import optax_momclip as omc

STEPS = 10


def _grads(steps=STEPS, seed=0):
  """Stacked gradient trees whose global norm swings between ~0.3 and ~20."""
  k = jax.random.split(jax.random.key(seed), 4)
  size = jnp.where(jnp.arange(steps) % 3 == 0, 5.0, 0.1)
  return {
    "w": jax.random.normal(k[0], (steps, 3, 4)) * size[:, None, None],
    "b": jax.random.normal(k[1], (steps, 4)) * size[:, None],
    "s": jax.random.normal(k[2], (steps,)) * size,
  }


def _run(tx, grads=None):
  grads = _grads() if grads is None else grads
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)

  @jax.jit
  def run(grads):
    def body(state, g):
      u, state = tx.update(g, state, params)
      return state, (u, state)

    return jax.lax.scan(body, tx.init(params), grads)[1]

  return run(grads)


def _global_norms(stacked):
  leaves = [np.asarray(x, np.float64).reshape(STEPS, -1) for x in jax.tree.leaves(stacked)]
  return np.sqrt(sum((x**2).sum(1) for x in leaves))


# clipped_momentum


def test_clipped_momentum_with_nu_zero_is_clip_by_global_norm():
  ours, states = _run(omc.clipped_momentum(1.0, 0.9, nu=0.0))
  clipped, _ = _run(omc.clip_by_global_norm(1.0))
  theirs, _ = _run(optax.clip_by_global_norm(1.0))
  chex.assert_trees_all_close(ours, clipped, rtol=1e-6, atol=0)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)
  assert 0 < int(states.steps_clipped[-1]) < STEPS  # some steps clipped, some not


def test_clipped_momentum_never_clips_its_buffer():
  """The buffer is the plain EMA of the raw gradients (ema_momentum's), whatever the clip."""
  _, states = _run(omc.clipped_momentum(0.01, 0.9, nu=0.7))
  _, ema_states = _run(omc.ema_momentum(0.9))
  chex.assert_trees_all_close(states.momentum_buffer, ema_states.momentum_buffer, rtol=1e-6)


def test_clipped_momentum_matches_the_mixed_rule():
  c, beta, nu = 1.0, 0.9, 0.7
  ours, states = _run(omc.clipped_momentum(c, beta, nu=nu))
  g = {k: np.asarray(v, np.float64) for k, v in _grads().items()}
  m, t = {k: np.zeros_like(v[0]) for k, v in g.items()}, []
  expected = {k: [] for k in g}
  for step in range(STEPS):
    m = {k: beta * m[k] + (1 - beta) * g[k][step] for k in g}
    nm = np.sqrt(sum((x**2).sum() for x in m.values()))
    ng = np.sqrt(sum((x[step] ** 2).sum() for x in g.values()))
    t.append((nm, ng))
    for k in g:
      expected[k].append(nu * m[k] * min(1, c / nm) + (1 - nu) * g[k][step] * min(1, c / ng))
  chex.assert_trees_all_close(
    {k: np.asarray(v, np.float64) for k, v in ours.items()},
    {k: np.stack(v) for k, v in expected.items()},
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(states.momentum_norm, [a for a, _ in t], rtol=1e-6)
  np.testing.assert_allclose(states.grad_norm, [b for _, b in t], rtol=1e-6)


def test_clipped_momentum_output_norm_is_bounded_by_max_norm():
  ours, _ = _run(omc.clipped_momentum(0.5, 0.9, nu=0.7))
  assert np.all(_global_norms(ours) <= 0.5 * (1 + 1e-6))


def test_clipped_momentum_reports_its_statistics():
  tx = optax.chain(omc.clipped_momentum(1.0, 0.9), optax.sgd(0.1))
  g = {"w": jnp.array([30.0, 40.0])}
  _, state = tx.update(g, tx.init(g))
  m = omc.metrics(state)
  assert float(m["clipped_momentum/grad_norm"]) == pytest.approx(50.0)
  assert float(m["clipped_momentum/momentum_norm"]) == pytest.approx(5.0, rel=1e-6)
  assert float(m["clipped_momentum/clip_fraction"]) == 1.0


def test_clipped_momentum_zero_gradients_and_zero_threshold_give_zeros():
  tx = omc.clipped_momentum(0.0, 0.9, nu=0.5)
  g = {"w": jnp.zeros(3)}
  u, _ = jax.jit(tx.update)(g, tx.init(g))
  chex.assert_trees_all_equal(u, g)


# normalized_momentum


def test_normalized_momentum_has_unit_norm_in_the_ema_direction():
  ours, states = _run(omc.normalized_momentum(0.9))
  ema, _ = _run(omc.ema_momentum(0.9, debias=False))
  np.testing.assert_allclose(_global_norms(ours), 1.0, rtol=1e-6)
  norms = _global_norms(ema)
  np.testing.assert_allclose(states.momentum_norm, norms, rtol=1e-6)
  expected = jax.tree.map(lambda x: x / norms.reshape((-1,) + (1,) * (x.ndim - 1)), ema)
  chex.assert_trees_all_close(ours, expected, rtol=1e-5, atol=1e-7)


def test_normalized_momentum_of_zero_is_zero():
  tx = omc.normalized_momentum(0.9)
  g = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  u, state = jax.jit(tx.update)(g, tx.init(g))
  chex.assert_trees_all_equal(u, g)
  assert float(state.momentum_norm) == 0.0


# shared


@pytest.mark.parametrize(
  "make",
  [
    lambda dt: omc.clipped_momentum(1.0, 0.9, nu=0.7, accumulator_dtype=dt),
    lambda dt: omc.normalized_momentum(0.9, accumulator_dtype=dt),
  ],
  ids=["clipped_momentum", "normalized_momentum"],
)
def test_bf16_accumulator(make):
  ours, states = _run(make(jnp.bfloat16))
  full, _ = _run(make(None))
  assert all(b.dtype == jnp.bfloat16 for b in jax.tree.leaves(states.momentum_buffer))
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(ours))
  chex.assert_trees_all_close(ours, full, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
  "make",
  [
    lambda ax: omc.clipped_momentum(1.0, 0.9, nu=0.7, axis_name=ax),
    lambda ax: omc.normalized_momentum(0.9, axis_name=ax),
  ],
  ids=["clipped_momentum", "normalized_momentum"],
)
def test_axis_name_gives_the_global_norm_under_shard_map(make):
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  g = {"w": jax.random.normal(jax.random.key(0), (8, 3)) * 3.0}
  tx, tx_sharded = make(None), make("d")

  @jax.jit
  def sharded(g):
    def body(g):
      return tx_sharded.update(g, tx_sharded.init(g))[0]

    spec = PartitionSpec("d")
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,), out_specs=spec)(g)

  chex.assert_trees_all_close(sharded(g), tx.update(g, tx.init(g))[0], rtol=1e-6)


@pytest.mark.parametrize(
  "build,err,match",
  [
    (lambda: omc.clipped_momentum(-1.0), ValueError, r"clipped_momentum: max_norm must be in"),
    (lambda: omc.clipped_momentum(1.0, nu=2.0), ValueError, r"clipped_momentum: nu must be"),
    (lambda: omc.clipped_momentum(1.0, ord=3), ValueError, r"clipped_momentum: ord must be"),
    (lambda: omc.normalized_momentum(eps=0.0), ValueError, r"normalized_momentum: eps must be"),
    (lambda: omc.normalized_momentum(1.5), ValueError, r"normalized_momentum: momentum must"),
    (lambda: omc.normalized_momentum(axis_name=3), TypeError, r"normalized_momentum: axis_name"),
  ],
)
def test_bad_hyperparameters_raise(build, err, match):
  with pytest.raises(err, match=match):
    build()


def test_huge_momentum_is_normalized_and_clipped_not_zeroed():
  g = {"w": jnp.array([1.5e38, -2e38], jnp.float32), "z": jnp.zeros((2,))}  # ‖g‖ = 2.5e38
  for tx, want in [(omc.normalized_momentum(0.0), 1.0), (omc.clipped_momentum(2.0, 0.0), 2.0)]:
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], np.array([0.6, -0.8]) * want, rtol=1e-6)
