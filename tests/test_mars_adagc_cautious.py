"""MARS, AdaGC and cautious masking against NumPy float64 re-implementations, and at the edges.

The oracles follow pytorch-optimizer 4.1.0's code (optimizer/mars.py, optimizer/adagc.py,
base/optimizer.py ``apply_cautious``), written out here in float64 so these tests run without
the ``parity`` extra; test_pytorch_optimizer_parity.py runs the real thing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_momclip as omc

SHAPES = {"kernel": (6, 5), "bias": (5,), "scale": ()}


def _grads(steps, seed=0, spikes=()):
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    size = (0.05, 0.5, 3.0)[t % 3] * (20.0 if t in spikes else 1.0)
    out.append({k: (size * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()})
  return out


def _run(tx, grads, params=None):
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()} if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs, states = [], []
  for g in grads:
    u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    outs.append({k: np.asarray(v, np.float64) for k, v in u.items()})
    states.append(state)
  return outs, states


# ---- MARS -------------------------------------------------------------------------------------


def _mars_oracle(grads, gamma, beta1):
  previous, out = {}, []
  for g in grads:
    step = {}
    for k, x in g.items():
      x = x.astype(np.float64)
      c = x + gamma * beta1 / (1 - beta1) * (x - previous.get(k, 0.0))
      n = np.linalg.norm(c)
      step[k] = c / n if n > 1 else c
      previous[k] = x
    out.append(step)
  return out


def test_mars_is_the_clipped_variance_reduced_gradient():
  grads = _grads(9)
  ours, states = _run(omc.mars(0.1, 0.9), grads)
  for a, b in zip(ours, _mars_oracle(grads, 0.1, 0.9), strict=True):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-6, atol=1e-7)
  clipped = [int(s.tensors_clipped) for s in states]
  assert max(clipped) > 0 and min(clipped) < len(SHAPES)  # both sides of the clip are seen
  np.testing.assert_array_equal(states[-1].previous_grad["kernel"], grads[-1]["kernel"])


def test_mars_clips_huge_and_keeps_tiny_corrections_exactly():
  g = {"w": jnp.array([2e38, -1.5e38]), "v": jnp.array([3e-38, 4e-38])}
  tx = omc.mars(0.0, 0.9)  # gamma 0: the clip alone
  c, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(c["w"], [0.8, -0.6], rtol=1e-6)  # its sum of squares overflows
  np.testing.assert_array_equal(c["v"], g["v"])


def test_mars_keeps_the_gradient_dtype_and_stores_the_raw_gradient():
  g = {"w": jnp.array([1.0, -2.0, 3.0], jnp.bfloat16)}
  tx = omc.mars()
  c, state = tx.update(g, tx.init(g))
  c, state = tx.update({"w": 2 * g["w"]}, state)
  assert c["w"].dtype == jnp.bfloat16 and state.previous_grad["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(state.previous_grad["w"], 2 * g["w"])
  want = _mars_oracle([{"w": np.float32([1, -2, 3])}, {"w": np.float32([2, -4, 6])}], 0.025, 0.95)
  np.testing.assert_allclose(np.float32(c["w"]), want[1]["w"], rtol=1e-2)  # bf16 rounding


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"gamma": -0.1}, r"mars: gamma must be in \[0, inf\), got -0.1"),
    ({"beta1": 1.0}, r"mars: beta1 must be in \[0, 1\), got 1.0"),
    ({"gamma": jnp.ones(2)}, "mars: gamma must be a real number"),
  ],
)
def test_mars_rejects_bad_hyperparameters(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    omc.mars(**kwargs)


# ---- AdaGC ------------------------------------------------------------------------------------


def _adagc_oracle(grads, lambda_rel, beta, lambda_abs, warmup, eps):
  """pytorch-optimizer's AdaGC clipping in float64 (the ĝ it feeds Adam, and γ)."""
  gamma, out, gammas = {}, [], []
  for step, g in enumerate(grads, start=1):
    g = {k: v.astype(np.float64) for k, v in g.items()}
    total = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    hat = {}
    for k, v in g.items():
      if k not in gamma or step < warmup:
        hat[k] = v * min(lambda_abs / (total + eps), 1.0)
        n = np.linalg.norm(hat[k])
        gamma[k] = n if k not in gamma else min(gamma[k], n)
      else:
        h = min(lambda_rel * max(gamma[k], eps) / max(np.linalg.norm(v), eps), 1.0)
        hat[k] = h * v
        gamma[k] = gamma[k] + (1 - beta) * (np.linalg.norm(hat[k]) - gamma[k])
    out.append(hat)
    gammas.append(dict(gamma))
  return out, gammas


def test_adagc_warms_up_globally_then_clips_each_tensor_against_its_own_ema():
  grads = _grads(24, spikes=(13, 20))
  ours, states = _run(omc.adagc(1.05, beta=0.9, lambda_abs=2.0, warmup_steps=6), grads)
  want, gammas = _adagc_oracle(grads, 1.05, 0.9, 2.0, 6, 1e-8)
  for t, (a, b) in enumerate(zip(ours, want, strict=True)):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-6, atol=1e-7, err_msg=f"step {t}, {k}")
      np.testing.assert_allclose(states[t].gamma[k], gammas[t][k], rtol=2e-6)
  clipped = [int(s.tensors_clipped) for s in states]
  assert max(clipped[:5]) == len(SHAPES)  # the global clip scales every tensor
  assert max(clipped[6:]) > 0 and min(clipped[6:]) < len(SHAPES)  # then tensors on their own
  m = omc.metrics(states[-1])
  g = np.array([gammas[-1][k] for k in SHAPES])
  np.testing.assert_allclose(
    [m["adagc/gamma_min"], m["adagc/gamma_mean"], m["adagc/gamma_max"]],
    [g.min(), g.mean(), g.max()],
    rtol=2e-6,
  )
  assert not any(k.startswith("adagc/gamma/") for k in m)  # a summary, not a key per tensor


def test_adagc_keeps_gamma_through_nonfinite_norms():
  grads = _grads(12)
  bad = [dict(g) for g in grads]
  bad[3] = {**bad[3], "bias": np.float32([np.nan] * 5)}  # during warm-up: every γ kept
  bad[8] = {**bad[8], "kernel": np.full((6, 5), np.inf, np.float32)}  # after: that γ kept
  tx = omc.adagc(1.05, warmup_steps=5)
  ours, states = _run(tx, bad)
  assert np.isnan(ours[3]["bias"]).all() and np.isfinite(ours[3]["kernel"]).all()  # unscaled
  np.testing.assert_array_equal(ours[3]["kernel"], bad[3]["kernel"])
  for k in SHAPES:
    assert float(states[3].gamma[k]) == float(states[2].gamma[k])
  assert float(states[8].gamma["kernel"]) == float(states[7].gamma["kernel"])
  assert float(states[8].gamma["bias"]) != float(states[7].gamma["bias"])
  assert all(np.isfinite(float(x)) for x in jax.tree.leaves(states[-1].gamma))


def test_adagc_stays_out_of_warm_up_when_its_count_saturates():
  tx = omc.adagc(warmup_steps=5, lambda_abs=0.01)
  g = {"a": jnp.array([3.0, 4.0])}
  state = tx.init(g)._replace(
    count=jnp.int32(np.iinfo(np.int32).max), gamma={"a": jnp.float32(1.0)}
  )
  u, state = jax.jit(tx.update)(g, state)
  # after warm-up: clipped to lambda_rel·γ = 1.05, not to the warm-up's lambda_abs = 0.01
  np.testing.assert_allclose(np.linalg.norm(np.asarray(u["a"])), 1.05, rtol=1e-6)
  assert int(state.count) == np.iinfo(np.int32).max


def test_adagc_gamma_of_a_zero_size_leaf_is_empty_and_left_out_of_the_summary():
  params = {"w": jnp.ones((3,)), "e": jnp.zeros((0,))}
  tx = omc.adagc(warmup_steps=1)
  state = tx.init(params)
  assert state.gamma["e"].shape == (0,) and float(state.gamma["w"]) == np.inf
  _, state = tx.update({"w": jnp.array([0.3, 0.4, 0.0]), "e": jnp.zeros((0,))}, state)
  m = omc.metrics(state)
  assert float(m["adagc/gamma_min"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"lambda_rel": 0.0}, r"adagc: lambda_rel must be in \(0, inf\), got 0.0"),
    ({"beta": 1.0}, r"adagc: beta must be in \[0, 1\), got 1.0"),
    ({"lambda_abs": -1.0}, r"adagc: lambda_abs must be in \(0, inf\), got -1.0"),
    ({"warmup_steps": -1}, r"adagc: warmup_steps must be >= 0, got -1"),
    ({"warmup_steps": 2.5}, "adagc: warmup_steps must be an int"),
    ({"axis_name": 3}, "adagc: axis_name"),
  ],
)
def test_adagc_rejects_bad_hyperparameters(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    omc.adagc(**kwargs)


# ---- cautious ---------------------------------------------------------------------------------


def _cautious_oracle(grads, lr, momentum):
  """Momentum SGD (optax's trace, then -lr), each update masked as apply_cautious does."""
  buf = {k: np.zeros(s) for k, s in SHAPES.items()}
  out, fractions = [], []
  for g in grads:
    step, kept, total = {}, 0, 0
    for k, x in g.items():
      x = x.astype(np.float64)
      buf[k] = momentum * buf[k] + x
      u = -lr * buf[k]
      mask = (u * x < 0).astype(np.float64)
      step[k] = u * mask * (mask.size / (mask.sum() + 1))
      kept, total = kept + mask.sum(), total + mask.size
    out.append(step)
    fractions.append(1 - kept / total)
  return out, fractions


def test_cautious_masks_components_that_climb_the_gradient():
  grads = _grads(12)
  ours, states = _run(omc.cautious(optax.sgd(0.1, momentum=0.9)), grads)
  want, fractions = _cautious_oracle(grads, 0.1, 0.9)
  for a, b in zip(ours, want, strict=True):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-6, atol=1e-8)
  np.testing.assert_allclose([float(s.masked_fraction) for s in states], fractions, rtol=1e-6)
  assert max(fractions) > 0.2


def test_cautious_around_momclip_sgd_is_masked_pytorch_sgd():
  grads = _grads(12)
  tx = omc.cautious(omc.momclip_sgd(0.1, 0.9))
  ours, _ = _run(tx, grads)
  want, _ = _cautious_oracle(grads, 0.1, 0.9)  # torch SGD's buffer is optax's trace
  for a, b in zip(ours, want, strict=True):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-6, atol=1e-8)


def test_cautious_judges_tiny_components_by_sign_and_complex_ones_by_part():
  tx = omc.cautious(optax.scale(-1.0))
  g = {"w": jnp.array([1e-30, -1e-30, 2.0, 0.0])}  # 1e-30 squared underflows float32
  u, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(u["w"], [-1e-30, 1e-30, -2.0, 0.0])  # 3 kept: 4/(3 + 1) = 1
  assert float(state.masked_fraction) == pytest.approx(0.25)  # only the zero
  momentum = omc.cautious(optax.chain(omc.heavy_ball(0.9), optax.scale(-1.0)))
  s = momentum.init({"z": jnp.zeros(2, jnp.complex64)})
  _, s = momentum.update({"z": jnp.array([1 + 1j, 1 - 1j], jnp.complex64)}, s)
  z, s = momentum.update({"z": jnp.array([-0.5 + 1j, 1 + 0.5j], jnp.complex64)}, s)
  # buffers 0.4+1.9j and 1.9-0.4j: the real part of the first and the imaginary part of the
  # second still point along their gradient part; 2 of 4 parts kept, scaled by 4/(2 + 1)
  np.testing.assert_allclose(z["z"], np.array([-1.9j, -1.9]) * 4 / 3, rtol=1e-6)
  assert float(s.masked_fraction) == pytest.approx(0.5)


def test_cautious_leaves_a_broken_update_visible_as_the_reference_does():
  # The reference multiplies by its 0/1 mask, so a masked NaN or infinity comes out NaN.
  fixed = {
    "w": jnp.float32([np.nan, np.inf, np.inf, -np.inf, 1.0, 2.0, -3.0, 4.0]),
    "z": jnp.complex64([np.nan + 1j, -1 + np.inf * 1j]),
  }
  tx = omc.cautious(optax.stateless(lambda g, p: fixed))
  g = {
    "w": jnp.float32([1.0, 1.0, -1.0, 1.0, 0.5, np.nan, 2.0, -1.0]),
    "z": jnp.complex64([1 + 1j, 1 - 1j]),
  }
  u, state = jax.jit(tx.update)(g, tx.init(g))
  masked = 0
  for k in fixed:  # pytorch-optimizer's apply_cautious in float64, on real views as torch's
    real = lambda x: np.stack([x.real, x.imag], -1) if np.iscomplexobj(x) else x
    x, grad = (
      real(np.asarray(fixed[k], np.complex128 if k == "z" else np.float64)),
      real(np.asarray(g[k], np.complex128 if k == "z" else np.float64)),
    )
    with np.errstate(invalid="ignore"):
      mask = (-x * grad > 0).astype(np.float64)
      want = x * (mask * (mask.size / (mask.sum() + 1)))
    masked += mask.size - mask.sum()
    np.testing.assert_array_equal(real(np.asarray(u[k])), want.astype(np.float32))
  assert np.isnan(u["w"][:2]).all() and u["w"][5] == 0  # a NaN gradient only masks
  assert float(state.masked_fraction) == pytest.approx(masked / 12)


def test_cautious_passes_extra_arguments_to_inner():
  inner = omc.skip_bad_steps(optax.sgd(0.1), spike_on="loss", z_threshold=3.0)
  tx = omc.cautious(inner)
  g = {"w": jnp.array([1.0, -1.0])}
  u, state = tx.update(g, tx.init(g), value=jnp.float32(jnp.nan))
  assert bool(state.inner_state.last_step_skipped)
  np.testing.assert_array_equal(u["w"], [0.0, 0.0])


def test_cautious_rejects_what_is_not_a_transformation():
  with pytest.raises(TypeError, match=r"cautious: inner must be an optax\.GradientTransformation"):
    omc.cautious(optax.sgd)


@pytest.mark.parametrize(
  "make",
  [
    lambda ax: omc.mars(axis_name=ax),
    lambda ax: omc.cautious(optax.sgd(0.1, momentum=0.9), axis_name=ax),
  ],
  ids=["mars", "cautious"],
)
def test_axis_name_makes_a_sharded_tensor_act_as_one_under_shard_map(make):
  """Without it each of the 8 shards was clipped (MARS) or rescaled (cautious) on its own."""
  from jax.sharding import Mesh, PartitionSpec

  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  keys = jax.random.split(jax.random.key(3), 2)
  steps = [{"w": jax.random.normal(k, (16, 3)) * 0.5} for k in keys]  # norm ~3.5: MARS clips
  params = {"w": jnp.zeros((16, 3))}

  def two_steps(tx, steps, params):
    state = tx.init(params)
    for g in steps:
      u, state = tx.update(g, state, params)
    return u, omc.metrics(state)

  spec = PartitionSpec("d")
  sharded = jax.jit(
    jax.shard_map(
      lambda s, p: two_steps(make("d"), s, p),
      mesh=mesh,
      in_specs=(spec, spec),
      out_specs=(spec, PartitionSpec()),
    )
  )
  u, stats = sharded(steps, params)
  u_whole, stats_whole = two_steps(make(None), steps, params)
  np.testing.assert_allclose(u["w"], u_whole["w"], rtol=1e-6, atol=1e-7)
  for key, value in stats_whole.items():
    np.testing.assert_allclose(stats[key], value, rtol=1e-6, err_msg=key)


def test_mars_keeps_its_state_dtype_when_the_gradients_are_narrower():
  """bf16 gradients into f32 params: the stored gradient stays f32, so ``scan`` can carry it."""
  params = {"w": jnp.zeros(4, jnp.float32)}
  grads = jnp.asarray(np.linspace(-1, 1, 12).reshape(3, 4), jnp.bfloat16)
  tx = omc.mars()

  def step(state, g):
    u, state = tx.update({"w": g}, state)
    return state, u["w"]

  state, outs = jax.lax.scan(step, tx.init(params), grads)
  assert state.previous_grad["w"].dtype == jnp.float32
  np.testing.assert_array_equal(state.previous_grad["w"], np.asarray(grads[-1], np.float32))
  eager = tx.init(params)
  for t in range(3):
    u, eager = tx.update({"w": grads[t]}, eager)
    np.testing.assert_array_equal(outs[t], u["w"])


def test_adagc_gives_a_schedule_an_integer_step_at_init():
  """A table schedule indexes by the step: a float32 step at init raised a TypeError."""
  table = jnp.array([2.0, 1.0, 0.5])
  tx = omc.adagc(lambda_abs=lambda step: table[jnp.minimum(step, 2)], warmup_steps=3)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  u, _ = tx.update({"w": jnp.array([3.0, 4.0, 0.0])}, state)
  np.testing.assert_allclose(u["w"], [1.2, 1.6, 0.0], rtol=1e-6)  # warm-up clip to 2.0
