"""Every public transformation passes the same contract (DESIGN §4, STYLE 'Tests')."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from registry import CASES, NOT_TRANSFORMS, Case

import optax_momclip as omc

IDS = [c.name for c in CASES]


def _params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "dense": {
      "kernel": jax.random.normal(k[0], (3, 4), dtype),
      "bias": jax.random.normal(k[1], (4,), dtype) * 0.1,
    },
    "scale": jnp.asarray(1.5, dtype),
  }


def _grads(step, dtype=jnp.float32):
  """Gradients of varying size so clips engage on some steps and not others."""
  k = jax.random.split(jax.random.fold_in(jax.random.key(1), step), 3)
  size = 0.3 + 2.0 * (step % 3)
  return {
    "dense": {
      "kernel": (jax.random.normal(k[0], (3, 4)) * size).astype(dtype),
      "bias": (jax.random.normal(k[1], (4,)) * size).astype(dtype),
    },
    "scale": (jax.random.normal(k[2], ()) * size).astype(dtype),
  }


def _run(tx, steps, dtype=jnp.float32, params=None, jit=True):
  params = _params(dtype) if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  outs = []
  for t in range(steps):
    u, state = update(_grads(t, dtype), state, params)
    outs.append(u)
  return outs, state


def _dtypes(tree):
  return jax.tree.map(lambda x: (jnp.asarray(x).shape, jnp.asarray(x).dtype), tree)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_and_eager_agree(case: Case):
  eager, s1 = _run(case.make(), 3, jit=False)
  jitted, s2 = _run(case.make(), 3, jit=True)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s1, s2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_transform_does_work(case: Case):
  """The contract settings must change some update, or the other checks prove little."""
  outs, _ = _run(case.make(), 3)
  changed = [
    not np.allclose(np.asarray(a), np.asarray(b))
    for out, t in zip(outs, range(3), strict=True)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(_grads(t)), strict=True)
  ]
  assert any(changed)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scan_matches_loop(case: Case):
  tx = case.make()
  params = _params()
  grads = [_grads(t) for t in range(4)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *grads)

  def body(state, g):
    u, state = tx.update(g, state, params)
    return state, u

  final, us = jax.lax.scan(body, tx.init(params), stacked)
  loop_us, loop_state = _run(case.make(), 4, params=params)
  chex.assert_trees_all_close(us, jax.tree.map(lambda *x: jnp.stack(x), *loop_us), rtol=1e-6)
  chex.assert_trees_all_close(final, loop_state, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dtypes_are_stable(case: Case, dtype):
  tx = case.make()
  params = _params(dtype)
  state = tx.init(params)
  before = _dtypes(state)
  for t in range(2):
    u, state = jax.jit(tx.update)(_grads(t, dtype), state, params)
    assert _dtypes(u) == _dtypes(_grads(t, dtype))
    assert _dtypes(state) == before


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lax_cond_accepts_the_state(case: Case):
  tx = case.make()
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(pred, g, state):
    return jax.lax.cond(pred, lambda: tx.update(g, state, params), lambda: (g, state))

  _, s = step(True, _grads(0), state)
  _, s = step(False, _grads(1), s)
  chex.assert_trees_all_equal_structs(s, state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_recompile_on_second_step(case: Case):
  tx = case.make()
  params = _params()
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(3):
    _, state = update(_grads(t), state, params)
  assert update._cache_size() == 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_initial_state_can_be_donated(case: Case):
  """No two state leaves share a buffer, so a jitted step can donate the state from init."""
  tx = case.make()
  params = _params()
  state = tx.init(params)
  leaves = jax.tree.leaves(state)
  assert len({id(x) for x in leaves}) == len(leaves)
  _, new = jax.jit(tx.update, donate_argnums=1)(_grads(0), state, params)
  assert _dtypes(new) == _dtypes(tx.init(params))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inject_hyperparams(case: Case):
  tx = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.numeric)
  plain = case.factory(**case.numeric)
  injected, s_inj = _run(tx, 3)
  expected, _ = _run(plain, 3)
  chex.assert_trees_all_close(injected, expected, rtol=1e-6, atol=1e-7)
  assert _dtypes(s_inj) == _dtypes(tx.init(_params()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_multisteps(case: Case):
  tx = optax.MultiSteps(case.make(), every_k_schedule=2)
  outs, state = _run(tx, 4)
  zero = jax.tree.map(jnp.zeros_like, outs[0])
  chex.assert_trees_all_equal(outs[0], zero)  # accumulating
  expected_state = case.make().init(_params())
  assert _dtypes(state.inner_opt_state) == _dtypes(expected_state)
  assert int(state.gradient_step) == 2


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_dtype_struct_init(case: Case):
  tx = case.make()
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert _dtypes(tx.init(abstract)) == _dtypes(tx.init(params))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_none_leaves(case: Case):
  tx = case.make()
  params = {"a": jnp.ones((2, 3)), "b": None}
  grads = {"a": jnp.full((2, 3), 3.0), "b": None}
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert u["b"] is None
  assert u["a"].shape == (2, 3)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_empty_tree(case: Case):
  tx = case.make()
  u, _ = jax.jit(tx.update)({}, tx.init({}), {})
  assert u == {}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_masked_node_via_optax_masked(case: Case):
  tx = optax.masked(case.make(), {"dense": {"kernel": True, "bias": False}, "scale": True})
  outs, _ = _run(tx, 2)
  chex.assert_trees_all_equal(outs[1]["dense"]["bias"], _grads(1)["dense"]["bias"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nnx_state_container(case: Case):
  tx = case.make()
  params = nnx.State(_params())
  grads = nnx.State(_grads(0))
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert isinstance(u, nnx.State)
  plain, _ = _run(case.make(), 1)
  chex.assert_trees_all_close(jax.tree.leaves(u), jax.tree.leaves(plain[0]), rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_extra_kwargs_accepted(case: Case):
  tx = case.make()
  params = _params()
  u, _ = tx.update(_grads(0), tx.init(params), params, loss=jnp.float32(1.0), step=3)
  assert jax.tree.structure(u) == jax.tree.structure(_grads(0))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_over_seeds(case: Case):
  tx = case.make()
  params = _params()
  grads = jax.tree.map(lambda *x: jnp.stack(x), *[_grads(t) for t in range(3)])
  states = jax.vmap(lambda _: tx.init(params))(jnp.arange(3))
  us, _ = jax.vmap(lambda g, s: tx.update(g, s, params))(grads, states)
  for t in range(3):
    single, _ = tx.update(_grads(t), tx.init(params), params)
    row = jax.tree.map(lambda x, t=t: x[t], us)
    chex.assert_trees_all_close(row, single, rtol=1e-6, atol=1e-7)


def test_registry_covers_every_public_transformation():
  public = {n for n in omc.__all__ if n[0].islower()} - NOT_TRANSFORMS
  assert public == {c.name for c in CASES}
