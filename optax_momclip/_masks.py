"""Updates masked by agreement with the gradient: Cautious optimizers."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_momclip import _eager, _metrics, _norms, _validation


class CautiousState(NamedTuple):
  """State of `cautious`.

  Attributes:
    inner_state: the wrapped transformation's state.
    masked_fraction: the fraction of update components zeroed this step, over
      all leaves (a complex component counts as two: its real and imaginary
      parts). f32[] (f64[] for float64 params).
    count: updates processed (saturating). i32[].
  """

  inner_state: Any
  masked_fraction: jax.Array  # f32[]
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count


def cautious(
  inner: optax.GradientTransformation, *, axis_name: str | tuple[str, ...] | None = None
) -> optax.GradientTransformationExtraArgs:
  r"""Cautious masking: zeroes the components of ``inner``'s update that would climb the gradient.

  .. math:: \phi = \mathbb{1}[u \cdot g < 0], \qquad
     u \leftarrow u \cdot \phi \cdot \frac{n}{\sum \phi + 1}

  per tensor (leaf) of ``n`` components, where ``g`` is the gradient this
  wrapper receives and ``u`` what ``inner`` returns from it. ``inner`` is a
  whole optimizer, whose updates are *added* to the params (optax's
  convention): a component is kept when it moves against the gradient, the
  paper's ``u·g > 0`` for updates that are subtracted. Wrap a momentum
  direction with its (negative) scale: ``cautious(optax.chain(heavy_ball(0.9),
  optax.scale(-lr)))``; `momclip_sgd` and ``optax.adamw`` are whole already.
  The rescaling keeps the mean update size, as the reference code does (its
  ``+ 1``: a tensor with every component kept is scaled by ``n/(n + 1)``).

  Signs are compared, not products, so components too small for their
  product to be a normal number are judged correctly (PyTorch's product
  underflows to 0 and masks them). A complex component is masked by its real
  and imaginary parts separately, as PyTorch's ``view_as_real`` treats it.
  A masked component is multiplied by 0, as the reference does: it keeps its
  sign (``-0.``), and a NaN or infinite one in ``u`` comes out NaN, so a broken
  update is never hidden as a zero. Everything ``inner`` returns is masked, a
  decoupled weight decay inside it included; the reference decays the params
  unmasked. For that, decay outside:
  ``optax.chain(cautious(optax.adam(lr)), optax.add_decayed_weights(-lr * wd))``
  (a constant ``lr``), which is ``pytorch_optimizer``'s ``cautious=True``.

  Args:
    inner: the optimizer whose updates are masked, an
      ``optax.GradientTransformation``; extra arguments (``value=loss``) are
      passed on to it.
    axis_name: for leaves sharded under ``shard_map``/``pmap``: each tensor's
      kept components are counted over these mapped axes, so its rescaling is
      the whole tensor's. Default None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `CautiousState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_momclip as omc
    >>> tx = omc.cautious(optax.sgd(1.0, momentum=0.9))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> u, state = tx.update({"w": jnp.array([1.0, 1.0, 1.0])}, state)
    >>> print(u["w"], state.masked_fraction)  # all kept: 3/(3 + 1) of the SGD step
    [-0.75 -0.75 -0.75] 0.0
    >>> u, state = tx.update({"w": jnp.array([1.0, -0.5, 1.0])}, state)
    >>> print(u["w"], state.masked_fraction)  # the momentum, 0.4, climbs the middle gradient
    [-1.9 -0.  -1.9] 0.33333334

  References:
    Liang, Chen, Liu, Liu, *Cautious Optimizers: Improving Training with One
    Line of Code*, 2024, https://arxiv.org/abs/2411.16085
  """
  fn = "cautious"
  _validation.check_axis_name(fn, axis_name)
  inner = _validation.inner_transformation(fn, inner)

  def init_fn(params: Any) -> CautiousState:
    return CautiousState(
      inner_state=inner.init(params),
      masked_fraction=jnp.zeros([], _norms.statistics_dtype(params)),
      count=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: CautiousState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, CautiousState]:
    new, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    _validation.check_tree_matches(fn, new, updates)
    leaves, treedef = jax.tree.flatten(new)
    grads = jax.tree.leaves(updates)
    masked = [
      _masked(jnp.asarray(u), jnp.asarray(g), axis_name) for u, g in zip(leaves, grads, strict=True)
    ]
    dtype = state.masked_fraction.dtype
    kept = sum((k.astype(dtype) for _, k, _ in masked), jnp.zeros([], dtype))
    total = float(sum(n for _, _, n in masked))
    return jax.tree.unflatten(treedef, [u for u, _, _ in masked]), CautiousState(
      inner_state=inner_state,
      masked_fraction=(total - kept) / max(total, 1.0),
      count=optax.safe_increment(state.count),
    )

  return optax.GradientTransformationExtraArgs(
    init_fn, _eager.compiled_when_reused(fn, update_fn, passes_extra_args=True)
  )


def _masked(u: jax.Array, g: jax.Array, axis_name: Any) -> tuple[jax.Array, jax.Array, int]:
  """``(u masked and rescaled, components kept, components)`` for one leaf (all its shards)."""
  shards = 1 if axis_name is None else lax.axis_size(axis_name)
  total = lambda kept: kept if axis_name is None else lax.psum(kept, axis_name)
  if jnp.iscomplexobj(u):
    parts = [_descends(jnp.real(u), jnp.real(g)), _descends(jnp.imag(u), jnp.imag(g))]
    kept = total(jnp.sum(parts[0], dtype=jnp.int32) + jnp.sum(parts[1], dtype=jnp.int32))
    n = 2 * u.size * shards
    scale = _rescale(n, kept, u.dtype)
    real = jnp.real(u) * jnp.where(parts[0], scale, 0)
    imag = jnp.imag(u) * jnp.where(parts[1], scale, 0)
    return jax.lax.complex(real, imag).astype(u.dtype), kept, n
  keep = _descends(u, g)
  n = u.size * shards
  kept = total(_count(keep, n))
  scale = _rescale(n, kept, u.dtype)
  return (u * jnp.where(keep, scale, 0)).astype(u.dtype), kept, n


def _count(keep: jax.Array, n: int) -> jax.Array:
  """The number of True in ``keep``, one shard of a tensor of ``n`` components, exactly.

  Summed as float32 ones and zeros, exact up to 2**24 components (every
  partial sum is a whole number float32 holds), which XLA:CPU reduces in one
  library kernel, where an int32 count takes a generic two-stage reduction.
  Larger tensors are counted in int32.
  """
  if n <= 2**24:
    return jnp.sum(jnp.where(keep, 1.0, 0.0).astype(jnp.float32))
  return jnp.sum(keep, dtype=jnp.int32)


def _descends(u: jax.Array, g: jax.Array) -> jax.Array:
  """Where an added update ``u`` moves against the gradient ``g``: their signs differ."""
  return ((u > 0) & (g < 0)) | ((u < 0) & (g > 0))


def _rescale(n: int, kept: jax.Array, dtype: Any) -> jax.Array:
  """``n / (kept + 1)`` in the real dtype of the update (float32 or wider)."""
  real = jnp.finfo(dtype).dtype
  wide = jnp.result_type(real, jnp.float32)
  return jnp.asarray(n, wide) / (kept.astype(wide) + 1)


_metrics.register_statistics(CautiousState, "cautious", ("masked_fraction", "count"))
