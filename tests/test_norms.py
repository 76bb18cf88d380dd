"""global_norm and the per-leaf norms against float64 NumPy and an exact rational oracle."""

import contextlib
import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, Mesh, NamedSharding
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
  if scale < 1e-38:  # subnormal inputs: XLA:CPU flushes them, so they count as zero there
    assert jax.default_backend() != "cpu" or float(got) == 0.0
    assert float(got) == 0.0 or np.isclose(got, want, rtol=1e-5)
  else:
    np.testing.assert_allclose(got, want, rtol=1e-6)


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
  with pytest.raises(ValueError, match=r"global_norm: ord must be None, 1, 2 or inf, got 3"):
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


def test_zero_size_leaves_count_for_nothing():
  tree = {"e": jnp.zeros((0,)), "f": jnp.zeros((3, 0)), "x": jnp.array([3.0, 4.0])}
  assert omc.global_norm(tree) == 5.0
  assert omc.global_norm({"e": jnp.zeros((0,))}) == 0.0
  assert omc.global_norm(tree, ord=np.inf) == 4.0


# ---------------------------------------------------------------------------------------------
# Exact over the whole range: an exact rational oracle, rounded once.

_SQRT_BITS = 1400  # enough below float64's smallest subnormal and above its largest square


def _parts(values):
  """Real numbers whose squares sum to ``sum |v|^2``: a complex value gives two."""
  out = []
  for v in np.asarray(values).ravel().tolist():
    out += [v.real, v.imag] if isinstance(v, complex) else [v]
  return [Fraction(float(x)) for x in out]


def _exact(values, ord):
  """The norm of ``values`` in exact arithmetic (complex by modulus), rounded once to float."""
  if np.iscomplexobj(values) and ord != 2:
    mags = [math.hypot(z.real, z.imag) for z in np.asarray(values, np.complex128).ravel()]
    return max(mags, default=0.0) if ord == np.inf else math.fsum(mags)
  parts = _parts(values)
  if ord == np.inf:
    return float(max((abs(x) for x in parts), default=0))
  if ord == 1:
    return float(sum(abs(x) for x in parts))
  total = sum(x * x for x in parts)
  root = math.isqrt(total.numerator * 4**_SQRT_BITS // total.denominator)
  return float(Fraction(root, 2**_SQRT_BITS))


def _ulps(got, want, dtype):
  """|got - want| in units of ``dtype``'s spacing at ``want``."""
  got, want = float(got), float(want)
  if want == 0:
    return 0.0 if got == 0 else np.inf
  return abs(got - want) / float(np.spacing(np.asarray(abs(want), dtype)))


def _spread(rng, top, n, dtype):
  """``n`` normal numbers of ``dtype``: the largest in binade ``top``, each next 3 binades down."""
  info = ml_dtypes.finfo(dtype)
  exps = np.clip(top - 3 * np.arange(n), info.minexp, info.maxexp - 1)
  mant = 1.0 + 0.9 * rng.random(n)
  signs = rng.choice([-1.0, 1.0], n)
  return (signs * mant * np.exp2(exps.astype(np.float64))).astype(dtype)


_RANGE_DTYPES = {
  "float16": (np.float16, 1),
  "bfloat16": (ml_dtypes.bfloat16, 3),
  "float32": (np.float32, 3),
  "float64": (np.float64, 23),
}
# Allowed distance from the correctly rounded norm: summing n terms rounds up to n - 1 times.
_TOLERANCE_ULPS = {1: 7.0, 2: 2.0, np.inf: 0.0}


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype_name", list(_RANGE_DTYPES))
def test_norms_are_exact_across_every_exponent(dtype_name, ord):
  """Global, per-leaf and unit-wise norms, from the smallest normal number to the largest."""
  dtype, step = _RANGE_DTYPES[dtype_name]
  info = ml_dtypes.finfo(dtype)
  out_dtype = np.float64 if dtype == np.float64 else np.float32
  rng = np.random.default_rng(0)
  with jax.enable_x64(dtype == np.float64):
    worst = 0.0
    for top in range(info.minexp, info.maxexp, step):
      a, b = _spread(rng, top, 8, dtype), _spread(rng, top - 40, 5, dtype)
      units = np.stack([_spread(rng, t, 4, dtype) for t in (top, top - 60, top + 1)], axis=1)
      tree = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
      want = _exact(np.concatenate([a, b]).astype(np.float64), ord)
      if not (np.isfinite(want) and want <= ml_dtypes.finfo(out_dtype).max):
        continue
      got = omc.global_norm(tree, ord=ord)
      assert got.dtype == out_dtype
      worst = max(worst, _ulps(got, want, out_dtype))
      per_leaf, per_unit = (
        n.value() for n in _norms.unit_norms([tree["a"], jnp.asarray(units)], [None, (0,)], ord=ord)
      )
      worst = max(
        worst, _ulps(per_leaf[0, ...].item(), _exact(a.astype(np.float64), ord), out_dtype)
      )
      for j in range(units.shape[1]):
        want_j = _exact(units[:, j].astype(np.float64), ord)
        if want_j <= ml_dtypes.finfo(out_dtype).max:
          worst = max(worst, _ulps(per_unit[0, j], want_j, out_dtype))
    assert worst <= _TOLERANCE_ULPS[ord], f"{dtype_name} ord={ord}: {worst} ulps"


@pytest.mark.parametrize("ord", ORDS)
def test_a_tree_of_huge_and_tiny_leaves(ord):
  rng = np.random.default_rng(1)
  huge = _spread(rng, 126, 6, np.float32)
  tiny = _spread(rng, -126 + 15, 6, np.float32)
  middle = _spread(rng, 0, 6, np.float32)
  leaves = {"huge": huge, "tiny": tiny, "middle": middle}
  for names in [("huge", "tiny"), ("tiny", "middle"), ("huge", "tiny", "middle"), ("tiny",)]:
    tree = {k: jnp.asarray(leaves[k]) for k in names}
    want = _exact(np.concatenate([leaves[k] for k in names]).astype(np.float64), ord)
    assert _ulps(omc.global_norm(tree, ord=ord), want, np.float32) <= _TOLERANCE_ULPS[ord]


def test_the_norm_of_1e38_is_1e38_not_zero():
  got = omc.global_norm({"w": jnp.array([1e38, 1.0])})
  assert (
    _ulps(got, _exact(np.array([1e38, 1.0], np.float32).astype(np.float64), 2), np.float32) <= 1
  )
  assert omc.global_norm({"w": jnp.array([3e38, 3e38])}) == np.inf  # not representable


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
@pytest.mark.parametrize("ord", ORDS)
def test_complex_leaves_count_with_their_modulus(dtype, ord):
  with jax.enable_x64(dtype == jnp.complex128):
    rng = np.random.default_rng(2)
    z = (rng.normal(size=(5, 3)) + 1j * rng.normal(size=(5, 3))).astype(dtype)
    z[0, 0] = 1e30 + 1e30j  # squares beyond float32: the rescue keeps the imaginary part
    out = np.float64 if dtype == jnp.complex128 else np.float32
    got = omc.global_norm({"z": jnp.asarray(z), "r": jnp.array([3.0], out)}, ord=ord)
    assert got.dtype == out
    want = _exact(np.append(z.ravel().astype(np.complex128), 3.0), ord)
    assert _ulps(got, want, out) <= _TOLERANCE_ULPS[ord] + 1
  assert omc.global_norm({"z": jnp.array([3 + 4j, 0j], jnp.complex64)}) == 5.0
  assert omc.global_norm({"z": jnp.array([3 + 4j, 0j], jnp.complex64)}) == optax.tree.norm(
    {"z": jnp.array([3 + 4j, 0j], jnp.complex64)}
  )


def test_python_number_leaves():
  assert omc.global_norm({"a": 3.0, "b": 4.0}) == optax.tree.norm({"a": 3.0, "b": 4.0}) == 5.0
  assert omc.global_norm({"a": 3, "b": [4.0, None]}, ord=1) == 7.0


def test_a_single_conditional_whatever_the_number_of_leaves():
  tree = [jnp.ones((i % 7 + 1, 3)) * (i + 1) for i in range(100)]
  for f in [omc.global_norm, lambda t: [n.value() for n in _norms.unit_norms(t, [(0,)] * len(t))]]:
    hlo = jax.jit(f).lower(tree).compile().as_text()
    assert hlo.count(" conditional(") == 1
  for ord in (1, np.inf):  # no overflow or underflow to rescue
    hlo = jax.jit(lambda t, o=ord: omc.global_norm(t, ord=o)).lower(tree).compile().as_text()
    assert " conditional(" not in hlo


def _collectives(hlo):
  """``(result type, op)`` of every cross-device collective in compiled HLO text."""
  ops = r"all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter"
  return re.findall(rf"= (.+?) ({ops})(?:-start)?\(", hlo)


@pytest.mark.parametrize("axis_types", ["plain", "explicit"])
def test_leaves_sharded_along_different_axes_need_only_scalar_all_reduces(axis_types):
  """The norm and the clipping steps never move a leaf: only scalars are reduced across devices."""
  devices = np.array(jax.devices()).reshape(4, 2)
  kinds = {} if axis_types == "plain" else {"axis_types": (AxisType.Explicit,) * 2}
  mesh = Mesh(devices, ("d", "m"), **kinds)
  rng = np.random.default_rng(3)
  specs = [P("d", "m")] * 3 + [P("m", "d")] * 3 + [P("d"), P()]
  shapes = [(16, 16)] * 6 + [(8,), (4,)]
  tree = [
    jax.device_put(jnp.asarray(rng.normal(size=s), jnp.float32), NamedSharding(mesh, spec))
    for s, spec in zip(shapes, specs, strict=True)
  ]
  context = contextlib.nullcontext() if axis_types == "plain" else jax.sharding.set_mesh(mesh)
  with context:
    np.testing.assert_allclose(jax.jit(omc.global_norm)(tree), _np_norm(tree, 2), rtol=1e-6)
    compiled = [jax.jit(omc.global_norm).lower(tree).compile().as_text()]
    for tx in [omc.clip_by_global_norm(1.0), omc.momclip_sgd(0.1, 0.9, max_norm=1.0)]:

      def step(p, s, g, tx=tx):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      state = tx.init(tree)
      compiled.append(jax.jit(step).lower(tree, state, tree).compile().as_text())
  for hlo in compiled:
    found = _collectives(hlo)
    assert found, "the test should see the norm's all-reduces"
    assert {kind for _, kind in found} == {"all-reduce"}, found
    operands = {t for t, _ in found}
    assert all(re.fullmatch(r"[(]?((/[*]index=\d+[*]/)?f32\[\](, )?)+[)]?", t) for t in operands)


def test_narrow_leaves_are_fenced_on_cpu_only():
  """The XLA:CPU optimization barrier is chosen where the step is lowered, never elsewhere."""
  tree = [jnp.ones((4,), jnp.bfloat16), jnp.ones((3,), jnp.float32)]
  barrier = {}
  for platform in ["cpu", "cuda", "tpu"]:
    exported = jax.export.export(jax.jit(omc.global_norm), platforms=[platform])(tree)
    barrier[platform] = exported.mlir_module().count("stablehlo.optimization_barrier")
  assert barrier == {"cpu": 1, "cuda": 0, "tpu": 0}
  f32 = jax.export.export(jax.jit(omc.global_norm), platforms=["cpu"])([tree[1]])
  assert "optimization_barrier" not in f32.mlir_module()
  hlo = jax.jit(omc.global_norm).lower(tree).compile().as_text()
  assert (
    " conditional(" in hlo and hlo.count(" conditional(") == 1
  )  # the rescue, not a platform case
