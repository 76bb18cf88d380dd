"""clip_by_value, clip_by_norm and clip_by_global_norm against NumPy, optax and invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_momclip as omc


def _tree(seed=0, scale=3.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.normal(size=(6, 4)) * scale, dtype),
    "b": [jnp.asarray(rng.normal(size=(4,)) * scale, dtype), jnp.asarray(scale, dtype)],
  }


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _np_clip_global(tree, max_norm, min_norm=0.0):
  flat = _flat(tree)
  norm = np.linalg.norm(flat)
  target = min(max(norm, min_norm), max_norm) if norm > 0 else 0.0
  scale = target / norm if norm > 0 else 1.0
  return jax.tree.map(lambda x: np.asarray(x, np.float64) * scale, tree), norm, scale


@pytest.mark.parametrize("max_norm, min_norm", [(1.0, 0.0), (100.0, 50.0), (100.0, 0.0), (5, 5)])
def test_clip_by_global_norm_matches_numpy(max_norm, min_norm):
  g = _tree()
  tx = omc.clip_by_global_norm(max_norm, min_norm=min_norm)
  u, state = jax.jit(tx.update)(g, tx.init(g))
  want, norm, scale = _np_clip_global(g, max_norm, min_norm)
  chex.assert_trees_all_close(u, want, rtol=1e-6)
  np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-6)
  np.testing.assert_allclose(state.clip_scale, scale, rtol=1e-6)
  assert state.clip_threshold == max_norm
  assert state.count == 1
  assert state.steps_clipped == int(not np.isclose(scale, 1.0))


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_by_global_norm_equals_optax(max_norm):
  g = _tree()
  tx = omc.clip_by_global_norm(max_norm)
  ours, _ = tx.update(g, tx.init(g))
  theirs, _ = optax.clip_by_global_norm(max_norm).update(g, None)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)


def test_clip_by_value_equals_optax_clip():
  g = _tree(scale=2.0)
  tx = omc.clip_by_value(0.7)
  ours, state = tx.update(g, tx.init(g))
  theirs, _ = optax.clip(0.7).update(g, None)
  chex.assert_trees_all_equal(ours, theirs)
  np.testing.assert_allclose(state.grad_norm, np.abs(_flat(g)).max(), rtol=1e-7)
  assert state.steps_clipped == 1
  _, state = tx.update(jax.tree.map(lambda x: x * 0 + 0.1, g), state)
  assert (state.count, state.steps_clipped) == (2, 1)


def test_clip_by_value_asymmetric_bounds():
  tx = omc.clip_by_value(1.0, min_value=-0.25)
  u, _ = tx.update({"x": jnp.array([-3.0, -0.1, 0.5, 4.0])}, tx.init(None))
  np.testing.assert_array_equal(u["x"], np.float32([-0.25, -0.1, 0.5, 1.0]))


@pytest.mark.parametrize("axis", [None, 0, (0, 1)])
def test_clip_by_norm_matches_numpy(axis):
  rng = np.random.default_rng(4)
  g = {"k": jnp.asarray(rng.normal(size=(3, 5, 2)) * 2, jnp.float32), "v": jnp.ones((4,)) * 3}
  tx = omc.clip_by_norm(1.5, min_norm=0.5, axis=axis)
  u, state = jax.jit(tx.update)(g, tx.init(g))
  for name in g:
    x = np.asarray(g[name], np.float64)
    ax = axis if x.ndim > max(np.atleast_1d(axis if axis is not None else 0)) else None
    n = np.linalg.norm(x.reshape(-1) if ax is None else x, axis=ax, keepdims=ax is not None)
    n = n if ax is not None or axis is None else np.reshape(n, (1,) * x.ndim)
    want = x * np.clip(n, 0.5, 1.5) / n
    np.testing.assert_allclose(u[name], want, rtol=1e-6)
    np.testing.assert_allclose(state.grad_norm[name], n, rtol=1e-6)
  assert state.steps_clipped == 1


def test_global_norm_schedule_is_evaluated_on_count():
  tx = omc.clip_by_global_norm(lambda step: 1.0 + step)
  g = {"x": jnp.array([30.0, 40.0])}
  state = tx.init(g)
  step = jax.jit(tx.update)
  for t in range(3):
    u, state = step(g, state)
    np.testing.assert_allclose(omc.global_norm(u), 1.0 + t, rtol=1e-6)
    assert state.clip_threshold == 1.0 + t


# ---- invariants over random trees ------------------------------------------------------------

_leaf = st.lists(st.floats(-1e4, 1e4, width=32, allow_subnormal=False), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(st.lists(_leaf, min_size=1, max_size=3), st.floats(0.01, 100.0), st.floats(0.0, 1.0))
def test_property_global_norm_lands_in_range_direction_kept_idempotent(leaves, max_norm, frac):
  g = [jnp.asarray(x, jnp.float32) for x in leaves]
  min_norm = frac * max_norm
  tx = omc.clip_by_global_norm(max_norm, min_norm=min_norm)
  u, _ = tx.update(g, tx.init(g))
  n_in, n_out = float(omc.global_norm(g)), float(omc.global_norm(u))
  assert n_out <= max_norm * (1 + 1e-6)
  if n_in > 1e-30:
    assert n_out >= min_norm * (1 - 1e-6)
    cos = _flat(u) @ _flat(g) / (np.linalg.norm(_flat(u)) * np.linalg.norm(_flat(g)))
    assert cos > 1 - 1e-6 or n_out == 0.0
  else:
    chex.assert_trees_all_equal(u, g)  # zero stays zero
  u2, _ = tx.update(u, tx.init(u))
  chex.assert_trees_all_close(u2, u, rtol=2e-6, atol=1e-30)


@settings(max_examples=40, deadline=None)
@given(st.lists(_leaf, min_size=1, max_size=3), st.floats(0.01, 100.0))
def test_property_clip_by_norm_bounds_every_leaf(leaves, max_norm):
  g = [jnp.asarray(x, jnp.float32) for x in leaves]
  tx = omc.clip_by_norm(max_norm)
  u, _ = tx.update(g, tx.init(g))
  for a, b in zip(u, g, strict=True):
    assert np.linalg.norm(np.asarray(a)) <= max_norm * (1 + 1e-6)
    if np.linalg.norm(np.asarray(b)) <= max_norm:
      np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(st.lists(_leaf, min_size=1, max_size=3), st.floats(0.0, 10.0), st.floats(0.0, 10.0))
def test_property_value_clip_bounds(leaves, hi, width):
  assume(width <= hi + 10)
  g = [jnp.asarray(x, jnp.float32) for x in leaves]
  lo = hi - width
  u, _ = omc.clip_by_value(hi, min_value=lo).update(g, omc.clip_by_value(hi).init(g))
  for a, b in zip(u, g, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert np.all(a <= np.float32(hi)) and np.all(a >= np.float32(lo))
    inside = (b <= np.float32(hi)) & (b >= np.float32(lo))
    np.testing.assert_array_equal(a[inside], b[inside])


# ---- edge values -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_zero_gradients_stay_zero_and_finite(max_norm):
  g = {"x": jnp.zeros((3,)), "y": jnp.zeros(())}
  for tx in [omc.clip_by_global_norm(max_norm, min_norm=0.0), omc.clip_by_norm(max_norm)]:
    u, state = tx.update(g, tx.init(g))
    chex.assert_trees_all_equal(u, g)
    assert not state.steps_clipped


def test_max_norm_zero_gives_zeros_not_nan():
  g = _tree()
  u, state = omc.clip_by_global_norm(0.0).update(g, omc.clip_by_global_norm(0.0).init(g))
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, g))
  assert state.clip_scale == 0.0
  zeros = jax.tree.map(jnp.zeros_like, g)
  assert np.all(np.isnan(_flat(optax.clip_by_global_norm(0.0).update(zeros, None)[0])))
  u, _ = omc.clip_by_global_norm(0.0).update(zeros, omc.clip_by_global_norm(0.0).init(zeros))
  chex.assert_trees_all_equal(u, zeros)


def test_float16_gradients_whose_sum_of_squares_overflows():
  g = {"w": jnp.full((4,), 300.0, jnp.float16)}
  tx = omc.clip_by_global_norm(1.0)
  u, state = tx.update(g, tx.init(g))
  assert u["w"].dtype == jnp.float16
  np.testing.assert_array_equal(u["w"], np.full((4,), 0.5, np.float16))
  assert state.grad_norm == 600.0
  theirs, _ = optax.clip_by_global_norm(1.0).update(g, None)
  np.testing.assert_array_equal(theirs["w"], 0.0)  # optax: inf norm, all zeros


def test_bfloat16_gradients_with_a_float32_array_max_norm():
  g = _tree(dtype=jnp.bfloat16)
  tx = omc.clip_by_global_norm(jnp.asarray(2.0, jnp.float32))
  u, state = jax.jit(tx.update)(g, tx.init(g))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  np.testing.assert_allclose(omc.global_norm(u), 2.0, rtol=1e-2)  # bf16 rounding of the output
  want, norm, _ = _np_clip_global(g, 2.0)
  np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-6)  # exact f32 norm of bf16 input
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x.astype(jnp.float32), u), want, rtol=8e-3, atol=1e-6
  )


def test_huge_gradients_are_clipped_not_zeroed():
  g = {"x": jnp.asarray([3e30, 4e30], jnp.float32)}
  u, state = omc.clip_by_global_norm(1.0).update(g, omc.clip_by_global_norm(1.0).init(g))
  np.testing.assert_allclose(u["x"], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(state.grad_norm, 5e30, rtol=1e-6)


def test_tiny_gradients_are_raised_to_min_norm():
  g = {"x": jnp.asarray([3e-25, 4e-25], jnp.float32)}
  tx = omc.clip_by_global_norm(10.0, min_norm=1.0)
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(u["x"], [0.6, 0.8], rtol=1e-6)


def _ulps(got, want):
  return abs(float(got) - want) / float(np.spacing(np.float32(want)))


def test_a_norm_of_1e38_is_clipped_to_exactly_max_norm_direction_kept():
  g = {"w": jnp.array([1e38, -1e38], jnp.float32)}
  tx = omc.clip_by_global_norm(1.0)
  u, state = tx.update(g, tx.init(g))
  half = np.float32(np.sqrt(0.5))
  np.testing.assert_array_equal(u["w"], [half, -half])  # the correctly rounded 1e38 / ‖g‖
  assert _ulps(np.linalg.norm(np.asarray(u["w"], np.float64)), 1.0) <= 1
  assert _ulps(state.grad_norm, np.sqrt(2.0) * float(np.float32(1e38))) <= 1
  assert int(state.steps_clipped) == 1 and float(state.clip_scale) < 1e-38
  u, _ = omc.clip_by_norm(1.0).update({"w": jnp.array([1e38])}, omc.clip_by_norm(1.0).init(g))
  np.testing.assert_array_equal(u["w"], [1.0])


@pytest.mark.parametrize("exponent", [*range(-123, 128, 6), 127])
def test_every_clip_lands_on_its_bound_at_any_magnitude(exponent):
  """Norms from float32's smallest normal to its largest: the bound, to the ulp, never 0 or inf."""
  g = {"a": jnp.asarray(np.array([3.0, -4.0]) * 2.0**exponent / 8, jnp.float32), "b": jnp.zeros(3)}
  norm = 5.0 * 2.0**exponent / 8
  for hi, lo in [(1.0, 0.0), (1e30, 1e-30), (3e38, 2.0**-100), (3e38, 1e30)]:
    want = min(max(norm, lo), hi)
    for tx in [omc.clip_by_global_norm(hi, min_norm=lo), omc.clip_by_norm(hi, min_norm=lo)]:
      u, _ = tx.update(g, tx.init(g))
      got = np.linalg.norm(np.asarray(u["a"], np.float64))
      assert _ulps(got, want) <= 2, (tx, hi, lo, got, want)
      np.testing.assert_array_equal(np.sign(u["a"]), [1.0, -1.0])


def test_compiled_clips_land_on_their_bound_at_any_magnitude():
  """As above, through jit: XLA once rewrote an exactly-one factor into power², which flushed."""
  for hi, lo in [(1.0, 0.0), (3e38, 1e30)]:
    for tx in [omc.clip_by_global_norm(hi, min_norm=lo), omc.clip_by_norm(hi, min_norm=lo)]:
      update = jax.jit(tx.update)
      for exponent in [-123, -60, 0, 60, 120, 127]:
        g = {"a": jnp.asarray(np.array([3.0, -4.0]) * 2.0**exponent / 8, jnp.float32)}
        want = min(max(5.0 * 2.0**exponent / 8, lo), hi)
        u, _ = update(g, tx.init(g))
        got = np.linalg.norm(np.asarray(u["a"], np.float64))
        assert _ulps(got, want) <= 2, (tx, hi, lo, exponent, got, want)


def _beyond():
  """Finite float32 elements whose norm, about 7.3e38, float32 cannot hold."""
  return {"a": jnp.full((3, 2), 3e38, jnp.float32), "b": jnp.array([1.0, -2.0], jnp.float32)}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_norm_beyond_float32_is_clipped_exactly_not_passed_on(jit):
  g = _beyond()
  flat = _flat(g)
  want = jax.tree.map(lambda x: np.asarray(x, np.float64) / np.linalg.norm(flat), g)
  for tx in [
    omc.clip_by_global_norm(1.0),
    omc.clip_by_global_norm(1.0, nonfinite="zero"),
    omc.clip_by_global_norm(1.0, min_norm=0.5),
  ]:
    update = jax.jit(tx.update) if jit else tx.update
    u, state = update(g, tx.init(g))
    for k in g:
      # "b" comes out below float32's smallest normal number: flushed to zero on XLA:CPU
      np.testing.assert_allclose(np.asarray(u[k], np.float64), want[k], rtol=3e-7, atol=2e-38)
    assert np.isinf(state.grad_norm) and int(state.steps_clipped) == 1  # beyond float32
  tx = omc.clip_by_norm(1.0)
  u, state = (jax.jit(tx.update) if jit else tx.update)(g, tx.init(g))
  for k in g:
    x = np.asarray(g[k], np.float64)
    np.testing.assert_allclose(np.asarray(u[k]), x / np.linalg.norm(x), rtol=3e-7)
  assert np.isinf(state.grad_norm["a"])


def _direction(tree):
  flat = _flat(tree)
  return flat / np.linalg.norm(flat)


def test_every_norm_clip_divides_by_a_norm_beyond_float32_exactly():
  """Transformations that clip by a norm, fed finite elements whose norm overflows float32:
  each lands on the bound it had for that step, direction kept (the old code passed them on)."""
  g = _beyond()
  ones = {k: jnp.ones_like(v) for k, v in g.items()}
  cases = {
    "momclip_sgd": (omc.momclip_sgd(1.0, 0.0, max_norm=1.0), [], -1.0),
    "clipped_momentum": (omc.clipped_momentum(1.0), [], 1.0),
    "normalized_momentum": (omc.normalized_momentum(0.9), [], 1.0),
    "adagc, warm-up": (omc.adagc(), [], 1.0),  # the global clip at lambda_abs
    "autoclip": (omc.autoclip(50.0), [ones] * 5, 1.0),  # the median of norms of 2.83
    "zclip": (omc.zclip(warmup_steps=5), [ones] * 30, 1.0),  # a spike: clipped to mu
  }
  for name, (tx, before, sign) in cases.items():
    update = jax.jit(tx.update)
    state = tx.init(g)
    for i, h in enumerate(before):
      _, state = update(jax.tree.map(lambda x, i=i: x * (1 + 0.01 * (i % 3)), h), state, g)
    u, state = update(g, state, g)
    want = {"autoclip": np.linalg.norm(_flat(ones)) * 1.01, "zclip": None}.get(name, 1.0)
    got = np.linalg.norm(_flat(u))
    assert np.isfinite(got) and got > 0, (name, got)
    if want is not None:
      assert got == pytest.approx(want, rel=2e-2 if name == "autoclip" else 1e-5), (name, got)
    else:
      assert got < 4.0, (name, got)  # near the mean norm of what came before (2.85)
    np.testing.assert_allclose(sign * _direction(u), _direction(g), atol=1e-6, err_msg=name)
  corrected = {"w": jnp.full((3, 2), 1e38, jnp.float32)}  # c = 1.475e38 each: ‖c‖ = 3.6e38
  c, _ = jax.jit(omc.mars().update)(corrected, omc.mars().init(corrected))
  np.testing.assert_allclose(np.asarray(c["w"]), np.full((3, 2), 1 / np.sqrt(6)), rtol=1e-6)


@pytest.mark.parametrize(
  "hyper", [{"max_value": -1.0}, {"max_value": np.nan}], ids=["negative", "nan"]
)
def test_clip_by_value_zeroes_rather_than_flips_under_an_out_of_range_schedule(hyper):
  g = {"w": jnp.array([150.0, -200.0, 0.5])}
  tx = optax.inject_hyperparams(omc.clip_by_value)(max_value=1.0)
  state = tx.init(g)
  state.hyperparams.update({k: jnp.float32(v) for k, v in hyper.items()})
  u, _ = jax.jit(tx.update)(g, state)
  np.testing.assert_array_equal(u["w"], [0.0, 0.0, 0.0])
  tx = optax.inject_hyperparams(omc.clip_by_value)(max_value=1.0, min_value=-1.0)
  for lo, hi in [(2.0, 1.0), (np.nan, 1.0), (-1.0, np.nan)]:  # crossed, or NaN: no interval
    state = tx.init(g)
    state.hyperparams.update({"min_value": jnp.float32(lo), "max_value": jnp.float32(hi)})
    u, _ = jax.jit(tx.update)(g, state)
    np.testing.assert_array_equal(u["w"], [0.0, 0.0, 0.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_policies(bad):
  g = {"x": jnp.array([bad, 1.0, 2.0]), "y": jnp.array([5.0])}
  prop = omc.clip_by_global_norm(1.0, nonfinite="propagate")
  u, state = prop.update(g, prop.init(g))
  chex.assert_trees_all_equal(u, g)  # unscaled: the problem stays visible
  assert state.clip_scale == 1.0 and state.steps_clipped == 0
  assert not np.isfinite(state.grad_norm)
  zero = omc.clip_by_global_norm(1.0, nonfinite="zero")
  u, state = zero.update(g, zero.init(g))
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, g))
  assert state.clip_scale == 0.0 and state.steps_clipped == 1


def test_nonfinite_leaf_in_clip_by_norm_only_leaves_that_leaf_unscaled():
  g = {"x": jnp.array([np.nan, 1.0]), "y": jnp.array([30.0, 40.0])}
  u, _ = omc.clip_by_norm(1.0).update(g, omc.clip_by_norm(1.0).init(g))
  assert np.isnan(u["x"][0])
  np.testing.assert_allclose(u["y"], [0.6, 0.8], rtol=1e-6)


# ---- errors ------------------------------------------------------------------------------------

BAD = [
  (
    omc.clip_by_global_norm,
    (-1.0,),
    {},
    ValueError,
    r"clip_by_global_norm: max_norm must be "
    r"in \[0, inf\], got -1.0",
  ),
  (omc.clip_by_global_norm, (np.nan,), {}, ValueError, r"max_norm must be in .*got nan"),
  (omc.clip_by_global_norm, ("1",), {}, TypeError, r"max_norm must be a real number.*'1'"),
  (omc.clip_by_global_norm, (True,), {}, TypeError, r"max_norm must be a real number"),
  (omc.clip_by_global_norm, (jnp.ones(2),), {}, TypeError, r"max_norm.*shape \(2,\)"),
  (
    omc.clip_by_global_norm,
    (1.0,),
    {"min_norm": 2.0},
    ValueError,
    r"min_norm must be <= max_norm, got min_norm=2.0 > max_norm=1.0",
  ),
  (omc.clip_by_global_norm, (1.0,), {"min_norm": -0.5}, ValueError, r"min_norm .* got -0.5"),
  (omc.clip_by_global_norm, (1.0,), {"ord": 3}, ValueError, r"ord must be None, 1, 2 or inf"),
  (omc.clip_by_global_norm, (1.0,), {"ord": jnp.ones(2)}, TypeError, r"ord picks a code path"),
  (
    omc.clip_by_global_norm,
    (1.0,),
    {"nonfinite": "skip"},
    ValueError,
    r"nonfinite must be one of \('propagate', 'zero'\), got 'skip'",
  ),
  (omc.clip_by_global_norm, (1.0,), {"axis_name": 3}, TypeError, r"axis_name must be"),
  (omc.clip_by_norm, (-2.0,), {}, ValueError, r"clip_by_norm: max_norm .*got -2.0"),
  (omc.clip_by_norm, (1.0,), {"axis": "0"}, TypeError, r"clip_by_norm: axis must be"),
  (omc.clip_by_norm, (1.0,), {"min_norm": 3.0}, ValueError, r"min_norm must be <= max_norm"),
  (omc.clip_by_value, (-1.0,), {}, ValueError, r"clip_by_value: max_value .*got -1.0"),
  (omc.clip_by_value, (1.0,), {"min_value": 2.0}, ValueError, r"min_value must be <= max_value"),
  (omc.clip_by_value, (None,), {}, TypeError, r"clip_by_value: max_value must be a real number"),
]


@pytest.mark.parametrize("factory, args, kwargs, exc, msg", BAD)
def test_bad_hyperparameters_raise_naming_them(factory, args, kwargs, exc, msg):
  with pytest.raises(exc, match=msg):
    factory(*args, **kwargs)


def test_negative_value_clip_bounds_are_fine_when_min_value_given():
  tx = omc.clip_by_value(-1.0, min_value=-2.0)
  u, _ = tx.update({"x": jnp.array([0.0, -5.0])}, tx.init(None))
  np.testing.assert_array_equal(u["x"], [-1.0, -2.0])


def test_tree_mismatch_names_the_transform_and_path():
  params = {"dense": {"kernel": jnp.ones((3, 4))}}
  tx = omc.clip_by_norm(1.0)
  state = tx.init(params)
  with pytest.raises(
    AssertionError, match=r"clip_by_norm: .*only in updates: \[\"\['dense'\]\['bias'\]"
  ):
    jax.jit(tx.update)({"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}, state)
  tx = omc.clip_by_norm(1.0, axis=0)
  state = tx.init(params)
  with pytest.raises(
    AssertionError,
    match=r"clip_by_norm: updates\['dense'\]\['kernel'\]: "
    r"shape \(4, 3\) does not match the state's \(1, 4\)",
  ):
    jax.jit(tx.update)({"dense": {"kernel": jnp.ones((4, 3))}}, state)


# ---- sharding ----------------------------------------------------------------------------------


def test_jit_with_named_sharding_equals_unsharded():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  g = {
    "w": jnp.asarray(np.random.default_rng(5).normal(size=(16, 8)), jnp.float32),
    "b": jnp.arange(8.0),
  }
  specs = {"w": P("data", "model"), "b": P("model")}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), g, specs)
  tx = omc.clip_by_global_norm(1.0)
  u_sharded, s_sharded = jax.jit(tx.update)(sharded, tx.init(g))
  u, s = tx.update(g, tx.init(g))
  chex.assert_trees_all_close(u_sharded, u, rtol=1e-6)
  np.testing.assert_allclose(s_sharded.grad_norm, s.grad_norm, rtol=1e-6)
  assert u_sharded["w"].sharding.spec == P("data", "model")
  hlo = jax.jit(tx.update).lower(sharded, tx.init(g)).compile().as_text()
  assert "all-gather" not in hlo


def test_shard_map_clip_uses_the_global_norm():
  mesh = jax.make_mesh((8,), ("d",))
  g = jnp.asarray(np.random.default_rng(6).normal(size=(32,)) * 3, jnp.float32)
  tx = omc.clip_by_global_norm(1.0, axis_name="d")

  def step(x):
    u, state = tx.update({"g": x}, tx.init({"g": x}))
    return u["g"], state.grad_norm

  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P())))
  u, norm = f(jax.device_put(g, NamedSharding(mesh, P("d"))))
  np.testing.assert_allclose(norm, np.linalg.norm(np.asarray(g)), rtol=1e-6)
  np.testing.assert_allclose(u, np.asarray(g) / np.linalg.norm(np.asarray(g)), rtol=1e-6)


def test_clip_by_value_counts_a_float64_clip_float32_cannot_see():
  with jax.enable_x64(True):
    tx = omc.clip_by_value(1.0)
    g = {"w": jnp.array([1.0 + 1e-12, 0.5], jnp.float64)}
    u, s = tx.update(g, tx.init(g))
    assert u["w"][0] == 1.0 and s.steps_clipped == 1


# ---- every clip over random trees of mixed dtypes, shapes and magnitudes --------------------

_DTYPES = {
  "float32": (jnp.float32, 60, 4e-6),
  "bfloat16": (jnp.bfloat16, 60, 1e-2),
  "float16": (jnp.float16, 6, 2e-3),
}
_SHAPES = [(), (0,), (3,), (2, 3), (3, 0), (4, 2)]


@st.composite
def _mixed_trees(draw):
  """A list of leaves: each its own dtype, shape (zero-size included) and binade."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  leaves = []
  for _ in range(draw(st.integers(1, 4))):
    name = draw(st.sampled_from(sorted(_DTYPES)))
    dtype, span, _ = _DTYPES[name]
    shape = draw(st.sampled_from(_SHAPES))
    scale = 2.0 ** draw(st.integers(-span, span))
    leaves.append(jnp.asarray(rng.normal(size=shape) * scale, dtype))
  return leaves


def _tolerance(tree):
  return max([_DTYPES[jnp.dtype(x.dtype).name][2] for x in tree] + [4e-6])


def _f64(tree):
  return [np.asarray(x, np.float64) for x in tree]


def _cos(a, b):
  a, b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@settings(max_examples=40, deadline=None)
@given(_mixed_trees(), st.integers(-6, 6), st.floats(0.0, 1.0))
def test_property_every_norm_clip_lands_in_range_keeps_direction_and_is_idempotent(
  tree, exponent, frac
):
  hi = 2.0**exponent * 1.5
  lo = frac * hi
  tol = _tolerance(tree)
  g = _f64(tree)
  for name, tx in [
    ("global", omc.clip_by_global_norm(hi, min_norm=lo)),
    ("leaf", omc.clip_by_norm(hi, min_norm=lo)),
    ("unit", omc.clip_by_norm(hi, min_norm=lo, axis=0)),
  ]:
    u, _ = tx.update(tree, tx.init(tree))
    out = _f64(u)
    assert [x.dtype for x in u] == [x.dtype for x in tree] and [x.shape for x in u] == [
      x.shape for x in tree
    ]
    if name == "global":
      groups = [(g, out)]
    elif name == "leaf":
      groups = [([a], [b]) for a, b in zip(g, out, strict=True)]
    else:  # each column of a leaf of rank >= 2 (axis 0), else the whole leaf
      groups = [
        ([a[:, j]], [b[:, j]]) if a.ndim >= 2 else ([a], [b])
        for a, b in zip(g, out, strict=True)
        for j in range(a.shape[1] if a.ndim >= 2 else 1)
      ]
    for before, after in groups:
      n_in = np.sqrt(sum(np.sum(x * x) for x in before))
      n_out = np.sqrt(sum(np.sum(x * x) for x in after))
      if n_in == 0:
        assert n_out == 0  # zero stays zero
        continue
      assert n_out <= hi * (1 + tol), (name, n_out, hi)
      assert n_out >= min(lo, hi) * (1 - tol) or n_out == 0, (name, n_out, lo)
      assert _cos(before, after) >= 1 - tol, name
    again, _ = tx.update(u, tx.init(u))
    for a, b in zip(_f64(again), out, strict=True):
      np.testing.assert_allclose(a, b, rtol=2 * tol, atol=0)


@settings(max_examples=40, deadline=None)
@given(_mixed_trees(), st.integers(-6, 6))
def test_property_value_clip_and_agc_bound_every_element_and_unit(tree, exponent):
  hi = 2.0**exponent * 1.5
  tol = _tolerance(tree)
  u, _ = omc.clip_by_value(hi).update(tree, omc.clip_by_value(hi).init(tree))
  for a, b in zip(_f64(u), _f64(tree), strict=True):
    assert np.all(np.abs(a) <= hi * (1 + tol))
    inside = np.abs(b) <= np.float64(hi) * (1 - tol)
    np.testing.assert_array_equal(a[inside], b[inside])
  again, _ = omc.clip_by_value(hi).update(u, omc.clip_by_value(hi).init(u))
  jax.tree.map(np.testing.assert_array_equal, again, u)
  params = [x * 2 for x in tree]
  tx = omc.adaptive_grad_clip(0.25)
  u, _ = tx.update(tree, tx.init(params), params)
  for a, b, w in zip(_f64(u), _f64(tree), _f64(params), strict=True):
    axes = tuple(range(a.ndim - 1)) if a.ndim >= 2 else None
    n_out = np.sqrt(np.sum(a * a, axis=axes))
    bound = 0.25 * np.maximum(np.sqrt(np.sum(w * w, axis=axes)), 1e-3)
    assert np.all(n_out <= bound * (1 + tol))
    assert np.all((a == 0) | (np.sign(a) == np.sign(b)))  # each unit keeps its direction
