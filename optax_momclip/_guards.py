"""Skipping bad steps (NaN/Inf or norm spikes) without touching the optimizer state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core
from jax.extend import source_info_util

from optax_momclip import _adaptive, _eager, _hyperparams, _metrics, _norms, _validation
from optax_momclip._clipping import count_if


class SkipBadStepsState(NamedTuple):
  """State of `skip_bad_steps`.

  Attributes:
    inner_state: the wrapped transformation's state, unchanged by a skipped step.
    checked_norm: the global L2 norm of the incoming updates the decision was
      taken on. f32[].
    steps_checked: updates seen (saturating). i32[].
    steps_skipped: updates skipped (saturating). i32[].
    consecutive_skips: updates skipped in a row, 0 after an applied one. i32[].
    last_step_skipped: whether the latest update was skipped. bool[].
    spike_mean: mean of the accepted finite norms: the warm-up mean, then an EMA. f32[].
    spike_var: their population variance, likewise. f32[].
    spike_count: accepted finite norms in the statistics since the last
      (re)start, at most ``warmup_steps``. i32[].
    consecutive_spikes: finite updates skipped since the last accepted one
      (non-finite ones neither count nor break the run). i32[].
    spike_restarts: times the statistics restarted their warm-up after
      ``max_consecutive_skips`` finite spikes. i32[].
  """

  inner_state: Any
  checked_norm: jax.Array  # f32[]
  steps_checked: jax.Array  # i32[]
  steps_skipped: jax.Array  # i32[]
  consecutive_skips: jax.Array  # i32[]
  last_step_skipped: jax.Array  # bool[]
  spike_mean: jax.Array  # f32[]
  spike_var: jax.Array  # f32[]
  spike_count: jax.Array  # i32[]
  consecutive_spikes: jax.Array  # i32[]
  spike_restarts: jax.Array  # i32[]


def skip_bad_steps(
  inner: optax.GradientTransformation,
  *,
  skip_nonfinite: bool = True,
  max_norm: float | jax.Array | None = None,
  spike_zscore: float | jax.Array | None = None,
  alpha: float | jax.Array = 0.99,
  warmup_steps: int | jax.Array = 100,
  max_consecutive_skips: int | jax.Array | None = None,
  axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``inner`` so a bad step is skipped: zero update, ``inner``'s state untouched.

  A step is bad when the global norm of the incoming updates ``x = ‖g‖`` is
  non-finite (``skip_nonfinite``), above ``max_norm``, or a spike:

  .. math:: z = \frac{x - \mu}{\sigma + 10^{-6}} > \text{spike\_zscore}

  where μ, σ² are the mean and population variance of the first
  ``warmup_steps`` accepted norms, then EMAs with decay ``alpha``
  (``μ ← αμ + (1-α)x``, ``σ² ← ασ² + (1-α)(x - μ)²``). While σ is below
  ``0.01·μ`` (say, after identical norms) no step is a spike: such a spread
  says nothing, and dividing by it would skip every larger norm forever. The statistics are
  updated on accepted steps only, so a skipped NaN or spike never poisons
  them (rolling-window rules that record the bad value skip every later step
  of the window). No spike is detected during the warm-up. After
  ``max_consecutive_skips`` finite spikes in a row the statistics restart
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
    spike_zscore: skip steps whose z-score is above this (> 0). Default None: off.
    alpha: EMA decay of the spike statistics, in ``[0, 1]``. Default 0.99.
    warmup_steps: accepted norms that initialise the statistics, >= 1. Default 100.
    max_consecutive_skips: finite spikes in a row after which the statistics
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
  if spike_zscore is not None:
    _validation.check_scalar(
      fn, "spike_zscore", spike_zscore, low=0.0, low_open=True, infinite=True
    )
  _validation.check_scalar(fn, "alpha", alpha, low=0.0, high=1.0)
  _validation.check_count(fn, "warmup_steps", warmup_steps)
  if max_consecutive_skips is not None:
    _validation.check_count(fn, "max_consecutive_skips", max_consecutive_skips)
  _validation.check_axis_name(fn, axis_name)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Any) -> SkipBadStepsState:
    # A fresh array per field: one array in two fields cannot be donated.
    zero = lambda: jnp.zeros([], jnp.int32)
    dtype = _norms.statistics_dtype(params)
    return SkipBadStepsState(
      inner_state=inner.init(params),
      checked_norm=jnp.zeros([], dtype),
      steps_checked=zero(),
      steps_skipped=zero(),
      consecutive_skips=zero(),
      last_step_skipped=jnp.zeros([], bool),
      spike_mean=jnp.zeros([], dtype),
      spike_var=jnp.zeros([], dtype),
      spike_count=zero(),
      consecutive_spikes=zero(),
      spike_restarts=zero(),
    )

  def update_fn(
    updates: Any, state: SkipBadStepsState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, SkipBadStepsState]:
    dtype = state.checked_norm.dtype
    norm = _norms.global_norms([updates], axis_name=axis_name)[0].astype(dtype)
    finite = jnp.isfinite(norm)
    bad = jnp.zeros([], bool)  # a finite step to skip
    if max_norm is not None:
      bad |= finite & (norm > _hyperparams.bound(max_norm, None, dtype))
    if spike_zscore is not None:
      z, _, _ = _adaptive.zscore(norm, state.spike_mean, state.spike_var)
      warm = state.spike_count < warmup_steps
      bad |= finite & ~warm & (z > _hyperparams.evaluate(spike_zscore, None, dtype))
    skip = bad | ~finite if skip_nonfinite else bad
    fed = finite & ~skip
    mean, var, count = _adaptive.norm_statistics(
      norm,
      fed,
      state.spike_mean,
      state.spike_var,
      state.spike_count,
      warmup_steps,
      _hyperparams.evaluate(alpha, None, dtype),
    )
    spikes = jnp.where(fed, 0, count_if(state.consecutive_spikes, bad))
    restart = jnp.zeros([], bool)
    if max_consecutive_skips is not None:
      restart = bad & (spikes >= max_consecutive_skips)
    zero_f = jnp.zeros([], dtype)

    new_updates, new_inner = _update_keeping_state(
      inner.update, skip, updates, state.inner_state, params, extra_args
    )
    return new_updates, SkipBadStepsState(
      inner_state=new_inner,
      checked_norm=norm,
      steps_checked=optax.safe_increment(state.steps_checked),
      steps_skipped=count_if(state.steps_skipped, skip),
      consecutive_skips=jnp.where(skip, optax.safe_increment(state.consecutive_skips), 0),
      last_step_skipped=skip,
      spike_mean=jnp.where(restart, zero_f, mean),
      spike_var=jnp.where(restart, zero_f, var),
      spike_count=jnp.where(restart, 0, count),
      consecutive_spikes=jnp.where(restart, 0, spikes),
      spike_restarts=count_if(state.spike_restarts, restart),
    )

  return optax.GradientTransformationExtraArgs(
    init_fn, _eager.compiled_when_reused(update_fn, passes_extra_args=True)
  )


def _update_keeping_state(
  update: Callable[..., tuple[Any, Any]],
  skip: jax.Array,
  updates: Any,
  state: Any,
  params: Any,
  extra_args: dict[str, Any],
) -> tuple[Any, Any]:
  """``update(updates, state, params)``, with its state kept and its update ``-0.0`` on a skip.

  Selecting the finished results would leave XLA two readers of each old state
  buffer after the donated state has been overwritten in place: the select and
  the update, which is computed from the unselected new state. XLA:CPU copies
  every such buffer at the start of the step, which made a heavy-ball step 3.2
  times as slow. So ``update`` is replayed from its jaxpr, and each value of
  the new state is selected the moment it is computed: everything after it,
  the update included, reads the selected state, and each old buffer has one
  reader. On an applied step every selected value is the new one bit for bit,
  so the results are exactly those of ``update``; on a skipped step the state
  is the old one and the update ``-0.0``, whatever was computed.
  """
  if not isinstance(skip, jax.core.Tracer):
    # Run eagerly, nothing is donated, and ``update`` may branch on concrete values.
    new_updates, new_state = update(updates, state, params, **extra_args)
    _check_same_structure(state, new_state)
    return _skipped_as_zero(skip, new_updates), jax.tree.map(
      lambda old, new: jnp.where(skip, old, new), state, new_state
    )
  closed, (shape_updates, shape_state) = jax.make_jaxpr(
    lambda u, s, p: update(u, s, p, **extra_args), return_shape=True
  )(updates, state, params)
  _check_same_structure(state, shape_state)
  jaxpr = closed.jaxpr
  n_updates = len(jax.tree.leaves(shape_updates))
  old_state = jax.tree.leaves(state)
  state_vars = jaxpr.outvars[n_updates:]
  # A variable returned in several fields is selected against the first field's old
  # value as it is computed, and against each other field's at the end.
  keep: dict[jex_core.Var, Any] = {}
  for var, old, new in zip(state_vars, old_state, jax.tree.leaves(shape_state), strict=True):
    same_type = (np.shape(old), jnp.result_type(old)) == (new.shape, new.dtype)
    if isinstance(var, jex_core.Var) and same_type:
      keep.setdefault(var, old)

  env: dict[jex_core.Var, Any] = {}

  def read(var: Any) -> Any:
    return var.val if isinstance(var, jex_core.Literal) else env[var]

  def write(var: jex_core.Var, value: Any) -> None:
    env[var] = jnp.where(skip, keep[var], value) if var in keep else value

  for var, value in zip(jaxpr.constvars, closed.consts, strict=True):
    write(var, value)
  for var, value in zip(jaxpr.invars, jax.tree.leaves((updates, state, params)), strict=True):
    write(var, value)
  # As `jax.core.eval_jaxpr` binds each equation, with its source and name scope.
  for eqn in jaxpr.eqns:
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with (
      source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
      eqn.ctx.manager,
    ):
      out = eqn.primitive.bind(*map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params))
    out = out if eqn.primitive.multiple_results else [out]
    for var, value in zip(eqn.outvars, out, strict=True):
      write(var, value)

  new_state = []
  for var, old in zip(state_vars, old_state, strict=True):
    value = read(var)
    selected = isinstance(var, jex_core.Var) and keep.get(var) is old
    new_state.append(value if selected else jnp.where(skip, old, value))
  new_updates = map(read, jaxpr.outvars[:n_updates])
  return (
    _skipped_as_zero(skip, jax.tree.unflatten(jax.tree.structure(shape_updates), new_updates)),
    jax.tree.unflatten(jax.tree.structure(state), new_state),
  )


def _skipped_as_zero(skip: jax.Array, updates: Any) -> Any:
  # -0.0 is the identity of IEEE addition: p + (-0.0) == p bit for bit, -0.0 included.
  return jax.tree.map(lambda u: jnp.where(skip, jnp.array(-0.0, jnp.result_type(u)), u), updates)


def _check_same_structure(state: Any, new_state: Any) -> None:
  # Any: jaxlib ships no type stub for PyTreeDef, and mypy rejects comparing two.
  old_def: Any = jax.tree.structure(state)
  new_def: Any = jax.tree.structure(new_state)
  if new_def != old_def:
    raise ValueError(
      "skip_bad_steps: inner.update returned a state of another structure than its input: "
      f"{new_def} for {old_def}"
    )


_metrics.register(
  SkipBadStepsState,
  "skip_bad_steps",
  (
    "checked_norm",
    "steps_checked",
    "steps_skipped",
    "consecutive_skips",
    "last_step_skipped",
    "spike_mean",
    "spike_var",
    "spike_restarts",
  ),
  fractions={"skip_fraction": ("steps_skipped", "steps_checked")},
)
