"""global_norm and the per-leaf norms against float64 NumPy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_momclip as omc
from optax_momclip import _norms

ORDS = [1, 2, np.inf]


def _np_norm(leaves, ord):
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
  return np.linalg.norm(flat, ord=ord)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_matches_float64_numpy(dtype, ord):
  rng = np.random.default_rng(0)
  tree = {
    "a": jnp.asarray(rng.normal(size=(17, 5)) * 3, dtype),
    "b": [jnp.asarray(rng.normal(size=(7,)), dtype), jnp.asarray(2.5, dtype)],
  }
  got = omc.global_norm(tree, ord=ord)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_norm(jax.tree.leaves(tree), ord), rtol=2e-6)


def test_float16_sum_of_squares_does_not_overflow():
  g = {"w": jnp.full((4,), 300.0, jnp.float16)}  # 4 * 300^2 = 360000 > f16 max 65504
  assert np.isinf(optax.tree.norm(g))  # why this library exists
  assert omc.global_norm(g) == 600.0


def test_bfloat16_norm_is_exact_in_float32():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4096,)).astype(ml_dtypes.bfloat16)
  want = np.linalg.norm(x.astype(np.float64))
  np.testing.assert_allclose(omc.global_norm({"x": jnp.asarray(x)}), want, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e30, 1e-25, 1e-41])
def test_huge_and_tiny_norms_are_exact(scale):
  x = np.array([3.0, 4.0, 12.0], np.float64) * scale
  got = omc.global_norm({"x": jnp.asarray(x, jnp.float32), "y": jnp.zeros((2,))})
  want = np.linalg.norm(x.astype(np.float32).astype(np.float64))
  if scale < 1e-38:  # float32 subnormals flush to zero on XLA:CPU; the norm is then 0
    assert got == 0.0 or np.isclose(got, want, rtol=1e-5)
  else:
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_huge_norm_per_leaf_is_exact():
  x = jnp.asarray([3e30, 4e30], jnp.float32)
  np.testing.assert_allclose(_norms.leaf_norm(x), 5e30, rtol=1e-6)
  np.testing.assert_allclose(_norms.tree_norms({"x": x[None]}, axis=0)["x"], [3e30, 4e30])


@pytest.mark.parametrize(
  "values, want",
  [([np.nan, 1.0], np.nan), ([np.inf, 1.0], np.inf), ([-np.inf, 1.0], np.inf)],
)
@pytest.mark.parametrize("ord", ORDS)
def test_nonfinite_values_give_nonfinite_norm(values, want, ord):
  got = omc.global_norm({"x": jnp.asarray(values)}, ord=ord)
  np.testing.assert_equal(np.asarray(got), want)


def test_none_leaves_masked_nodes_and_empty_trees():
  tree = {"a": jnp.array([3.0]), "b": None, "c": optax.MaskedNode(), "d": jnp.array([4.0])}
  assert omc.global_norm(tree) == 5.0
  assert omc.global_norm({}) == 0.0
  assert omc.global_norm({}).dtype == jnp.float32
  assert omc.global_norm({"z": jnp.zeros((3, 3))}) == 0.0


def test_float64_stays_float64_under_x64():
  with jax.enable_x64(True):
    x = jnp.asarray([1e200, 1e200], jnp.float64)  # squares overflow float64
    got = omc.global_norm({"x": x})
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, np.sqrt(2) * 1e200, rtol=1e-12)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"global_norm: ord must be one of 1, 2 or inf, got 3"):
    omc.global_norm({"x": jnp.ones(2)}, ord=3)
  with pytest.raises(TypeError, match="global_norm: axis_name"):
    omc.global_norm({"x": jnp.ones(2)}, axis_name=0)


@pytest.mark.parametrize("ord", ORDS)
def test_shard_map_axis_name_gives_the_global_norm(ord):
  mesh = jax.make_mesh((8,), ("d",))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(32, 3)), jnp.float32)
  sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
  local = jax.jit(
    jax.shard_map(lambda t: omc.global_norm(t)[None], mesh=mesh, in_specs=P("d"), out_specs=P("d"))
  )
  total = jax.jit(
    jax.shard_map(
      lambda t: omc.global_norm(t, ord=ord, axis_name="d"),
      mesh=mesh,
      in_specs=P("d"),
      out_specs=P(),
    )
  )
  np.testing.assert_allclose(total(sharded), _np_norm([x], ord), rtol=1e-6)
  per_shard = np.asarray(local(sharded))  # without axis_name: one norm per shard
  assert per_shard.shape == (8,)
  np.testing.assert_allclose(per_shard[0], np.linalg.norm(np.asarray(x[:4]).ravel()), rtol=1e-6)


def test_shard_map_overflow_rescue_is_global():
  mesh = jax.make_mesh((8,), ("d",))
  x = jnp.arange(1.0, 17.0) * 1e25
  sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
  f = jax.shard_map(
    lambda t: omc.global_norm(t, axis_name="d"), mesh=mesh, in_specs=P("d"), out_specs=P()
  )
  np.testing.assert_allclose(
    jax.jit(f)(sharded), np.linalg.norm(np.arange(1.0, 17.0)) * 1e25, rtol=1e-6
  )


def test_tree_norms_with_axis_follow_numpy():
  rng = np.random.default_rng(3)
  tree = {"k": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.ones((3,)), "s": None}
  got = _norms.tree_norms(tree, axis=0, keepdims=True)
  np.testing.assert_allclose(
    got["k"], np.linalg.norm(np.asarray(tree["k"]), axis=0, keepdims=True), rtol=1e-6
  )
  np.testing.assert_allclose(got["b"], [np.sqrt(3.0)], rtol=1e-6)  # one unit
  assert got["s"] is None
  assert _norms.unit_axes(4) == (0, 1, 2)
  assert _norms.unit_axes(1) is None


@settings(max_examples=40, deadline=None)
@given(
  st.lists(
    st.lists(st.floats(-1e6, 1e6, width=32, allow_subnormal=False), min_size=1, max_size=9),
    min_size=1,
    max_size=4,
  )
)
def test_property_equals_numpy_on_random_trees(leaves):
  tree = [jnp.asarray(x, jnp.float32) for x in leaves]
  np.testing.assert_allclose(omc.global_norm(tree), _np_norm(tree, 2), rtol=2e-6, atol=1e-30)


def _many_small_leaves(scale=1.0):
  rng = np.random.default_rng(7)
  shapes = [(8,), (4, 8), (16, 4), (2, 3, 4)]
  tree = [jnp.asarray(rng.normal(size=shapes[i % 4]) * scale, jnp.float32) for i in range(120)]
  tree.append(jnp.asarray(rng.normal(size=(300, 256)) * scale, jnp.float32))  # above the cap
  tree.append(jnp.asarray(rng.normal(size=(8,)) * scale, jnp.bfloat16))  # own dtype group
  return tree


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-25])
def test_small_leaves_summed_stacked_give_the_exact_norm(scale):
  tree = _many_small_leaves(scale)
  want = _np_norm([np.asarray(x, np.float32) for x in tree], 2)
  np.testing.assert_allclose(jax.jit(omc.global_norm)(tree), want, rtol=1e-6)

  # One reduction per stack, not per leaf: 4 shapes + the big leaf + the bf16 leaf.
  jaxpr = jax.make_jaxpr(omc.global_norm)(tree).jaxpr
  top = [e for e in jaxpr.eqns if e.primitive.name == "reduce_sum"]
  assert len(top) == 6
  stacked = sorted(e.invars[0].aval.shape for e in top if len(e.invars[0].aval.shape) > 1)
  assert ((30, 2, 3, 4) in stacked) and ((30, 4, 8) in stacked)


def test_stacks_are_capped_and_big_leaves_stay_alone():
  cap, each = _norms._STACK_ELEMENTS, _norms._STACK_LEAF_ELEMENTS
  small = [jnp.zeros((each,)) for _ in range(cap // each + 3)]
  big = jnp.zeros((each + 1,))
  parts = _norms._stacked_small_leaves([*small, big])
  assert [p.shape for p in parts] == [big.shape, (cap // each, each), (3, each)]


def test_stacked_leaves_sharded_alike_need_no_collective_but_an_all_reduce():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  rng = np.random.default_rng(8)
  tree = [jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) for _ in range(6)]
  sharded = [jax.device_put(x, NamedSharding(mesh, P("data", "model"))) for x in tree]
  norm = jax.jit(omc.global_norm)
  assert "f32[6,16,8]" in str(jax.make_jaxpr(omc.global_norm)(tree))  # the six are one stack
  np.testing.assert_allclose(norm(sharded), _np_norm(tree, 2), rtol=1e-6)
  hlo = norm.lower(sharded).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" not in hlo
  assert "all-reduce" in hlo


def test_small_leaves_sharded_differently_are_not_stacked():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  rng = np.random.default_rng(9)
  tree = [jnp.asarray(rng.normal(size=(16, 16)), jnp.float32) for _ in range(2)]
  tree += [jnp.asarray(rng.normal(size=(16,)), jnp.float32) for _ in range(2)]
  specs = [P("data", "model"), P("model", "data"), P(), P("model")]
  sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(tree, specs, strict=True)]
  np.testing.assert_allclose(jax.jit(omc.global_norm)(sharded), _np_norm(tree, 2), rtol=1e-6)


def test_zero_size_leaves_count_for_nothing():
  tree = {"e": jnp.zeros((0,)), "f": jnp.zeros((3, 0)), "x": jnp.array([3.0, 4.0])}
  assert omc.global_norm(tree) == 5.0
  assert omc.global_norm({"e": jnp.zeros((0,))}) == 0.0
  assert omc.global_norm(tree, ord=np.inf) == 4.0
