"""Adaptive global-norm thresholds: AutoClip (a percentile of past norms) and ZClip (z-scores)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _hyperparams, _metrics, _norms, _validation
from optax_momclip._clipping import CLIP_STATS, clip_statistics, clip_statistics_init
from optax_momclip._scaling import range_scale, scale_tree
from optax_momclip._statistics import Z_EPS, norm_statistics, squarable, zscore


class AutoClipState(NamedTuple):
  """State of `autoclip`.

  Attributes:
    grad_norm: the global norm of the incoming updates, before clipping. f32[].
    clip_scale: the factor the updates were multiplied by. f32[].
    clip_threshold: the percentile of the window used as threshold this step
      (float32's largest value before any finite norm was seen). f32[].
    count: updates processed (saturating). i32[].
    steps_clipped: updates that were rescaled. i32[].
    norm_history: ring buffer of the last ``window`` finite norms; slots
      ``[0, history_size)`` are filled. f32[window].
    history_size: finite norms held, at most ``window``. i32[].
    history_index: the slot the next finite norm is written to. i32[].
  """

  grad_norm: jax.Array  # f32[]
  clip_scale: jax.Array  # f32[]
  clip_threshold: jax.Array  # f32[]
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_clipped: jax.Array  # i32[]
  norm_history: jax.Array  # f32[window]
  history_size: jax.Array  # i32[]
  history_index: jax.Array  # i32[]


def _percentile(history: jax.Array, size: jax.Array, percentile: jax.Array) -> jax.Array:
  """``np.percentile(history[:size], percentile)`` (linear interpolation), for size >= 1."""
  filled = jnp.arange(history.shape[0]) < size
  ordered = jnp.sort(jnp.where(filled, history, jnp.inf))
  pos = percentile / 100.0 * (jnp.maximum(size, 1) - 1).astype(history.dtype)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(size, 1) - 1)
  frac = pos - lo.astype(history.dtype)
  a, b = ordered[lo], ordered[hi]
  # NumPy's two-sided lerp, exact at both ends.
  return jnp.where(frac >= 0.5, b - (b - a) * (1.0 - frac), a + (b - a) * frac)


def autoclip(
  percentile: float | jax.Array = 10.0,
  *,
  window: int | None = None,
  ord: float | None = None,
  axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AutoClip: clips the global norm to a percentile of the recent norm history.

  .. math:: h \leftarrow h \cup \{\|g\|\}, \quad c = P_p(h), \quad
     g \leftarrow g \cdot \min(1, c / \|g\|)

  The history ``h`` holds the last ``window`` global norms in a fixed-size
  ring buffer, the current one included, so the threshold is computed on
  device without a host sync; ``P_p`` is the percentile with linear
  interpolation (``np.percentile``'s default). ``percentile=100`` never clips
  a norm it records.
  A norm over a NaN or infinite element is not recorded (it would poison the
  window) and its update passes unscaled, so a guard such as `skip_bad_steps`
  still sees it.
  A zero norm (a step whose gradient is all zeros) is not recorded either:
  it says nothing about the gradient's scale, and a few of them would pull the
  threshold to 0, so that every later update came out zero until enough
  nonzero norms had pushed them out of the window. The paper's code records it.
  A norm beyond float32's largest value (finite elements) is not recorded and
  is clipped, exactly, to the percentile of the others (passed on unscaled
  while there are none).

  This is the paper's rule (whole-model norm, current norm included, p=10);
  the ``autoclip`` pip package differs (per-parameter, quantile 0.9, current
  norm excluded). The paper keeps the whole history; a window keeps the state
  bounded and lets the threshold follow the norm's drift.

  Args:
    percentile: p in ``[0, 100]``. Default 10.
    window: the number of recent norms kept, >= 1; None (default) is 1000. It
      fixes a shape, so ``optax.inject_hyperparams`` must leave it static
      (None is, as every non-numeric default).
    ord: 1, 2 or ``inf``; None (default) is 2, as in NumPy.
    axis_name: a mapped axis (``shard_map``/``pmap``) the updates are sharded
      over; the norm is then the global one across it. Default None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an `AutoClipState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.autoclip(50.0, window=3)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for scale in [1.0, 2.0, 30.0]:
    ...   u, state = tx.update({"w": jnp.array([0.6, 0.8]) * scale}, state)
    >>> print(state.clip_threshold, round(float(omc.global_norm(u)), 4))
    2.0 2.0

  References:
    Seetharaman, Wichern, Pardo, Le Roux, *AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks*, 2020, https://arxiv.org/abs/2007.14469
  """
  fn = "autoclip"
  _validation.check_scalar(fn, "percentile", percentile, low=0.0, high=100.0)
  if window is not None:
    window = _validation.check_positive_int(fn, "window", window)
  size_of_window = 1000 if window is None else window
  order = _validation.check_ord(fn, ord)
  _validation.check_axis_name(fn, axis_name)

  def init_fn(params: Any) -> AutoClipState:
    dtype = _norms.statistics_dtype(params)
    return AutoClipState(
      **clip_statistics_init(dtype, jnp.finfo(dtype).max),
      norm_history=jnp.zeros([size_of_window], dtype),
      history_size=jnp.zeros([], jnp.int32),
      history_index=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: AutoClipState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, AutoClipState]:
    del params, extra_args
    dtype = state.norm_history.dtype
    exact = _norms.global_norms([updates], ord=order, axis_name=axis_name)[0].astype(dtype)
    norm = exact.value()
    recorded = jnp.isfinite(norm) & (norm > 0)
    history = jnp.where(
      recorded, state.norm_history.at[state.history_index].set(norm), state.norm_history
    )
    n = size_of_window
    size = jnp.where(recorded, jnp.minimum(state.history_size + 1, n), state.history_size)
    index = jnp.where(recorded, (state.history_index + 1) % n, state.history_index)
    p = _hyperparams.evaluate(percentile, None, dtype)
    if _validation.concrete_float(percentile) is None:
      # A traced percentile outside [0, 100] (or NaN) reads as the nearest end (NaN: 0).
      p = jnp.minimum(_hyperparams.bound(percentile, None, dtype), 100)
    threshold = _percentile(history, size, p)
    # No history, no bound: not even for a norm beyond float32's range (inf > the largest value).
    scale = range_scale(exact, jnp.where(size > 0, threshold, jnp.inf))
    threshold = jnp.where(size > 0, threshold, jnp.finfo(dtype).max)
    return scale_tree(updates, scale), AutoClipState(
      **clip_statistics(state, norm, scale, threshold),
      norm_history=history,
      history_size=size,
      history_index=index,
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


class ZClipState(NamedTuple):
  """State of `zclip`.

  Attributes:
    grad_norm: the global L2 norm of the incoming updates, before clipping. f32[].
    clip_scale: the factor the updates were multiplied by. f32[].
    clip_threshold: the norm a spike is clipped to this step, or the level
      above which a norm would count as a spike; capped by ``max_norm``;
      float32's largest value during an uncapped warm-up. f32[].
    count: updates processed (saturating). i32[].
    steps_clipped: updates that were rescaled. i32[].
    norm_mean: mean μ of the (clipped) norms: the warm-up mean, then an EMA. f32[].
    norm_var: population variance σ² of the (clipped) norms, likewise. f32[].
    stats_count: finite norms absorbed by the warm-up, at most ``warmup_steps``. i32[].
  """

  grad_norm: jax.Array  # f32[]
  clip_scale: jax.Array  # f32[]
  clip_threshold: jax.Array  # f32[]
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_clipped: jax.Array  # i32[]
  norm_mean: jax.Array  # f32[]
  norm_var: jax.Array  # f32[]
  stats_count: jax.Array  # i32[]


_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")


def zclip(
  z_threshold: float | jax.Array = 2.5,
  *,
  alpha: float | jax.Array = 0.97,
  warmup_steps: int | jax.Array = 25,
  max_norm: float | jax.Array | None = None,
  mode: str = "zscore",
  clip_option: str = "adaptive_scaling",
  clip_factor: float | jax.Array = 1.0,
  record_spikes: bool = True,
  axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZClip: clips global-norm spikes measured against EMA statistics of the norm.

  .. math:: z = \frac{\|g\| - \mu}{\sigma + 10^{-6}}, \qquad
     \text{if } z > z_{thr}: \ \|g\| \leftarrow c = f\,\big(\mu + z_{thr}^2 \sigma / z\big)

  (``mode="zscore"``, ``clip_option="adaptive_scaling"``: a larger spike is
  clipped harder), or ``c = μ`` (``clip_option="mean"``); with
  ``mode="percentile"`` a norm above ``μ + z_thr·σ`` is clipped to it. ``f``
  is ``clip_factor``, which, as in the reference code, multiplies the whole
  adaptive threshold. Then, with the clipped norm :math:`\hat g = c` (the
  norm itself on a step that is no spike),
  :math:`\mu \leftarrow \alpha\mu + (1-\alpha)\hat g`,
  :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(\hat g - \mu)^2`;
  ``record_spikes=False`` (the reference's ``skip_update_on_spike=True``)
  leaves the statistics alone on a spike. The first ``warmup_steps`` finite
  norms set μ and σ² (their mean and population variance) and are not
  clipped. ``max_norm`` optionally caps every step, warm-up included; it is
  off by default, unlike the reference code's 1.0, so ZClip is the only rule
  in force unless you ask for both.

  Departures from the reference code: the update is scaled to exactly the
  threshold (the reference divides by ``norm + 1e-6``); a norm over a NaN or
  infinite element does not touch the statistics and its update passes
  unscaled (in the reference a NaN made μ NaN for good and an infinite norm
  gave NaN gradients), and a norm beyond float32's range with finite
  elements is, after warm-up, a spike, clipped exactly; neither it nor any
  norm whose square float32 cannot hold (above 1.8e19) enters the statistics; and a spike is
  only measured against a spread ``σ > 1e-3·μ``: with the reference's
  ``σ + 1e-6`` alone a zero variance (identical norms, a one-step warm-up)
  made every larger norm a huge spike, clipped to μ and fed back as μ, so
  the statistics never moved again, and so did a lasting change of scale
  once the clipping had shrunk σ away. Below that spread no
  step is a spike and its norm enters the statistics, which then follow it.

  Args:
    z_threshold: the z-score above which a norm is a spike, > 0 (``inf``:
      never clip). Default 2.5.
    alpha: EMA decay α of the statistics, in ``[0, 1]``. Default 0.97.
    warmup_steps: finite norms that initialise the statistics, >= 1. Default 25.
    max_norm: an optional fixed upper bound on every step's norm, >= 0.
    mode: ``"zscore"`` (default) or ``"percentile"``.
    clip_option: with ``mode="zscore"``, ``"adaptive_scaling"`` (default) or
      ``"mean"``.
    clip_factor: ``f > 0``, multiplies the adaptive threshold. Default 1.
    record_spikes: feed a spike's clipped norm into the statistics. Default True.
    axis_name: a mapped axis (``shard_map``/``pmap``) the updates are sharded
      over; the norm is then the global one across it. Default None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `ZClipState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.zclip(2.5, warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in [1.0, 3.0, 2.0, 50.0]:
    ...   u, state = tx.update({"w": jnp.array([g])}, state)
    >>> print(round(float(u["w"][0]), 4), round(float(state.norm_mean), 4))
    2.1263 2.0038

  References:
    Kumar, Owen, Roy Chowdhury, Güra, *ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training*, 2025, https://arxiv.org/abs/2504.02507; reference
    code https://github.com/bluorion-com/ZClip
  """
  fn = "zclip"
  _validation.check_scalar(fn, "alpha", alpha, low=0.0, high=1.0)
  if max_norm is not None:
    _validation.check_scalar(fn, "max_norm", max_norm, low=0.0, infinite=True)
  _validation.check_bool(fn, "record_spikes", record_spikes)
  _validation.check_axis_name(fn, axis_name)
  rule = _ZClipRule.checked(fn, z_threshold, warmup_steps, mode, clip_option, clip_factor)

  cap = lambda dtype: _cap(max_norm, dtype)

  def init_fn(params: Any) -> ZClipState:
    dtype = _norms.statistics_dtype(params)
    return ZClipState(
      **clip_statistics_init(dtype, cap(dtype)),
      norm_mean=jnp.zeros([], dtype),
      norm_var=jnp.zeros([], dtype),
      stats_count=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: ZClipState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, ZClipState]:
    del params, extra_args
    dtype = state.norm_mean.dtype
    exact = _norms.global_norms([updates], axis_name=axis_name)[0].astype(dtype)
    norm = exact.value()
    spike, clipped_norm, level = rule.decide(norm, exact.elements_finite(), state)
    # No spike, no max_norm: no bound, not even for a norm beyond float32's range.
    limit = jnp.where(spike, clipped_norm, jnp.inf)
    scale = range_scale(exact, limit if max_norm is None else jnp.minimum(limit, cap(dtype)))
    fed = jnp.isfinite(norm) & (~spike if not record_spikes else True) & squarable(norm)
    mean, var, count = norm_statistics(
      jnp.where(spike, clipped_norm, norm),
      fed,
      state.norm_mean,
      state.norm_var,
      state.stats_count,
      warmup_steps,
      _hyperparams.evaluate(alpha, None, dtype),
    )
    return scale_tree(updates, scale), ZClipState(
      **clip_statistics(state, norm, scale, jnp.minimum(level, cap(dtype))),
      norm_mean=mean,
      norm_var=var,
      stats_count=count,
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


def _cap(max_norm: Any, dtype: Any) -> jax.Array:
  """``max_norm`` in ``dtype``; float32's (or float64's) largest value when there is none."""
  no_limit = jnp.finfo(dtype).max
  if max_norm is None:
    return jnp.asarray(no_limit, dtype)
  return jnp.minimum(_hyperparams.bound(max_norm, None, dtype), no_limit)


@dataclasses.dataclass(frozen=True)
class _ZClipRule:
  """Whether a norm is a spike, what it is clipped to, and the level reported."""

  z_threshold: Any
  warmup_steps: Any
  mode: str
  clip_option: str
  clip_factor: Any

  @classmethod
  def checked(cls, fn: str, *args: Any) -> _ZClipRule:
    """The rule, its arguments checked (see `zclip`)."""
    rule = cls(*args)
    _validation.check_scalar(
      fn, "z_threshold", rule.z_threshold, low=0.0, low_open=True, infinite=True
    )
    _validation.check_count(fn, "warmup_steps", rule.warmup_steps)
    _validation.check_choice(fn, "mode", rule.mode, _MODES)
    _validation.check_choice(fn, "clip_option", rule.clip_option, _CLIP_OPTIONS)
    _validation.check_scalar(fn, "clip_factor", rule.clip_factor, low=0.0, low_open=True)
    if rule.mode == "percentile":  # clips to μ + zσ: the z-score mode's options do nothing
      factor = _validation.concrete_float(rule.clip_factor)
      for name, value, unused in (
        ("clip_option", rule.clip_option, rule.clip_option != "adaptive_scaling"),
        ("clip_factor", rule.clip_factor, factor is not None and factor != 1.0),
      ):
        if unused:
          raise ValueError(
            f"{fn}: {name}={value!r} applies to mode='zscore', got mode='percentile'"
          )
    return rule

  def decide(
    self, norm: jax.Array, finite: jax.Array, state: ZClipState
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(spike, the norm a spike is clipped to, the level reported as clip_threshold)``.

    ``finite``: every element is (``norm`` may still be inf: beyond float32's range).
    """
    no_limit = jnp.finfo(norm.dtype).max
    z_thr = _hyperparams.bound(self.z_threshold, None, norm.dtype)
    warm = state.stats_count < self.warmup_steps
    z, std, informative = zscore(norm, state.norm_mean, state.norm_var)
    mean = state.norm_mean
    if self.mode == "percentile":
      threshold = mean + z_thr * std
      spike = finite & ~warm & informative & (norm > threshold)
      return spike, threshold, jnp.where(warm | ~informative, no_limit, threshold)
    spike = finite & ~warm & (z > z_thr)
    if self.clip_option == "mean":
      clipped_norm = mean
    else:
      factor = _hyperparams.bound(self.clip_factor, None, norm.dtype)
      clipped_norm = (mean + z_thr * z_thr * std / jnp.where(spike, z, 1.0)) * factor
    trigger = jnp.where(informative, mean + z_thr * (std + Z_EPS), no_limit)
    return spike, clipped_norm, jnp.where(warm, no_limit, jnp.where(spike, clipped_norm, trigger))


_metrics.register_statistics(AutoClipState, "autoclip", CLIP_STATS)
_metrics.register_statistics(ZClipState, "zclip", (*CLIP_STATS, "norm_mean", "norm_var"))
