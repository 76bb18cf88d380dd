"""Gradients corrected before the optimizer sees them: MARS's variance reduction."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _hyperparams, _metrics, _momentum, _norms, _scaling, _validation
from optax_momclip._clipping import count_if
from optax_momclip._scaling import known_after, range_scale, scale_leaf, units_moved


class MarsState(NamedTuple):
  """State of `mars`.

  Attributes:
    previous_grad: the raw gradient of the previous update, a tree like the
      updates in their dtype (zeros before the first).
    count: updates processed (saturating). i32[].
    steps_clipped: updates in which at least one tensor's correction was
      rescaled to norm 1. i32[].
    tensors_clipped: tensors rescaled this step. i32[].
  """

  previous_grad: Any  # tree like the updates
  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  steps_clipped: jax.Array  # i32[]
  tensors_clipped: jax.Array  # i32[]


def mars(
  gamma: float | jax.Array = 0.025,
  beta1: float | jax.Array = 0.95,
  *,
  axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MARS: the variance-reduced gradient, clipped to norm 1 per tensor, for the optimizer after it.

  .. math:: c_t = g_t + \gamma \frac{\beta_1}{1 - \beta_1} (g_t - g_{t-1}),
     \qquad c_t \leftarrow c_t / \|c_t\| \ \text{ if } \|c_t\| > 1

  per tensor (leaf), with ``g_{t-1}`` the previous raw gradient (zero before
  the first update) and ``β₁`` the momentum of the optimizer that follows:
  ``optax.chain(mars(0.025, 0.95), optax.adamw(3e-3, b1=0.95, b2=0.99))``
  is MARS-AdamW (the paper's approximate form, which reuses the previous
  gradient instead of evaluating a second one). It chains as well with
  `heavy_ball`, `momclip_sgd` or ``optax.lion``. One buffer of state: the
  previous gradient, in the params' dtype (what ``init`` sees, as optax keeps
  its moments; float32 params keep bf16 gradients exactly, bf16 params round
  float32 ones); the correction is computed in
  float32 (float64 for float64 updates). Norms are exact at any magnitude
  (see `global_norm`), beyond float32's range too when every element of the
  correction is finite; a tensor with a NaN or infinite element in it (a
  gradient near float32's largest value can make one) passes unscaled.

  ``pytorch_optimizer.MARS(mars_type="adamw", optimize_1d=True)`` is this
  chained with ``optax.adamw`` (to float32 rounding). Its default
  ``optimize_1d=False`` runs plain AdamW, with other betas, learning rate
  and weight decay, on tensors of rank < 2; do the same with
  ``optax.multi_transform`` (example below). Its ``eps`` enters the
  denominator as ``(sqrt(v) + eps)/sqrt(1 - β₂ᵗ)`` where optax adds ``eps``
  after the bias correction: with gradients above ~1e-6 the difference is
  below float32 rounding. For real parameters: on a complex one the reference's
  Adam treats the real and imaginary parts as two parameters, where
  ``optax.adam``'s second moment is ``|g|²``.

  Args:
    gamma: γ >= 0, the strength of the correction; 0 keeps only the
      clipping. Default 0.025.
    beta1: β₁ in ``[0, 1)``, the following optimizer's momentum. Default 0.95.
    axis_name: for leaves sharded under ``shard_map``/``pmap``: each tensor's
      norm is summed over these mapped axes, so the clip is the whole
      tensor's. Default None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `MarsState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import optax, optax_momclip as omc
    >>> tx = omc.mars(0.025, 0.95)
    >>> g = {"w": jnp.array([0.1, 0.2])}
    >>> c, state = tx.update(g, tx.init(g))  # g_prev = 0: c = (1 + 0.475) g
    >>> print(c["w"].round(6))
    [0.1475 0.295 ]

    MARS on matrices, plain AdamW on biases and scales, as pytorch-optimizer's default:

    >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    >>> rank = lambda p: jax.tree.map(lambda x: "mars" if x.ndim >= 2 else "1d", p)
    >>> tx = optax.multi_transform(
    ...   {"mars": optax.chain(omc.mars(), optax.adamw(3e-3, b1=0.95, b2=0.99, weight_decay=0.0)),
    ...    "1d": optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1)},
    ...   rank,
    ... )
    >>> u, _ = tx.update(params, tx.init(params), params)
    >>> print(jax.tree.map(jnp.shape, u))
    {'bias': (2,), 'kernel': (3, 2)}

  References:
    Yuan, Liu, Wu, Zhou, Gu, *MARS: Unleashing the Power of Variance
    Reduction for Training Large Models*, 2024, https://arxiv.org/abs/2411.10438
  """
  fn = "mars"
  _validation.check_scalar(fn, "gamma", gamma, low=0.0)
  _validation.check_scalar(fn, "beta1", beta1, low=0.0, high=1.0, high_open=True)
  _validation.check_axis_name(fn, axis_name)

  def init_fn(params: Any) -> MarsState:
    return MarsState(
      previous_grad=_momentum.init_buffer(params, None),
      count=jnp.zeros([], jnp.int32),
      steps_clipped=jnp.zeros([], jnp.int32),
      tensors_clipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: MarsState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, MarsState]:
    del params, extra_args
    _validation.check_tree_matches(fn, updates, state.previous_grad)
    leaves, treedef = jax.tree.flatten(updates)
    grads = [jnp.asarray(g) for g in leaves]
    previous = jax.tree.leaves(state.previous_grad)
    weights = [_weight(gamma, beta1, _scaling.scale_dtype(g.dtype)) for g in grads]
    corrected = _corrections(grads, previous, weights)
    norms = _norms.global_norms([[c] for c in corrected], axis_name=axis_name)
    scales = [range_scale(n, jnp.ones([], n.root.dtype)) for n in norms]
    out = [
      scale_leaf(c, s).astype(g.dtype) for c, s, g in zip(corrected, scales, grads, strict=True)
    ]
    tensors = units_moved(scales)
    return jax.tree.unflatten(treedef, out), MarsState(
      # Written once every norm is known, so over the old gradient in place (see known_after).
      previous_grad=jax.tree.unflatten(
        jax.tree.structure(state.previous_grad),
        [
          known_after(g, s).astype(p.dtype) for g, s, p in zip(grads, scales, previous, strict=True)
        ],
      ),
      count=optax.safe_increment(state.count),
      steps_clipped=count_if(state.steps_clipped, tensors > 0),
      tensors_clipped=tensors,
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


def _weight(gamma: Any, beta1: Any, dtype: Any) -> jax.Array:
  """``γ·β₁/(1 − β₁)``: in float64 and rounded once for numbers, as PyTorch's Python floats."""
  g, b = _validation.concrete_float(gamma), _validation.concrete_float(beta1)
  if g is not None and b is not None:
    return jnp.asarray(g * (b / (1.0 - b)), dtype)
  beta = _hyperparams.evaluate(beta1, None, dtype)
  return _hyperparams.evaluate(gamma, None, dtype) * (
    beta / _hyperparams.complement(beta1, None, dtype)
  )


def _corrections(grads: list, previous: list, weights: list) -> list[jax.Array]:
  """``g + w·(g − previous)`` per leaf, in ``w``'s dtype (float32 or wider; complex kept)."""
  out = []
  for g, p, w in zip(grads, previous, weights, strict=True):
    dtype = jnp.result_type(g.dtype, w.dtype)
    g, p = g.astype(dtype), p.astype(dtype)
    out.append(g + w * (g - p))
  return out


_metrics.register_statistics(MarsState, "mars", ("count", "steps_clipped", "tensors_clipped"))
