"""Global, per-leaf and unit-wise norms accumulated in float32."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optax_momclip import _validation

AxisName = str | tuple[str, ...] | None
Axes = int | tuple[int, ...] | None


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype norms of ``dtype`` arrays accumulate in: float32, or float64 for float64."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.dtype(jnp.float32)


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.pmax(x, axis_name)


def _lost_to_underflow(dtype: jnp.dtype, count: int, axis_name: AxisName) -> float | jax.Array:
  """A sum of squares below this may have lost terms to flush-to-zero underflow."""
  info = jnp.finfo(dtype)
  bound = float(info.tiny) / float(info.eps) * max(count, 1)
  return bound if axis_name is None else bound * lax.axis_size(axis_name)


def _rescued_l2(sumsq: jax.Array, count: int, scaled_sumsq: Any, axis_name: AxisName) -> jax.Array:
  """``sqrt(sumsq)``, recomputed by ``scaled_sumsq`` where it over- or underflowed.

  The common path reads every element once. When a sum of squares overflows,
  or is small enough to have lost terms to flush-to-zero (zero included), a
  `lax.cond` recomputes it scaled by the largest magnitude (as LAPACK's nrm2
  does), so huge and tiny norms come out exact instead of inf or 0.
  ``scaled_sumsq()`` returns ``(max|x|, sum((x / max|x|)^2))`` in the shape of
  ``sumsq``.
  """
  threshold = _lost_to_underflow(sumsq.dtype, count, axis_name)
  needs_rescue = jnp.any(~jnp.isfinite(sumsq) | (sumsq < threshold))

  def rescue(_: None) -> jax.Array:
    big, ss = scaled_sumsq()
    return jnp.where(jnp.isfinite(big) & (big > 0), big * jnp.sqrt(ss), big)

  return lax.cond(needs_rescue, rescue, lambda _: jnp.sqrt(sumsq), None)


def _safe_scale(big: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(big) & (big > 0), big, jnp.ones_like(big))


# Leaves of at most this many elements are summed stacked with leaves of the same shape,
# dtype and sharding, at most _STACK_ELEMENTS elements to a stack.
_STACK_LEAF_ELEMENTS = 1 << 16
_STACK_ELEMENTS = 1 << 22


def _stacked_small_leaves(leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """``leaves`` with the small ones stacked by shape, dtype and sharding: the norm's inputs.

  A model's many small leaves (biases, norm scales) would each cost a
  reduction kernel, twice (the rescue branch is compiled even though it rarely
  runs): a 1000-leaf step compiled in twice optax's time. A stack keeps each
  leaf's own axes, and so their sharding: only leaves sharded alike are
  stacked (on an explicit mesh the sharding is part of the group's key), and
  they need no collective. Its copy costs two passes over the small leaves
  only; the cap bounds the size of each stack.
  """
  parts: list[jax.Array] = []
  groups: dict[tuple[Any, ...], list[jax.Array]] = {}
  for x in leaves:
    if x.size > _STACK_LEAF_ELEMENTS:
      parts.append(x)
    else:
      sharding = getattr(jax.typeof(x), "sharding", None)
      groups.setdefault((x.shape, jnp.dtype(x.dtype), sharding), []).append(x)
  for group in groups.values():
    per_stack = max(1, _STACK_ELEMENTS // max(group[0].size, 1))
    for i in range(0, len(group), per_stack):
      chunk = group[i : i + per_stack]
      parts.append(chunk[0] if len(chunk) == 1 else jnp.stack(chunk))
  return parts


def _global_l2(leaves: Sequence[jax.Array], dtype: Any, axis_name: AxisName) -> jax.Array:
  count = sum(x.size for x in leaves)
  leaves = _stacked_small_leaves(leaves)
  sumsq = sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves)
  sumsq = _psum(jnp.asarray(sumsq, dtype), axis_name)

  def scaled_sumsq() -> tuple[jax.Array, jax.Array]:
    # Each leaf is scaled by its own largest magnitude and the per-leaf sums are rescaled
    # to the global one as a vector. Scaling every leaf by the global maximum, or summing
    # the rescaled scalars one by one, makes XLA's fusion pass copy the cross-leaf scalars
    # into every kernel: compile time quadratic in the number of leaves.
    maxes = [jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]
    sums = [
      jnp.sum(jnp.square(x.astype(dtype) / _safe_scale(m)))
      for x, m in zip(leaves, maxes, strict=True)
    ]
    bigs = jnp.stack(maxes)
    big = _pmax(jnp.max(bigs), axis_name)
    ss = jnp.sum(jnp.stack(sums) * jnp.square(bigs / _safe_scale(big)))
    return big, _psum(jnp.asarray(ss, dtype), axis_name)

  return _rescued_l2(sumsq, count, scaled_sumsq, axis_name)


def _leaf_l2(x: jax.Array, axis: Axes, keepdims: bool) -> jax.Array:
  dtype = accumulation_dtype(x.dtype)
  sumsq = jnp.sum(jnp.square(x.astype(dtype)), axis=axis, keepdims=True)

  def scaled_sumsq() -> tuple[jax.Array, jax.Array]:
    big = jnp.max(jnp.abs(x), axis=axis, keepdims=True, initial=0).astype(dtype)
    return big, jnp.sum(jnp.square(x.astype(dtype) / _safe_scale(big)), axis=axis, keepdims=True)

  norm = _rescued_l2(sumsq, x.size // max(sumsq.size, 1), scaled_sumsq, None)
  return norm if keepdims else jnp.reshape(norm, jnp.sum(sumsq, axis=axis).shape)


def leaf_norm(
  x: jax.Array, *, ord: float = 2, axis: Axes = None, keepdims: bool = False
) -> jax.Array:
  """The norm of one array over ``axis`` (None: all of it), accumulated in float32."""
  if ord == 2:
    return _leaf_l2(x, axis, keepdims)
  dtype = accumulation_dtype(x.dtype)
  if ord == 1:
    return jnp.sum(jnp.abs(x.astype(dtype)), axis=axis, keepdims=keepdims)
  return jnp.max(jnp.abs(x), axis=axis, keepdims=keepdims, initial=0).astype(dtype)


def global_norm(tree: Any, *, ord: float = 2, axis_name: AxisName = None) -> jax.Array:
  r"""The norm of a whole pytree, as if its leaves were one flat vector.

  .. math:: \|g\|_p = \Big(\sum_{\text{leaves}} \sum_i |g_i|^p\Big)^{1/p},
     \qquad \|g\|_\infty = \max_i |g_i|

  Accumulates in float32 whatever the leaf dtypes (float64 stays float64), so
  bf16 and f16 gradients get an exact norm where optax's, summed in the leaf
  dtype, overflows. ``None`` leaves and ``optax.MaskedNode`` are skipped; an
  empty tree has norm 0. For ``ord=2``, leaves of at most 65,536 elements are
  summed stacked with the leaves of the same shape and dtype (up to 4M
  elements to a stack): one reduction per stack instead of one per leaf keeps
  the compile time of a many-leaf model below optax's.

  Args:
    tree: a pytree of arrays.
    ord: 1, 2 (default) or ``inf``.
    axis_name: name (or tuple of names) of a mapped axis of ``shard_map`` or
      ``pmap`` over which the tree is sharded; the norm is then reduced over
      it (``psum``, or ``pmax`` for ``inf``). Default None: no reduction.

  Returns:
    A float32 scalar (float64 if any leaf is float64).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> g = {"w": jnp.full((4,), 300.0, jnp.float16)}
    >>> print(omc.global_norm(g))
    600.0
    >>> print(omc.global_norm(g, ord=1), omc.global_norm(g, ord=float("inf")))
    1200.0 300.0
  """
  _validation.check_ord("global_norm", ord)
  _validation.check_axis_name("global_norm", axis_name)
  leaves = jax.tree.leaves(tree)
  dtype = jnp.result_type(jnp.float32, *(accumulation_dtype(x.dtype) for x in leaves))
  if not leaves:
    return jnp.zeros([], dtype)
  if jax.default_backend() == "cpu":
    # XLA:CPU otherwise fuses the norm's float32 conversion of bf16/f16 leaves with the
    # consumers of the same gradients into slow materialised converts (a momclip_sgd
    # step at 16M bf16 parameters: 22 ms without the barrier, 9 ms with it, f32 unchanged).
    leaves = lax.optimization_barrier(leaves)
  if ord == 2:
    return _global_l2(leaves, dtype, axis_name)
  if ord == 1:
    total = sum(jnp.sum(jnp.abs(x.astype(dtype))) for x in leaves)
    return _psum(jnp.asarray(total, dtype), axis_name)
  return _pmax(jnp.max(jnp.stack([leaf_norm(x, ord=ord).astype(dtype) for x in leaves])), axis_name)


def tree_norms(tree: Any, *, ord: float = 2, axis: Axes = None, keepdims: bool = False) -> Any:
  """The norm of every leaf of ``tree`` (over ``axis`` of each), float32, same structure.

  ``None`` leaves stay ``None``. With ``axis``, a leaf with too few dimensions
  for it is one unit: its norm is over all its elements.
  """
  return jax.tree.map(
    lambda x: leaf_norm(x, ord=ord, axis=resolve_axes(x.ndim, axis), keepdims=keepdims), tree
  )


def resolve_axes(ndim: int, axis: Axes) -> tuple[int, ...] | None:
  """Normalises ``axis`` for an array of rank ``ndim``; None means every axis.

  A leaf whose rank cannot hold every requested axis is treated as one unit.
  """
  if axis is None:
    return None
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if any(not -ndim <= a < ndim for a in axes):
    return None
  return tuple(sorted(a % ndim for a in axes))


def unit_axes(ndim: int) -> tuple[int, ...] | None:
  """Flax's unit convention: the output axis is last, so reduce over every other axis.

  Scalars and vectors are one unit (None: reduce over everything).
  """
  return None if ndim <= 1 else tuple(range(ndim - 1))


def is_finite_tree(tree: Any) -> jax.Array:
  """True when every element of every leaf is finite (a bool scalar)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
