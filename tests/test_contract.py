"""Every public transformation passes the same contract.

jit, scan, vmap, cond, donation, inject_hyperparams, MultiSteps, dtypes, complex, zero-size and
Python-number leaves, at most one conditional, eager cost, gradients.
"""

import inspect
import statistics
import time

import chex
import jax
import jax.numpy as jnp
import jax.test_util
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


def _run(tx, steps, dtype=jnp.float32, params=None, jit=True, state=None):
  params = _params(dtype) if params is None else params
  state = tx.init(params) if state is None else state
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


# ---------------------------------------------------------------------------------------------
# Every input: complex, zero-size and Python-number leaves; one conditional; cheap eager calls.


def _complex(tree_re, tree_im):
  return jax.tree.map(lambda a, b: (a + 1j * b).astype(jnp.complex64), tree_re, tree_im)


def _embed(x):
  """A complex leaf as its real and imaginary parts side by side, in the same units.

  Arrays of rank >= 2 stack the parts on a new first axis (each output unit, the last
  axis, keeps its elements); vectors and scalars, one unit each, concatenate them.
  """
  x = jnp.asarray(x)
  if not jnp.iscomplexobj(x):
    return x
  parts = (jnp.real(x), jnp.imag(x))
  return jnp.stack(parts) if x.ndim >= 2 else jnp.concatenate([p.ravel() for p in parts])


def _unembed(x, like):
  if not jnp.iscomplexobj(like):
    return x
  re, im = (x[0], x[1]) if like.ndim >= 2 else jnp.split(x, 2)
  return (re + 1j * im).reshape(like.shape)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_complex_updates(case: Case):
  """A complex leaf is treated as its real and imaginary parts: norms use |z|, scales are real."""
  make = case.make_complex or case.make
  params = _complex(_params(), jax.tree.map(lambda x: -0.5 * x, _params()))
  grads = [_complex(_grads(t), _grads(t + 7)) for t in range(3)]
  tx, ref = make(), make()
  state, ref_state = tx.init(params), ref.init(jax.tree.map(_embed, params))
  for g in grads:
    u, state = jax.jit(tx.update)(g, state, params)
    assert _dtypes(u) == _dtypes(g)
    if case.clips_modulus:
      mod = jax.tree.map(lambda z: np.abs(np.asarray(z, np.complex128)), g)
      want = jax.tree.map(lambda z, m: np.asarray(z) * np.minimum(1, 0.5 / m), g, mod)
      chex.assert_trees_all_close(u, want, rtol=1e-6, atol=1e-7)
      continue
    ref_u, ref_state = jax.jit(ref.update)(
      jax.tree.map(_embed, g), ref_state, jax.tree.map(_embed, params)
    )
    chex.assert_trees_all_close(u, jax.tree.map(_unembed, ref_u, g), rtol=2e-6, atol=1e-7)
    chex.assert_trees_all_close(omc.metrics(state), omc.metrics(ref_state), rtol=2e-6)
  buffer = optax.tree.get(state, "momentum_buffer", None)
  if buffer is not None:  # momentum keeps the complex dtype
    assert all(jnp.iscomplexobj(x) for x in jax.tree.leaves(buffer))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_size_leaves_change_nothing(case: Case):
  empty = {"e": jnp.zeros((0,)), "f": jnp.zeros((3, 0))}
  params = {**_params(), **empty}
  tx = omc.with_value_checks(case.make())
  plain, plain_state = _run(case.make(), 3)
  state = tx.init(params)
  for t in range(3):
    u, state = tx.update({**_grads(t), **empty}, state, params)
  assert u["e"].shape == (0,) and u["f"].shape == (3, 0)
  chex.assert_trees_all_close({k: u[k] for k in plain[-1]}, plain[-1], rtol=1e-6, atol=1e-7)
  ours = {k: v for k, v in omc.metrics(state).items() if "/e" not in k and "/f" not in k}
  chex.assert_trees_all_close(ours, omc.metrics(plain_state), rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_python_number_leaves(case: Case):
  as_numbers = lambda tree: {**tree, "scale": float(tree["scale"])}
  tx = case.make()
  params = as_numbers(_params())
  state = tx.init(params)
  for t in range(3):
    u, state = tx.update(as_numbers(_grads(t)), state, params)
  plain, _ = _run(case.make(), 3, jit=False)
  chex.assert_trees_all_close(u, plain[-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_an_integer_gradient_is_refused_by_name(case: Case, dtype):
  """Scaled and cast back, [3, 4] clipped to norm 1 came out [0, 0]."""
  params = {**_params(), "steps": jnp.zeros(2, dtype)}
  grads = {**_grads(0), "steps": jnp.array([3, 4]).astype(dtype)}
  tx = case.make()
  with pytest.raises(
    TypeError, match=rf"{case.name}: updates\['steps'\] has dtype {jnp.dtype(dtype)}"
  ):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(TypeError, match=rf"{case.name}: updates\['steps'\]"):
    jax.jit(tx.update)(grads, tx.init(params), params)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_at_most_one_conditional_per_step(case: Case):
  """On XLA:GPU every conditional waits for its predicate on the host."""
  params = {f"layer{i}": jnp.ones((i % 7 + 1, 3)) * (i + 1) for i in range(100)}
  tx = case.make()
  hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  assert hlo.count(" conditional(") <= 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_donated_step_copies_no_parameter_sized_array(case: Case):
  """With params and state donated, every parameter-sized state field is updated in place.

  MARS keeps the last gradient: written over its old value before the correction had read
  that value, it made XLA copy the old one aside first, a parameter-sized copy (and fresh
  memory) every step.
  """
  params = {"a": jnp.ones((64, 32)), "b": jnp.full((32, 64), 2.0)}
  tx = case.make()

  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
  entry = compiled.as_text().split("ENTRY", 1)[1]
  sized = ("[64,32]", "[32,64]")
  copies = [ln for ln in entry.splitlines() if " copy(" in ln and any(s in ln for s in sized)]
  assert not copies, copies


def test_mars_writes_its_previous_gradient_over_the_old_one():
  """At a size XLA does not keep in spare buffers (8 leaves of 256K): no parameter-sized
  temporary, which XLA:CPU maps afresh every step. A tie XLA can see through, or a compare
  in place of the quotient, made it write the new gradient to a fresh buffer."""
  shapes = {f"l{i}": jax.ShapeDtypeStruct((1024, 256), jnp.float32) for i in range(8)}
  tx = optax.chain(omc.mars(), optax.adamw(3e-3))

  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  state = jax.eval_shape(tx.init, shapes)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(shapes, state, shapes).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 0.01 * 8 * 1024 * 256 * 4


# The transformations that multiply every leaf by one factor, each leaf's own work aside.
_ONE_FACTOR = {
  "clip_by_global_norm",
  "autoclip",
  "zclip",
  "skip_bad_steps",
  "clipped_momentum",
  "normalized_momentum",
  "momclip_sgd",
}


@pytest.mark.parametrize("case", [c for c in CASES if c.name in _ONE_FACTOR], ids=lambda c: c.name)
def test_a_factor_shared_by_every_leaf_is_chosen_once(case: Case):
  """Choosing an exact factor is many scalar ops: copied into each leaf's kernel, they cost
  XLA:CPU about a fifth more compile time on a tree of 300 leaves."""

  def compares(leaves: int) -> int:
    params = {f"l{i:03d}": jnp.ones((i % 7 + 2, 3 + i % 5)) * (i + 1) for i in range(leaves)}
    tx = case.make()
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    return hlo.count(" compare(")

  # momclip_sgd compares its step count with 0 in each leaf's kernel (PyTorch's first step).
  assert compares(40) - compares(20) <= 20


_ANCHORS = {
  "clip": lambda: optax.clip_by_global_norm(1.0),
  "trace": lambda: optax.trace(0.9),
  "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.trace(0.9), optax.scale(-0.1)),
}


def _eager_seconds(tx, params, grads, rounds):
  state = tx.init(params)
  for _ in range(3):  # the first calls compile
    jax.block_until_ready(tx.update(grads, state, params))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(tx.update(grads, state, params))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_an_eager_update_costs_at_most_three_of_optax(case: Case):
  """A ratio of medians measured side by side, not an absolute time."""
  params, grads = _params(), _grads(1)
  ours, anchor = case.make(), _ANCHORS[case.eager_anchor]()
  ratios = [
    _eager_seconds(ours, params, grads, 7) / _eager_seconds(anchor, params, grads, 7)
    for _ in range(3)
  ]
  assert statistics.median(ratios) <= 3.0, ratios


# ---------------------------------------------------------------------------------------------
# Every hyperparameter a user can give: injected the plain way, any dtype, differentiable.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inject_hyperparams_the_plain_way(case: Case, dtype):
  """``optax.inject_hyperparams(factory)(first)``, jitted, no static_args: as with optax's own.

  optax injects every numeric default too, and casts them to the params' dtype (bf16 here).
  """
  tx = optax.inject_hyperparams(case.factory)(case.first_arg(), **case.inject)
  plain = case.factory(case.first_arg(), **case.inject)
  params = _params(dtype)
  state, plain_state = jax.jit(tx.init)(params), plain.init(params)
  before = _dtypes(state)
  for t in range(3):
    u, state = jax.jit(tx.update)(_grads(t, dtype), state, params)
    plain_u, plain_state = jax.jit(plain.update)(_grads(t, dtype), plain_state, params)
    assert _dtypes(state) == before and _dtypes(u) == _dtypes(_grads(t, dtype))
    if dtype == jnp.float32:  # bf16-rounded hyperparameters give another trajectory
      chex.assert_trees_all_close(u, plain_u, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  "case", [c for c in CASES if c.drive], ids=[c.name for c in CASES if c.drive]
)
def test_an_injected_hyperparameter_drives_the_update(case: Case):
  name, value = case.drive
  tx = optax.inject_hyperparams(case.factory)(case.first_arg(), **case.inject)
  params = _params()
  state = tx.init(params)
  state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
  first = next(iter(inspect.signature(case.factory).parameters))
  kwargs = {first: case.first_arg(), **case.inject}
  injected, _ = _run(tx, 3, params=params, state=state)
  driven, _ = _run(case.factory(**{**kwargs, name: value}), 3)
  default, _ = _run(case.factory(**kwargs), 3)
  chex.assert_trees_all_close(injected, driven, rtol=1e-6, atol=1e-7)
  assert not all(
    np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(driven), jax.tree.leaves(default), strict=True)
  )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dtypes_never_change_under_x64(case: Case):
  """float64 params and updates: float64 statistics from init on, stable through scan and cond."""
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), _params())
    grads = [jax.tree.map(lambda x: x.astype(jnp.float64), _grads(t)) for t in range(3)]
    tx = case.make()
    state = tx.init(params)
    before = _dtypes(state)
    floats = {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats <= {jnp.dtype(jnp.float64)}, floats

    def body(s, g):
      u, s = tx.update(g, s, params)
      return s, u

    final, us = jax.lax.scan(body, state, jax.tree.map(lambda *x: jnp.stack(x), *grads))
    assert _dtypes(final) == before
    assert {x.dtype for x in jax.tree.leaves(us)} == {jnp.dtype(jnp.float64)}
    _, s = jax.jit(
      lambda g, s: jax.lax.cond(True, lambda: tx.update(g, s, params), lambda: (g, s))
    )(grads[0], state)
    assert _dtypes(s) == before


def _float_hyperparameters(case):
  # A tiny eps (1e-8) sits below the finite-difference step: it would be stepped negative.
  return {k: v for k, v in case.numeric.items() if isinstance(v, float) and v > 1e-4}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_finite_differences(case: Case):
  """With respect to the updates and every float hyperparameter, step by step (float64)."""
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), _params())
    hyper = _float_hyperparameters(case)
    weights = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape) + 1.0), params)
    tx = case.factory(**case.numeric)
    state = tx.init(params)
    for t in range(4):
      g = jax.tree.map(lambda x: x.astype(jnp.float64), _grads(t))

      def loss(g, h, state=state):
        u, _ = case.factory(**{**case.numeric, **h}).update(g, state, params)
        return sum(
          jnp.sum(a * w) for a, w in zip(jax.tree.leaves(u), jax.tree.leaves(weights), strict=True)
        )

      value, grad = jax.value_and_grad(loss, argnums=(0, 1))(g, hyper)
      assert np.isfinite(value)
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(grad)), grad
      jax.test_util.check_grads(loss, (g, hyper), order=1, modes=["rev"], eps=1e-6, rtol=1e-5)
      _, state = tx.update(g, state, params)
