"""Clipping each unit on its own, against a reference of its own: AGC (the unit's weights) and
AdaGC (the tensor's own recent norms)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _hyperparams, _metrics, _norms, _scaling, _validation
from optax_momclip._clipping import CLIP_STATS, clip_statistics_init, count_if
from optax_momclip._hyperparams import ScheduleOrScalar
from optax_momclip._scaling import Scale, range_scale, scale_leaf, smallest_scale, units_moved


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

    def scale(g: _scaling.Norm, w: _scaling.Norm) -> _scaling.Scale:
      dtype = g.root.dtype
      lam = _hyperparams.bound(clipping, None, dtype)
      return range_scale(
        g, lam * jnp.maximum(w.value().astype(dtype), _hyperparams.bound(eps, None, dtype))
      )

    scales = [scale(g, w) for g, w in zip(g_norms, w_norms, strict=True)]
    new = [scale_leaf(g, s) for g, s in zip(grads, scales, strict=True)]
    units = units_moved(scales)
    like = lambda x: x.astype(state.grad_norm.dtype)
    return jax.tree.unflatten(treedef, new), AdaptiveGradClipState(
      grad_norm=like(_norms.norm_of_norms(g_norms).value()),
      clip_scale=smallest_scale(scales, state.clip_scale.dtype),
      clip_threshold=like(_hyperparams.bound(clipping, None, state.grad_norm.dtype)),
      count=optax.safe_increment(state.count),
      steps_clipped=count_if(state.steps_clipped, units > 0),
      units_clipped=units,
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


_metrics.register_statistics(
  AdaptiveGradClipState, "adaptive_grad_clip", (*CLIP_STATS, "units_clipped")
)


# ---- adagc ------------------------------------------------------------------------------------


class AdaGCState(NamedTuple):
  """State of `adagc`.

  Attributes:
    gamma: a tree like the updates with each tensor's threshold γ: an EMA of
      its clipped norms (the smallest clipped norm during warm-up); ``inf``
      until a finite norm is seen. f32[] per leaf (f64 for float64 params, as
      every float field here); f32[0] for a zero-size leaf, which has none.
    grad_norm: the global L2 norm of the incoming updates, before clipping. f32[].
    clip_scale: the smallest factor any tensor was multiplied by this step. f32[].
    clip_threshold: ``lambda_abs`` during warm-up (a global norm), then
      ``lambda_rel`` (a ratio to γ). f32[].
    count: updates processed (saturating); warm-up lasts while
      ``count + 1 < warmup_steps``, and always for the first update (a
      saturated count stays out of it). i32[].
    steps_clipped: updates in which at least one tensor was rescaled. i32[].
    tensors_clipped: tensors rescaled this step. i32[].
  """

  gamma: Any  # tree of f32[] (f32[0] for a zero-size leaf)
  grad_norm: jax.Array  # f32[]
  clip_scale: jax.Array  # f32[]
  clip_threshold: jax.Array  # f32[]
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_clipped: jax.Array  # i32[]
  tensors_clipped: jax.Array  # i32[]


def adagc(
  lambda_rel: ScheduleOrScalar = 1.05,
  *,
  beta: float | jax.Array = 0.98,
  lambda_abs: ScheduleOrScalar = 1.0,
  warmup_steps: int | jax.Array = 100,
  eps: float | jax.Array = 1e-8,
  axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGC: each tensor clipped against an EMA of its own clipped norms.

  .. math::
     h_i = \min\Big(\frac{\lambda_{rel}\,\max(\gamma_i, \epsilon)}
     {\max(\|g_i\|, \epsilon)}, 1\Big), \quad \hat g_i = h_i g_i, \quad
     \gamma_i \leftarrow \beta\gamma_i + (1 - \beta)\|\hat g_i\|

  for each tensor (leaf) ``i`` after warm-up. During warm-up (the first
  update, and every update while ``count + 1 < warmup_steps``) the whole
  update is clipped to a global norm of ``lambda_abs``,
  ``ĝ = g·min(λ_abs/(‖g‖ + ε), 1)``, and each γᵢ is the smallest
  ``‖ĝᵢ‖`` seen. A tensor whose gradient suddenly grows beyond ``λ_rel``
  times its recent norm is scaled back to it, whatever the other tensors do.
  Chain it before the optimizer: ``optax.chain(adagc(), optax.adam(lr))`` is
  the paper's AdaGC-Adam. γ is reported by `metrics` as ``gamma_min``,
  ``gamma_mean`` and ``gamma_max``.

  As the reference implementation (``pytorch_optimizer.AdaGC``, with its
  ``eps`` clamps and step counting), except: a NaN or infinite element leaves
  its tensor unscaled (the update stays non-finite, for `skip_bad_steps` to
  catch) and its γ unchanged; during warm-up, whose clip is global, every
  tensor, where the reference turns every tensor NaN and its γ NaN for the
  rest of training; complex tensors are
  clipped by ``|z|`` (the reference refuses them); γ is ``inf`` until set
  rather than absent; and the weight decay and Adam of the reference are
  optax's (``optax.adamw``, or ``optax.add_decayed_weights`` before
  ``adagc`` for the reference's coupled decay). A warm-up norm beyond
  float32's largest value (finite elements) is divided by exactly, where the
  reference's overflows to inf and zeroes the step.

  A pitfall, the reference's too: a tensor whose gradient is all zeros on a
  warm-up step (a layer behind a zero-initialised output layer, at step 0)
  gets γ = 0, and after warm-up its updates are clipped to about
  ``λ_rel·ε`` and grow by a factor ``β + (1 − β)·λ_rel`` (0.1% with the
  defaults) per step. Start the warm-up once every tensor has a gradient, or
  check ``gamma_min`` in `metrics`.

  Args:
    lambda_rel: λ_rel > 0, the ratio to γ a tensor's norm may reach after
      warm-up; a schedule of the step is allowed. Default 1.05.
    beta: the EMA decay β in ``[0, 1)``. Default 0.98.
    lambda_abs: λ_abs > 0, the global norm during warm-up; a schedule is
      allowed. Default 1.0.
    warmup_steps: updates in warm-up, >= 0 (see above). Default 100.
    eps: ε >= 0 of the clamps and the warm-up denominator. Default 1e-8.
    axis_name: for leaves sharded under ``shard_map``/``pmap``: each tensor's
      norm is summed over these mapped axes. Default None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an `AdaGCState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.adagc(1.05, warmup_steps=1)
    >>> g = {"a": jnp.array([0.03, 0.04]), "b": jnp.array([0.3, 0.4])}
    >>> u, state = tx.update(g, tx.init(g))  # warm-up: global norm 0.5025 <= 1, kept
    >>> print(state.gamma["a"], state.gamma["b"])
    0.05 0.5
    >>> u, state = tx.update({"a": 10 * g["a"], "b": g["b"]}, state)
    >>> print(u["a"], u["b"], state.tensors_clipped)  # "a" grew 10×: back to 1.05·γ
    [0.0315 0.042 ] [0.3 0.4] 1

  References:
    Wang et al., *AdaGC: Improving Training Stability for Large Language
    Model Pretraining*, 2025, https://arxiv.org/abs/2502.11034
  """
  fn = "adagc"
  _validation.check_scalar(fn, "lambda_rel", lambda_rel, low=0.0, low_open=True, schedule=True)
  _validation.check_scalar(fn, "beta", beta, low=0.0, high=1.0, high_open=True)
  _validation.check_scalar(fn, "lambda_abs", lambda_abs, low=0.0, low_open=True, schedule=True)
  _validation.check_count(fn, "warmup_steps", warmup_steps, low=0)
  _validation.check_scalar(fn, "eps", eps, low=0.0)
  _validation.check_axis_name(fn, axis_name)
  gamma_shape = lambda shape: () if math.prod(shape) else (0,)

  def init_fn(params: Any) -> AdaGCState:
    dtype = _norms.statistics_dtype(params)
    return AdaGCState(
      gamma=jax.tree.map(lambda x: jnp.full(gamma_shape(jnp.shape(x)), jnp.inf, dtype), params),
      **clip_statistics_init(
        dtype, _hyperparams.evaluate(lambda_abs, jnp.zeros([], jnp.int32), dtype)
      ),
      tensors_clipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: AdaGCState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, AdaGCState]:
    del params, extra_args
    _validation.check_tree_matches(fn, updates, state.gamma, shape_of=gamma_shape)
    leaves, treedef = jax.tree.flatten(updates)
    grads = [jnp.asarray(g) for g in leaves]
    gammas = jax.tree.leaves(state.gamma)
    dtype = state.grad_norm.dtype
    norms = [
      n.astype(dtype) for n in _norms.global_norms([[g] for g in grads], axis_name=axis_name)
    ]
    total = _norms.norm_of_norms(norms).astype(dtype)
    h = _AdaGCRule(lambda_rel, beta, lambda_abs, warmup_steps, eps, dtype, state.count)
    scales, new_gammas = h.scales_and_gammas(norms, total, gammas)
    tensors = units_moved(scales)
    new = [scale_leaf(g, s) for g, s in zip(grads, scales, strict=True)]
    return jax.tree.unflatten(treedef, new), (
      AdaGCState(
        gamma=jax.tree.unflatten(jax.tree.structure(state.gamma), new_gammas),
        grad_norm=total.value(),
        clip_scale=smallest_scale(scales, dtype),
        clip_threshold=jnp.where(h.warm, h.lambda_abs, h.lambda_rel),
        count=optax.safe_increment(state.count),
        steps_clipped=count_if(state.steps_clipped, tensors > 0),
        tensors_clipped=tensors,
      )
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


class _AdaGCRule:
  """AdaGC's hyperparameters evaluated at one step, and its per-tensor rule."""

  def __init__(
    self, lambda_rel: Any, beta: Any, lambda_abs: Any, warmup: Any, eps: Any, dtype: Any, count: Any
  ):
    self.lambda_rel = _hyperparams.bound(lambda_rel, count, dtype)
    self.lambda_abs = _hyperparams.bound(lambda_abs, count, dtype)
    self.weight = _hyperparams.complement(beta, None, dtype)
    self.eps = _hyperparams.bound(eps, None, dtype)
    self.warm = (count == 0) | (count < warmup - 1)  # count + 1 would wrap at the int32 limit

  def scales_and_gammas(
    self, norms: list[_scaling.Norm], total: _scaling.Norm, gammas: list[jax.Array]
  ) -> tuple[list[Scale], list[jax.Array]]:
    """Each tensor's factor ``h`` and its new γ (a zero-size tensor's γ stays empty).

    Norms beyond float32's range, of finite elements, are divided by exactly.
    """
    warm_scale = range_scale(total.plus(self.eps), self.lambda_abs)
    scales, new = [], []
    for n, gamma in zip(norms, gammas, strict=True):
      dtype = n.root.dtype
      g0 = gamma.astype(dtype) if gamma.size else jnp.zeros([], dtype)
      unset = jnp.isinf(g0)  # no finite norm seen yet: no bound (and no NaN in its gradient)
      known = jnp.where(unset, 1, g0)
      hi = jnp.where(unset, jnp.inf, self.lambda_rel * jnp.maximum(known, self.eps))
      scale = _scaling.where(self.warm, warm_scale, range_scale(n.at_least(self.eps), hi))
      clipped = n.times(scale)
      ema = jnp.where(unset, clipped, known + self.weight * (clipped - known))
      updated = jnp.where(self.warm, jnp.minimum(g0, clipped), ema)
      finite = jnp.where(self.warm, total.elements_finite(), n.elements_finite())
      scales.append(scale)
      new.append(jnp.where(finite, updated, g0).astype(gamma.dtype) if gamma.size else gamma)
    return scales, new


_metrics.register_statistics(
  AdaGCState, "adagc", (*CLIP_STATS, "tensors_clipped"), summaries=("gamma",)
)
_metrics.allow_infinite(AdaGCState, "gamma")  # unset until a finite norm is seen
