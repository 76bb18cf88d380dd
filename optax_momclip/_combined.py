"""Momentum and clipping combined: clipped (mixed) momentum and normalized momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _metrics, _norms, _scaling, _validation
from optax_momclip._clipping import count_if
from optax_momclip._hyperparams import bound, complement, evaluate
from optax_momclip._momentum import cast_like, ema_tree, momentum_init
from optax_momclip._scaling import range_scale


class ClippedMomentumState(NamedTuple):
  """State of `clipped_momentum`.

  Attributes:
    count: steps taken (saturating). i32[].
    momentum_buffer: the unclipped moving average ``m``, a tree like the
      params in ``accumulator_dtype`` (default: each param's dtype).
    grad_norm: the global norm of the incoming gradient ``‖g‖``. f32[].
    momentum_norm: the global norm of the new average ``‖m‖``. f32[].
    clip_threshold: ``max_norm``. f32[].
    steps_clipped: steps in which a clip that enters the output (of ``m``
      when ``ν > 0``, of ``g`` when ``ν < 1``) rescaled (saturating). i32[].
  """

  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  momentum_buffer: Any  # tree like params, accumulator_dtype
  grad_norm: jax.Array  # f32[]
  momentum_norm: jax.Array  # f32[]
  clip_threshold: jax.Array  # f32[]
  steps_clipped: jax.Array  # i32[]


def clipped_momentum(
  max_norm: float | jax.Array,
  momentum: float | jax.Array = 0.9,
  *,
  nu: float | jax.Array = 1.0,
  ord: float | None = None,
  axis_name: str | tuple[str, ...] | None = None,
  accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clipped momentum and its mix with the clipped gradient (Zhang et al., 2020).

  .. math:: m_t = \beta m_{t-1} + (1 - \beta) g_t, \quad m_0 = 0, \qquad
     u_t = \nu \,\mathrm{clip}_c(m_t) + (1 - \nu)\,\mathrm{clip}_c(g_t), \qquad
     \mathrm{clip}_c(x) = x \min\!\big(1, c / \|x\|\big)

  The buffer ``m`` itself is never clipped: only the output is. ``ν = 1``
  (default) is the paper's clipped momentum, ``ν = 0`` is
  `clip_by_global_norm` of the gradient, and the paper's mixed clipping uses
  ``β = 0.999, ν = 0.7``. Both norms are global (over the whole tree),
  accumulated in float32 and kept in the state; a norm over a NaN or infinite
  element leaves its term unscaled so the problem stays visible.

  Args:
    max_norm: the threshold ``c``, in ``[0, inf]``.
    momentum: ``β`` in ``[0, 1]``. Default 0.9.
    nu: ``ν`` in ``[0, 1]``. Default 1.
    ord: the norm, 1, 2 or ``inf``; None (default) is 2, as in NumPy.
    axis_name: a mapped axis (``shard_map``/``pmap``) the updates are sharded
      over; the norms are then global across it. Default None.
    accumulator_dtype: dtype ``m`` is stored in; updates keep the gradient's
      dtype. Default None: each param's dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    `ClippedMomentumState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.clipped_momentum(1.0, 0.5)
    >>> g = {"w": jnp.array([6.0, 8.0])}
    >>> u, state = tx.update(g, tx.init(g))  # m = (3, 4), clipped to norm 1
    >>> print([round(float(x), 4) for x in u["w"]], state.momentum_norm, state.grad_norm)
    [0.6, 0.8] 5.0 10.0

  References:
    Zhang, Jin, Fang, Wang, *Improved Analysis of Clipping Algorithms for
    Non-convex Optimization*, 2020, https://arxiv.org/abs/2010.02519
  """
  fn = "clipped_momentum"
  _validation.check_scalar(fn, "max_norm", max_norm, low=0.0, infinite=True)
  _validation.check_scalar(fn, "momentum", momentum, low=0.0, high=1.0)
  _validation.check_scalar(fn, "nu", nu, low=0.0, high=1.0)
  order = _validation.check_ord(fn, ord)
  _validation.check_axis_name(fn, axis_name)
  _validation.check_dtype(fn, "accumulator_dtype", accumulator_dtype)

  def init_fn(params: Any) -> ClippedMomentumState:
    dtype = _norms.statistics_dtype(params)
    return ClippedMomentumState(
      **momentum_init(params, accumulator_dtype),
      grad_norm=jnp.zeros([], dtype),
      momentum_norm=jnp.zeros([], dtype),
      clip_threshold=bound(max_norm, None, dtype),
      steps_clipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: ClippedMomentumState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, ClippedMomentumState]:
    del params, extra_args
    _validation.check_tree_matches(fn, updates, state.momentum_buffer)
    dtype = state.grad_norm.dtype
    c = bound(max_norm, None, dtype)
    v, one_minus_v = evaluate(nu, state.count, dtype), complement(nu, state.count, dtype)
    new = ema_tree(updates, state.momentum_buffer, momentum, state.count)
    m_exact, g_exact = (
      n.astype(dtype) for n in _norms.global_norms([new, updates], ord=order, axis_name=axis_name)
    )
    m_scale, g_scale = range_scale(m_exact, c), range_scale(g_exact, c)
    m_norm, g_norm = m_exact.value(), g_exact.value()
    clipped = ((v > 0) & m_scale.changes()) | ((v < 1) & g_scale.changes())
    return _mix(updates, new, m_scale.times(v), g_scale.times(one_minus_v)), ClippedMomentumState(
      count=optax.safe_increment(state.count),
      momentum_buffer=cast_like(new, state.momentum_buffer),
      grad_norm=g_norm,
      momentum_norm=m_norm,
      clip_threshold=c,
      steps_clipped=count_if(state.steps_clipped, clipped),
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


def _mix(updates: Any, buffer: Any, m_weight: _scaling.Scale, g_weight: _scaling.Scale) -> Any:
  """``m_weight·m + g_weight·g`` leaf by leaf, in the gradient's dtype."""
  scale_m, scale_g = _scaling.scaler(m_weight), _scaling.scaler(g_weight)

  def leaf(g: jax.Array, m: jax.Array) -> jax.Array:
    g = jnp.asarray(g)
    return (scale_m(m) + scale_g(g.astype(m.dtype))).astype(g.dtype)

  return jax.tree.map(leaf, updates, buffer)


class NormalizedMomentumState(NamedTuple):
  """State of `normalized_momentum`.

  Attributes:
    count: steps taken (saturating). i32[].
    momentum_buffer: the moving average ``m``, a tree like the params in
      ``accumulator_dtype`` (default: each param's dtype).
    momentum_norm: ``‖m‖`` of the new average, before normalizing. f32[].
  """

  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  momentum_buffer: Any  # tree like params, accumulator_dtype
  momentum_norm: jax.Array  # f32[]


def normalized_momentum(
  momentum: float | jax.Array = 0.9,
  *,
  eps: float | jax.Array = 1e-8,
  axis_name: str | tuple[str, ...] | None = None,
  accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Normalized SGD with momentum: the moving average scaled to unit global norm.

  .. math:: m_t = \beta m_{t-1} + (1 - \beta) g_t, \quad m_0 = 0, \qquad
     u_t = \frac{m_t}{\max(\|m_t\|_2, \epsilon)}

  Every step has length 1 (times the learning rate) whatever the gradient's
  scale; a zero average gives a zero update. The norm is global, accumulated
  in float32 and kept in the state.

  Args:
    momentum: ``β`` in ``[0, 1]``. Default 0.9.
    eps: ``ε > 0``, the smallest norm divided by. Default 1e-8.
    axis_name: a mapped axis (``shard_map``/``pmap``) the updates are sharded
      over; the norm is then global across it. Default None.
    accumulator_dtype: dtype ``m`` is stored in; updates keep the gradient's
      dtype. Default None: each param's dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    `NormalizedMomentumState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.normalized_momentum(0.9)
    >>> g = {"w": jnp.array([30.0, 40.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> print([round(float(x), 4) for x in u["w"]], state.momentum_norm)
    [0.6, 0.8] 5.0

  References:
    Cutkosky, Mehta, *Momentum Improves Normalized SGD*, 2020,
    https://arxiv.org/abs/2002.03305
  """
  fn = "normalized_momentum"
  _validation.check_scalar(fn, "momentum", momentum, low=0.0, high=1.0)
  _validation.check_scalar(fn, "eps", eps, low=0.0, low_open=True)
  _validation.check_axis_name(fn, axis_name)
  _validation.check_dtype(fn, "accumulator_dtype", accumulator_dtype)

  def init_fn(params: Any) -> NormalizedMomentumState:
    return NormalizedMomentumState(
      **momentum_init(params, accumulator_dtype),
      momentum_norm=jnp.zeros([], _norms.statistics_dtype(params)),
    )

  def update_fn(
    updates: Any, state: NormalizedMomentumState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, NormalizedMomentumState]:
    del params, extra_args
    _validation.check_tree_matches(fn, updates, state.momentum_buffer)
    new = ema_tree(updates, state.momentum_buffer, momentum, state.count)
    dtype = state.momentum_norm.dtype
    exact = _norms.global_norms([new], axis_name=axis_name)[0].astype(dtype)
    norm = exact.value()
    inv = _scaling.ratio(1.0, exact.at_least(evaluate(eps, None, dtype)))
    scale = _scaling.scaler(inv)
    out = jax.tree.map(lambda g, m: scale(m).astype(jnp.asarray(g).dtype), updates, new)
    return out, NormalizedMomentumState(
      count=optax.safe_increment(state.count),
      momentum_buffer=cast_like(new, state.momentum_buffer),
      momentum_norm=norm,
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


_metrics.register_statistics(
  ClippedMomentumState,
  "clipped_momentum",
  ("grad_norm", "momentum_norm", "clip_threshold", "count", "steps_clipped"),
  fractions={"clip_fraction": ("steps_clipped", "count")},
)
_metrics.register_statistics(NormalizedMomentumState, "normalized_momentum", ("momentum_norm",))
