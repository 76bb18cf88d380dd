"""Skipping bad steps (NaN/Inf or norm spikes) without touching the optimizer state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _metrics, _norms, _validation
from optax_momclip._clipping import count_if
from optax_momclip._replay import update_keeping_state
from optax_momclip._skip_rules import EMA_ALPHA, SpikeRule


class SkipBadStepsState(NamedTuple):
  """State of `skip_bad_steps`.

  Attributes:
    inner_state: the wrapped transformation's state, unchanged by a skipped step.
    grad_norm: the global L2 norm of the incoming updates the decision was
      taken on. f32[] (f64[] for float64 params, as every float field here).
    loss: the loss given as ``update(..., value=loss)``, 0 when none was. f32[].
    count: updates seen (saturating). i32[].
    steps_skipped: updates skipped (saturating). i32[].
    consecutive_skips: updates skipped in a row, 0 after an applied one. i32[].
    last_step_skipped: whether the latest update was skipped. bool[].
    norm_mean: the mean a norm is judged against: the warm-up mean then an
      EMA, or the window's mean at the latest step. f32[].
    norm_var: the variance, likewise (the window's sample or population one). f32[].
    loss_mean: the mean a loss is judged against, likewise. f32[].
    loss_var: its variance, likewise. f32[].
    stats_count: values in the statistics since the last (re)start: at most
      ``warmup_steps`` for the EMA rule, at most ``window`` for the window rule. i32[].
    norm_window: the window of norms, a ring buffer. f32[window]; an unused f32[1] for the
      EMA rule (orbax cannot save zero-size arrays).
    loss_window: the window of losses, likewise. f32[window].
    window_index: the slot the next value is written to. i32[].
    consecutive_spikes: finite updates skipped since the last accepted one
      (non-finite ones neither count nor break the run). i32[].
    stats_restarts: times the statistics restarted after
      ``max_consecutive_spikes`` finite spikes. i32[].
  """

  inner_state: Any
  grad_norm: jax.Array  # f32[]
  loss: jax.Array  # f32[]
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_skipped: jax.Array  # i32[]
  consecutive_skips: jax.Array  # i32[]
  last_step_skipped: jax.Array  # bool[]
  norm_mean: jax.Array  # f32[]
  norm_var: jax.Array  # f32[]
  loss_mean: jax.Array  # f32[]
  loss_var: jax.Array  # f32[]
  stats_count: jax.Array  # i32[]
  norm_window: jax.Array  # f32[window], f32[1] for the EMA rule
  loss_window: jax.Array  # f32[window]
  window_index: jax.Array  # i32[]
  consecutive_spikes: jax.Array  # i32[]
  stats_restarts: jax.Array  # i32[]


def skip_bad_steps(
  inner: optax.GradientTransformation,
  *,
  skip_nonfinite: bool = True,
  max_norm: float | jax.Array | None = None,
  z_threshold: float | jax.Array | None = None,
  spike_on: str = "grad_norm",
  alpha: float | jax.Array = EMA_ALPHA,
  warmup_steps: int | jax.Array = 100,
  window: int | None = None,
  min_history: int | None = None,
  std: str = "population",
  record_spikes: bool = False,
  max_consecutive_spikes: int | jax.Array | None = None,
  axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``inner`` so a bad step is skipped: zero update, ``inner``'s state untouched.

  A step is bad when the global norm ``x = ‖g‖`` of the incoming updates, or
  the loss given as ``update(..., value=loss)``, is non-finite
  (``skip_nonfinite``); when the norm is above ``max_norm``; or when the
  signal named by ``spike_on`` (the norm, the loss, or either) is a spike
  above ``z_threshold`` against the statistics of the accepted steps:

  - the EMA rule (default): ``z = (x - μ)/(σ + 10^{-6}) > z_threshold``,
    where μ, σ² are the mean and population variance of the first
    ``warmup_steps`` accepted values, then EMAs with decay ``alpha``
    (``μ ← αμ + (1-α)x``, ``σ² ← ασ² + (1-α)(x - μ)²``);
  - the window rule (``window=N``): ``x - μ > z_threshold·σ`` over the last
    ``N`` values (a ring buffer on device), once ``min_history`` are held,
    with the population or sample (``std="sample"``) deviation: OLMo-core's
    ``SkipStepOptimizer`` and MaxText's ``skip_step_on_spikes``.

  Statistics are fed with accepted steps only, so a skipped NaN or spike never
  poisons them. OLMo-core and MaxText write every step's values into their
  window, so one NaN skips every step of the window after it, and one spike
  inflates σ so that the next ones pass; ``record_spikes=True`` does as they
  do, and with ``window=128, z_threshold=6, std="sample", spike_on="either"``
  takes their decisions. While σ is below ``1e-3·|μ|`` (say, after identical
  values) no step is a spike: such a spread says nothing, and measuring
  against it would skip every larger value forever. After
  ``max_consecutive_spikes`` finite spikes in a row the statistics restart,
  so a lasting change of scale is accepted rather than skipped forever; a
  non-finite step is always skipped. Only the z-score rule's spikes count
  there: a step skipped for ``max_norm`` alone neither counts nor breaks the run.

  ``inner.update`` runs on every step: on a skipped step every leaf of its
  state keeps its old bits and the update is ``-0.0`` everywhere, which
  ``optax.apply_updates`` adds to the params without changing a bit; on an
  applied step both are those of ``inner`` bit for bit. This stays on device,
  works under ``vmap`` (each instance decides alone) and costs no host sync.
  Wrap the whole optimizer (the learning rate included), so nothing after it
  turns the skip into a move. With ``axis_name`` the norm is global across
  the mapped axis, so every replica takes the same decision (pass the same
  loss to each); under ``jit`` with sharded arrays it is global already.

  Under a trace, ``inner.update`` is replayed from its jaxpr and each value
  of its new state is selected with ``jnp.where`` as soon as it is computed,
  so the update is computed from the selected state: a donated state is then
  overwritten in place with no copy of the old one. State computed inside a
  nested ``jit``, ``cond`` or ``scan`` of ``inner`` (``optax.MultiSteps``,
  say) is selected when that returns, which is exact but lets XLA:CPU copy
  those buffers again.

  Differs from ``optax.apply_if_finite``, which after ``max_consecutive_errors``
  applies the NaN update; here a non-finite update is never applied.

  Args:
    inner: the transformation to protect (any ``optax.GradientTransformation``).
    skip_nonfinite: skip steps whose norm or loss is NaN or Inf. Default True.
    max_norm: skip steps whose norm is above this (>= 0). Default None: off.
    z_threshold: the spike threshold (> 0, ``inf`` allowed). Default None: no
      spike rule.
    spike_on: ``"grad_norm"`` (default), ``"loss"`` or ``"either"``: the
      signals a spike is looked for in. A loss needs ``update(..., value=loss)``.
    alpha: the EMA rule's decay, in ``[0, 1]``. Default 0.99.
    warmup_steps: accepted values that start the EMA rule, >= 1. Default 100.
    window: the window rule's length N, >= 2 (it fixes a shape). Default None:
      the EMA rule.
    min_history: values the window must hold before any decision, in ``[1,
      N]``. Default None: ``max(2, N // 2) - 1``, OLMo-core's and MaxText's.
    std: the window's ``"population"`` (default) or ``"sample"`` deviation.
    record_spikes: write skipped steps' values into the window too, as
      OLMo-core and MaxText do. Default False.
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

    The loss as a signal, through ``optax.chain``'s extra arguments (as
    ``nnx.Optimizer.update(model, grads, value=loss)`` passes them):

    >>> tx = optax.chain(omc.skip_bad_steps(optax.sgd(0.1), z_threshold=4.0, spike_on="loss",
    ...                                     window=8, min_history=4))
    >>> state = tx.init(params)
    >>> for loss in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 30.0]:
    ...   u, state = tx.update({"w": jnp.ones(2)}, state, params, value=jnp.asarray(loss))
    >>> print(optax.tree.get(state, "steps_skipped"))
    1

  References:
    Chowdhery et al., *PaLM: Scaling Language Modeling with Pathways*, 2022,
    https://arxiv.org/abs/2204.02311 (skipping batches around loss spikes);
    OLMo-core's ``SkipStepOptimizer``, https://github.com/allenai/OLMo-core;
    MaxText's ``skip_step_on_spikes``, https://github.com/AI-Hypercomputer/maxtext
  """
  fn = "skip_bad_steps"
  rule = SpikeRule.checked(
    fn,
    max_norm,
    z_threshold,
    spike_on,
    alpha,
    warmup_steps,
    window,
    min_history,
    std,
    record_spikes,
    max_consecutive_spikes,
  )
  _validation.check_bool(fn, "skip_nonfinite", skip_nonfinite)
  _validation.check_axis_name(fn, axis_name)
  inner = _validation.inner_transformation(fn, inner)

  def init_fn(params: Any) -> SkipBadStepsState:
    return _initial_state(inner.init(params), _norms.statistics_dtype(params), window or 1)

  def update_fn(
    updates: Any, state: SkipBadStepsState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, SkipBadStepsState]:
    norm = _norms.global_norms([updates], axis_name=axis_name)[0].value()
    return _step(fn, rule, inner, skip_nonfinite, norm, updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(
    init_fn, _eager.compiled_when_reused(fn, update_fn, passes_extra_args=True)
  )


def _step(
  fn: str,
  rule: SpikeRule,
  inner: optax.GradientTransformationExtraArgs,
  skip_nonfinite: bool,
  norm: jax.Array,
  updates: Any,
  state: SkipBadStepsState,
  params: Any,
  extra_args: dict[str, Any],
) -> tuple[Any, SkipBadStepsState]:
  """One step: judge the norm and the loss, run ``inner`` keeping its state on a skip."""
  norm = norm.astype(state.grad_norm.dtype)
  loss = rule.loss_of(fn, extra_args, norm.dtype)
  finite = jnp.isfinite(norm) & (jnp.isfinite(loss) if "value" in extra_args else True)
  spike, z_spike, judged = rule.judge(norm, loss, state)
  bad = finite & spike
  skip = bad | ~finite if skip_nonfinite else bad
  new_updates, new_inner = update_keeping_state(
    inner.update, skip, updates, state.inner_state, params, extra_args
  )
  return new_updates, SkipBadStepsState(
    inner_state=new_inner,
    grad_norm=norm,
    loss=loss,
    count=optax.safe_increment(state.count),
    steps_skipped=count_if(state.steps_skipped, skip),
    consecutive_skips=jnp.where(skip, optax.safe_increment(state.consecutive_skips), 0),
    last_step_skipped=skip,
    **rule.statistics(norm, loss, finite & ~skip, finite & z_spike, state, judged),
  )


def _initial_state(inner_state: Any, dtype: Any, slots: int) -> SkipBadStepsState:
  # A fresh array per field: one array in two fields cannot be donated.
  zero, zero_f = (lambda: jnp.zeros([], jnp.int32)), (lambda: jnp.zeros([], dtype))
  return SkipBadStepsState(
    inner_state=inner_state,
    grad_norm=zero_f(),
    loss=zero_f(),
    count=zero(),
    steps_skipped=zero(),
    consecutive_skips=zero(),
    last_step_skipped=jnp.zeros([], bool),
    norm_mean=zero_f(),
    norm_var=zero_f(),
    loss_mean=zero_f(),
    loss_var=zero_f(),
    stats_count=zero(),
    norm_window=jnp.zeros([slots], dtype),
    loss_window=jnp.zeros([slots], dtype),
    window_index=zero(),
    consecutive_spikes=zero(),
    stats_restarts=zero(),
  )


_metrics.register_statistics(
  SkipBadStepsState,
  "skip_bad_steps",
  (
    "grad_norm",
    "loss",
    "count",
    "steps_skipped",
    "consecutive_skips",
    "last_step_skipped",
    "norm_mean",
    "norm_var",
    "loss_mean",
    "loss_var",
    "stats_restarts",
  ),
  fractions={"skip_fraction": ("steps_skipped", "count")},
)
