"""When a step is one to skip: the spike rules of `skip_bad_steps` (EMA or rolling window)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_momclip import _hyperparams, _statistics, _validation
from optax_momclip._clipping import count_if

_SIGNALS = ("grad_norm", "loss", "either")
_STDS = ("population", "sample")
_SIGNAL_OF = {"norm": "grad_norm", "loss": "loss"}
EMA_ALPHA = 0.99  # skip_bad_steps's default alpha
EMA_ALPHA32 = np.float32(EMA_ALPHA)


def _refuse_unused(
  fn: str, z_threshold: Any, spike_on: str, window: Any, std: str, alpha: Any
) -> None:
  """Refuses arguments the chosen rule would ignore."""
  if z_threshold is None and spike_on != "grad_norm":
    raise ValueError(
      f"{fn}: spike_on={spike_on!r} chooses what z_threshold judges, got z_threshold=None"
    )
  if window is None and std != "population":
    raise ValueError(f"{fn}: std={std!r} needs a window (window=N), got window=None")
  alpha_value = _validation.concrete_float(alpha)
  # optax.inject_hyperparams passes the default as an array of the params' dtype (bf16 too).
  dtype = getattr(alpha, "dtype", None)
  floating = dtype is not None and jnp.issubdtype(dtype, jnp.floating)
  default = np.asarray(EMA_ALPHA, dtype) if floating else EMA_ALPHA32
  if window is not None and alpha_value is not None and np.float32(alpha_value) != default:
    raise ValueError(
      f"{fn}: alpha={alpha!r} sets the EMA rule's decay, which window={window!r} replaces "
      "(drop alpha, or window)"
    )


@dataclasses.dataclass(frozen=True)
class SpikeRule:
  """When a finite step is one to skip, and how the statistics follow the accepted ones."""

  max_norm: Any
  z_threshold: Any
  spike_on: str
  alpha: Any
  warmup_steps: Any
  window: int | None
  min_history: Any
  ddof: int
  record_spikes: bool
  max_consecutive_spikes: Any

  @classmethod
  def checked(
    cls,
    fn: str,
    max_norm: Any,
    z_threshold: Any,
    spike_on: str,
    alpha: Any,
    warmup_steps: Any,
    window: Any,
    min_history: Any,
    std: str,
    record_spikes: Any,
    max_consecutive_spikes: Any,
  ) -> SpikeRule:
    """The rule, its arguments checked (see `skip_bad_steps`)."""
    if max_norm is not None:
      _validation.check_scalar(fn, "max_norm", max_norm, low=0.0, infinite=True)
    if z_threshold is not None:
      _validation.check_scalar(
        fn, "z_threshold", z_threshold, low=0.0, low_open=True, infinite=True
      )
    _validation.check_choice(fn, "spike_on", spike_on, _SIGNALS)
    _validation.check_scalar(fn, "alpha", alpha, low=0.0, high=1.0)
    _validation.check_count(fn, "warmup_steps", warmup_steps)
    _validation.check_choice(fn, "std", std, _STDS)
    _validation.check_bool(fn, "record_spikes", record_spikes)
    if max_consecutive_spikes is not None:
      _validation.check_count(fn, "max_consecutive_spikes", max_consecutive_spikes)
    _refuse_unused(fn, z_threshold, spike_on, window, std, alpha)
    if window is None:
      for name, value in (("min_history", min_history), ("record_spikes", record_spikes)):
        if value not in (None, False):
          raise ValueError(f"{fn}: {name}={value!r} needs a window (window=N), got window=None")
      history = 0
    else:
      window = _validation.check_positive_int(fn, "window", window, low=2)
      history = max(2, window // 2) - 1 if min_history is None else min_history
      _validation.check_count(fn, "min_history", history)  # a traced one is compared in the step
      concrete = _validation.concrete_float(history)
      if concrete is not None and concrete > window:
        raise ValueError(f"{fn}: min_history must be <= window ({window}), got {history!r}")
    return cls(
      max_norm,
      z_threshold,
      spike_on,
      alpha,
      warmup_steps,
      window,
      history,
      int(std == "sample"),
      record_spikes,
      max_consecutive_spikes,
    )

  def loss_of(self, fn: str, extra_args: dict[str, Any], dtype: Any) -> jax.Array:
    """The loss passed as ``value``; 0 when none is (only allowed when spikes are not on it)."""
    if "value" not in extra_args:
      if self.z_threshold is not None and self.spike_on != "grad_norm":
        raise TypeError(
          f"{fn}: spike_on={self.spike_on!r} needs the loss: call update(..., value=loss)"
        )
      return jnp.zeros([], dtype)
    loss = jnp.asarray(extra_args["value"])
    if loss.shape != ():
      raise ValueError(
        f"{fn}: value must be the scalar loss (shape ()), got shape {loss.shape}: average a "
        "per-example loss first"
      )
    return loss.astype(dtype)

  def judge(
    self, norm: jax.Array, loss: jax.Array, state: Any
  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Whether a finite step is bad, whether the z-score rule found it a spike, and the
    statistics each signal was judged against."""
    over = jnp.zeros([], bool)
    if self.max_norm is not None:
      over = norm > _hyperparams.bound(self.max_norm, None, norm.dtype)
    bad = jnp.zeros([], bool)
    judged = {}
    for name, x, window in (("norm", norm, state.norm_window), ("loss", loss, state.loss_window)):
      mean, var = getattr(state, f"{name}_mean"), getattr(state, f"{name}_var")
      if self.window is not None:
        mean, var = _statistics.window_moments(window, state.stats_count, self.ddof)
      judged[f"{name}_mean"], judged[f"{name}_var"] = mean, var
      if self.z_threshold is not None and self.spike_on in (_SIGNAL_OF[name], "either"):
        bad |= self._spike(x, mean, var, state.stats_count)
    return over | bad, bad, judged

  def _spike(self, x: jax.Array, mean: jax.Array, var: jax.Array, held: jax.Array) -> jax.Array:
    k = _hyperparams.bound(self.z_threshold, None, x.dtype)
    if self.window is None:
      z, _, _ = _statistics.zscore(x, mean, var)
      return (held >= self.warmup_steps) & (z > k)
    std = jnp.sqrt(var)
    # OLMo-core's and MaxText's test, NaN included: not (x - mean <= k·std).
    beyond = ~(x - mean <= k * std)
    return (held >= self.min_history) & _statistics.informative(std, mean) & beyond

  def statistics(
    self,
    norm: jax.Array,
    loss: jax.Array,
    accepted: jax.Array,
    bad: jax.Array,
    state: Any,
    judged: dict[str, jax.Array],
  ) -> dict[str, jax.Array]:
    """The statistics fed with an accepted step (any step, recording spikes), restarted after
    ``max_consecutive_spikes`` finite spikes in a row (``bad``: the z-score rule's; a step
    skipped for ``max_norm`` alone neither counts nor breaks the run)."""
    out = (
      self._fed_window(norm, loss, accepted, state, judged)
      if self.window
      else (self._fed_ema(norm, loss, accepted, state))
    )
    spikes = jnp.where(accepted, 0, count_if(state.consecutive_spikes, bad))
    restart = jnp.zeros([], bool)
    if self.max_consecutive_spikes is not None:
      restart = bad & (spikes >= self.max_consecutive_spikes)
    for key in ("norm_mean", "norm_var", "loss_mean", "loss_var", "stats_count", "window_index"):
      out[key] = jnp.where(restart, jnp.zeros_like(out[key]), out[key])
    out["consecutive_spikes"] = jnp.where(restart, 0, spikes)
    out["stats_restarts"] = count_if(state.stats_restarts, restart)
    return out

  def _fed_ema(self, norm: Any, loss: Any, fed: Any, state: Any) -> dict:
    alpha, out = _hyperparams.evaluate(self.alpha, None, norm.dtype), {}
    # Both signals or neither: they share one count.
    fed = fed & _statistics.squarable(norm) & _statistics.squarable(loss)
    for name, x in (("norm", norm), ("loss", loss)):
      mean, var, count = _statistics.norm_statistics(
        x,
        fed,
        getattr(state, f"{name}_mean"),
        getattr(state, f"{name}_var"),
        state.stats_count,
        self.warmup_steps,
        alpha,
      )
      out[f"{name}_mean"], out[f"{name}_var"], out["stats_count"] = mean, var, count
    return {
      **out,
      "norm_window": state.norm_window,
      "loss_window": state.loss_window,
      "window_index": state.window_index,
    }

  def _fed_window(
    self,
    norm: Any,
    loss: Any,
    accepted: Any,
    state: Any,
    judged: dict[str, jax.Array],
  ) -> dict:
    fed = jnp.ones([], bool) if self.record_spikes else accepted
    out = dict(judged)
    for name, x in (("norm", norm), ("loss", loss)):
      values, size, index = _statistics.window_push(
        getattr(state, f"{name}_window"), state.stats_count, state.window_index, x, fed
      )
      out[f"{name}_window"], out["stats_count"], out["window_index"] = values, size, index
    return out
