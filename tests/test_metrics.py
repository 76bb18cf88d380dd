"""metrics() at any nesting, one norm pass per step, and with_value_checks."""

import re

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_momclip as omc

G = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "b": jnp.array([0.0, 0.0])}
NORM = 5.0


def _step(tx, grads=G, params=G, steps=1):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    _, state = update(grads, state, params)
  return state


WRAPPERS = {
  "chain": lambda t: optax.chain(optax.scale(1.0), t, optax.sgd(0.1)),
  "inject_hyperparams": lambda t: optax.chain(
    t, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  ),
  "inject_inner": lambda t: optax.inject_hyperparams(omc.clip_by_global_norm, static_args=("ord",))(
    max_norm=1.0
  ),
  "multisteps": lambda t: optax.MultiSteps(t, every_k_schedule=1),
  "masked": lambda t: optax.masked(t, {"w": True, "b": True}),
  "multi_transform": lambda t: optax.multi_transform(
    {"a": t, "z": optax.set_to_zero()}, {"w": "a", "b": "a"}
  ),
}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_metrics_find_the_norm_at_any_nesting(wrap):
  state = _step(wrap(omc.clip_by_global_norm(1.0)))
  m = jax.jit(omc.metrics)(state)
  key = "a/clip_by_global_norm" if wrap is WRAPPERS["multi_transform"] else "clip_by_global_norm"
  np.testing.assert_allclose(m[f"{key}/grad_norm"], NORM, rtol=1e-6)
  np.testing.assert_allclose(m[f"{key}/clip_scale"], 1.0 / NORM, rtol=1e-6)
  assert m[f"{key}/clip_threshold"] == 1.0
  assert m[f"{key}/count"] == 1
  assert m[f"{key}/clip_fraction"] == 1.0
  np.testing.assert_allclose(optax.tree.get(state, "grad_norm"), NORM, rtol=1e-6)


def test_metrics_keys_values_and_fraction_over_steps():
  tx = optax.chain(omc.clip_by_value(2.0), omc.clip_by_global_norm(100.0))
  state = _step(tx, steps=3)
  m = omc.metrics(state)
  assert sorted(m) == sorted(
    [
      f"{p}/{k}"
      for p in ("clip_by_value", "clip_by_global_norm")
      for k in ("grad_norm", "clip_threshold", "count", "steps_clipped", "clip_fraction")
    ]
    + ["clip_by_global_norm/clip_scale"]
  )
  assert m["clip_by_value/clip_fraction"] == 1.0
  assert m["clip_by_global_norm/clip_fraction"] == 0.0
  np.testing.assert_allclose(m["clip_by_global_norm/grad_norm"], np.sqrt(8.0), rtol=1e-6)
  assert m["clip_by_value/grad_norm"] == 4.0
  assert m["clip_by_value/count"].dtype == jnp.int32
  assert m["clip_by_value/clip_fraction"].dtype == jnp.float32


def test_second_instance_gets_a_numbered_key():
  tx = optax.chain(omc.clip_by_global_norm(1.0), omc.clip_by_global_norm(0.5))
  m = omc.metrics(_step(tx))
  np.testing.assert_allclose(m["clip_by_global_norm/grad_norm"], NORM, rtol=1e-6)
  np.testing.assert_allclose(m["clip_by_global_norm_1/grad_norm"], 1.0, rtol=1e-6)


def test_per_leaf_statistics_get_a_key_per_leaf():
  m = omc.metrics(_step(omc.clip_by_norm(1.0, axis=0)))
  np.testing.assert_allclose(m["clip_by_norm/grad_norm/w"], 4.0, rtol=1e-6)  # max over units
  assert m["clip_by_norm/grad_norm/b"] == 0.0
  assert m["clip_by_norm/clip_fraction"] == 1.0


def test_metrics_of_an_nnx_optimizer_inside_a_jitted_step():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x):
      return self.lin(x)

  model = Model(nnx.Rngs(0))
  tx = optax.chain(omc.clip_by_global_norm(0.1), optax.sgd(0.1))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((4, 2))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    opt.update(model, grads)
    return omc.metrics(opt.opt_state), omc.global_norm(grads)

  m, norm = step(model, opt)
  np.testing.assert_allclose(m["clip_by_global_norm/grad_norm"], norm, rtol=1e-6)
  assert m["clip_by_global_norm/count"] == 1
  assert set(m) >= {"clip_by_global_norm/clip_fraction", "clip_by_global_norm/clip_scale"}


def _count_reductions(jaxpr, shapes, in_cond=False):
  """(outside conds, inside conds) counts of reduce_sum over a parameter-shaped operand."""
  outside = inside = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum" and tuple(eqn.invars[0].aval.shape) in shapes:
      if in_cond:
        inside += 1
      else:
        outside += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      o, i = _count_reductions(sub, shapes, in_cond or eqn.primitive.name == "cond")
      outside, inside = outside + o, inside + i
  return outside, inside


def test_one_norm_pass_in_a_step_that_logs_the_norm():
  tx = optax.chain(omc.clip_by_global_norm(1.0), optax.trace(0.9), optax.scale(-0.1))
  params = {"a": jnp.ones((8, 3)), "b": jnp.ones((5,))}

  def step(grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), omc.metrics(state)

  jaxpr = jax.make_jaxpr(step)(params, tx.init(params)).jaxpr
  outside, inside = _count_reductions(jaxpr, {(8, 3), (5,)})
  assert outside == 2  # one sum of squares per leaf; metrics reads the state
  assert inside == 2  # the overflow/underflow rescue, taken only when needed


def test_with_value_checks_raises_under_chexify_and_is_free_under_jit():
  tx = omc.with_value_checks(optax.chain(omc.clip_by_global_norm(1.0), optax.trace(0.9)))
  good = {"w": jnp.array([1.0, 2.0])}
  bad = {"w": jnp.array([jnp.nan, 2.0])}
  state = tx.init(good)

  checked = chex.chexify(jax.jit(tx.update), async_check=False)
  u, _ = checked(good, state)
  np.testing.assert_allclose(u["w"], np.array([1.0, 2.0]) / np.sqrt(5.0), rtol=1e-6)
  with pytest.raises(AssertionError, match="non-finite updates"):
    checked(bad, state)

  # A fresh instance: jit caches traces per function, checks included.
  tx = omc.with_value_checks(optax.chain(omc.clip_by_global_norm(1.0), optax.trace(0.9)))
  plain = jax.jit(tx.update)
  u, _ = plain(bad, state)
  assert np.isnan(u["w"][0])
  # Compiled without chexify, the checks leave no instruction in the step.
  unchecked = optax.chain(omc.clip_by_global_norm(1.0), optax.trace(0.9))

  def instructions(f):
    hlo = jax.jit(f).lower(good, state).compile().as_text()
    return sorted(re.findall(r" = .*?\s([a-z][\w-]*)\(", hlo))

  assert instructions(tx.update) == instructions(unchecked.update)
  assert len(instructions(tx.update)) > 10  # the step itself


def test_with_value_checks_keeps_the_state_and_extra_args():
  inner = omc.clip_by_global_norm(1.0)
  tx = omc.with_value_checks(inner)
  u, s = tx.update(G, tx.init(G), None, loss=1.0)
  u2, s2 = inner.update(G, inner.init(G))
  chex.assert_trees_all_equal((u, s), (u2, s2))


def test_with_value_checks_accepts_a_skipped_nan_step_but_not_a_corrupted_state():
  tx = omc.with_value_checks(omc.skip_bad_steps(optax.sgd(0.1, momentum=0.9)))
  params = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(params)
  u, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)  # skipped: fine
  assert bool(state.last_step_skipped) and np.isnan(state.grad_norm)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
  unguarded = omc.with_value_checks(optax.sgd(0.1, momentum=0.9))
  with pytest.raises(AssertionError, match="non-finite"):
    unguarded.update({"w": jnp.array([jnp.nan, 1.0])}, unguarded.init(params), params)
  corrupt = state._replace(inner_state=jax.tree.map(lambda x: x * jnp.nan, state.inner_state))
  bad_inner = omc.with_value_checks(
    omc.skip_bad_steps(optax.sgd(0.1, momentum=0.9), skip_nonfinite=False)
  )
  with pytest.raises(AssertionError, match="non-finite"):
    bad_inner.update({"w": jnp.array([1.0, 1.0])}, corrupt, params)


def test_with_value_checks_accepts_a_skipped_nan_loss_and_an_unset_adagc_gamma():
  params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}
  on_loss = omc.with_value_checks(
    omc.skip_bad_steps(optax.sgd(0.1), z_threshold=3.0, spike_on="loss")
  )
  _, state = on_loss.update(params, on_loss.init(params), params, value=jnp.float32(jnp.nan))
  assert bool(state.last_step_skipped) and np.isnan(state.loss)  # recorded, not corruption
  adagc = omc.with_value_checks(omc.skip_bad_steps(optax.chain(omc.adagc(), optax.adam(0.1))))
  nan = {"w": jnp.array([jnp.nan, 1.0]), "b": jnp.array([0.5])}
  _, state = adagc.update(nan, adagc.init(params), params)  # skipped: every γ still unset
  assert np.isinf(state.inner_state[0].gamma["w"])
  bare = omc.with_value_checks(omc.adagc())
  corrupt = bare.init(params)._replace(gamma={"w": jnp.float32(jnp.nan), "b": jnp.float32(1.0)})
  with pytest.raises(AssertionError, match="non-finite state"):  # NaN is still caught
    bare.update(params, corrupt, params)


def test_register_statistics_takes_dataclass_states_and_checks_field_names():
  from flax import struct

  @struct.dataclass
  class Tracked:
    grad_norm: jax.Array
    running: jax.Array  # state proper, which the checks look at

  omc.register_statistics(Tracked, "tracked", ["grad_norm"])
  tx = optax.GradientTransformation(
    lambda p: Tracked(jnp.zeros([]), jnp.zeros([])),
    lambda g, s, p=None: (g, Tracked(omc.global_norm(g), 0.5 * s.running + 1.0)),
  )
  checked = omc.with_value_checks(tx)
  g = {"w": jnp.array([3.0, 4.0])}
  _, state = checked.update(g, checked.init(g))  # an AttributeError (_replace) before
  assert float(omc.metrics(state)["tracked/grad_norm"]) == 5.0
  with pytest.raises(AssertionError, match="non-finite state"):
    checked.update(g, state.replace(running=jnp.float32(jnp.nan)))
  with pytest.raises(ValueError, match=r"register_statistics: Tracked has no field 'grad_nrom'"):
    omc.register_statistics(Tracked, "tracked", ["grad_nrom"])


def test_zero_size_leaves_in_per_leaf_statistics_and_value_checks():
  tx = omc.with_value_checks(omc.clip_by_norm(1.0, axis=0))
  g = {"f": jnp.zeros((3, 0)), "e": jnp.zeros((0,)), "x": jnp.full((2, 2), 3.0)}
  u, state = tx.update(g, tx.init(g))
  assert u["f"].shape == (3, 0)
  m = omc.metrics(state)
  np.testing.assert_allclose(m["clip_by_norm/grad_norm/x"], np.sqrt(18.0), rtol=1e-6)
  assert float(m["clip_by_norm/grad_norm/e"]) == 0.0  # a whole-leaf norm: zero
  assert not any("/f" in k for k in m)  # no slices, no statistic


def test_keys_stay_put_when_the_chain_around_a_transformation_changes():
  g = {"w": jnp.array([3.0, 4.0])}
  clip = lambda: omc.clip_by_global_norm(1.0)
  keys = lambda tx: set(omc.metrics(tx.update(g, tx.init(g))[1]))
  alone = keys(optax.named_chain(("dec", clip())))
  grown = keys(optax.named_chain(("enc", clip()), ("dec", clip()), ("sgd", optax.sgd(0.1))))
  assert {k for k in alone} <= grown and "dec/clip_by_global_norm/grad_norm" in alone
  assert "enc/clip_by_global_norm/grad_norm" in grown
  # In a plain chain only a second instance of the same transformation is numbered.
  assert "clip_by_global_norm/grad_norm" in keys(optax.chain(omc.clip_by_value(9.0), clip()))
  assert "clip_by_global_norm_1/grad_norm" in keys(optax.chain(clip(), clip()))


def test_a_vmapped_ensemble_state_reports_each_member_on_its_own():
  """Summaries (adagc's gamma) and per-leaf maxima (clip_by_norm's per-row norms) mixed members."""
  tx = optax.chain(omc.adagc(warmup_steps=1), omc.clip_by_norm(1.0, axis=-1))
  params = {"w": jnp.zeros((3, 2, 4)), "b": jnp.zeros((3, 4))}  # 3 members
  rng = np.random.default_rng(0)
  size = np.array([0.1, 5.0, 1.0])[:, None, None]  # members apart: one clipped, one not
  steps = [
    {
      "w": jnp.asarray(rng.normal(size=(3, 2, 4)) * size, jnp.float32),
      "b": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    }
    for _ in range(3)
  ]
  state = jax.vmap(tx.init)(params)
  for g in steps:
    _, state = jax.vmap(tx.update)(g, state)
  batched = omc.metrics(state)
  for member in range(3):
    take = lambda tree, m=member: jax.tree.map(lambda x: x[m], tree)
    alone = tx.init(take(params))
    for g in steps:
      _, alone = tx.update(take(g), alone)
    expected = omc.metrics(alone)
    assert set(batched) == set(expected)
    for key, value in expected.items():
      np.testing.assert_allclose(batched[key][member], value, rtol=1e-6, err_msg=key)
