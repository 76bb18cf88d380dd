"""Scale factors that stay exact outside float32's range, and how every clip applies them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def real_dtype(dtype: Any) -> jnp.dtype:
  """The dtype of the real part of ``dtype`` (``dtype`` itself when it is real)."""
  dtype = jnp.dtype(dtype)
  return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def scale_dtype(*dtypes: Any) -> jnp.dtype:
  """float32, or wider when a (real part of an) input is wider: where scales are applied."""
  out = jnp.dtype(_F32)
  for d in dtypes:
    d = real_dtype(d)
    if jnp.issubdtype(d, jnp.floating):
      out = jnp.promote_types(out, d)
  return out


def pow2(k: jax.Array, dtype: Any) -> jax.Array:
  """``2**k`` built from its bits: exact for integer ``k`` in ``[minexp, maxexp - 1]``."""
  info = jnp.finfo(dtype)
  int_dtype = jnp.int64 if info.bits == 64 else jnp.int32
  biased = (jnp.asarray(k).astype(int_dtype) + (1 - info.minexp)) << info.nmant
  return lax.bitcast_convert_type(biased, jnp.dtype(dtype))


def split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(m, e)`` with ``x = m·2**e`` and ``m`` in ``[1, 2)``, for positive normal ``x``."""
  info = jnp.finfo(x.dtype)
  int_dtype = jnp.int64 if info.bits == 64 else jnp.int32
  bits = lax.bitcast_convert_type(x, int_dtype)
  e = ((bits >> info.nmant) & ((1 << (info.bits - 1 - info.nmant)) - 1)) + (info.minexp - 1)
  one = (1 - info.minexp) << info.nmant  # the bits of 1.0
  mantissa_bits = (bits & ((1 << info.nmant) - 1)) | one
  return lax.bitcast_convert_type(mantissa_bits, x.dtype), e.astype(jnp.int32)


class Scale(NamedTuple):
  """A positive factor ``factor · power``; ``power`` is 1 whenever the factor is normal.

  A clip's factor ``max_norm / norm`` leaves float32's normal range when the
  norm is huge (``1/1e38`` would flush to zero) or a ``min_norm`` lifts a tiny
  norm. ``power`` is then ``2**-126`` or ``2**126`` (for float32), so that
  ``factor`` is normal again, and `scale_leaf` multiplies by the power first,
  which rounds nothing.
  """

  factor: jax.Array  # f32 (f64 for float64 norms)
  power: jax.Array  # same dtype: 1, or 2**∓(-minexp) outside the normal range

  def changes(self) -> jax.Array:
    """True where the factor is not exactly 1."""
    return (self.factor != 1) | (self.power != 1)

  def times(self, weight: jax.Array) -> Scale:
    """This factor times ``weight`` (rounded once, into the factor)."""
    return Scale(self.factor * weight.astype(self.factor.dtype), self.power)

  def value(self) -> jax.Array:
    """The factor rounded to its dtype: 0 below the smallest normal, the largest finite above."""
    return jnp.minimum(self.factor * self.power, jnp.finfo(self.factor.dtype).max)


class Norm(NamedTuple):
  """A norm ``root / power`` that stays exact beyond its dtype's largest value.

  ``power`` is 1 unless the norm itself is too large for the dtype although
  every element is finite (the sum of ``[3e38] * 6``'s squares, taken scaled
  by a power of two): ``root`` is then the root of that scaled sum, finite,
  and ``power`` the power of two it was scaled by. A clip still divides by
  such a norm exactly (`ratio`, `range_scale`); `value` rounds it to inf. A
  NaN or infinite element leaves ``root`` non-finite.
  """

  root: jax.Array  # f32 (f64 for float64 norms), any shape
  power: jax.Array  # same dtype and shape: 1, or 2**-k for a norm beyond the range

  @classmethod
  def of(cls, norm: jax.Array | Norm) -> Norm:
    """``norm`` as a `Norm` (an array is its own root, with power 1)."""
    if isinstance(norm, Norm):
      return norm
    norm = jnp.asarray(norm)
    return cls(norm, jnp.ones_like(norm))

  def value(self) -> jax.Array:
    """The norm in its dtype: inf when it is beyond the dtype's largest value."""
    return self.root / self.power

  def elements_finite(self) -> jax.Array:
    """True where every element the norm was taken over is finite (it may still be beyond range)."""
    return jnp.isfinite(self.root)

  def astype(self, dtype: Any) -> Norm:
    return Norm(self.root.astype(dtype), self.power.astype(dtype))

  def plus(self, x: jax.Array | float) -> Norm:
    """The norm plus ``x >= 0`` (negligible beyond the range, where ``x`` is not a norm)."""
    return Norm(self.root + jnp.asarray(x, self.root.dtype) * self.power, self.power)

  def at_least(self, x: jax.Array | float) -> Norm:
    """``max(norm, x)`` for finite ``x``."""
    return Norm(jnp.maximum(self.root, jnp.asarray(x, self.root.dtype) * self.power), self.power)

  def times(self, scale: Scale) -> jax.Array:
    """``norm · scale`` as a number (finite whenever the product is in range)."""
    return self.root * scale.power.astype(self.root.dtype) * scale.factor / self.power


def unit(like: jax.Array) -> Scale:
  """The factor 1, shaped like ``like``."""
  return Scale(jnp.ones_like(like), jnp.ones_like(like))


def where(cond: jax.Array, a: Scale, b: Scale) -> Scale:
  """``a`` where ``cond``, else ``b``."""
  return Scale(jnp.where(cond, a.factor, b.factor), jnp.where(cond, a.power, b.power))


def ratio(target: jax.Array | float, norm: jax.Array | Norm) -> Scale:
  """``target / norm`` for a finite ``target >= 0`` and a positive ``norm``, in ``norm``'s dtype.

  The correctly rounded quotient wherever that is a normal number. Where it
  would underflow (a huge norm), or overflow (a tiny one), the norm is first
  multiplied by ``2**-126`` or ``2**126`` (float32's; exact, since the norm is
  then above 1 or below 1) and that power goes into ``power``. A `Norm` beyond
  the dtype's range divides as exactly: its power of two is multiplied in
  afterwards, which rounds nothing. Only a factor beyond ``2**±252`` is lost,
  where no float32 update could hold the result.
  """
  norm = Norm.of(norm)
  root = norm.root
  dtype = root.dtype
  info = jnp.finfo(dtype)
  target = jnp.asarray(target, dtype)
  k = 2.0 ** (-info.minexp)
  quotient = target / root
  down = (quotient < info.tiny) & (target > 0) & (root > 1)
  up = jnp.isinf(quotient) & jnp.isfinite(root) & (root < 1)
  moved = target / (root * jnp.where(down, 1 / k, k))
  factor = jnp.where(down | up, moved, quotient)
  power = jnp.where(down, 1 / k, jnp.where(up, k, 1.0)).astype(dtype)
  # Beyond the range: target/norm = factor · power · norm.power, with norm.power = 2**-j and
  # j well below 126. Multiply it into the factor, or with 2**126 into it and 2**-126 into the
  # power when the factor would leave the normal range (power 1 there: the root is large).
  small = (norm.power < 1) & (factor * norm.power < info.tiny)
  lift = jnp.where(small & (power == 1), k, 1.0).astype(dtype)
  return Scale(factor * (norm.power * lift), power / lift)


def range_scale(
  norm: jax.Array | Norm,
  max_norm: jax.Array,
  min_norm: jax.Array | float = 0.0,
  *,
  nonfinite: float = 1.0,
) -> Scale:
  """The factor that brings ``norm`` into ``[min_norm, max_norm]``, exact at any magnitude.

  One when the norm is in range or zero (zero stays zero), ``max_norm/norm``
  above it (a `Norm` beyond the dtype's range included), ``min_norm/norm``
  below it, ``nonfinite`` for a norm over a NaN or infinite element.
  Broadcasts over arrays of norms.
  """
  norm = Norm.of(norm)
  dtype = scale_dtype(norm.root.dtype)
  norm = norm.astype(dtype)
  value = norm.value()
  hi, lo = jnp.asarray(max_norm, dtype), jnp.asarray(min_norm, dtype)
  finite = norm.elements_finite()
  move = finite & (value > 0) & ((value > hi) | (value < lo))
  target = jnp.minimum(jnp.where(value > hi, hi, lo), hi)  # the upper bound wins
  one = jnp.ones_like(value)
  moved = ratio(
    jnp.where(move, target, 1), Norm(jnp.where(move, norm.root, 1), jnp.where(move, norm.power, 1))
  )
  keep = Scale(jnp.where(finite, 1, jnp.asarray(nonfinite, dtype)), one)
  return where(move, moved, keep)


def multiplier(scale: Scale, dtype: Any) -> Callable[[jax.Array], jax.Array]:
  """``x -> x · scale`` for real arrays ``x`` of ``dtype`` (float32 or wider).

  With a normal factor this is one rounded product; otherwise the power of
  two comes first (exact) and the factor rounds once.
  """
  power, factor = scale.power.astype(dtype), scale.factor.astype(dtype)
  return lambda x: x * power * factor


def _exactly_one(power: jax.Array) -> jax.Array:
  """Exactly 1 (``power`` is a power of two, finite and positive), chosen by comparing ``power``.

  XLA cannot see that it is constant, so whatever is multiplied or divided by it
  waits for ``power`` and is computed where it stands. An optimization barrier
  would not do: XLA:CPU removes it before fusing. Nor would ``power / power``
  here, where it divides: XLA rewrites ``x / (power / power)`` as
  ``x · power / power``, and ``power²`` flushes to zero for a power of
  ``2**-126`` (every factor below ``1/1e38``).
  """
  return jnp.where(power > 0, 1, 2).astype(power.dtype)


def _computed_once(power: jax.Array, factor: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(power, factor)`` unchanged, computed once rather than in every kernel that uses them.

  XLA copies cheap scalar work into each consumer's kernel: choosing an exact
  factor is twenty-odd scalar ops, and on a tree of 300 leaves those copies
  made XLA:CPU compile a ``momclip_sgd`` step about a fifth longer. XLA does
  not copy a division, so both end in one, by `_exactly_one`: no value changes.
  """
  one = _exactly_one(power)
  return power / one, factor / one


def _scale_with(g: jax.Array, mul: Callable[[jax.Array], jax.Array], dtype: Any) -> jax.Array:
  one = lambda x: mul(x.astype(dtype)).astype(x.dtype)
  if jnp.iscomplexobj(g):
    return lax.complex(one(jnp.real(g)), one(jnp.imag(g)))
  return one(g)


def scale_leaf(g: Any, scale: Scale) -> jax.Array:
  """``g · scale`` computed in float32 (or wider) and returned in ``g``'s dtype.

  A complex ``g`` has its real and imaginary parts scaled alike: its phase is kept.
  """
  g = jnp.asarray(g)
  dtype = scale_dtype(g.dtype, scale.factor.dtype)
  return _scale_with(g, multiplier(scale, dtype), dtype)


def scaler(scale: Scale) -> Callable[[Any], jax.Array]:
  """``g -> g · scale`` as `scale_leaf`, for many leaves: the scalar work done once per dtype."""
  scale = Scale(*_computed_once(scale.power, scale.factor))
  muls: dict[Any, Callable[[jax.Array], jax.Array]] = {}

  def scale_one(g: Any) -> jax.Array:
    g = jnp.asarray(g)
    dtype = scale_dtype(g.dtype, scale.factor.dtype)
    if dtype not in muls:
      muls[dtype] = multiplier(scale, dtype)
    return _scale_with(g, muls[dtype], dtype)

  return scale_one


def known_after(x: Any, scale: Scale) -> jax.Array:
  """``x`` itself, produced only once ``scale`` is known.

  ``x`` is multiplied by ``power / power`` (exactly 1) of the scale's power, so
  it waits for the scale. A state field that keeps a copy of an input (MARS's
  previous gradient) is then written over its donated old value after
  everything that reads the old value (the scale was computed from it).
  Without the tie XLA copies the old value aside first: a parameter-sized
  copy, and fresh memory, every step. The tie is a product with a quotient,
  which XLA leaves as it is; with `_exactly_one`'s compare XLA:CPU wrote the
  new value to a fresh buffer each step instead of over the old one. Subnormal
  elements become zero where the backend flushes them in arithmetic (XLA:CPU
  does), as they would in any use of the value.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  one = scale.power / scale.power
  return _scale_with(x, lambda v: v * one.astype(v.dtype), real_dtype(x.dtype))


def scale_tree(tree: Any, scale: Scale) -> Any:
  """Every leaf of ``tree`` times the scalar ``scale``, each in its own dtype."""
  return jax.tree.map(scaler(scale), tree)


def clip_modulus(z: jax.Array, bound: jax.Array) -> jax.Array:
  """Complex ``z`` with every modulus clipped to ``|z| <= bound``, each phase kept."""
  modulus = jnp.abs(z)
  return scale_leaf(z, range_scale(modulus, bound.astype(modulus.dtype)))


def units_moved(scales: list[Scale]) -> jax.Array:
  """How many units (elements of the scales, over all of them) were rescaled. i32[]."""
  moved = [jnp.sum(s.changes(), dtype=jnp.int32) for s in scales]
  return jnp.sum(jnp.stack(moved), dtype=jnp.int32) if moved else jnp.zeros([], jnp.int32)


def smallest_scale(scales: list[Scale], dtype: Any) -> jax.Array:
  """The smallest factor any unit was multiplied by (1 with no units), in ``dtype``."""
  lowest = [jnp.min(s.value(), initial=1.0).astype(dtype) for s in scales]
  return jnp.min(jnp.stack(lowest)) if lowest else jnp.ones([], dtype)
