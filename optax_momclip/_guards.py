"""Skipping bad steps (NaN/Inf or norm spikes) without touching the optimizer state."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _hyperparams, _metrics, _norms, _statistics, _validation
from optax_momclip._clipping import count_if
from optax_momclip._replay import update_keeping_state


class SkipBadStepsState(NamedTuple):
  """State of `skip_bad_steps`.

  Attributes:
    inner_state: the wrapped transformation's state, unchanged by a skipped step.
    grad_norm: the global L2 norm of the incoming updates the decision was
      taken on. f32[] (f64[] for float64 params, as every float field here).
    count: updates seen (saturating). i32[].
    steps_skipped: updates skipped (saturating). i32[].
    consecutive_skips: updates skipped in a row, 0 after an applied one. i32[].
    last_step_skipped: whether the latest update was skipped. bool[].
    norm_mean: mean of the accepted finite norms: the warm-up mean, then an EMA. f32[].
    norm_var: their population variance, likewise. f32[].
    stats_count: accepted finite norms in the statistics since the last
      (re)start, at most ``warmup_steps``. i32[].
    consecutive_spikes: finite updates skipped since the last accepted one
      (non-finite ones neither count nor break the run). i32[].
    stats_restarts: times the statistics restarted their warm-up after
      ``max_consecutive_spikes`` finite spikes. i32[].
  """

  inner_state: Any
  grad_norm: jax.Array  # f32[]
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_skipped: jax.Array  # i32[]
  consecutive_skips: jax.Array  # i32[]
  last_step_skipped: jax.Array  # bool[]
  norm_mean: jax.Array  # f32[]
  norm_var: jax.Array  # f32[]
  stats_count: jax.Array  # i32[]
  consecutive_spikes: jax.Array  # i32[]
  stats_restarts: jax.Array  # i32[]


def skip_bad_steps(
  inner: optax.GradientTransformation,
  *,
  skip_nonfinite: bool = True,
  max_norm: float | jax.Array | None = None,
  z_threshold: float | jax.Array | None = None,
  alpha: float | jax.Array = 0.99,
  warmup_steps: int | jax.Array = 100,
  max_consecutive_spikes: int | jax.Array | None = None,
  axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``inner`` so a bad step is skipped: zero update, ``inner``'s state untouched.

  A step is bad when the global norm of the incoming updates ``x = ‖g‖`` is
  non-finite (``skip_nonfinite``), above ``max_norm``, or a spike:

  .. math:: z = \frac{x - \mu}{\sigma + 10^{-6}} > \text{z\_threshold}

  where μ, σ² are the mean and population variance of the first
  ``warmup_steps`` accepted norms, then EMAs with decay ``alpha``
  (``μ ← αμ + (1-α)x``, ``σ² ← ασ² + (1-α)(x - μ)²``). While σ is below
  ``0.01·μ`` (say, after identical norms) no step is a spike: such a spread
  says nothing, and dividing by it would skip every larger norm forever.
  The statistics are updated on accepted steps only, so a skipped NaN or
  spike never poisons them (rolling-window rules that record the bad value
  skip every later step of the window). No spike is detected during the
  warm-up. After ``max_consecutive_spikes`` finite spikes in a row the statistics restart
  their warm-up, so a lasting change of scale is accepted rather than
  skipped forever; a non-finite step is always skipped.

  ``inner.update`` runs on every step: on a skipped step every leaf of its
  state keeps its old bits and the update is ``-0.0`` everywhere, which
  ``optax.apply_updates`` adds to the params without changing a bit (even
  ``-0.0`` params); on an applied step both are those of ``inner`` bit for
  bit. This stays on device, works under ``vmap`` (each instance decides
  alone) and costs no host sync. Wrap the whole optimizer (the learning rate
  included), so nothing after it turns the skip into a move. With
  ``axis_name`` the norm is global across the mapped axis, so every replica
  takes the same decision; under ``jit`` with sharded arrays it is global
  already.

  Under a trace, ``inner.update`` is replayed from its jaxpr and each value
  of its new state is selected with ``jnp.where`` as soon as it is computed,
  so the update is computed from the selected state. A donated state is then
  overwritten in place with no copy of the old one, and the guard costs only
  the norm it checks (nothing when ``inner`` clips by the global norm: XLA
  computes the two once). State computed inside a nested ``jit``, ``cond``
  or ``scan`` of ``inner`` (``optax.MultiSteps``, say) is selected when that
  returns, which is exact but lets XLA:CPU copy those buffers again.

  Differs from ``optax.apply_if_finite``, which after ``max_consecutive_errors``
  applies the NaN update; here a non-finite update is never applied.

  Args:
    inner: the transformation to protect (any ``optax.GradientTransformation``).
    skip_nonfinite: skip steps whose norm is NaN or Inf. Default True.
    max_norm: skip steps whose norm is above this (>= 0). Default None: off.
    z_threshold: skip steps whose z-score is above this (> 0, ``inf`` allowed).
      Default None: no spike rule.
    alpha: EMA decay of the spike statistics, in ``[0, 1]``. Default 0.99.
    warmup_steps: accepted norms that initialise the statistics, >= 1. Default 100.
    max_consecutive_spikes: finite spikes in a row after which the statistics
      restart, >= 1. Default None: never.
    axis_name: a mapped axis (``shard_map``/``pmap``) the updates are sharded
      over. Default None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `SkipBadStepsState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_momclip as omc
    >>> tx = omc.skip_bad_steps(optax.sgd(0.1, momentum=0.9), max_norm=10.0)
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> state = tx.init(params)
    >>> for g in [[1.0, 1.0], [jnp.nan, 0.0], [100.0, 0.0]]:
    ...   u, state = tx.update({"w": jnp.array(g)}, state, params)
    ...   params = optax.apply_updates(params, u)
    >>> print(params["w"], state.steps_skipped)
    [0.9 1.9] 2

  References:
    Chowdhery et al., *PaLM: Scaling Language Modeling with Pathways*, 2022,
    https://arxiv.org/abs/2204.02311 (skipping batches around loss spikes)
  """
  fn = "skip_bad_steps"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"{fn}: inner must be an optax.GradientTransformation, got {type(inner).__name__}"
    )
  _validation.check_bool(fn, "skip_nonfinite", skip_nonfinite)
  if max_norm is not None:
    _validation.check_scalar(fn, "max_norm", max_norm, low=0.0, infinite=True)
  if z_threshold is not None:
    _validation.check_scalar(fn, "z_threshold", z_threshold, low=0.0, low_open=True, infinite=True)
  _validation.check_scalar(fn, "alpha", alpha, low=0.0, high=1.0)
  _validation.check_count(fn, "warmup_steps", warmup_steps)
  if max_consecutive_spikes is not None:
    _validation.check_count(fn, "max_consecutive_spikes", max_consecutive_spikes)
  _validation.check_axis_name(fn, axis_name)
  inner = optax.with_extra_args_support(inner)
  rule = _SpikeRule(max_norm, z_threshold, alpha, warmup_steps, max_consecutive_spikes)

  def init_fn(params: Any) -> SkipBadStepsState:
    return _initial_state(inner.init(params), _norms.statistics_dtype(params))

  def update_fn(
    updates: Any, state: SkipBadStepsState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, SkipBadStepsState]:
    norm = _norms.global_norms([updates], axis_name=axis_name)[0].astype(state.grad_norm.dtype)
    bad = rule.is_spike(norm, state)
    skip = bad | ~jnp.isfinite(norm) if skip_nonfinite else bad
    new_updates, new_inner = update_keeping_state(
      inner.update, skip, updates, state.inner_state, params, extra_args
    )
    return new_updates, SkipBadStepsState(
      inner_state=new_inner,
      grad_norm=norm,
      count=optax.safe_increment(state.count),
      steps_skipped=count_if(state.steps_skipped, skip),
      consecutive_skips=jnp.where(skip, optax.safe_increment(state.consecutive_skips), 0),
      last_step_skipped=skip,
      **rule.statistics(norm, bad, skip, state),
    )

  return optax.GradientTransformationExtraArgs(
    init_fn, _eager.compiled_when_reused(update_fn, passes_extra_args=True)
  )


def _initial_state(inner_state: Any, dtype: Any) -> SkipBadStepsState:
  # A fresh array per field: one array in two fields cannot be donated.
  zero = lambda: jnp.zeros([], jnp.int32)
  return SkipBadStepsState(
    inner_state=inner_state,
    grad_norm=jnp.zeros([], dtype),
    count=zero(),
    steps_skipped=zero(),
    consecutive_skips=zero(),
    last_step_skipped=jnp.zeros([], bool),
    norm_mean=jnp.zeros([], dtype),
    norm_var=jnp.zeros([], dtype),
    stats_count=zero(),
    consecutive_spikes=zero(),
    stats_restarts=zero(),
  )


@dataclasses.dataclass(frozen=True)
class _SpikeRule:
  """When a finite norm is a step to skip, and how the statistics follow the accepted ones."""

  max_norm: Any
  z_threshold: Any
  alpha: Any
  warmup_steps: Any
  max_consecutive_spikes: Any

  def is_spike(self, norm: jax.Array, state: SkipBadStepsState) -> jax.Array:
    """A finite norm above ``max_norm``, or a z-score spike after the warm-up."""
    bad = jnp.zeros([], bool)
    if self.max_norm is not None:
      bad |= norm > _hyperparams.bound(self.max_norm, None, norm.dtype)
    if self.z_threshold is not None:
      z, _, _ = _statistics.zscore(norm, state.norm_mean, state.norm_var)
      warm = state.stats_count < self.warmup_steps
      bad |= ~warm & (z > _hyperparams.evaluate(self.z_threshold, None, norm.dtype))
    return jnp.isfinite(norm) & bad

  def statistics(
    self, norm: jax.Array, bad: jax.Array, skip: jax.Array, state: SkipBadStepsState
  ) -> dict[str, jax.Array]:
    """The statistics fed with an accepted finite norm, restarted after a run of spikes."""
    fed = jnp.isfinite(norm) & ~skip
    alpha = _hyperparams.evaluate(self.alpha, None, norm.dtype)
    mean, var, count = _statistics.norm_statistics(
      norm, fed, state.norm_mean, state.norm_var, state.stats_count, self.warmup_steps, alpha
    )
    spikes = jnp.where(fed, 0, count_if(state.consecutive_spikes, bad))
    restart = jnp.zeros([], bool)
    if self.max_consecutive_spikes is not None:
      restart = bad & (spikes >= self.max_consecutive_spikes)
    zero = jnp.zeros_like(mean)
    return {
      "norm_mean": jnp.where(restart, zero, mean),
      "norm_var": jnp.where(restart, zero, var),
      "stats_count": jnp.where(restart, 0, count),
      "consecutive_spikes": jnp.where(restart, 0, spikes),
      "stats_restarts": count_if(state.stats_restarts, restart),
    }


_metrics.register_statistics(
  SkipBadStepsState,
  "skip_bad_steps",
  (
    "grad_norm",
    "count",
    "steps_skipped",
    "consecutive_skips",
    "last_step_skipped",
    "norm_mean",
    "norm_var",
    "stats_restarts",
  ),
  fractions={"skip_fraction": ("steps_skipped", "count")},
)
