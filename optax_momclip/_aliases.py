"""Whole optimizers: momclip_sgd, PyTorch's clip-then-SGD step in one fused pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _metrics, _norms, _scaling, _validation
from optax_momclip._clipping import count_if
from optax_momclip._hyperparams import ScheduleOrScalar, bound, complement, evaluate
from optax_momclip._momentum import (
  check_nesterov,
  compute_dtype,
  heavy_ball_leaf,
  started,
  torch_buffer_init,
  unzip,
)

# torch.nn.utils.clip_grad_norm_ divides by total_norm + 1e-6.
_TORCH_NORM_EPS = 1e-6


class MomclipSgdState(NamedTuple):
  """State of `momclip_sgd`.

  Attributes:
    count: steps taken (saturating); the step schedules are evaluated at, and
      0 marks the first step. i32[].
    momentum_buffer: PyTorch's ``momentum_buffer``, a tree like the params in
      ``accumulator_dtype`` (default: each param's dtype).
    grad_norm: the global L2 norm of the raw gradient, before any clipping
      (what ``clip_grad_norm_`` returns); 0 when ``max_norm`` is None. f32[].
    clip_scale: the factor the gradient was multiplied by,
      ``min(1, max_norm / (grad_norm + 1e-6))``; 1 when ``max_norm`` is None.
      f32[].
    clip_threshold: ``max_norm``; 0 when it is None. f32[].
    steps_clipped: steps whose ``clip_scale`` was below 1 (saturating). i32[].
    buffer_started: whether a step with non-zero momentum has started the
      buffer (PyTorch's is None until then). bool[].
  """

  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  momentum_buffer: Any  # tree like params, accumulator_dtype
  grad_norm: jax.Array  # f32[]
  clip_scale: jax.Array  # f32[]
  clip_threshold: jax.Array  # f32[]
  steps_clipped: jax.Array  # i32[]
  buffer_started: jax.Array  # bool[]


def momclip_sgd(
  learning_rate: ScheduleOrScalar,
  momentum: ScheduleOrScalar = 0.0,
  *,
  max_norm: float | jax.Array | None = None,
  max_value: float | jax.Array | None = None,
  nesterov: bool = False,
  dampening: float | jax.Array = 0.0,
  weight_decay: float | jax.Array | None = None,
  accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clipped SGD with momentum, equal step for step to PyTorch's.

  One step is, in this order, what a PyTorch loop does with
  ``clip_grad_norm_(params, max_norm)``, then ``clip_grad_value_(params,
  max_value)``, then ``torch.optim.SGD(lr, momentum, dampening,
  weight_decay, nesterov).step()``; the defaults are PyTorch's (no momentum,
  no clip), so ``momclip_sgd(lr)`` is ``torch.optim.SGD(params, lr)``:

  .. math::
     g &\leftarrow g \cdot \min\!\big(1, c / (\|g\|_2 + 10^{-6})\big), \qquad
     g \leftarrow \mathrm{clip}(g, -v, v), \qquad g \leftarrow g + \lambda \theta \\
     b_1 &= g_1, \quad b_t = \mu b_{t-1} + (1 - d) g_t, \qquad
     u = g + \mu b \ (\text{Nesterov}) \text{ or } b, \qquad
     \Delta\theta = -\eta\, u

  It returns ``Δθ`` (apply with ``optax.apply_updates``). The norm clip comes
  first so that ``grad_norm`` is the raw gradient's norm, the number a
  PyTorch loop logs; both bounds hold after either order. A step with ``μ = 0``
  neither reads nor changes the buffer (a non-finite gradient aside, which
  makes it NaN as it makes the params), and the first step with a non-zero
  ``μ`` starts it as a copy of the gradient (as in PyTorch, whose buffer is
  None until then). The step reads the gradient twice:
  once for the norm (skipped when ``max_norm`` is None) and once in a single
  fused elementwise pass that clips, decays, updates the buffer and scales.
  Unlike `clip_by_global_norm` it keeps PyTorch's ``+1e-6``, so a norm just
  above ``c`` is scaled slightly below it, and a norm over a NaN or infinite
  element scales as PyTorch's does (``c/inf = 0``, NaN stays NaN); a norm
  beyond float32's range with finite elements is divided by exactly (PyTorch's
  overflows to inf and zeroes the step).

  Args:
    learning_rate: ``η >= 0``, or a schedule ``step -> η`` evaluated at ``count``.
    momentum: ``μ`` in ``[0, 1]``, or a schedule. Default 0, as in PyTorch.
    max_norm: ``c >= 0`` for the global L2 norm clip, or None (default) for none.
    max_value: ``v >= 0`` for the elementwise clip to ``[-v, v]`` (PyTorch's
      ``clip_value``; of each modulus, phase kept, for complex gradients), or
      None (default) for none.
    nesterov: use ``g + μb``; needs ``μ > 0`` and ``d = 0`` as in PyTorch.
      Default False.
    dampening: ``d`` in ``[0, 1]``. Default 0.
    weight_decay: ``λ >= 0``, PyTorch's coupled L2 decay; when set (concrete
      and non-zero, or traced) ``update`` needs ``params``. Default None: no
      decay (None rather than 0, so ``optax.inject_hyperparams`` leaves it out).
    accumulator_dtype: dtype the buffer is stored in (e.g. ``jnp.bfloat16``);
      the step is computed in float32 and updates keep the gradient's dtype.
      Default None: each param's dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    `MomclipSgdState`; `metrics` reports ``momclip_sgd/grad_norm`` and
    ``momclip_sgd/clip_fraction``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_momclip as omc
    >>> tx = omc.momclip_sgd(0.1, 0.9, max_norm=1.0)
    >>> params = {"w": jnp.array([1.0, 1.0])}
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> u, state = tx.update(g, tx.init(params), params)
    >>> print([round(float(x), 4) for x in u["w"]], state.grad_norm)
    [-0.06, -0.08] 5.0

  References:
    PyTorch ``torch.optim.SGD``,
    https://pytorch.org/docs/stable/generated/torch.optim.SGD.html and
    ``torch.nn.utils.clip_grad_norm_``,
    https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html

    Pascanu, Mikolov, Bengio, *On the difficulty of training recurrent neural
    networks*, 2013, https://arxiv.org/abs/1211.5063
  """
  fn = "momclip_sgd"
  _check_arguments(fn, learning_rate, momentum, max_norm, max_value, dampening, weight_decay)
  check_nesterov(fn, nesterov, momentum, dampening)
  _validation.check_dtype(fn, "accumulator_dtype", accumulator_dtype)
  decays = weight_decay is not None and _validation.concrete_float(weight_decay) != 0.0

  def init_fn(params: Any) -> MomclipSgdState:
    dtype = _norms.statistics_dtype(params)
    return MomclipSgdState(
      **torch_buffer_init(params, accumulator_dtype),
      grad_norm=jnp.zeros([], dtype),
      clip_scale=jnp.ones([], dtype),
      clip_threshold=jnp.zeros([], dtype) if max_norm is None else bound(max_norm, None, dtype),
      steps_clipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: Any, state: MomclipSgdState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, MomclipSgdState]:
    del extra_args
    _validation.check_tree_matches(fn, updates, state.momentum_buffer)
    if decays and params is None:
      raise ValueError(f"{fn}: weight_decay={weight_decay!r} needs params in update()")
    norm, scale, threshold = _norm_clip(updates, max_norm, state.clip_threshold)
    step = _SgdStep.at(
      state,
      _norms.statistics_dtype(updates),
      clip=None if max_norm is None else _scaling.scaler(scale),
      max_value=max_value,
      weight_decay=weight_decay if decays else None,
      learning_rate=learning_rate,
      momentum=momentum,
      dampening=dampening,
      nesterov=nesterov,
    )
    decayed = params if decays else state.momentum_buffer  # read only when decaying
    out, buf = unzip(updates, jax.tree.map(step, updates, state.momentum_buffer, decayed))
    like = lambda x: x.astype(state.grad_norm.dtype)
    return out, MomclipSgdState(
      count=optax.safe_increment(state.count),
      momentum_buffer=buf,
      grad_norm=like(norm),
      clip_scale=like(scale.value()),
      clip_threshold=like(threshold),
      steps_clipped=count_if(state.steps_clipped, scale.changes()),
      buffer_started=started(state.buffer_started, step.mu),
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


def _check_arguments(
  fn: str,
  learning_rate: Any,
  momentum: Any,
  max_norm: Any,
  max_value: Any,
  dampening: Any,
  weight_decay: Any,
) -> None:
  _validation.check_scalar(fn, "learning_rate", learning_rate, low=0.0, schedule=True)
  _validation.check_scalar(fn, "momentum", momentum, low=0.0, high=1.0, schedule=True)
  for name, value in (("max_norm", max_norm), ("max_value", max_value)):
    if value is not None:
      _validation.check_scalar(fn, name, value, low=0.0, infinite=True)
  _validation.check_scalar(fn, "dampening", dampening, low=0.0, high=1.0)
  if weight_decay is not None:
    _validation.check_scalar(fn, "weight_decay", weight_decay, low=0.0)


@dataclasses.dataclass(frozen=True)
class _SgdStep:
  """One leaf of `momclip_sgd`'s step: clip, value-clip, decay, heavy ball, scale, in one pass."""

  clip: Callable[[Any], jax.Array] | None
  max_value: jax.Array | None
  weight_decay: jax.Array | None  # None: no decay, and the third tree is not read
  lr: jax.Array
  mu: jax.Array
  undamped: jax.Array
  fresh: jax.Array
  nesterov: bool

  @classmethod
  def at(
    cls,
    state: MomclipSgdState,
    dtype: Any,
    *,
    clip: Any,
    max_value: Any,
    weight_decay: Any,
    learning_rate: Any,
    momentum: Any,
    dampening: Any,
    nesterov: bool,
  ) -> _SgdStep:
    """The step at ``state.count``: schedules evaluated, hyperparameters rounded to ``dtype``."""
    count = state.count
    return cls(
      clip=clip,
      max_value=None if max_value is None else bound(max_value, None, dtype),
      weight_decay=None if weight_decay is None else evaluate(weight_decay, count, dtype),
      lr=evaluate(learning_rate, count, dtype),
      mu=evaluate(momentum, count, dtype),
      undamped=complement(dampening, count, dtype),
      fresh=~state.buffer_started,
      nesterov=nesterov,
    )

  def __call__(self, g: jax.Array, b: jax.Array, p: jax.Array) -> tuple[Any, Any]:
    dtype = compute_dtype(g.dtype, b.dtype)
    x = jnp.asarray(g).astype(dtype)
    if self.clip is not None:
      x = self.clip(x)
    if self.max_value is not None:
      if jnp.iscomplexobj(x):  # by modulus, keeping the phase
        x = _scaling.clip_modulus(x, self.max_value)
      else:
        x = jnp.clip(x, -self.max_value.astype(dtype), self.max_value.astype(dtype))
    if self.weight_decay is not None:
      x = x + self.weight_decay.astype(dtype) * p.astype(dtype)
    u, new = heavy_ball_leaf(x, b, self.mu, self.undamped, self.fresh, self.nesterov)
    return ((-self.lr).astype(dtype) * u).astype(g.dtype), new.astype(b.dtype)


def _norm_clip(
  updates: Any, max_norm: Any, threshold: jax.Array
) -> tuple[jax.Array, _scaling.Scale, jax.Array]:
  """``(grad_norm, clip_grad_norm_'s factor, max_norm)``; norm 0 and factor 1 with no clip."""
  if max_norm is None:
    dtype = _norms.statistics_dtype(updates)
    return jnp.zeros([], dtype), _scaling.unit(jnp.zeros([], dtype)), threshold
  norm = _norms.global_norms([updates])[0]
  threshold = bound(max_norm, None, norm.root.dtype)
  return norm.value(), _torch_clip_coefficient(threshold, norm), threshold


def _torch_clip_coefficient(max_norm: jax.Array, norm: _scaling.Norm) -> _scaling.Scale:
  """``min(1, max_norm / (norm + 1e-6))``, as ``clip_grad_norm_`` computes it, exact at any norm.

  A norm beyond float32's range with every element finite is divided by exactly; a NaN or
  infinite element gives PyTorch's ``max_norm / inf = 0``, or NaN.
  """
  coefficient = _scaling.ratio(max_norm, norm.plus(_TORCH_NORM_EPS))
  above = (coefficient.power == 1) & (coefficient.factor >= 1)
  return _scaling.where(above, _scaling.unit(norm.root), coefficient)


_metrics.register_statistics(
  MomclipSgdState,
  "momclip_sgd",
  ("grad_norm", "clip_scale", "clip_threshold", "count", "steps_clipped"),
  fractions={"clip_fraction": ("steps_clipped", "count")},
)
