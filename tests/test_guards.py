"""skip_bad_steps: a skipped step changes no bit of the params or the inner state."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_momclip as omc

U = {"w": jnp.array([[0.6, 0.0], [0.0, 0.0]]), "b": jnp.array([0.0, -0.8])}


def _bits(tree):
  """Every leaf as raw bytes, so -0.0 != 0.0 and NaN payloads count."""
  return jax.tree.map(lambda x: np.asarray(x).tobytes(), tree)


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(_bits(a)), jax.tree.leaves(_bits(b)), strict=True):
    assert x == y


def _replay(tx, norms, params=None):
  """Feeds g_t = norm_t·U through tx and apply_updates in one lax.scan; returns per-step states."""
  params = jax.tree.map(jnp.ones_like, U) if params is None else params

  @jax.jit
  def run(norms):
    def step(carry, n):
      p, s = carry
      u, s = tx.update(jax.tree.map(lambda x: x * n, U), s, p)
      p = optax.apply_updates(p, u)
      return (p, s), (p, s)

    return jax.lax.scan(step, (params, tx.init(params)), norms)[1]

  return jax.tree.map(np.asarray, run(jnp.asarray(norms, jnp.float32)))


def _at(tree, t):
  return jax.tree.map(lambda x: x[t], tree)


def _norms(n, seed=0):
  return np.exp(np.random.default_rng(seed).normal(0.0, 0.1, n)).astype(np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e3], ids=["nan", "inf", "spike"])
def test_a_bad_step_changes_no_bit(bad):
  inner = optax.chain(omc.clip_by_global_norm(2.0), optax.adam(0.1))
  tx = omc.skip_bad_steps(inner, z_threshold=5.0, warmup_steps=4)
  norms = np.append(_norms(6), [bad, 1.0]).astype(np.float32)
  params = {"w": jnp.array([[1.0, -0.0], [0.0, 2.0]]), "b": jnp.array([-0.0, 3.0])}
  ps, states = _replay(tx, norms, params)
  before, after = (_at(ps, 5), _at(states, 5)), (_at(ps, 6), _at(states, 6))
  _assert_bit_identical(after[0], before[0])  # params, -0.0 kept
  _assert_bit_identical(after[1].inner_state, before[1].inner_state)
  for field in ("norm_mean", "norm_var", "stats_count"):
    _assert_bit_identical(getattr(after[1], field), getattr(before[1], field))
  assert int(after[1].consecutive_spikes) == int(np.isfinite(bad))  # NaN/Inf are not spikes
  assert after[1].last_step_skipped and not before[1].last_step_skipped
  assert int(after[1].steps_skipped) == 1 and int(after[1].consecutive_skips) == 1
  assert int(after[1].count) == 7
  # The next finite step is applied and moves params and state again.
  assert not states.last_step_skipped[7] and int(states.consecutive_skips[7]) == 0
  assert not np.array_equal(ps["b"][7], ps["b"][6])


def test_skip_bad_steps_without_a_bad_step_is_the_inner_transformation():
  inner = optax.chain(omc.clip_by_global_norm(2.0), optax.sgd(0.1, momentum=0.9))
  norms = _norms(10)
  ps, states = _replay(omc.skip_bad_steps(inner, z_threshold=5.0, warmup_steps=3), norms)
  ref_ps, ref_states = _replay(inner, norms)
  # Equal up to the order XLA sums the inner norm in (fused differently with the guard's).
  chex.assert_trees_all_close(ps, ref_ps, rtol=1e-6)
  chex.assert_trees_all_close(states.inner_state, ref_states, rtol=1e-6)
  assert int(states.steps_skipped[-1]) == 0


def _spike_oracle(norms, z_thr, alpha, warmup, max_norm=None, max_spikes=None):
  """NumPy re-derivation: statistics of the accepted finite norms only, float64."""
  acc, mean, var, rows, run = [], 0.0, 0.0, [], 0
  for x in np.asarray(norms, np.float64):
    finite = np.isfinite(x)
    warm = len(acc) < warmup
    informative = np.sqrt(var) > 1e-3 * abs(mean)  # a spread worth a z-score
    z = (x - mean) / (np.sqrt(var) + 1e-6) if finite and informative else 0.0
    bad = finite and ((max_norm is not None and x > max_norm) or (not warm and z > z_thr))
    skip = bad or not finite
    if finite and not skip:
      run = 0
      if warm:
        acc.append(x)
        mean, var = float(np.mean(acc)), float(np.var(acc))
      else:
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    elif bad:
      run += 1
      if max_spikes is not None and run >= max_spikes:
        acc, mean, var, run = [], 0.0, 0.0, 0
    rows.append((skip, mean, var, len(acc)))
  return [np.array(c) for c in zip(*rows, strict=True)]


def test_spike_statistics_follow_accepted_steps_only():
  norms = _norms(80)
  norms[[30, 31, 55]] *= 40.0
  norms[[10, 45]] = [np.nan, np.inf]
  norms[[60]] = 5.0  # above max_norm only
  tx = omc.skip_bad_steps(optax.sgd(0.1), max_norm=4.0, z_threshold=3.0, warmup_steps=12)
  _, states = _replay(tx, norms)
  skip, mean, var, count = _spike_oracle(norms, 3.0, 0.99, 12, max_norm=4.0)
  np.testing.assert_array_equal(states.last_step_skipped, skip)
  assert set(np.flatnonzero(skip)) == {10, 30, 31, 45, 55, 60}
  np.testing.assert_allclose(states.norm_mean, mean, rtol=2e-6)
  np.testing.assert_allclose(states.norm_var, var, rtol=2e-5, atol=1e-9)
  np.testing.assert_array_equal(states.stats_count, count)
  assert int(states.steps_skipped[-1]) == 6
  np.testing.assert_array_equal(states.consecutive_skips[[29, 30, 31, 32]], [0, 1, 2, 0])


def test_one_nan_never_skips_a_later_finite_step():
  norms = _norms(60)
  with_nan = norms.copy()
  with_nan[20] = np.nan
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=5.0, warmup_steps=10)
  _, clean = _replay(tx, norms)
  _, dirty = _replay(tx, with_nan)
  assert not clean.last_step_skipped.any()
  np.testing.assert_array_equal(np.flatnonzero(dirty.last_step_skipped), [20])
  # After the NaN everything is as if step 20 had never happened.
  _, without_20 = _replay(tx, np.delete(norms, 20))
  for field in ("norm_mean", "norm_var", "stats_count", "consecutive_spikes", "inner_state"):
    _assert_bit_identical(
      jax.tree.map(lambda x: x[21:], getattr(dirty, field)),
      jax.tree.map(lambda x: x[20:], getattr(without_20, field)),
    )


def test_statistics_restart_after_max_consecutive_finite_spikes():
  norms = np.concatenate([_norms(20), 50.0 * _norms(30, seed=1)]).astype(np.float32)
  norms[21] = np.nan  # neither counts as a spike nor breaks the run
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=5.0, warmup_steps=5, max_consecutive_spikes=3)
  ps, states = _replay(tx, norms)
  skip, mean, _, count = _spike_oracle(norms, 5.0, 0.99, 5, max_spikes=3)
  np.testing.assert_array_equal(states.last_step_skipped, skip)
  np.testing.assert_array_equal(np.flatnonzero(skip), [20, 21, 22, 23])
  np.testing.assert_array_equal(states.stats_restarts[[22, 23, 49]], [0, 1, 1])
  np.testing.assert_array_equal(states.stats_count[[22, 23, 24, 49]], [5, 0, 1, 5])
  np.testing.assert_allclose(states.norm_mean, mean, rtol=2e-6)
  np.testing.assert_array_equal(count, states.stats_count)
  assert np.isfinite(ps["w"]).all()


def test_without_a_restart_a_change_of_scale_is_skipped_forever():
  norms = np.concatenate([_norms(20), 50.0 * _norms(10, seed=1)]).astype(np.float32)
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=5.0, warmup_steps=5)
  _, states = _replay(tx, norms)
  assert not states.last_step_skipped[:20].any()
  assert states.last_step_skipped[20:].all() and int(states.consecutive_skips[-1]) == 10


def test_after_equal_norms_a_growing_norm_is_followed_not_skipped_forever():
  """σ = 0 after two equal norms: dividing by 1e-6 skipped every larger norm, forever."""
  norms = np.concatenate([[1.0, 1.0], 1.0001 ** np.arange(1, 200)]).astype(np.float32)
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=3.0, warmup_steps=2)
  _, states = _replay(tx, norms)
  skip, mean, _, _ = _spike_oracle(norms, 3.0, 0.99, 2)
  np.testing.assert_array_equal(states.last_step_skipped, skip)
  assert not skip.any()
  np.testing.assert_allclose(states.norm_mean, mean, rtol=1e-5)
  # A spike against the spread the drift has built is still skipped.
  spiked = norms.copy()
  spiked[150] *= 1.05
  _, states = _replay(tx, spiked)
  np.testing.assert_array_equal(np.flatnonzero(states.last_step_skipped), [150])


def test_skip_nonfinite_false_lets_nan_through():
  tx = omc.skip_bad_steps(optax.sgd(0.1), skip_nonfinite=False)
  ps, states = _replay(tx, np.array([1.0, np.nan], np.float32))
  assert np.isnan(ps["w"][1]).all() and int(states.steps_skipped[-1]) == 0


def test_vmap_decides_per_instance():
  tx = omc.skip_bad_steps(optax.sgd(0.1, momentum=0.9))
  params = jax.tree.map(jnp.ones_like, U)
  g = jax.tree.map(lambda x: jnp.stack([x, x * jnp.nan]), U)
  states = jax.vmap(lambda _: tx.init(params))(jnp.arange(2))
  u, s = jax.vmap(lambda g, s: tx.update(g, s, params))(g, states)
  np.testing.assert_array_equal(s.last_step_skipped, [False, True])
  np.testing.assert_allclose(u["w"][0], -0.1 * U["w"], rtol=1e-6)
  _assert_bit_identical(u["w"][1], jnp.full((2, 2), -0.0))


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8
  return Mesh(np.array(jax.devices()), ("data",))


def _sharded_case():
  """Params (8, 3) sharded by rows; a bad value lands in one replica's shard only."""
  params = {"w": jnp.arange(24.0).reshape(8, 3) / 24.0}
  grads = []
  for t, bad in enumerate([None, np.nan, None, 1e4, None]):
    g = jnp.full((8, 3), 0.1 * (t + 1))
    grads.append(g if bad is None else g.at[5, 1].set(bad))
  return params, jnp.stack(grads)


def test_every_replica_takes_the_same_decision_under_shard_map(mesh):
  params, grads = _sharded_case()
  make = lambda axis_name: omc.skip_bad_steps(
    optax.sgd(0.1, momentum=0.9), max_norm=100.0, axis_name=axis_name
  )

  def train(axis_name):
    tx = make(axis_name)

    def local(p, gs):
      def step(carry, g):
        p, s = carry
        u, s = tx.update({"w": g}, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), s.last_step_skipped[None]

      (p, s), flags = jax.lax.scan(step, (p, tx.init(p)), gs)
      return p, flags.T, s.steps_skipped[None]

    return jax.jit(
      jax.shard_map(
        local,
        mesh=mesh,
        in_specs=({"w": P("data")}, P(None, "data")),
        out_specs=({"w": P("data")}, P("data"), P("data")),
        check_vma=False,
      )
    )(params, grads)

  p, flags, skipped = train("data")
  np.testing.assert_array_equal(flags, np.tile([False, True, False, True, False], (8, 1)))
  np.testing.assert_array_equal(skipped, np.full(8, 2))
  # Same as one device holding everything.
  ref = make(None)
  rp, rs = params, ref.init(params)
  for g in grads:
    u, rs = ref.update({"w": g}, rs, rp)
    rp = optax.apply_updates(rp, u)
  np.testing.assert_allclose(p["w"], rp["w"], rtol=1e-6)  # psum adds in another order
  # Without axis_name each replica decides on its own shard: they disagree.
  _, local_flags, _ = train(None)
  assert local_flags[5].sum() == 2 and local_flags[0].sum() == 0


def test_jit_with_named_sharding_decides_globally(mesh):
  params, grads = _sharded_case()
  shard = NamedSharding(mesh, P("data"))
  tx = omc.skip_bad_steps(optax.sgd(0.1, momentum=0.9), max_norm=100.0)
  p = jax.device_put(params, shard)
  s = tx.init(p)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  flags = []
  for g in grads:
    u, s = step({"w": jax.device_put(g, shard)}, s, p)
    p = optax.apply_updates(p, u)
    flags.append(bool(s.last_step_skipped))
  assert flags == [False, True, False, True, False]
  assert p["w"].sharding.is_equivalent_to(shard, 2)


def test_metrics_see_the_guard_and_what_it_wraps():
  tx = omc.skip_bad_steps(optax.chain(omc.zclip(), optax.sgd(0.1)))
  params = {"w": jnp.ones(2)}
  s = tx.init(params)
  _, s = tx.update({"w": jnp.array([3.0, 4.0])}, s, params)
  _, s = tx.update({"w": jnp.array([jnp.nan, 4.0])}, s, params)
  m = omc.metrics(s)
  assert float(m["skip_bad_steps/skip_fraction"]) == 0.5
  assert float(m["skip_bad_steps/grad_norm"]) != float(m["skip_bad_steps/grad_norm"])
  assert int(m["zclip/count"]) == 1  # the skipped step left zclip's state alone
  assert float(m["zclip/grad_norm"]) == 5.0
  assert float(optax.tree.get(s, "steps_skipped")) == 1


@pytest.mark.parametrize(
  "kwargs, err, match",
  [
    ({"inner": "sgd"}, TypeError, "skip_bad_steps: inner must be an optax.GradientTransformation"),
    ({"skip_nonfinite": 1}, TypeError, "skip_nonfinite must be True or False"),
    ({"max_norm": -1.0}, ValueError, r"skip_bad_steps: max_norm must be in \[0, inf\]"),
    ({"z_threshold": 0.0}, ValueError, "skip_bad_steps: z_threshold"),
    ({"alpha": 2.0}, ValueError, "skip_bad_steps: alpha"),
    ({"warmup_steps": 0}, ValueError, "skip_bad_steps: warmup_steps must be >= 1, got 0"),
    ({"max_consecutive_spikes": 0}, ValueError, "max_consecutive_spikes must be >= 1"),
    ({"axis_name": 3}, TypeError, "skip_bad_steps: axis_name"),
  ],
)
def test_bad_arguments_raise(kwargs, err, match):
  kwargs = {"inner": optax.sgd(0.1), **kwargs}
  with pytest.raises(err, match=match):
    omc.skip_bad_steps(**kwargs)


def _select_after(inner):
  """The plain formulation, as an oracle: run ``inner``, then select its finished results."""

  def update(g, s, p=None, **extra):
    skip = ~jnp.isfinite(optax.tree.norm(g))
    u, new = optax.with_extra_args_support(inner).update(g, s, p, **extra)
    u = jax.tree.map(lambda x: jnp.where(skip, -0.0, x), u)
    return u, jax.tree.map(lambda o, n: jnp.where(skip, o, n), s, new)

  return update


class _AwkwardState(NamedTuple):
  trace: Any
  twin: Any  # the same new value as `trace`, from another old value
  kept: Any  # passed through
  seen: Any  # the incoming updates themselves
  const: jax.Array  # a constant, whatever the step
  count: jax.Array
  recast: jax.Array  # float32 in, bfloat16 out


def _awkward_inner(lr, jit_update=False):
  """A state whose fields share, pass through, store or ignore values; ``lr`` may be a tracer."""

  def init(p):
    return _AwkwardState(
      trace=jax.tree.map(jnp.zeros_like, p),
      twin=jax.tree.map(lambda x: jnp.full_like(x, 2.0), p),
      kept=jax.tree.map(lambda x: x + 1.0, p),
      seen=jax.tree.map(lambda x: x - 1.0, p),
      const=jnp.float32(7.0),
      count=jnp.int32(0),
      recast=jnp.float32(5.0),
    )

  def update(g, s, p=None, *, scale, value_fn):
    new = jax.tree.map(lambda t, x: 0.5 * t + scale * x, s.trace, g)
    recast = (s.recast / 2).astype(jnp.bfloat16)
    factor = value_fn(s.count) * (recast * jnp.bfloat16(2)).astype(jnp.float32)
    u = jax.tree.map(lambda t: -lr * t * factor, new)
    return u, _AwkwardState(new, new, s.kept, g, jnp.float32(3.0), s.count + 1, recast)

  return optax.GradientTransformationExtraArgs(
    init, jax.jit(update, static_argnames="value_fn") if jit_update else update
  )


@pytest.mark.parametrize("run", ["jit", "eager", "jitted_inner"])
@pytest.mark.parametrize("bad", [None, np.nan], ids=["applied", "skipped"])
def test_the_state_selected_as_computed_equals_the_results_selected_after(bad, run):
  params = jax.tree.map(jnp.ones_like, U)
  g = U if bad is None else {"w": U["w"], "b": U["b"].at[1].set(bad)}

  def step(lr, scale, g, s):
    extra = {"scale": scale, "value_fn": lambda c: 1.0 + c.astype(jnp.float32)}
    inner = lambda: _awkward_inner(lr, jit_update=run == "jitted_inner")
    ours = omc.skip_bad_steps(inner()).update(g, s, params, **extra)
    plain = _select_after(inner())(g, s.inner_state, params, **extra)
    return (ours[0], ours[1].inner_state), plain

  s = omc.skip_bad_steps(_awkward_inner(0.1)).init(params)
  s = s._replace(inner_state=s.inner_state._replace(trace=jax.tree.map(jnp.ones_like, params)))
  ours, plain = (step if run == "eager" else jax.jit(step))(0.1, 2.0, g, s)
  _assert_bit_identical(ours, plain)
  old = s.inner_state
  if bad is None:
    assert float(ours[1].const) == 3.0 and int(ours[1].count) == 1
    assert float(ours[1].recast) == 2.5
    _assert_bit_identical(ours[1].twin, ours[1].trace)
    _assert_bit_identical(ours[1].seen, g)
  else:
    _assert_bit_identical(ours[1]._replace(recast=None), old._replace(recast=None))
    assert float(ours[1].recast) == 5.0
    _assert_bit_identical(ours[0], jax.tree.map(lambda x: jnp.full_like(x, -0.0), U))


@pytest.mark.parametrize(
  "inner",
  [
    lambda: optax.chain(omc.clip_by_global_norm(1.0), optax.trace(0.9), optax.scale(-0.1)),
    lambda: omc.momclip_sgd(0.1, 0.9, max_norm=1.0),
    lambda: optax.adamw(1e-3),
  ],
  ids=["optax_chain", "momclip_sgd", "adamw"],
)
def test_a_donated_step_copies_no_state_buffer(inner):
  params = [jnp.ones((512, 256)) * i for i in range(4)]

  def state_copies(update, state):
    def step(p, s, g):
      u, s = update(g, s, p)
      return optax.apply_updates(p, u), s

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
    return [line for line in hlo.splitlines() if "f32[512,256]" in line and " copy" in line]

  tx = omc.skip_bad_steps(inner())
  assert not state_copies(tx.update, tx.init(params))
  # Selecting the finished results instead makes XLA:CPU copy every old state buffer.
  assert state_copies(_select_after(inner()), inner().init(params))


@pytest.mark.parametrize("run", [jax.jit, lambda f: f], ids=["jit", "eager"])
def test_an_inner_state_of_another_structure_raises(run):
  inner = optax.GradientTransformation(
    lambda p: (jnp.zeros([]), jnp.ones([])), lambda g, s, p=None: (g, [s[0], s[1]])
  )
  tx = omc.skip_bad_steps(inner)
  with pytest.raises(ValueError, match=r"skip_bad_steps: inner\.update returned a state of an"):
    run(tx.update)(U, tx.init(U), U)


# ---- the replay under everything an inner transformation may contain ----------------------


def _kernel(t_ref, g_ref, o_ref):
  o_ref[...] = 0.5 * t_ref[...] + g_ref[...]


@jax.custom_vjp
def _custom_trace(t, g):
  return 0.5 * t + g


_custom_trace.defvjp(lambda t, g: (_custom_trace(t, g), None), lambda _, ct: (0.5 * ct, ct))


def _trace_step(kind):
  """``(t, g) -> 0.5·t + g`` computed inside ``kind``."""
  plain = lambda t, g: 0.5 * t + g
  if kind == "jit":
    return jax.jit(plain)
  if kind == "scan":
    return lambda t, g: jax.lax.scan(lambda c, _: (plain(c, g), None), t, None, length=1)[0]
  if kind == "cond":
    return lambda t, g: jax.lax.cond(jnp.sum(g) > -1e9, plain, lambda t, g: t, t, g)
  if kind == "custom_vjp":
    return _custom_trace
  if kind == "shard_map":
    mesh = jax.make_mesh((1,), ("d",))
    return jax.shard_map(plain, mesh=mesh, in_specs=(P(), P()), out_specs=P())
  if kind == "pallas_call":
    from jax.experimental import pallas as pl

    return lambda t, g: pl.pallas_call(
      _kernel, out_shape=jax.ShapeDtypeStruct(t.shape, t.dtype), interpret=True
    )(t, g)
  raise ValueError(kind)


def _inner_with(kind):
  step = _trace_step(kind)

  def update(g, s, p=None):
    new = jax.tree.map(step, s, g)
    return jax.tree.map(lambda t: -0.1 * t, new), new

  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), update)


KINDS = ["jit", "scan", "cond", "custom_vjp", "shard_map", "pallas_call"]


@pytest.mark.parametrize("bad", [None, np.nan], ids=["applied", "skipped"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_replay_equals_selecting_after_whatever_inner_contains(kind, bad):
  params = jax.tree.map(jnp.ones_like, U)
  g = U if bad is None else {"w": U["w"], "b": U["b"].at[1].set(bad)}
  tx = omc.skip_bad_steps(_inner_with(kind))
  state = tx.init(params)
  state = state._replace(inner_state=jax.tree.map(lambda x: x + 1.0, state.inner_state))

  @jax.jit
  def both(g, s):
    ours = tx.update(g, s, params)
    plain = _select_after(_inner_with(kind))(g, s.inner_state, params)
    return (ours[0], ours[1].inner_state), plain

  ours, plain = both(g, state)
  _assert_bit_identical(ours, plain)
  if bad is not None:
    _assert_bit_identical(ours[1], state.inner_state)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_through_the_replay_equal_those_through_selecting_after(kind):
  params = jax.tree.map(jnp.ones_like, U)
  state = omc.skip_bad_steps(_inner_with(kind)).init(params)

  def loss(g, update):
    u, s = update(g)
    return sum(jnp.sum(x) for x in jax.tree.leaves((u, s)))

  ours = lambda g: (lambda r: (r[0], r[1].inner_state))(
    omc.skip_bad_steps(_inner_with(kind)).update(g, state, params)
  )
  plain = lambda g: _select_after(_inner_with(kind))(g, state.inner_state, params)
  if kind == "pallas_call":  # no reverse mode of its own: the wrapper fails as the inner does
    for update in (ours, plain):
      with pytest.raises(ValueError, match="Linearization failed"):
        jax.grad(lambda g, update=update: loss(g, update))(U)
    return
  got = jax.jit(jax.grad(lambda g: loss(g, ours)))(U)
  want = jax.jit(jax.grad(lambda g: loss(g, plain)))(U)
  _assert_bit_identical(got, want)
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(got))


# ---- the loss as a signal; the rolling-window rule against OLMo-core's and MaxText's ---------


def _loss_run(tx, norms, losses):
  """Feeds g_t = norm_t·U with value=loss_t in one jitted scan; returns the per-step states."""
  params = jax.tree.map(jnp.ones_like, U)

  @jax.jit
  def run(norms, losses):
    def step(s, nl):
      n, loss = nl
      _, s = tx.update(jax.tree.map(lambda x: x * n, U), s, params, value=loss)
      return s, s

    return jax.lax.scan(step, tx.init(params), (norms, losses))[1]

  return jax.tree.map(
    np.asarray, run(jnp.asarray(norms, jnp.float32), jnp.asarray(losses, jnp.float32))
  )


def _recorded_streams(n=600, seed=0):
  """A pre-training-like loss (decaying, noisy) and grad norm, with a few spikes in both."""
  rng = np.random.default_rng(seed)
  t = np.arange(n)
  loss = 3.0 + 2.0 * np.exp(-t / 150) + 0.05 * rng.normal(size=n)
  norm = 1.0 + 0.3 * np.exp(-t / 100) + 0.08 * rng.normal(size=n)
  for i, k in [(200, 3.0), (201, 2.0), (350, 1.6), (420, 5.0), (500, 1.3), (65, 2.0)]:
    loss[i % n] *= k
  for i, k in [(260, 8.0), (261, 4.0), (430, 3.0), (520, 1.4), (70, 3.0)]:
    norm[i % n] *= k
  return norm.astype(np.float32), loss.astype(np.float32)


def _olmo_core_skips(losses, norms, interval=128, sigma=6.0):
  """OLMo-core's SkipStepOptimizer, re-implemented in NumPy (float32, as torch computes it).

  allenai/OLMo-core, src/olmo_core/optim/skip_step_optimizer.py at commit
  fa6c5014c9f6e9ee789da2d9c20d5126fee8df0d: every step's loss and grad norm are appended to
  windows of interval + 1 values (skipped steps included); no decision while a window holds
  fewer than max(2, interval // 2) values, the current one counted; then the step is kept when
  value - mean <= sigma·std over the values before it, std with Bessel's correction
  (torch.std_mean), for the loss and for the grad norm.
  """
  buf_l, buf_g, out = [], [], []
  for loss, norm in zip(losses, norms, strict=True):
    buf_l, buf_g = ([*buf_l, loss])[-(interval + 1) :], ([*buf_g, norm])[-(interval + 1) :]
    if len(buf_l) < max(2, interval // 2):
      out.append(False)
      continue
    ok = True
    for buf, x in ((buf_l, loss), (buf_g, norm)):
      h = np.asarray(buf[:-1], np.float32)
      ok &= bool(
        np.float32(x) - h.mean(dtype=np.float32) <= sigma * h.std(ddof=1, dtype=np.float32)
      )
    out.append(not ok)
  return np.array(out)


def _maxtext_skips(losses, norms, interval=128, scaling=6.0):
  """MaxText's skip_step_on_spikes, re-implemented in NumPy (float32).

  AI-Hypercomputer/maxtext, src/maxtext/optimizers/optimizers.py at commit
  e591f30cbbf217ed67ef71263ec0538239f9c3b8: the statistics of the last min(count, interval)
  values (masked sums, variance over max(1, n - 1)); a step is kept when (count + 1) <
  max(2, interval // 2), or when value - mean <= scaling·std for the loss and the grad norm;
  then the step's values are written at count % interval, skipped or not.
  """
  win_l, win_g = np.zeros(interval, np.float32), np.zeros(interval, np.float32)
  out = []
  for count, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
    n = min(count, interval)
    ok = True
    for win, x in ((win_l, loss), (win_g, norm)):
      held = win[:n]
      mean = held.sum(dtype=np.float32) / np.float32(max(1, n))
      var = np.square(held - mean).sum(dtype=np.float32) / np.float32(max(1, n - 1))
      ok &= bool(np.float32(x) - mean <= np.float32(scaling) * np.sqrt(var))
    ok |= (count + 1) < max(2, interval // 2)
    out.append(not ok)
    win_l[count % interval], win_g[count % interval] = loss, norm
  return np.array(out)


def _their_rule(record_spikes=True, window=128, z_threshold=6.0, std="sample"):
  return omc.skip_bad_steps(
    optax.sgd(0.1),
    z_threshold=z_threshold,
    spike_on="either",
    window=window,
    std=std,
    record_spikes=record_spikes,
  )


def test_the_window_rule_recording_spikes_decides_as_olmo_core_and_maxtext():
  norms, losses = _recorded_streams()
  states = _loss_run(_their_rule(), norms, losses)
  olmo, maxtext = _olmo_core_skips(losses, norms), _maxtext_skips(losses, norms)
  np.testing.assert_array_equal(olmo, maxtext)
  np.testing.assert_array_equal(states.last_step_skipped, olmo)
  assert 3 <= olmo.sum() < 20  # the spikes are seen; the stream is not all skipped


def test_near_the_threshold_their_std_flavour_and_minimum_history_decide_as_theirs():
  # A heavy-tailed loss judged at 2 sigma over 8 values: many decisions lie near the
  # threshold, so the std flavour and the minimum history both change some of them.
  rng = np.random.default_rng(3)
  losses = (3.0 + 0.1 * rng.standard_t(3, size=400)).astype(np.float32)
  losses[2] = 6.0  # a spike before their minimum history: not judged
  norms = np.linspace(2.0, 1.0, 400, dtype=np.float32)  # falling: never a spike
  olmo = _olmo_core_skips(losses, norms, interval=8, sigma=2.0)
  np.testing.assert_array_equal(olmo, _maxtext_skips(losses, norms, interval=8, scaling=2.0))
  ours = _loss_run(_their_rule(window=8, z_threshold=2.0), norms, losses).last_step_skipped
  np.testing.assert_array_equal(ours, olmo)
  population = _loss_run(_their_rule(window=8, z_threshold=2.0, std="population"), norms, losses)
  assert (population.last_step_skipped != olmo).any()  # the flavour is seen
  early = _loss_run(
    omc.skip_bad_steps(
      optax.sgd(0.1),
      z_threshold=2.0,
      spike_on="either",
      window=8,
      min_history=1,
      std="sample",
      record_spikes=True,
    ),
    norms,
    losses,
  ).last_step_skipped
  assert (early != olmo).any()  # so is the minimum history


def test_one_nan_skips_their_whole_window_and_one_step_of_ours():
  norms, losses = _recorded_streams()
  losses = losses.copy()
  losses[300] = np.nan
  theirs = _loss_run(_their_rule(), norms, losses).last_step_skipped
  np.testing.assert_array_equal(theirs, _olmo_core_skips(losses, norms) | np.isnan(losses))
  assert theirs[300:428].all()  # the NaN sits in their window for 128 steps
  ours = _loss_run(_their_rule(record_spikes=False), norms, losses)
  clean = _loss_run(_their_rule(record_spikes=False), *_recorded_streams())
  assert ours.last_step_skipped[300] and not clean.last_step_skipped[300]
  # After the NaN, ours skips what it skips without it: the spikes at 350 and 420.
  np.testing.assert_array_equal(ours.last_step_skipped[301:428], clean.last_step_skipped[301:428])
  assert np.flatnonzero(ours.last_step_skipped[301:428]).tolist() == [49, 119]
  assert np.isfinite(ours.loss_mean).all() and np.isfinite(ours.norm_window).all()


def _window_oracle(values, z, window, min_history, ddof, fed_all=False):
  """The window rule on one signal, float64: (skip, mean judged against) per step."""
  held, out = [], []
  for x in np.asarray(values, np.float64):
    h = np.asarray(held[-window:])
    spike = False
    mean = h.mean() if len(h) else 0.0
    if len(h) >= min_history:
      std = np.sqrt(((h - mean) ** 2).sum() / max(len(h) - ddof, 1))
      spike = std > 1e-3 * abs(mean) and not (x - mean <= z * std)
    skip = spike or not np.isfinite(x)
    if fed_all or not skip:
      held.append(x)
    out.append((skip, mean))
  return [np.array(c) for c in zip(*out, strict=True)]


@pytest.mark.parametrize("std, ddof", [("population", 0), ("sample", 1)])
def test_the_window_rule_on_the_loss_alone_follows_accepted_steps(std, ddof):
  norms, losses = _recorded_streams(seed=1)
  losses = losses.copy()
  losses[[150, 151]] = [np.inf, np.nan]
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=4.0, spike_on="loss", window=32, std=std)
  states = _loss_run(tx, norms, losses)
  skip, mean = _window_oracle(losses, 4.0, 32, 15, ddof)
  np.testing.assert_array_equal(states.last_step_skipped, skip)
  np.testing.assert_allclose(states.loss_mean[20:], mean[20:], rtol=1e-5)
  assert skip[[150, 151, 200]].all()
  assert np.isfinite(states.loss_window).all() and np.isfinite(states.norm_window).all()


def test_the_ema_rule_on_the_loss_follows_accepted_steps_only():
  norms, losses = _recorded_streams(seed=2)
  losses = losses.copy()
  losses[[120, 121]] = [np.nan, np.inf]
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=5.0, spike_on="loss", warmup_steps=20)
  states = _loss_run(tx, norms, losses)
  skip, mean, var, _count = _spike_oracle(losses, 5.0, 0.99, 20)
  np.testing.assert_array_equal(states.last_step_skipped, skip)
  np.testing.assert_allclose(states.loss_mean, mean, rtol=1e-5)
  np.testing.assert_allclose(states.loss_var, var, rtol=1e-3, atol=1e-7)
  assert skip[[120, 121, 200]].all() and np.isfinite(states.loss_mean).all()


def test_a_nonfinite_loss_is_a_bad_step_and_no_value_is_today_s_rule():
  norms = np.ones(6, np.float32)
  losses = np.array([1.0, 1.0, np.nan, 1.0, np.inf, 1.0], np.float32)
  states = _loss_run(omc.skip_bad_steps(optax.sgd(0.1)), norms, losses)
  np.testing.assert_array_equal(states.last_step_skipped, np.isnan(losses) | np.isinf(losses))
  with pytest.raises(TypeError, match=r"skip_bad_steps: spike_on='loss' needs the loss"):
    tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=3.0, spike_on="loss")
    tx.update(U, tx.init(U), U)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"spike_on": "norm"}, r"spike_on must be one of \('grad_norm', 'loss', 'either'\)"),
    ({"window": 1}, r"window must be >= 2, got 1"),
    ({"window": 8, "min_history": 9}, r"min_history must be <= window \(8\), got 9"),
    ({"record_spikes": True}, r"record_spikes=True needs a window"),
    ({"min_history": 4}, r"min_history=4 needs a window"),
    ({"window": 8, "std": "unbiased"}, r"std must be one of \('population', 'sample'\)"),
    ({"std": "sample"}, r"skip_bad_steps: std='sample' needs a window \(window=N\)"),
    ({"window": 8, "alpha": 0.9}, r"alpha=0.9 sets the EMA rule's decay, which window=8 replaces"),
  ],
)
def test_bad_window_arguments_raise(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    omc.skip_bad_steps(optax.sgd(0.1), z_threshold=3.0, **kwargs)


def test_spike_on_without_a_z_threshold_raises():
  with pytest.raises(ValueError, match=r"spike_on='loss' chooses what z_threshold judges"):
    omc.skip_bad_steps(optax.sgd(0.1), spike_on="loss")


SKIP_RULES = {
  "ema": dict(warmup_steps=10),
  "window": dict(window=16),
  "window, sample": dict(window=16, std="sample"),
  "window, min_history 4": dict(window=16, min_history=4),
}


@pytest.mark.parametrize("signal", ["grad_norm", "loss", "either"])
@pytest.mark.parametrize("rule", list(SKIP_RULES))
def test_skip_statistics_are_never_poisoned_by_nonfinite_values(rule, signal):
  """A NaN or Inf norm or loss is skipped and the statistics go on as if it had not come."""
  norms, losses = _recorded_streams(n=80, seed=3)
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=5.0, spike_on=signal, **SKIP_RULES[rule])
  clean = _loss_run(tx, norms, losses)
  bad_norms, bad_losses = norms.copy(), losses.copy()
  bad_norms[30], bad_losses[50] = np.nan, np.inf
  dirty = _loss_run(tx, bad_norms, bad_losses)
  skipped = dirty.last_step_skipped
  assert skipped[30] and skipped[50]
  gone = _loss_run(tx, np.delete(norms, [30, 50]), np.delete(losses, [30, 50]))
  keep = np.delete(np.arange(80), [30, 50])
  for field in ("norm_mean", "norm_var", "loss_mean", "loss_var", "stats_count", "norm_window"):
    np.testing.assert_array_equal(getattr(dirty, field)[keep], getattr(gone, field), field)
  assert np.isfinite(dirty.norm_mean).all() and np.isfinite(dirty.loss_mean).all()
  assert clean.last_step_skipped.sum() <= skipped.sum()


def test_the_loss_reaches_skip_bad_steps_through_every_wrapper():
  """optax.chain, inject_hyperparams, MultiSteps and nnx.Optimizer pass value=loss on."""
  from flax import nnx

  make = lambda: omc.skip_bad_steps(
    optax.sgd(0.1), z_threshold=4.0, spike_on="loss", window=8, min_history=4
  )
  losses = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 30.0, 1.0]
  params = {"w": jnp.ones(2)}
  wrappers = {
    "chain": optax.chain(make()),
    "inject_hyperparams": optax.inject_hyperparams(omc.skip_bad_steps, static_args=("window",))(
      optax.sgd(0.1), z_threshold=4.0, spike_on="loss", window=8, min_history=4
    ),
    "MultiSteps": optax.MultiSteps(make(), every_k_schedule=1),
  }
  for name, tx in wrappers.items():
    state = tx.init(params)
    for loss in losses:
      _, state = jax.jit(tx.update)({"w": jnp.ones(2)}, state, params, value=jnp.float32(loss))
    assert int(optax.tree.get(state, "steps_skipped")) == 1, name

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, loss):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
    optimizer.update(model, grads, value=loss)

  for loss in losses:
    step(model, optimizer, jnp.float32(loss))
  assert int(omc.metrics(optimizer.opt_state)["skip_bad_steps/steps_skipped"]) == 1


def test_spike_statistics_survive_a_norm_too_large_to_square():
  tx = omc.skip_bad_steps(optax.sgd(1.0), z_threshold=6.0, warmup_steps=10)
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(1)})
  norms = 1.0 + 0.1 * np.random.default_rng(0).normal(size=61)
  norms[1], norms[60] = 1e20, 1e6  # finite, but the first one's square overflows float32
  for n in norms:
    u, state = update({"w": jnp.array([n], jnp.float32)}, state)
    assert np.isfinite(state.norm_var) and np.isfinite(state.norm_mean)
  assert bool(state.last_step_skipped) and float(u["w"][0]) == 0.0  # the 1e6 spike


def test_skip_bad_steps_needs_a_scalar_loss():
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=3.0, spike_on="loss")
  g = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"skip_bad_steps: value must be the scalar loss .*\(2,\)"):
    tx.update(g, tx.init(g), value=jnp.array([0.5, 0.7]))  # per-example losses, shaped like w


def test_steps_over_max_norm_alone_do_not_restart_the_statistics():
  tx = omc.skip_bad_steps(
    optax.sgd(0.1), max_norm=10.0, z_threshold=3.0, warmup_steps=20, max_consecutive_spikes=3
  )
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(2)})
  for n in 1.0 + 0.1 * np.random.default_rng(0).normal(size=5):  # still warming up
    _, state = update({"w": jnp.array([n, 0.0], jnp.float32)}, state)
  for _ in range(4):  # over max_norm: skipped, but the z-score rule judges nothing yet
    _, state = update({"w": jnp.array([50.0, 0.0])}, state)
    assert bool(state.last_step_skipped)
  assert int(state.stats_count) == 5 and int(state.stats_restarts) == 0
  assert int(state.consecutive_spikes) == 0


def test_a_value_too_large_to_square_feeds_neither_signal():
  tx = omc.skip_bad_steps(optax.sgd(0.1), z_threshold=3.0, warmup_steps=10)
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(1)})
  for n in [1.0, 2.0, 1e25, 3.0]:  # the norm and the loss share one count
    _, state = update({"w": jnp.array([n], jnp.float32)}, state, value=jnp.float32(0.5))
  assert int(state.stats_count) == 3
  assert float(state.norm_mean) == pytest.approx(2.0) and float(state.loss_mean) == 0.5


def test_a_window_rule_injected_with_bf16_params_keeps_its_default_alpha():
  """optax casts the injected default alpha to bf16 (0.98828); it was refused as user-set."""
  params = {"w": jnp.ones(4, jnp.bfloat16)}
  tx = optax.inject_hyperparams(omc.skip_bad_steps, static_args=("window",))(
    optax.sgd(0.1), z_threshold=3.0, window=8
  )
  state = tx.init(params)
  u, state = jax.jit(tx.update)({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
  np.testing.assert_array_equal(np.asarray(u["w"], np.float32), float(jnp.bfloat16(-0.1)))
  with pytest.raises(ValueError, match=r"alpha=.* sets the EMA rule's decay, which window=8"):
    omc.skip_bad_steps(optax.sgd(0.1), z_threshold=3.0, window=8, alpha=jnp.bfloat16(0.95))


@pytest.mark.parametrize(
  "wrap", [omc.skip_bad_steps, omc.cautious], ids=["skip_bad_steps", "cautious"]
)
def test_wrappers_take_an_optax_multisteps_as_optax_chain_does(wrap):
  every = lambda: optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=2)
  params = {"w": jnp.zeros(3)}
  ours, plain = wrap(every()), wrap(every().gradient_transformation())
  s1, s2 = ours.init(params), plain.init(params)
  for t in range(4):
    g = {"w": jnp.array([1.0, -2.0, 0.5]) * (t + 1)}
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = plain.update(g, s2, params)
    chex.assert_trees_all_equal(u1, u2)
  with pytest.raises(TypeError, match=r"inner must be an optax\.GradientTransformation \(or have"):
    wrap(object())
