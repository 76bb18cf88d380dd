"""Every input a user can give: accepted and used exactly, or refused at once by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_momclip as omc

G = {"w": jnp.array([[3.0, 0.0], [4.0, 0.0]]), "b": jnp.array([0.5, -0.5])}


@pytest.mark.parametrize(
  "make",
  [
    lambda v: omc.clip_by_global_norm(v),
    lambda v: omc.clip_by_norm(v),
    lambda v: omc.zclip(v),
    lambda v: omc.momclip_sgd(v, max_norm=v),
    lambda v: omc.heavy_ball(v),
    lambda v: omc.adaptive_grad_clip(v),
  ],
  ids=["clip_by_global_norm", "clip_by_norm", "zclip", "momclip_sgd", "heavy_ball", "agc"],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float64, np.int32])
def test_a_zero_d_array_of_any_real_dtype_is_a_hyperparameter(make, dtype):
  """As optax.inject_hyperparams casts them to bf16 params; the arithmetic stays in float32."""
  value = 0.5 if jnp.issubdtype(dtype, jnp.floating) else 1
  tx, ref = (
    make(jnp.asarray(value, dtype) if dtype != jnp.float64 else np.float64(value)),
    make(value),
  )
  u, s = tx.update(G, tx.init(G), G)
  ref_u, ref_s = ref.update(G, ref.init(G), G)
  jax.tree.map(np.testing.assert_array_equal, (u, s), (ref_u, ref_s))


def test_inject_hyperparams_with_bf16_params_as_optax_documents_it():
  params = {"w": jnp.ones(2, jnp.bfloat16)}
  tx = optax.inject_hyperparams(omc.momclip_sgd)(learning_rate=0.1, max_norm=1.0)
  state = tx.init(params)
  assert state.hyperparams["max_norm"].dtype == jnp.bfloat16  # optax's cast
  u, _ = jax.jit(tx.update)({"w": jnp.full(2, 3.0, jnp.bfloat16)}, state, params)
  np.testing.assert_allclose(np.asarray(u["w"], np.float32), -0.1 * np.sqrt(0.5), rtol=1e-2)
  tx = omc.clip_by_global_norm(jnp.asarray(1.0, jnp.bfloat16))
  assert float(tx.init(params).clip_threshold) == 1.0


def test_momclip_sgd_injected_without_params_needs_no_weight_decay():
  tx = optax.inject_hyperparams(omc.momclip_sgd)(learning_rate=0.1)
  g = {"w": jnp.ones(2)}
  u, _ = jax.jit(tx.update)(g, tx.init(g))  # no params: no decay was asked for
  np.testing.assert_allclose(u["w"], -0.1, rtol=1e-6)
  decayed = optax.inject_hyperparams(omc.momclip_sgd)(learning_rate=0.1, weight_decay=0.5)
  with pytest.raises(ValueError, match=r"momclip_sgd: weight_decay=.* needs params"):
    jax.jit(decayed.update)(g, decayed.init(g))


@pytest.mark.parametrize(
  "build, err, match",
  [
    (
      lambda: omc.ema_momentum(debias="False"),
      TypeError,
      r"ema_momentum: debias must be True or False, got 'False'",
    ),
    (
      lambda: omc.skip_bad_steps(optax.sgd(0.1), skip_nonfinite=1),
      TypeError,
      r"skip_nonfinite must be True or False",
    ),
    (
      lambda: omc.momclip_sgd(np.inf),
      ValueError,
      r"momclip_sgd: learning_rate must be in \[0, inf\), got inf",
    ),
    (
      lambda: omc.momclip_sgd(0.1, weight_decay=np.inf),
      ValueError,
      r"weight_decay must be in \[0, inf\), got inf",
    ),
    (
      lambda: omc.normalized_momentum(eps=np.inf),
      ValueError,
      r"normalized_momentum: eps must be in \(0, inf\), got inf",
    ),
    (
      lambda: omc.adaptive_grad_clip(np.inf),
      ValueError,
      r"adaptive_grad_clip: clipping must be in \[0, inf\), got inf",
    ),
    (
      lambda: omc.adaptive_grad_clip(0.1, eps=np.inf),
      ValueError,
      r"adaptive_grad_clip: eps must be in \[0, inf\)",
    ),
    (
      lambda: omc.heavy_ball(accumulator_dtype=jnp.ones(2)),
      TypeError,
      r"heavy_ball: accumulator_dtype must be None or a floating dtype, got an array",
    ),
    (
      lambda: omc.clip_by_global_norm(np.complex64(1)),
      TypeError,
      r"clip_by_global_norm: max_norm must be a real number.*complex64",
    ),
    (lambda: omc.heavy_ball(1j), TypeError, r"heavy_ball: momentum must be a real number.*1j"),
    (
      lambda: omc.clip_by_norm(1.0, axis=(0, 0)),
      ValueError,
      r"clip_by_norm: axis must name each axis once, got \(0, 0\)",
    ),
    (
      lambda: omc.adaptive_grad_clip(axis=(1, 1)),
      ValueError,
      r"adaptive_grad_clip: axis must name each axis once",
    ),
    (lambda: omc.autoclip(window=2.0), TypeError, r"autoclip: window must be an int, got 2.0"),
    (lambda: omc.demon(total_steps=np.float32(3)), TypeError, r"demon: total_steps must be an int"),
  ],
)
def test_what_cannot_work_is_refused_at_construction(build, err, match):
  with pytest.raises(err, match=match):
    build()


def test_numpy_integers_are_integers():
  assert omc.autoclip(window=np.int64(3)).init(G).norm_history.shape == (3,)
  assert float(omc.demon(0.9, total_steps=np.int64(10))(10)) == 0.0
  assert int(omc.zclip(warmup_steps=np.int32(2)).init(G).stats_count) == 0


@pytest.mark.parametrize(
  "name, tx",
  [
    ("clip_by_norm", omc.clip_by_norm(1.0, axis=(0, -2))),
    ("adaptive_grad_clip", omc.adaptive_grad_clip(0.1, axis=(1, -1))),
  ],
)
def test_axes_that_coincide_at_a_leaf_s_rank_are_named_at_update(name, tx):
  """``(0, -2)`` is two axes of a rank-3 leaf but one axis of a rank-2 leaf."""
  with pytest.raises(ValueError, match=rf"{name}: axis=\(.*\) names the same axis twice .*rank 2"):
    tx.update(G, tx.init(G), G)
  cube = {"c": jnp.ones((2, 3, 4))}
  tx.update(cube, tx.init(cube), cube)  # two axes there


@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_a_negative_or_nan_max_norm_from_a_schedule_zeroes_the_update(bad):
  """A schedule's value is only known in the step: it never flips the update or lets it through."""
  schedule = lambda step: jnp.where(step >= 1, bad, 1.0)
  for tx in [omc.clip_by_global_norm(schedule), optax.inject_hyperparams(omc.clip_by_norm)(1.0)]:
    state = tx.init(G)
    if hasattr(state, "hyperparams"):
      state.hyperparams["max_norm"] = jnp.asarray(bad, jnp.float32)
    else:
      _, state = tx.update(G, state)  # step 0: max_norm 1
    u, _ = jax.jit(tx.update)(G, state)  # traced: checked in the step, not at construction
    for leaf in jax.tree.leaves(u):
      np.testing.assert_array_equal(np.abs(np.asarray(leaf)), 0.0)


def test_when_a_traced_min_norm_exceeds_max_norm_the_upper_bound_wins():
  """Only traced bounds can cross (concrete ones are refused): max_norm is never exceeded."""
  g = {"w": jnp.array([0.3, 0.4])}  # norm 0.5

  @jax.jit
  def clipped(lo, hi):
    out = []
    for tx in [omc.clip_by_global_norm(hi, min_norm=lo), omc.clip_by_norm(hi, min_norm=lo)]:
      out.append(tx.update(g, tx.init(g))[0]["w"])
    return out

  for u in clipped(jnp.float32(5.0), jnp.float32(1.0)):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(u)), 1.0, rtol=1e-6)
