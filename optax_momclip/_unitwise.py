"""Clipping each unit on its own, against a reference of its own: AGC (the unit's weights)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _hyperparams, _metrics, _norms, _scaling, _validation
from optax_momclip._clipping import CLIP_STATS, clip_statistics_init, count_if
from optax_momclip._scaling import range_scale, scale_leaf


class AdaptiveGradClipState(NamedTuple):
  """State of `adaptive_grad_clip`.

  Attributes:
    grad_norm: the global L2 norm of the incoming updates, before clipping.
      f32[] (f64[] for float64 params, as every float field here).
    clip_scale: the smallest factor any unit was multiplied by this step. f32[].
    clip_threshold: the ratio ``clipping`` (λ) used. f32[].
    count: updates processed (saturating). i32[].
    steps_clipped: updates in which at least one unit was rescaled. i32[].
    units_clipped: units rescaled this step. i32[].
  """

  grad_norm: jax.Array  # f32[]
  clip_scale: jax.Array  # f32[]
  clip_threshold: jax.Array  # f32[]
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_clipped: jax.Array  # i32[]
  units_clipped: jax.Array  # i32[]


def adaptive_grad_clip(
  clipping: float | jax.Array = 0.01,
  eps: float | jax.Array = 1e-3,
  *,
  axis: int | tuple[int, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive gradient clipping (AGC): each unit's update is bounded relative to its weights.

  .. math:: G_i \leftarrow G_i \cdot \frac{\lambda \max(\|W_i\|, \epsilon)}{\|G_i\|}
     \quad \text{when} \quad \frac{\|G_i\|}{\max(\|W_i\|, \epsilon)} > \lambda

  A *unit* ``i`` is one output unit. With ``axis=None`` the norm of a leaf
  of rank >= 2 is taken over every axis but the last, which is the output axis
  in JAX/Flax layouts; scalars and vectors (biases) are one unit each::

    nn.Dense kernel (in, out)            -> norms over axis 0, one per output
    nn.Conv kernel (H, W, in, out)       -> norms over axes (0, 1, 2)
    nn.Conv 1-D kernel (W, in, out)      -> norms over axes (0, 1)
    bias (out,), scale ()                -> one norm for the whole leaf

  PyTorch layouts are output-first, so the same model reduces over other
  axes there: pass ``axis`` explicitly (the axes a norm is taken over) for
  any other layout. Norms accumulate in float32; a unit whose gradient norm
  is not finite is left unscaled. NFNets apply AGC to the raw gradient,
  before weight decay and momentum, and do not clip the final classifier
  (use ``optax.masked`` to leave it out).

  Differs from ``optax.adaptive_grad_clip`` in the default units of rank-3
  kernels (optax: axis 0, for multi-head projections; here axes (0, 1), for
  1-D convolutions) and of kernels of shape ``(1, n)`` (optax: one unit;
  here ``n`` units), in dividing by the exact ``‖G_i‖`` instead of
  ``max(‖G_i‖, 1e-6)``, and in keeping statistics in its state.

  Args:
    clipping: the largest allowed ratio λ of a unit's update norm to its
      weight norm, >= 0. Default 0.01.
    eps: the weight norm below which a unit counts as ``eps`` (so zero-
      initialised weights can move), >= 0. Default 1e-3.
    axis: None (default: the unit convention above), or an int or tuple of
      ints naming the axes each norm is taken over, for every leaf; a leaf
      with too few dimensions is one unit.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    `AdaptiveGradClipState`. Its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.adaptive_grad_clip(0.1)
    >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}  # (in, out)
    >>> grads = {"kernel": jnp.array([[1.0, 0.05], [0.0, 0.0]])}
    >>> u, state = tx.update(grads, tx.init(params), params)
    >>> print(u["kernel"][:, 0], state.units_clipped)
    [0.5 0. ] 1

    With a Flax ``Dense`` layer, each output unit (kernel column) is bounded by
    its own weight norm; a gradient parallel to the weights is clipped to λW:

    >>> import flax.linen as nn, jax
    >>> params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> grads = jax.tree.map(lambda p: 100.0 * p, params)  # kernel (4, 3), bias (3,) zeros
    >>> u, state = tx.update(grads, tx.init(params), params)
    >>> print(jnp.allclose(u["kernel"], 0.1 * params["kernel"]), state.units_clipped)
    True 3

  References:
    Brock, De, Smith, Simonyan, *High-Performance Large-Scale Image
    Recognition Without Normalization*, 2021, https://arxiv.org/abs/2102.06171
  """
  fn = "adaptive_grad_clip"
  _validation.check_scalar(fn, "clipping", clipping, low=0.0)
  _validation.check_scalar(fn, "eps", eps, low=0.0)
  _validation.check_axes(fn, "axis", axis)

  def axes_of(x: jax.Array) -> tuple[int, ...] | None:
    return _norms.unit_axes(x.ndim) if axis is None else _norms.resolve_axes(x.ndim, axis, fn)

  def init_fn(params: Any) -> AdaptiveGradClipState:
    dtype = _norms.statistics_dtype(params)
    return AdaptiveGradClipState(
      **clip_statistics_init(dtype, _hyperparams.bound(clipping, None, dtype)),
      units_clipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: AdaptiveGradClipState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, AdaptiveGradClipState]:
    del extra_args
    if params is None:
      raise ValueError(f"{fn}: update needs params (each unit is bounded relative to its weights)")
    _validation.check_tree_matches(fn, updates, params)
    leaves, treedef = jax.tree.flatten(updates)
    grads = [jnp.asarray(g) for g in leaves]
    weights = [jnp.asarray(w) for w in jax.tree.leaves(params)]
    axes = [axes_of(g) for g in grads]
    norms = _norms.unit_norms(grads + weights, axes + axes)
    g_norms, w_norms = norms[: len(grads)], norms[len(grads) :]

    def scale(g: jax.Array, w: jax.Array) -> _scaling.Scale:
      lam = _hyperparams.bound(clipping, None, g.dtype)
      return range_scale(
        g, lam * jnp.maximum(w.astype(g.dtype), _hyperparams.bound(eps, None, g.dtype))
      )

    scales = [scale(g, w) for g, w in zip(g_norms, w_norms, strict=True)]
    new = [scale_leaf(g, s) for g, s in zip(grads, scales, strict=True)]
    moved = [jnp.sum(s.changes(), dtype=jnp.int32) for s in scales]
    units = jnp.sum(jnp.stack(moved), dtype=jnp.int32) if moved else jnp.zeros([], jnp.int32)
    like = lambda x: x.astype(state.grad_norm.dtype)
    lowest = [like(jnp.min(s.value(), initial=1.0)) for s in scales]
    return jax.tree.unflatten(treedef, new), AdaptiveGradClipState(
      grad_norm=like(_norms.norm_of_norms(g_norms)),
      clip_scale=jnp.min(jnp.stack(lowest)) if lowest else jnp.ones_like(state.clip_scale),
      clip_threshold=like(_hyperparams.bound(clipping, None, state.grad_norm.dtype)),
      count=optax.safe_increment(state.count),
      steps_clipped=count_if(state.steps_clipped, units > 0),
      units_clipped=units,
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(update_fn))


_metrics.register_statistics(
  AdaptiveGradClipState, "adaptive_grad_clip", (*CLIP_STATS, "units_clipped")
)
