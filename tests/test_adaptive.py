"""AGC, AutoClip and ZClip against NumPy re-derivations of the published rules."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_momclip as omc

# ---------------------------------------------------------------- AGC


def _agc_oracle(g, w, lam, eps, axes):
  """Brock et al. 2021, as in the NFNets code: G * λ max(‖W‖, ε) / max(‖G‖, 1e-6) if over."""
  g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
  gn = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
  wn = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
  limit = lam * np.maximum(wn, eps)
  over = gn / np.maximum(wn, eps) > lam
  return np.where(over, g * limit / np.maximum(gn, 1e-6), g), int(np.sum(over))


def _agc_tree():
  k = jax.random.split(jax.random.key(3), 8)
  # Per-unit gradient sizes spread over four decades so some units clip, others not.
  unit = lambda key, n: jnp.exp(jax.random.uniform(key, (n,), minval=-6.0, maxval=1.0))
  params = {
    "dense": {"kernel": jax.random.normal(k[0], (5, 3)), "bias": jnp.full((3,), 0.5)},
    "conv": {"kernel": jax.random.normal(k[1], (3, 3, 2, 4)), "bias": jnp.zeros((4,))},
    "scale": jnp.asarray(2.0),
  }
  grads = {
    "dense": {
      "kernel": jax.random.normal(k[2], (5, 3)) * unit(k[3], 3),
      "bias": jnp.array([1e-4, 0.3, 0.002]),
    },
    "conv": {
      "kernel": jax.random.normal(k[4], (3, 3, 2, 4)) * unit(k[5], 4),
      "bias": jnp.full((4,), 1e-6),  # zero weights: the eps floor decides
    },
    "scale": jnp.asarray(0.5),
  }
  return params, grads


AXES = {
  ("dense", "kernel"): (0,),
  ("dense", "bias"): None,
  ("conv", "kernel"): (0, 1, 2),
  ("conv", "bias"): None,
  ("scale",): None,
}


def _leaf(tree, path):
  for p in path:
    tree = tree[p]
  return tree


@pytest.mark.parametrize("lam", [0.01, 0.2])
def test_agc_matches_numpy_on_dense_conv_and_biases(lam):
  params, grads = _agc_tree()
  tx = omc.adaptive_grad_clip(lam)
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  total = 0
  for path, axes in AXES.items():
    want, n = _agc_oracle(_leaf(grads, path), _leaf(params, path), lam, 1e-3, axes)
    np.testing.assert_allclose(_leaf(out, path), want, rtol=1e-6, atol=1e-12, err_msg=str(path))
    total += n
  assert 0 < total < 3 + 3 + 4 + 4 + 1  # some units clipped, not all
  assert int(state.units_clipped) == total
  assert int(state.steps_clipped) == 1 and int(state.count) == 1
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)]).astype(np.float64)
  np.testing.assert_allclose(state.grad_norm, np.linalg.norm(flat), rtol=1e-6)
  ratios = [
    np.linalg.norm(np.ravel(_leaf(out, p))) / np.linalg.norm(np.ravel(_leaf(grads, p)))
    for p in [("scale",), ("dense", "bias")]
  ]
  assert float(state.clip_scale) <= min(ratios) + 1e-7
  assert float(state.clip_threshold) == np.float32(lam)


def test_agc_agrees_with_optax_where_the_unit_conventions_agree():
  params, grads = _agc_tree()
  tx = omc.adaptive_grad_clip(0.05)
  ours, _ = tx.update(grads, tx.init(params), params)
  theirs, _ = optax.adaptive_grad_clip(0.05).update(grads, optax.EmptyState(), params)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-12)


def test_agc_explicit_axis_handles_pytorch_layout():
  """A PyTorch Linear weight is (out, in): axis=1 gives the Flax result transposed."""
  params, grads = _agc_tree()
  w, g = params["dense"]["kernel"], grads["dense"]["kernel"]
  flax_tx = omc.adaptive_grad_clip(0.05)
  flax_out, _ = flax_tx.update({"k": g}, flax_tx.init({"k": w}), {"k": w})
  torch_tx = omc.adaptive_grad_clip(0.05, axis=1)
  torch_out, _ = torch_tx.update({"k": g.T}, torch_tx.init({"k": w.T}), {"k": w.T})
  np.testing.assert_allclose(torch_out["k"].T, flax_out["k"], rtol=1e-6)


def test_agc_zero_weights_use_eps_and_nonfinite_units_pass_unscaled():
  params = {"w": jnp.zeros((2, 2))}
  grads = {"w": jnp.array([[1.0, jnp.inf], [0.0, 0.0]])}
  tx = omc.adaptive_grad_clip(0.5, eps=1e-2)
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(out["w"][:, 0], [0.005, 0.0], rtol=1e-6)  # λ·ε
  assert out["w"][0, 1] == jnp.inf


def test_agc_needs_params():
  tx = omc.adaptive_grad_clip()
  with pytest.raises(ValueError, match="adaptive_grad_clip: update needs params"):
    tx.update({"w": jnp.ones(2)}, tx.init(None))


def test_agc_params_must_match_updates():
  tx = omc.adaptive_grad_clip()
  with pytest.raises(AssertionError, match="adaptive_grad_clip"):
    tx.update({"w": jnp.ones(2)}, tx.init(None), {"w": jnp.ones(3)})


# ---------------------------------------------------------------- AutoClip


def _norm_sequence(n, spikes=(), seed=0):
  rng = np.random.default_rng(seed)
  norms = np.exp(rng.normal(0.0, 0.5, n)).astype(np.float32)
  for i in spikes:
    norms[i] *= 30.0
  return norms


def _replay(make_tx, norms, *args):
  """Feeds g_t = norm_t·u (u a fixed unit-norm tree) through tx in one lax.scan.

  Returns the output norms, the gradients, the outputs and the states, and
  checks the pre-clip norm kept in the state against float64; the oracles
  then replay the norms the transform saw (g_t's norm is norm_t up to 1 ulp).
  """
  u = {"a": jnp.array([0.6, 0.0]), "b": jnp.array([[0.0, 0.8]])}

  @jax.jit
  def run(norms, *args):
    tx = make_tx(*args)

    def step(state, n):
      g = jax.tree.map(lambda x: x * n, u)
      out, state = tx.update(g, state)
      return state, (omc.global_norm(out), g, out, state)

    return jax.lax.scan(step, tx.init(u), norms)[1]

  out = jax.tree.map(np.asarray, run(jnp.asarray(norms), *args))
  g64 = [np.asarray(x, np.float64).reshape(len(norms), -1) for x in jax.tree.leaves(out[1])]
  want = np.linalg.norm(np.concatenate(g64, axis=1), axis=1)
  np.testing.assert_allclose(out[3].grad_norm, want, rtol=1e-6)
  return out


@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 50.0, 90.0])
def test_autoclip_threshold_is_numpy_percentile_of_the_window(percentile):
  window = 5
  out_norm, _, _, states = _replay(
    lambda p: omc.autoclip(p, window=window), _norm_sequence(13, spikes=(7,)), percentile
  )
  norms = states.grad_norm
  for t in range(len(norms)):  # before the window has filled, and after it wraps
    want = np.percentile(norms[max(0, t - window + 1) : t + 1], percentile)
    np.testing.assert_allclose(states.clip_threshold[t], want, rtol=1e-6, err_msg=f"t={t}")
    np.testing.assert_allclose(out_norm[t], min(norms[t], want), rtol=1e-6)
  clipped = np.cumsum(norms > states.clip_threshold)
  np.testing.assert_array_equal(states.steps_clipped, clipped)
  assert int(states.history_size[-1]) == window and int(states.history_index[-1]) == 13 % window


def test_autoclip_leaves_zero_norms_out_of_its_window():
  tx = omc.autoclip()  # p = 10 over a window of 1000
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(2)})
  for _ in range(101):  # a frozen stretch: all-zero gradients
    _, state = update({"w": jnp.zeros(2)}, state)
  assert int(state.history_size) == 0
  norms = 1.0 + 0.1 * np.random.default_rng(0).normal(size=20)
  for n in norms:
    u, state = update({"w": jnp.array([0.6, 0.8], jnp.float32) * n}, state)
  want = np.percentile(norms.astype(np.float32), 10)  # of the nonzero norms only
  assert float(state.clip_threshold) == pytest.approx(want, rel=1e-6)
  assert np.linalg.norm(np.asarray(u["w"])) == pytest.approx(min(norms[-1], want), rel=1e-5)


def test_autoclip_threshold_is_numpy_percentile_to_the_bit_at_any_magnitude():
  tx = omc.autoclip()  # p = 10
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(1)})
  seen = np.float32([6.34, 12.02, 7.2e-30, 7.7e30])
  for n in seen:
    _, state = update({"w": jnp.array([n])}, state)
  assert float(state.clip_threshold) == np.float32(np.percentile(seen.astype(np.float64), 10))


def test_with_no_bound_in_force_a_norm_beyond_float32_passes_unscaled():
  g = {"w": jnp.full((3, 2), 3e38, jnp.float32)}
  for tx in [omc.autoclip(100.0), omc.autoclip(), omc.zclip()]:  # no history; warm-up
    u, state = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_array_equal(u["w"], g["w"])
    assert int(state.steps_clipped) == 0


def test_autoclip_percentile_100_is_the_identity():
  norms = _norm_sequence(9, spikes=(4,))
  _, grads, outs, states = _replay(lambda: omc.autoclip(100.0, window=3), norms)
  chex.assert_trees_all_equal(outs, grads)
  assert int(states.steps_clipped[-1]) == 0


def test_autoclip_skips_nonfinite_norms_in_its_window():
  norms = np.array([1.0, 2.0, np.nan, 3.0, np.inf, 4.0], np.float32)
  _, grads, outs, states = _replay(lambda: omc.autoclip(50.0, window=3), norms)
  finite = states.grad_norm[np.isfinite(norms)]
  want = [np.percentile(finite[max(0, i - 2) : i + 1], 50.0) for i in range(len(finite))]
  np.testing.assert_allclose(states.clip_threshold[np.isfinite(norms)], want, rtol=1e-6)
  # A non-finite update passes unscaled (still visible downstream), and is not recorded.
  chex.assert_trees_all_equal(
    jax.tree.map(lambda x: x[2], outs), jax.tree.map(lambda x: x[2], grads)
  )
  np.testing.assert_array_equal(states.history_size, [1, 2, 2, 3, 3, 3])


# ---------------------------------------------------------------- ZClip


def _zclip_reference(
  norms,
  z_thr,
  alpha,
  warmup,
  max_norm=None,
  mode="zscore",
  clip_option="adaptive_scaling",
  clip_factor=1.0,
  skip_update_on_spike=False,
):
  """The ZClip reference code, re-implemented in float64: (output norm, mean, var) per step.

  bluorion-com/ZClip, zclip/zclip.py at commit 584ce4f5a4aabab59e7df1dbaffc26a44df39dc1:
  warm-up buffers the first `warmup` norms (clipped at max_grad_norm when given) and sets
  mean and population variance from them; then percentile mode clips at mean + z·std, zscore
  mode at (mean + z_thr²·std/z)·clip_factor (adaptive_scaling) or at mean, for
  z = (x - mean)/(std + 1e-6) > z_thr; the effective clip is min(that or x, max_grad_norm); the
  EMAs are fed the adaptive threshold (not the capped one), or nothing on a spike with
  skip_update_on_spike. Departures of `zclip`, reproduced here: the output norm is the
  threshold itself (the reference divides by x + 1e-6), and a non-finite norm passes unscaled
  and leaves the statistics alone (the reference has no rule for it).
  """
  buf, mean, var, rows = [], None, None, []
  cap = np.inf if max_norm is None else max_norm
  for x in np.asarray(norms, np.float64):
    out = x
    if not np.isfinite(x):
      pass
    elif mean is None:
      buf.append(x)
      if len(buf) >= warmup:
        mean, var = float(np.mean(buf)), float(np.var(buf))
      out = min(x, cap)
    else:
      std, c = np.sqrt(var), None
      if mode == "percentile":
        c = mean + z_thr * std if x > mean + z_thr * std else None
      elif (z := (x - mean) / (std + 1e-6)) > z_thr:
        c = mean if clip_option == "mean" else (mean + z_thr * std / (z / z_thr)) * clip_factor
      out = min(x if c is None else c, cap, x)
      if c is None or not skip_update_on_spike:
        y = x if c is None else c
        mean = alpha * mean + (1 - alpha) * y
        var = alpha * var + (1 - alpha) * (y - mean) ** 2
    m, v = (np.mean(buf), np.var(buf)) if mean is None else (mean, var)
    rows.append((out, m, v))
  return np.array(rows).T


ZCLIP_MODES = {
  "zscore": {},
  "zscore, clip_factor 0.8": {"clip_factor": 0.8},
  "zscore, mean": {"clip_option": "mean"},
  "percentile": {"mode": "percentile"},
  "zscore, spikes kept out": {"skip_update_on_spike": True},
  "percentile, spikes kept out": {"mode": "percentile", "skip_update_on_spike": True},
}


def _zclip_with(mode, max_norm=None, warmup=8):
  kwargs = dict(ZCLIP_MODES[mode])
  record = not kwargs.pop("skip_update_on_spike", False)
  return lambda z, a: omc.zclip(
    z, alpha=a, warmup_steps=warmup, max_norm=max_norm, record_spikes=record, **kwargs
  )


@pytest.mark.parametrize("max_norm", [None, 2.0])
@pytest.mark.parametrize("mode", list(ZCLIP_MODES))
def test_zclip_matches_the_reference_code_step_by_step(mode, max_norm):
  norms = _norm_sequence(60, spikes=(3, 20, 21, 40, 55))  # one spike inside the warm-up
  out_norm, _, _, states = _replay(_zclip_with(mode, max_norm), norms, 2.5, 0.9)
  want_norm, want_mean, want_var = _zclip_reference(
    states.grad_norm, 2.5, 0.9, 8, max_norm, **ZCLIP_MODES[mode]
  )
  np.testing.assert_allclose(out_norm, want_norm, rtol=2e-6)
  np.testing.assert_allclose(states.norm_mean, want_mean, rtol=2e-6)
  np.testing.assert_allclose(states.norm_var, want_var, rtol=2e-5)
  spikes = out_norm < states.grad_norm * (1 - 1e-6)
  assert spikes[[20, 40, 55]].all()
  assert spikes[3] == (max_norm is not None)  # the warm-up is unprotected without a cap
  assert int(states.steps_clipped[-1]) == int(spikes.sum())
  np.testing.assert_array_equal(states.stats_count[[6, 7, 59]], [7, 8, 8])


@pytest.mark.parametrize("mode", list(ZCLIP_MODES))
def test_zclip_statistics_are_never_poisoned_by_nonfinite_norms(mode):
  norms = _norm_sequence(40, spikes=(25,))
  with_bad = np.insert(norms, [10, 30], [np.nan, np.inf]).astype(np.float32)
  _, _, _, clean = _replay(_zclip_with(mode), norms, 2.5, 0.9)
  _, grads, outs, dirty = _replay(_zclip_with(mode), with_bad, 2.5, 0.9)
  keep = np.ones(len(with_bad), bool)
  keep[[10, 31]] = False  # np.insert shifted the second index by one
  for field in ("norm_mean", "norm_var", "stats_count"):
    np.testing.assert_array_equal(getattr(dirty, field)[keep], getattr(clean, field))
  for i in (10, 31):  # passed on unscaled, so a guard downstream still sees them
    chex.assert_trees_all_equal(
      jax.tree.map(lambda x, i=i: x[i], outs), jax.tree.map(lambda x, i=i: x[i], grads)
    )


def _norm_stream(blow_up_at=1, spike_at=60, steps=61, seed=0):
  """Norms about 1, one of 1e20 (finite, but its square overflows float32), one of 1e6."""
  norms = 1.0 + 0.1 * np.random.default_rng(seed).normal(size=steps)
  norms[blow_up_at], norms[spike_at] = 1e20, 1e6
  return norms


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_zclip_statistics_survive_a_norm_too_large_to_square(mode):
  tx = omc.zclip(mode=mode)
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(1)})
  for n in _norm_stream():
    u, state = update({"w": jnp.array([n], jnp.float32)}, state)
    assert np.isfinite(state.norm_var) and np.isfinite(state.norm_mean)
  assert float(u["w"][0]) < 3.0  # the 1e6 spike is clipped to the statistics of norms about 1


def _injected(factory, steps, **hyper):
  """``factory`` under ``optax.inject_hyperparams``, jitted, fed ``steps`` (norms), with
  ``hyper`` set inside the state before the last step (a schedule gone out of range)."""
  tx = optax.inject_hyperparams(factory)()
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(2)})
  for i, n in enumerate(steps):
    if i == len(steps) - 1:
      state.hyperparams.update({k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()})
    u, state = update({"w": jnp.array([0.6, -0.8], jnp.float32) * n}, state)
  return np.asarray(u["w"])


@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_an_out_of_range_schedule_never_flips_or_unclips_a_spike(bad):
  norms = [*(1.0 + 0.05 * np.sin(np.arange(40))), 1000.0]
  raw = np.array([0.6, -0.8]) * 1000.0
  for factory, hyper in [
    (omc.zclip, {"clip_factor": bad}),
    (omc.zclip, {"z_threshold": bad}),
    (functools.partial(omc.zclip, clip_option="mean"), {"z_threshold": bad}),
    (omc.autoclip, {"percentile": bad}),
  ]:
    u = _injected(factory, norms, **hyper)
    assert np.all(u * raw >= 0), (hyper, u)  # never flipped
    assert np.linalg.norm(u) < 2.0, (hyper, u)  # clipped (a bound of 0 zeroes it)
  u = _injected(omc.autoclip, norms, percentile=250.0)  # reads 100: the largest norm seen
  assert np.linalg.norm(u) == pytest.approx(1000.0, rel=1e-6)


def test_zclip_infinite_threshold_is_the_identity():
  norms = _norm_sequence(30, spikes=(12, 25))
  _, grads, outs, states = _replay(lambda: omc.zclip(jnp.inf, warmup_steps=5), norms)
  chex.assert_trees_all_equal(outs, grads)
  assert int(states.steps_clipped[-1]) == 0


def test_zclip_nonfinite_norms_leave_the_statistics_alone():
  norms = _norm_sequence(20)
  with_nan = np.insert(norms, [3, 12], [np.nan, np.inf]).astype(np.float32)
  _, _, _, clean = _replay(lambda: omc.zclip(2.5, warmup_steps=5), norms)
  _, _, outs, dirty = _replay(lambda: omc.zclip(2.5, warmup_steps=5), with_nan)
  keep = np.isfinite(with_nan)
  for field in ("norm_mean", "norm_var", "stats_count"):
    np.testing.assert_array_equal(getattr(dirty, field)[keep], getattr(clean, field))
  assert np.isnan(outs["a"][3, 0]) and np.isinf(outs["a"][13, 0])  # passed unscaled


# ---------------------------------------------------------------- shared


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: omc.adaptive_grad_clip(-0.1), r"adaptive_grad_clip: clipping must be in \[0, inf\)"),
    (lambda: omc.adaptive_grad_clip(eps=-1.0), "adaptive_grad_clip: eps"),
    (lambda: omc.autoclip(101.0), r"autoclip: percentile must be in \[0, 100\], got 101.0"),
    (lambda: omc.autoclip(window=0), "autoclip: window must be >= 1, got 0"),
    (lambda: omc.zclip(0.0), r"zclip: z_threshold must be in \(0, inf\]"),
    (lambda: omc.zclip(alpha=1.5), "zclip: alpha"),
    (lambda: omc.zclip(warmup_steps=0), "zclip: warmup_steps must be >= 1"),
    (lambda: omc.zclip(max_norm=-1.0), "zclip: max_norm"),
    (
      lambda: omc.zclip(mode="percentile", clip_option="mean"),
      r"zclip: clip_option='mean' applies to mode='zscore', got mode='percentile'",
    ),
    (
      lambda: omc.zclip(mode="percentile", clip_factor=0.5),
      r"zclip: clip_factor=0.5 applies to mode='zscore'",
    ),
  ],
)
def test_bad_hyperparameters_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_autoclip_window_must_be_static():
  with pytest.raises(TypeError, match=r"autoclip: window fixes a shape.*static_args=\('window',\)"):
    jax.jit(lambda w: omc.autoclip(window=w).init({}))(3)
  assert omc.autoclip(window=np.int64(3)).init({}).norm_history.shape == (3,)


def test_metrics_report_the_adaptive_statistics():
  params = {"w": jnp.ones((2, 2))}
  tx = optax.chain(omc.adaptive_grad_clip(0.01), omc.autoclip(50.0, window=4), omc.zclip())
  _, state = tx.update({"w": jnp.full((2, 2), 3.0)}, tx.init(params), params)
  m = omc.metrics(state)
  assert float(m["adaptive_grad_clip/clip_fraction"]) == 1.0
  assert int(m["adaptive_grad_clip/units_clipped"]) == 2
  np.testing.assert_allclose(m["adaptive_grad_clip/grad_norm"], 6.0, rtol=1e-6)
  np.testing.assert_allclose(m["autoclip/grad_norm"], 0.02, rtol=1e-6)
  assert {"zclip/norm_mean", "zclip/norm_var", "zclip/clip_fraction"} <= set(m)


def test_agc_clips_huge_unit_gradients_to_their_bound():
  params = {"k": jnp.array([[3.0, 1.0], [4.0, 0.0]])}  # unit norms 5 and 1
  grads = {"k": jnp.array([[3e38, 0.0], [4e37, 1e-30]], jnp.float32)}
  tx = omc.adaptive_grad_clip(0.1)
  u, state = tx.update(grads, tx.init(params), params)
  col = np.array([3e38, 4e37]) / np.hypot(3e38, 4e37) * 0.5
  np.testing.assert_allclose(u["k"][:, 0], col, rtol=1e-6)
  np.testing.assert_allclose(u["k"][:, 1], [0.0, 1e-30], rtol=1e-6)  # within its bound
  np.testing.assert_allclose(state.grad_norm, np.hypot(3e38, 4e37), rtol=1e-6)
  assert int(state.units_clipped) == 1


def _zclip_norms(tx, norms):
  """The norms of the updates zclip returns for g_t = norm_t·(0.6, 0.8), and its last state."""
  state = tx.init({"w": jnp.zeros(2)})
  out = []
  for n in norms:
    u, state = tx.update({"w": jnp.array([0.6, 0.8], jnp.float32) * np.float32(n)}, state)
    out.append(float(omc.global_norm(u)))
  return np.array(out), state


def test_zclip_after_a_zero_variance_follows_a_growing_norm():
  """Two equal norms give σ = 0: the reference's σ + 1e-6 then clipped every larger norm to μ."""
  growth = 1.0 + 0.05 * np.arange(1, 21)  # 1.05 ... 2.0
  norms = np.concatenate([[1.0, 1.0], growth, np.full(300, 2.0)])
  out, state = _zclip_norms(omc.zclip(2.5, warmup_steps=1), norms)
  np.testing.assert_allclose(out[-50:], 2.0, rtol=1e-6)  # the level shift was taken in
  assert float(state.norm_mean) > 1.9
  # A slow drift (0.1% a step) after a flat warm-up: clipped at first, followed in the end.
  slow = np.concatenate([[1.0, 1.0], 1.001 ** np.arange(1, 700)])
  out, _ = _zclip_norms(omc.zclip(2.5, warmup_steps=2), slow)
  np.testing.assert_allclose(out[-100:], slow[-100:], rtol=1e-6)
  # The same drift present in the warm-up is never clipped.
  out, state = _zclip_norms(omc.zclip(2.5, warmup_steps=25), slow[2:])
  np.testing.assert_allclose(out, slow[2:], rtol=1e-6)
  assert int(state.steps_clipped) == 0


def test_zclip_still_clips_a_spike_against_an_informative_spread():
  norms = 1.0 + 0.1 * np.sin(np.arange(40))
  norms[30] = 50.0
  out, state = _zclip_norms(omc.zclip(2.5, warmup_steps=10), norms)
  assert out[30] < 2.0 and int(state.steps_clipped) == 1


def test_zclip_gradient_is_finite_at_zero_variance():
  tx = omc.zclip(2.5, warmup_steps=1)

  def f(scale):
    state = tx.init({"w": jnp.zeros(2)})
    _, state = tx.update({"w": jnp.array([0.6, 0.8])}, state)  # σ = 0 after one step
    u, _ = tx.update({"w": jnp.array([0.6, 0.8]) * scale}, state)
    return jnp.sum(u["w"])

  for scale in [0.5, 1.0, 3.0]:
    got = jax.grad(f)(jnp.float32(scale))
    fd = (f(scale + 1e-3) - f(scale - 1e-3)) / 2e-3
    assert np.isfinite(got)
    np.testing.assert_allclose(got, fd, rtol=1e-3)


def test_clip_by_value_and_the_global_clip_bound_in_float64_under_x64():
  with jax.enable_x64(True):
    g = {"w": jnp.array([1.0, -3.0, 0.05], jnp.float64)}
    u, state = omc.clip_by_value(0.1).update(g, omc.clip_by_value(0.1).init(g))
    np.testing.assert_array_equal(u["w"], optax.clip(0.1).update(g, None)[0]["w"])
    assert u["w"][0] == 0.1 and state.clip_threshold == 0.1 and state.grad_norm.dtype == jnp.float64
    tx = omc.clip_by_global_norm(0.1)
    u, state = tx.update(g, tx.init(g))
    norm = np.linalg.norm(np.asarray(u["w"]))
    assert abs(norm - 0.1) <= 2 * np.spacing(0.1), norm
    assert state.clip_threshold == 0.1 and state.clip_scale.dtype == jnp.float64
