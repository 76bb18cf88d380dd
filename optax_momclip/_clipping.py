"""Value, per-leaf and global-norm clipping that keeps the norm it clipped with."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _hyperparams, _metrics, _norms, _scaling, _validation
from optax_momclip._hyperparams import ScheduleOrScalar
from optax_momclip._scaling import Scale, range_scale, scale_leaf, scale_tree

_NONFINITE = ("propagate", "zero")


# ---- the bookkeeping every clip shares ---------------------------------------------------


def count_if(counter: jax.Array, cond: jax.Array) -> jax.Array:
  """``counter + 1`` (saturating) where ``cond``, else ``counter``."""
  return jnp.where(cond, optax.safe_increment(counter), counter)


def any_of(flags: list[jax.Array]) -> jax.Array:
  """True when any of a list of bool arrays is (False for an empty list)."""
  return jnp.any(jnp.stack([jnp.any(f) for f in flags])) if flags else jnp.array(False)


def clip_statistics_init(dtype: Any, threshold: Any) -> dict[str, jax.Array]:
  """The statistics a clip keeps, before its first step, as keyword arguments of its state."""
  return {
    "grad_norm": jnp.zeros([], dtype),
    "clip_scale": jnp.ones([], dtype),
    "clip_threshold": jnp.asarray(threshold, dtype),
    "count": jnp.zeros([], jnp.int32),
    "steps_clipped": jnp.zeros([], jnp.int32),
  }


def clip_statistics(
  state: Any, norm: jax.Array, scale: Scale, threshold: jax.Array
) -> dict[str, jax.Array]:
  """The statistics after a step that multiplied the updates by ``scale``, in the state's dtype."""
  like = lambda x: jnp.asarray(x).astype(state.grad_norm.dtype)
  return {
    "grad_norm": like(norm),
    "clip_scale": like(scale.value()),
    "clip_threshold": like(threshold),
    "count": optax.safe_increment(state.count),
    "steps_clipped": count_if(state.steps_clipped, jnp.any(scale.changes())),
  }


# Fields every clip's state shares, in this order; `metrics` reports them.
CLIP_STATS = ("grad_norm", "clip_scale", "clip_threshold", "count", "steps_clipped")


# ---- clip_by_value -----------------------------------------------------------------------


class ClipByValueState(NamedTuple):
  """State of `clip_by_value`.

  Attributes:
    grad_norm: the largest magnitude of the incoming updates, ``max|g|``
      (their inf-norm), before clipping. f32[] (f64[] for float64 params).
    clip_threshold: the upper bound ``max_value`` used. f32[] (f64[]).
    count: updates processed (saturating). i32[].
    steps_clipped: updates in which at least one element was clipped. i32[].
  """

  grad_norm: jax.Array  # f32[] (f64[] for float64 params)
  clip_threshold: jax.Array  # f32[] (f64[])
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_clipped: jax.Array  # i32[]


def clip_by_value(
  max_value: float | jax.Array, *, min_value: float | jax.Array | None = None
) -> optax.GradientTransformationExtraArgs:
  r"""Clips every element of the updates into ``[min_value, max_value]``.

  .. math:: g_i \leftarrow \min(\max(g_i, a), b), \quad a = \text{min\_value}
     \ (\text{default } -b), \ b = \text{max\_value}

  Changes the direction of the update (Mikolov, 2012). NaN stays NaN; ±inf
  is clipped to the bound, as ``torch.clamp`` and ``optax.clip`` do. A complex
  element has its modulus clipped, ``|z| <= max_value``, its phase kept
  (``optax.clip`` rejects complex updates); ``min_value`` must then be None.
  The bounds are rounded once, to each leaf's precision (float32 at least).

  Args:
    max_value: upper bound ``b``, >= 0 when ``min_value`` is None.
    min_value: lower bound ``a``, <= ``max_value``. Default None: ``-max_value``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `ClipByValueState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.clip_by_value(0.5)
    >>> g = {"w": jnp.array([-2.0, 0.1, 3.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> print(u["w"], state.grad_norm)
    [-0.5  0.1  0.5] 3.0

  References:
    Mikolov, *Statistical Language Models Based on Neural Networks*, 2012,
    https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf
  """
  fn = "clip_by_value"
  if min_value is None:
    _validation.check_scalar(fn, "max_value", max_value, low=0.0, infinite=True)
  else:
    _validation.check_scalar(fn, "max_value", max_value, infinite=True)
    _validation.check_scalar(fn, "min_value", min_value, infinite=True)
    _validation.check_order(fn, "min_value", min_value, "max_value", max_value)

  def init_fn(params: Any) -> ClipByValueState:
    dtype = _norms.statistics_dtype(params)
    return ClipByValueState(
      grad_norm=jnp.zeros([], dtype),
      clip_threshold=jnp.asarray(max_value, dtype),
      count=jnp.zeros([], jnp.int32),
      steps_clipped=jnp.zeros([], jnp.int32),
    )

  def bounds(dtype: Any) -> tuple[jax.Array, jax.Array]:
    # Traced bounds making no interval (negative, crossed, NaN) read 0: zeroed, never flipped.
    if min_value is None:
      return (hi := _hyperparams.bound(max_value, None, dtype)), -hi
    hi, lo = (_hyperparams.evaluate(v, None, dtype) for v in (max_value, min_value))
    empty = ~(lo <= hi)
    return jnp.where(empty, 0, hi), jnp.where(empty, 0, lo)

  def update_fn(
    updates: Any, state: ClipByValueState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, ClipByValueState]:
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    clipped = [_clip_leaf(fn, jnp.asarray(g), bounds, min_value is None) for g in leaves]
    largest = [
      top.astype(state.grad_norm.dtype)
      for g, (_, top, _) in zip(leaves, clipped, strict=True)
      if jnp.size(g)
    ]
    return jax.tree.unflatten(treedef, [out for out, _, _ in clipped]), ClipByValueState(
      grad_norm=jnp.max(jnp.stack(largest)) if largest else jnp.zeros_like(state.grad_norm),
      clip_threshold=bounds(state.clip_threshold.dtype)[0],
      count=optax.safe_increment(state.count),
      steps_clipped=count_if(state.steps_clipped, any_of([moved for _, _, moved in clipped])),
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


def _clip_leaf(
  fn: str, g: jax.Array, bounds: Any, symmetric: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(clipped leaf, max|g|, whether an element moved)``."""
  hi, lo = bounds(_scaling.scale_dtype(g.dtype))
  if jnp.iscomplexobj(g):
    if not symmetric:
      raise ValueError(
        f"{fn}: complex updates are clipped by modulus, |z| <= max_value, so min_value must be None"
      )
    top = jnp.max(jnp.abs(g), initial=0)
    return _scaling.clip_modulus(g, hi), top, top > hi.astype(top.dtype)
  # One max and one min give both the clip decision and max|g|. The decision compares in
  # the leaf's dtype, as the clip does (a float64 1 + 1e-12 is clipped to 1).
  b, a = hi.astype(g.dtype), lo.astype(g.dtype)
  big, small = jnp.max(g, initial=-jnp.inf), jnp.min(g, initial=jnp.inf)
  top = jnp.maximum(jnp.abs(big), jnp.abs(small))
  return jnp.clip(g, a, b), top, (big > b) | (small < a)


# ---- clip_by_norm ------------------------------------------------------------------------


class ClipByNormState(NamedTuple):
  """State of `clip_by_norm`.

  Attributes:
    grad_norm: a tree like the updates holding each leaf's pre-clip norm: f32[]
      per leaf (f64 for a float64 leaf), or with the reduced ``axis`` kept as
      size 1 when ``axis`` is given.
    clip_scale: a tree like ``grad_norm`` with the factor each leaf (or
      slice) was multiplied by, rounded to its dtype.
    clip_threshold: ``max_norm``. f32[] (f64[] for float64 params).
    count: updates processed (saturating). i32[].
    steps_clipped: updates in which at least one leaf or slice was rescaled. i32[].
  """

  grad_norm: Any  # tree of f32 (f64 for float64 leaves)
  clip_scale: Any  # tree of f32 (f64)
  clip_threshold: jax.Array  # f32[] (f64[])
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_clipped: jax.Array  # i32[]


def clip_by_norm(
  max_norm: float | jax.Array,
  *,
  min_norm: float | jax.Array = 0.0,
  ord: float | None = None,
  axis: int | tuple[int, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clamps the norm of each leaf (or of each slice along ``axis``) into a range.

  .. math:: g_\ell \leftarrow g_\ell \cdot
     \frac{\min(\max(\|g_\ell\|, \text{min\_norm}), \text{max\_norm})}{\|g_\ell\|}

  A zero leaf stays zero. ``axis`` names the axes a norm is taken over, as in
  ``jnp.linalg.norm``: ``axis=0`` on a Flax ``Dense`` kernel ``(in, out)``
  clips each output unit's column. A leaf with too few dimensions for
  ``axis`` is one unit. Non-finite norms leave their leaf unscaled. The norms
  are exact at any magnitude and share one rescue branch (see `global_norm`).

  Args:
    max_norm: upper bound, in ``[0, inf]``.
    min_norm: lower bound, in ``[0, max_norm]``. Default 0: no lower bound.
    ord: 1, 2 or ``inf``; None (default) is 2, as in NumPy.
    axis: None (default: the whole leaf), an int or a tuple of ints, each axis
      once.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `ClipByNormState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.clip_by_norm(1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> print(u["a"], u["b"], state.grad_norm["a"])
    [0.6 0.8] [0.3 0.4] 5.0
  """
  fn = "clip_by_norm"
  _validation.check_scalar(fn, "max_norm", max_norm, low=0.0, infinite=True)
  _validation.check_scalar(fn, "min_norm", min_norm, low=0.0)
  _validation.check_order(fn, "min_norm", min_norm, "max_norm", max_norm)
  order = _validation.check_ord(fn, ord)
  _validation.check_axes(fn, "axis", axis)
  kept_shape = lambda shape: _kept_shape(fn, shape, axis)
  bounds = lambda dtype: (
    _hyperparams.bound(max_norm, None, dtype),
    _hyperparams.bound(min_norm, None, dtype),
  )

  def init_fn(params: Any) -> ClipByNormState:
    norms = jax.tree.map(
      lambda x: jnp.zeros(kept_shape(jnp.shape(x)), _norms.statistics_dtype(x)), params
    )
    return ClipByNormState(
      grad_norm=norms,
      clip_scale=jax.tree.map(jnp.ones_like, norms),
      clip_threshold=jnp.asarray(max_norm, _norms.statistics_dtype(params)),
      count=jnp.zeros([], jnp.int32),
      steps_clipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: ClipByNormState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, ClipByNormState]:
    del params, extra_args
    _validation.check_tree_matches(fn, updates, state.grad_norm, shape_of=kept_shape)
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(g) for g in leaves]
    axes = [_norms.resolve_axes(g.ndim, axis, fn) for g in leaves]
    norms = [
      jax.tree.map(lambda x, g=g, s=s: jnp.reshape(x, kept_shape(g.shape)).astype(s.dtype), n)
      for n, g, s in zip(
        _norms.unit_norms(leaves, axes, ord=order),
        leaves,
        jax.tree.leaves(state.grad_norm),
        strict=True,
      )
    ]
    scales = [range_scale(n, *bounds(n.root.dtype)) for n in norms]
    as_tree = lambda xs: jax.tree.unflatten(treedef, xs)
    new = [scale_leaf(g, s) for g, s in zip(leaves, scales, strict=True)]
    return as_tree(new), ClipByNormState(
      grad_norm=as_tree([n.value() for n in norms]),
      clip_scale=as_tree([s.value() for s in scales]),
      clip_threshold=bounds(state.clip_threshold.dtype)[0],
      count=optax.safe_increment(state.count),
      steps_clipped=count_if(state.steps_clipped, any_of([s.changes() for s in scales])),
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


def _kept_shape(fn: str, shape: tuple[int, ...], axis: Any) -> tuple[int, ...]:
  """The shape of a leaf's norms: () for the whole leaf, else its shape with ``axis`` as 1."""
  axes = _norms.resolve_axes(len(shape), axis, fn)
  if axis is None:
    return ()
  if axes is None:
    return (1,) * len(shape)
  return tuple(1 if i in axes else d for i, d in enumerate(shape))


# ---- clip_by_global_norm -----------------------------------------------------------------


class ClipByGlobalNormState(NamedTuple):
  """State of `clip_by_global_norm`.

  Attributes:
    grad_norm: the global norm of the incoming updates, before clipping. f32[]
      (f64[] for float64 params, as every float field here).
    clip_scale: the factor the updates were multiplied by (1 when in range or
      propagated, 0 when zeroed), rounded to float32: below its smallest
      normal number it reads 0, though the updates were scaled exactly. f32[].
    clip_threshold: ``max_norm`` at this step (a schedule's value). f32[].
    count: updates processed (saturating); the step a ``max_norm`` schedule
      is evaluated at. i32[].
    steps_clipped: updates that were rescaled or zeroed. i32[].
  """

  grad_norm: jax.Array  # f32[]
  clip_scale: jax.Array  # f32[]
  clip_threshold: jax.Array  # f32[]
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_clipped: jax.Array  # i32[]


def clip_by_global_norm(
  max_norm: ScheduleOrScalar,
  *,
  min_norm: float | jax.Array = 0.0,
  ord: float | None = None,
  axis_name: str | tuple[str, ...] | None = None,
  nonfinite: str = "propagate",
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales the whole update so its global norm lies in ``[min_norm, max_norm]``.

  .. math:: g \leftarrow g \cdot \frac{\min(\max(\|g\|, m), c)}{\|g\|}

  (Pascanu et al., 2013, with a lower bound ``m`` added.) The direction is
  kept and zero stays zero. The pre-clip norm is kept in the state, computed
  once in float32 whatever the gradient dtype, exact from float32's smallest
  normal number to its largest (see `global_norm`); the factor is applied
  exactly even where it leaves float32's range (``1/1e38``). Complex leaves
  count with ``|z|`` and are scaled by a real factor.

  Differs from ``optax.clip_by_global_norm`` in that the norm is exact for
  bf16/f16 gradients (optax sums in the leaf dtype and overflows),
  ``max_norm=0`` with zero gradients gives zeros (optax: NaN), and a
  norm over a NaN or infinite element is handled by ``nonfinite`` (optax scales
  by ``c/inf``), while an L2 norm beyond float32's range with finite elements
  is divided by exactly (optax's overflows and zeroes the update). From
  ``torch.nn.utils.clip_grad_norm_`` in that no ``1e-6`` is added to the
  norm, so a norm just above ``c`` is clipped to exactly ``c``.

  Args:
    max_norm: the upper bound ``c`` in ``[0, inf]``, or a schedule ``step ->
      c`` evaluated at ``count``; a schedule value below 0 or NaN counts as 0
      (the update is zeroed, never flipped or let through).
    min_norm: the lower bound ``m``, in ``[0, max_norm]``. Default 0.
    ord: 1, 2 or ``inf``; None (default) is 2, as in NumPy.
    axis_name: a mapped axis (``shard_map``/``pmap``) the updates are sharded
      over; the norm is then the global one across it. Default None.
    nonfinite: ``"propagate"`` (default) returns a NaN/Inf-norm update
      unscaled so the problem stays visible; ``"zero"`` returns zeros.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    `ClipByGlobalNormState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_momclip as omc
    >>> tx = optax.chain(omc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> print(u["w"].round(4), optax.tree.get(state, "grad_norm"))
    [-0.06 -0.08] 5.0

  References:
    Pascanu, Mikolov, Bengio, *On the difficulty of training recurrent neural
    networks*, 2013, https://arxiv.org/abs/1211.5063
  """
  fn = "clip_by_global_norm"
  _validation.check_scalar(fn, "max_norm", max_norm, low=0.0, schedule=True, infinite=True)
  _validation.check_scalar(fn, "min_norm", min_norm, low=0.0)
  _validation.check_order(fn, "min_norm", min_norm, "max_norm", max_norm)
  order = _validation.check_ord(fn, ord)
  _validation.check_axis_name(fn, axis_name)
  _validation.check_choice(fn, "nonfinite", nonfinite, _NONFINITE)

  def init_fn(params: Any) -> ClipByGlobalNormState:
    dtype = _norms.statistics_dtype(params)
    threshold = _hyperparams.bound(max_norm, jnp.zeros([], jnp.int32), dtype)
    return ClipByGlobalNormState(**clip_statistics_init(dtype, threshold))

  def update_fn(
    updates: Any, state: ClipByGlobalNormState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, ClipByGlobalNormState]:
    del params, extra_args
    exact = _norms.global_norms([updates], ord=order, axis_name=axis_name)[0]
    norm = exact.value()
    hi = _hyperparams.bound(max_norm, state.count, norm.dtype)
    lo = _hyperparams.bound(min_norm, state.count, norm.dtype)
    scale = range_scale(exact, hi, lo, nonfinite=1.0 if nonfinite == "propagate" else 0.0)
    new = scale_tree(updates, scale)
    if nonfinite == "zero":  # 0·NaN is NaN: zero explicitly
      finite = exact.elements_finite()
      new = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), new)
    return new, ClipByGlobalNormState(**clip_statistics(state, norm, scale, hi))

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


_metrics.register_statistics(ClipByValueState, "clip_by_value", ClipByValueState._fields)
_metrics.register_statistics(ClipByNormState, "clip_by_norm", CLIP_STATS)
_metrics.register_statistics(ClipByGlobalNormState, "clip_by_global_norm", CLIP_STATS)
