"""Norms of trees, leaves and units: float32 accumulation, exact over the whole range."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optax_momclip import _scaling, _validation
from optax_momclip._scaling import Norm, real_dtype

AxisName = str | tuple[str, ...] | None
Axes = int | tuple[int, ...] | None


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype norms of ``dtype`` arrays accumulate in: float32, or float64 for 64-bit floats."""
  dtype = real_dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.dtype(jnp.float32)


def statistics_dtype(tree: Any) -> jnp.dtype:
  """The dtype a tree's norms, bounds and statistics are kept in: float32, or float64 for 64-bit.

  Accepts arrays, ``jax.ShapeDtypeStruct`` leaves and Python numbers, so a
  state's dtypes can be fixed at ``init`` from the params.
  """
  dtypes = [x.dtype if hasattr(x, "dtype") else jnp.result_type(x) for x in jax.tree.leaves(tree)]
  return jnp.dtype(jnp.result_type(jnp.float32, *(accumulation_dtype(d) for d in dtypes)))


def leaves_of(tree: Any) -> list[jax.Array]:
  """The array leaves of ``tree`` (Python numbers become arrays; None and MaskedNode vanish)."""
  return [jnp.asarray(x) for x in jax.tree.leaves(tree)]


def _squares(x: jax.Array, dtype: Any, scale: jax.Array | None = None) -> jax.Array:
  """``|x|²`` elementwise in ``dtype``, ``x`` first multiplied by ``scale`` when given."""

  def square(part: jax.Array) -> jax.Array:
    part = part.astype(dtype) if scale is None else part.astype(dtype) * scale
    return part * part

  return square(jnp.real(x)) + square(jnp.imag(x)) if jnp.iscomplexobj(x) else square(x)


def _terms(x: jax.Array, units: int = 1) -> int:
  """The number of squares summed into each of ``units`` norms of ``x``."""
  return (x.size // max(units, 1)) * (2 if jnp.iscomplexobj(x) else 1)


def _limits(dtype: Any, terms: int) -> tuple[float, float, float]:
  """``(threshold, down, up)`` for a sum of ``terms`` squares accumulated in ``dtype``.

  A sum below ``threshold`` may have lost terms to underflow (flushed squares
  below the smallest normal); a non-finite one overflowed or holds an inf or
  NaN. Multiplying every element by the power of two ``down`` before
  squaring keeps any sum of finite squares finite; multiplying by ``up``
  keeps a sum below ``threshold`` finite and lifts the smallest normal
  number's square above the smallest normal.
  """
  info = jnp.finfo(dtype)
  log_terms = max(terms - 1, 0).bit_length()  # ceil(log2(terms))
  floor = info.minexp + info.nmant + 1
  threshold = terms * 2.0**floor
  k_down = (info.maxexp + 2 + log_terms) // 2
  k_up = (info.maxexp - 2 - floor - log_terms) // 2
  return threshold, 2.0**-k_down, 2.0**k_up


def _rescued_sqrt(
  sums: Sequence[jax.Array],
  limits: Sequence[tuple[float, float, float]],
  recompute: Callable[[list[jax.Array]], list[jax.Array]],
  enabled: bool = True,
) -> list[Norm]:
  """``sqrt`` of each sum of squares, those that over- or underflowed recomputed scaled.

  One ``lax.cond`` for all of them, taken only when a sum is non-finite or
  small enough to have lost terms (zero included): ``recompute(powers)``
  sums the squares again with every element multiplied by its power of two,
  and the root is divided by it, exactly. A root too large for the dtype
  once divided (every element finite, the norm beyond the largest value)
  keeps its power instead: see `Norm`. On the common path every element is
  read once. ``enabled=False`` (for the benchmark) leaves the roots as they are.
  """
  if not sums or not enabled:
    return [Norm.of(jnp.sqrt(s)) for s in sums]
  bad = [~jnp.isfinite(s) | (s < lim[0]) for s, lim in zip(sums, limits, strict=True)]
  needed = jnp.any(jnp.stack([jnp.any(b) for b in bad]))

  def power(s: jax.Array, limit: tuple[float, float, float]) -> jax.Array:
    threshold, down, up = limit
    return jnp.where(~jnp.isfinite(s), down, jnp.where(s < threshold, up, 1.0)).astype(s.dtype)

  def rescue(operands: tuple[list[jax.Array], list[jax.Array]]) -> list[Norm]:
    sums, powers = operands
    out = []
    for s, a, b, p in zip(sums, recompute(powers), bad, powers, strict=True):
      root = jnp.sqrt(jnp.where(b, a, s))
      norm = root / p  # dividing by a power of two rounds nothing
      beyond = b & jnp.isfinite(root) & ~jnp.isfinite(norm)
      out.append(Norm(jnp.where(beyond, root, norm), jnp.where(beyond, p, 1).astype(p.dtype)))
    return out

  # The powers enter the branch as operands: computed inside it, XLA:CPU fuses them into
  # every leaf's kernel, which then compiles as a generic loop instead of a library reduction.
  powers = [power(s, lim) for s, lim in zip(sums, limits, strict=True)]
  plain = lambda operands: [Norm.of(jnp.sqrt(s)) for s in operands[0]]
  return lax.cond(needed, rescue, plain, (list(sums), powers))


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.pmax(x, axis_name)


def _total(parts: Sequence[jax.Array], dtype: Any) -> jax.Array:
  # One stacked reduction: a chain of scalar adds is fused into every leaf's kernel by XLA.
  return jnp.sum(jnp.stack(parts)) if parts else jnp.zeros([], dtype)


# Switches for the benchmark, which measures each both ways: `_fenced` keeps narrow floats
# apart on XLA:CPU; the rescue branch recomputes norms that over- or underflowed.
FENCE_NARROW_ON_CPU = True
RESCUE_OUT_OF_RANGE = True


def _fenced(trees: tuple[list[jax.Array], ...]) -> tuple[list[jax.Array], ...]:
  """The trees with their bf16/f16 leaves behind an optimization barrier on XLA:CPU.

  XLA:CPU otherwise fuses the norm's conversion of narrow gradients to float32
  with the other consumers of the same gradients into slow materialised
  converts: a ``momclip_sgd`` step on 16M bf16 parameters took 4.5 times as
  long without the barrier (the benchmark's "CPU barrier" rows). Elsewhere
  (GPU, TPU) the leaves pass as they are: the branch is chosen where the
  computation is lowered, so no conditional is left in the compiled step.
  """
  narrow = [
    (i, j)
    for i, leaves in enumerate(trees)
    for j, x in enumerate(leaves)
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4
  ]
  if not narrow:
    return trees
  fenced = lax.platform_dependent(
    [trees[i][j] for i, j in narrow], cpu=lax.optimization_barrier, default=lambda xs: xs
  )
  out = [list(leaves) for leaves in trees]
  for (i, j), x in zip(narrow, fenced, strict=True):
    out[i][j] = x
  return tuple(out)


@functools.partial(jax.jit, static_argnames=("ord", "axis_name", "fence", "rescue"))
def _global_norms(
  trees: tuple[list[jax.Array], ...], ord: float, axis_name: AxisName, fence: bool, rescue: bool
) -> list:
  """The norm of each list of arrays as one vector, with at most one ``lax.cond`` in all."""
  if fence:
    trees = _fenced(trees)
  dtypes = [
    jnp.result_type(jnp.float32, *(accumulation_dtype(x.dtype) for x in leaves)) for leaves in trees
  ]
  if ord == 1:
    return [
      Norm.of(_psum(_total([jnp.sum(jnp.abs(x).astype(d)) for x in leaves], d), axis_name))
      for leaves, d in zip(trees, dtypes, strict=True)
    ]
  if ord == math.inf:
    return [
      Norm.of(
        _pmax(
          jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0).astype(d) for x in leaves]), initial=0),
          axis_name,
        )
        if leaves
        else jnp.zeros([], d)
      )
      for leaves, d in zip(trees, dtypes, strict=True)
    ]
  replicas = 1 if axis_name is None else lax.axis_size(axis_name)

  def sums(scales: Sequence[jax.Array | None]) -> list[jax.Array]:
    return [
      _psum(_total([jnp.sum(_squares(x, d, s)) for x in leaves], d), axis_name)
      for leaves, d, s in zip(trees, dtypes, scales, strict=True)
    ]

  limits = [
    _limits(d, replicas * sum(_terms(x) for x in leaves))
    for leaves, d in zip(trees, dtypes, strict=True)
  ]
  return _rescued_sqrt(sums([None] * len(trees)), limits, sums, rescue)


@functools.partial(jax.jit, static_argnames=("ord", "axes", "rescue"))
def _unit_norms(
  arrays: list[jax.Array], ord: float, axes: tuple[Any, ...], rescue: bool
) -> list[Norm]:
  """The norm of each array over its ``axes`` (kept as size 1), with at most one ``lax.cond``."""
  dtypes = [accumulation_dtype(x.dtype) for x in arrays]
  if ord == 1:
    return [
      Norm.of(jnp.sum(jnp.abs(x).astype(d), axis=a, keepdims=True))
      for x, d, a in zip(arrays, dtypes, axes, strict=True)
    ]
  if ord == math.inf:
    return [
      Norm.of(jnp.max(jnp.abs(x), axis=a, keepdims=True, initial=0).astype(d))
      for x, d, a in zip(arrays, dtypes, axes, strict=True)
    ]

  def sums(scales: Sequence[jax.Array | None]) -> list[jax.Array]:
    return [
      jnp.sum(_squares(x, d, s), axis=a, keepdims=True)
      for x, d, a, s in zip(arrays, dtypes, axes, scales, strict=True)
    ]

  first = sums([None] * len(arrays))
  limits = [_limits(d, _terms(x, s.size)) for x, d, s in zip(arrays, dtypes, first, strict=True)]
  return _rescued_sqrt(first, limits, sums, rescue)


def global_norms(trees: Sequence[Any], *, ord: float = 2, axis_name: AxisName = None) -> list[Norm]:
  """`global_norm` of each tree as a `Norm`, computed together: one rescue branch for all.

  A norm beyond float32's largest value keeps a finite root and its power of
  two, so that clips still divide by it exactly; ``.value()`` is the number.
  """
  leaves = tuple(leaves_of(t) for t in trees)
  return _global_norms(
    leaves, ord=ord, axis_name=axis_name, fence=FENCE_NARROW_ON_CPU, rescue=RESCUE_OUT_OF_RANGE
  )


def unit_norms(
  arrays: Sequence[Any], axes: Sequence[tuple[int, ...] | None], *, ord: float = 2
) -> list[Norm]:
  """The norm of each array over its axes (None: all), kept as size-1 axes, in float32.

  As `Norm` s (see `global_norms`); all of them share one rescue branch.
  """
  arrays = [jnp.asarray(x) for x in arrays]
  return _unit_norms(arrays, ord=ord, axes=tuple(axes), rescue=RESCUE_OUT_OF_RANGE)


def norm_of_norms(norms: Sequence[jax.Array | Norm]) -> Norm:
  """The L2 norm of already computed norms (say, per unit) taken as one vector, as a `Norm`.

  In float32, or float64 if any is. Exact without a rescue branch: these
  arrays are small, so a second pass costs little; every norm is divided by
  the power of two nearest their largest before squaring, which rounds nothing.
  Norms beyond the dtype's range (`Norm` s with a power) count as exactly, and
  a result beyond it keeps a power too.
  """
  exact = [Norm.of(n) for n in norms]
  dtype = jnp.result_type(jnp.float32, *(n.root.dtype for n in exact))
  if not exact:
    return Norm.of(jnp.zeros([], dtype))
  # Per array, then over scalars: arrays sharded differently are never concatenated.
  least = jnp.min(jnp.stack([jnp.min(n.power.astype(dtype), initial=1) for n in exact]))
  roots = [n.root.astype(dtype) * (least / n.power.astype(dtype)) for n in exact]  # exact
  big = jnp.max(jnp.stack([jnp.max(r, initial=0) for r in roots]))
  usable = jnp.isfinite(big) & (big >= jnp.finfo(dtype).tiny)
  _, e = _scaling.split(jnp.where(usable, big, 1.0))
  half = e // 2
  p = [_scaling.pow2(x, dtype) for x in (-half, half - e, half, e - half)]
  total = jnp.sum(jnp.stack([jnp.sum(jnp.square(r * p[0] * p[1])) for r in roots]))
  root = jnp.sqrt(total) * p[2]
  norm = root * p[3]
  beyond = usable & jnp.isinf(norm)  # only when no norm had a power: their roots are moderate
  return Norm(
    jnp.where(beyond, root, jnp.where(usable, norm, big)),
    least * jnp.where(beyond, 1 / p[3], 1).astype(dtype),
  )


def global_norm(tree: Any, *, ord: float | None = 2, axis_name: AxisName = None) -> jax.Array:
  r"""The norm of a whole pytree, as if its leaves were one flat vector.

  .. math:: \|g\|_p = \Big(\sum_{\text{leaves}} \sum_i |g_i|^p\Big)^{1/p},
     \qquad \|g\|_\infty = \max_i |g_i|

  Accumulates in float32 whatever the leaf dtypes (float64 stays float64), so
  bf16 and f16 gradients get an exact norm where optax's, summed in the leaf
  dtype, overflows. Complex leaves count with their modulus ``|z|``. ``None``
  leaves and ``optax.MaskedNode`` are skipped, Python numbers are leaves,
  zero-size leaves add nothing; an empty tree has norm 0.

  Exact over the whole range: for ``ord=2`` the sum of squares is taken once;
  when it overflows or is small enough to have lost squares to underflow
  (a norm below about ``2**-51`` times the square root of the element count,
  zero included), a single rarely taken ``lax.cond`` sums again with every
  element multiplied by a power of two, which rounds nothing, as LAPACK's
  safe ``nrm2`` scales. So norms from float32's smallest normal number up to
  its largest value, and trees that mix huge and tiny leaves, come out
  correctly rounded up to the summation's own rounding, instead of inf or 0.
  Subnormal inputs count as zero (XLA:CPU flushes them). Under ``jit`` each
  leaf is reduced where it lives and only scalars are combined, so sharded
  leaves need nothing but scalar all-reduces.

  Args:
    tree: a pytree of arrays.
    ord: 1, 2 (default; None also means 2, as in NumPy) or ``inf``.
    axis_name: name (or tuple of names) of a mapped axis of ``shard_map`` or
      ``pmap`` over which the tree is sharded; the norm is then reduced over
      it (``psum``, or ``pmax`` for ``inf``). Default None: no reduction.

  Returns:
    A float32 scalar (float64 if any leaf is float64 or complex128).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> g = {"w": jnp.full((4,), 300.0, jnp.float16)}
    >>> print(omc.global_norm(g))
    600.0
    >>> print(omc.global_norm(g, ord=1), omc.global_norm(g, ord=float("inf")))
    1200.0 300.0
    >>> print(omc.global_norm({"w": jnp.array([1e38, 1.0]), "z": jnp.array([3 + 4j])}))
    1e+38
  """
  ord = _validation.check_ord("global_norm", ord)
  _validation.check_axis_name("global_norm", axis_name)
  return global_norms([tree], ord=ord, axis_name=axis_name)[0].value()


def resolve_axes(ndim: int, axis: Axes, fn: str = "resolve_axes") -> tuple[int, ...] | None:
  """Normalises ``axis`` for an array of rank ``ndim``; None means every axis.

  A leaf whose rank cannot hold every requested axis is treated as one unit.

  Raises:
    ValueError: two entries of ``axis`` name the same axis of this rank (``(0, -2)`` at rank 2).
  """
  if axis is None:
    return None
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if any(not -ndim <= a < ndim for a in axes):
    return None
  resolved = tuple(sorted(a % ndim for a in axes))
  if len(set(resolved)) != len(resolved):
    raise ValueError(f"{fn}: axis={axis!r} names the same axis twice for a leaf of rank {ndim}")
  return resolved


def unit_axes(ndim: int) -> tuple[int, ...] | None:
  """Flax's unit convention: the output axis is last, so reduce over every other axis.

  Scalars and vectors are one unit (None: reduce over everything).
  """
  return None if ndim <= 1 else tuple(range(ndim - 1))
