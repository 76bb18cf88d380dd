"""Momentum: PyTorch-exact heavy ball and EMA momentum, and the leaf arithmetic they share."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_momclip import _eager, _norms, _validation
from optax_momclip._hyperparams import ScheduleOrScalar, complement, evaluate

_F32 = jnp.float32


# Shared by every momentum transformation here and in `_combined` / `_aliases`.


def compute_dtype(*dtypes: Any) -> jnp.dtype:
  """The dtype a momentum step is computed in: float32, or wider if an input is wider."""
  out = jnp.dtype(_F32)
  for d in dtypes:
    out = jnp.promote_types(out, d)
  return out


def init_buffer(params: Any, dtype: Any, leading: tuple[int, ...] = ()) -> Any:
  """Zeros shaped like every leaf of ``params`` (``leading + shape``), in ``dtype`` or its own.

  Accepts ``jax.ShapeDtypeStruct`` leaves and Python numbers; ``None`` leaves stay ``None``.
  """

  def zeros(p: Any) -> jax.Array:
    shape, own = (p.shape, p.dtype) if hasattr(p, "dtype") else (jnp.shape(p), jnp.result_type(p))
    return jnp.zeros(leading + tuple(shape), dtype or own)

  return jax.tree.map(zeros, params)


def unzip(like: Any, pairs: Any) -> tuple[Any, Any]:
  """Splits a tree of pairs (one per leaf of ``like``) into two trees."""
  return jax.tree.map(lambda _, o: o[0], like, pairs), jax.tree.map(lambda _, o: o[1], like, pairs)


def momentum_init(params: Any, dtype: Any, leading: tuple[int, ...] = ()) -> dict[str, Any]:
  """The fields every momentum state starts with: ``count`` 0 and a zero buffer like the params."""
  return {"count": jnp.zeros([], jnp.int32), "momentum_buffer": init_buffer(params, dtype, leading)}


def torch_buffer_init(params: Any, dtype: Any) -> dict[str, Any]:
  """`momentum_init`'s fields and ``buffer_started`` False: PyTorch's buffer is still None."""
  return {**momentum_init(params, dtype), "buffer_started": jnp.zeros([], jnp.bool_)}


def heavy_ball_leaf(
  g: jax.Array,
  b: jax.Array,
  momentum: jax.Array,
  undamped: jax.Array,
  fresh: jax.Array,
  nesterov: bool,
) -> tuple[jax.Array, jax.Array]:
  """One PyTorch SGD momentum step on a leaf: ``(direction, new buffer)``.

  ``undamped`` is ``1 - dampening``; ``fresh`` (a bool scalar) marks a buffer
  not started yet (PyTorch's None), which the first step with a non-zero
  momentum starts as a plain copy of ``g``. A step with zero momentum moves
  along ``g`` and leaves the buffer as it is, as PyTorch does (a momentum
  schedule that starts at 0 starts the buffer where it leaves 0). Computed in
  `compute_dtype`; the direction is taken from the buffer as stored (rounded
  to ``b``'s dtype), as PyTorch does with a bf16 buffer, so what moves the
  params is exactly what the state holds.
  """
  dtype = compute_dtype(g.dtype, b.dtype)
  x, mu = g.astype(dtype), momentum.astype(dtype)
  still = mu == 0
  # new = kb·b + kx·g with scalar weights: (μ, 1-d) once started, (0, 1) to start (b is still
  # its initial zeros) and (1, 0) to keep b. A select between b and a new value instead makes
  # XLA copy every donated buffer aside each step when μ is not a constant. (A non-finite g at
  # a μ = 0 step reaches b through 0·g, as it reaches the params through the direction.)
  kb = jnp.where(still, 1, jnp.where(fresh, 0, mu)).astype(dtype)
  kx = jnp.where(still, 0, jnp.where(fresh, 1, undamped.astype(dtype))).astype(dtype)
  new = (kb * b.astype(dtype) + kx * x).astype(b.dtype).astype(dtype)
  return (x + mu * new if nesterov else jnp.where(still, x, new)), new


def started(state_started: jax.Array, momentum: jax.Array) -> jax.Array:
  """Whether PyTorch's buffer exists after this step: once a momentum was non-zero."""
  return state_started | (momentum != 0)


def ema_leaf(g: jax.Array, m: jax.Array, decay: jax.Array, weight: jax.Array) -> jax.Array:
  """``decay·m + weight·g`` (``weight = 1 - decay``, see `complement`) in `compute_dtype`."""
  dtype = compute_dtype(g.dtype, m.dtype)
  return weight.astype(dtype) * g.astype(dtype) + decay.astype(dtype) * m.astype(dtype)


def cast_like(tree: Any, like: Any) -> Any:
  """Every leaf of ``tree`` cast to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def ema_tree(updates: Any, buffer: Any, decay: ScheduleOrScalar, count: jax.Array) -> Any:
  """The new moving average ``decay·m + (1 - decay)·g`` of every leaf, unrounded."""
  dtype = _norms.statistics_dtype(updates)
  beta, weight = evaluate(decay, count, dtype), complement(decay, count, dtype)
  return jax.tree.map(lambda g, m: ema_leaf(g, m, beta, weight), updates, buffer)


def check_nesterov(fn: str, nesterov: Any, momentum: Any, dampening: Any) -> None:
  """Rejects what ``torch.optim.SGD`` rejects: Nesterov without momentum or with dampening."""
  if not isinstance(nesterov, bool | np.bool_):
    raise TypeError(f"{fn}: nesterov must be a bool, got {nesterov!r}")
  if not nesterov:
    return
  mu = None if callable(momentum) else _validation.concrete_float(momentum)
  d = _validation.concrete_float(dampening)
  if (mu is not None and mu <= 0) or (d is not None and d != 0):
    raise ValueError(
      f"{fn}: nesterov=True needs momentum > 0 and dampening == 0 (as torch.optim.SGD), "
      f"got momentum={momentum!r}, dampening={dampening!r}"
    )


class HeavyBallState(NamedTuple):
  """State of `heavy_ball`.

  Attributes:
    count: steps taken (saturating); the step a momentum schedule is evaluated
      at, and 0 marks the first step. i32[].
    momentum_buffer: PyTorch's ``momentum_buffer``, a tree like the params in
      ``accumulator_dtype`` (default: each param's dtype).
    buffer_started: whether a step with non-zero momentum has started the
      buffer (PyTorch's is None until then). bool[].
  """

  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  momentum_buffer: Any  # tree like params, accumulator_dtype
  buffer_started: jax.Array  # bool[]


def heavy_ball(
  momentum: ScheduleOrScalar = 0.9,
  *,
  dampening: float | jax.Array = 0.0,
  nesterov: bool = False,
  accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Heavy-ball momentum with PyTorch's SGD semantics.

  .. math::
     b_1 = g_1, \qquad b_t = \mu b_{t-1} + (1 - d)\, g_t, \qquad
     u_t = \begin{cases} g_t + \mu b_t & \text{Nesterov} \\ b_t & \text{otherwise}\end{cases}

  The first buffer is the undamped gradient, as in ``torch.optim.SGD``; with
  ``d = 0`` this is ``optax.trace`` and the classic ``v = γv + g``, and the
  step ``θ ← θ - α u`` is added by ``optax.sgd``-style scaling after it. A
  step with momentum 0 returns ``g`` whatever the dampening and leaves the
  buffer as it is, as PyTorch does (unless ``g`` holds an inf or NaN, which
  then makes the buffer NaN as it makes the params); ``b_1`` is the first step with a
  non-zero momentum (a schedule warming up from 0 starts the buffer there,
  and one that returns to a non-zero momentum resumes the old buffer).

  Args:
    momentum: ``μ`` in ``[0, 1]``, or a schedule ``step -> μ`` (e.g. `demon`)
      evaluated at ``count``. Default 0.9.
    dampening: ``d`` in ``[0, 1]``. Default 0.
    nesterov: use the Nesterov direction ``g + μb``. Needs ``μ > 0`` and
      ``d = 0``, as in PyTorch. Default False.
    accumulator_dtype: dtype the buffer is stored in (e.g. ``jnp.bfloat16``);
      the step is computed in float32 and the updates keep the gradient's
      dtype. Default None: each param's dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `HeavyBallState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.heavy_ball(0.9, dampening=0.5)
    >>> g = {"w": jnp.array([1.0, -2.0])}
    >>> u, state = tx.update(g, tx.init(g))  # first step: b = g
    >>> u, state = tx.update(g, state)  # 0.9·b + 0.5·g
    >>> print(u["w"])
    [ 1.4 -2.8]

  References:
    Polyak, *Some methods of speeding up the convergence of iteration
    methods*, 1964, https://doi.org/10.1016/0041-5553(64)90137-5

    Sutskever, Martens, Dahl, Hinton, *On the importance of initialization and
    momentum in deep learning*, 2013, https://proceedings.mlr.press/v28/sutskever13.html

    PyTorch ``torch.optim.SGD``,
    https://pytorch.org/docs/stable/generated/torch.optim.SGD.html
  """
  fn = "heavy_ball"
  _validation.check_scalar(fn, "momentum", momentum, low=0.0, high=1.0, schedule=True)
  _validation.check_scalar(fn, "dampening", dampening, low=0.0, high=1.0)
  check_nesterov(fn, nesterov, momentum, dampening)
  _validation.check_dtype(fn, "accumulator_dtype", accumulator_dtype)

  def init_fn(params: Any) -> HeavyBallState:
    return HeavyBallState(**torch_buffer_init(params, accumulator_dtype))

  def update_fn(
    updates: Any, state: HeavyBallState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, HeavyBallState]:
    del params, extra_args
    _validation.check_tree_matches(fn, updates, state.momentum_buffer)
    dtype = _norms.statistics_dtype(updates)
    mu = evaluate(momentum, state.count, dtype)
    undamped = complement(dampening, state.count, dtype)
    fresh = ~state.buffer_started
    pairs = jax.tree.map(
      lambda g, b: heavy_ball_leaf(g, b, mu, undamped, fresh, nesterov),
      updates,
      state.momentum_buffer,
    )
    out, buf = unzip(updates, pairs)
    return cast_like(out, updates), HeavyBallState(
      count=optax.safe_increment(state.count),
      momentum_buffer=cast_like(buf, state.momentum_buffer),
      buffer_started=started(state.buffer_started, mu),
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


class EmaMomentumState(NamedTuple):
  """State of `ema_momentum`.

  Attributes:
    count: steps taken (saturating); the step a decay schedule is evaluated
      at. i32[].
    momentum_buffer: the moving average ``m``, a tree like the params in
      ``accumulator_dtype`` (default: each param's dtype).
    decay_product: ``Π β`` over the steps taken, so that ``1 - Π β`` debiases
      exactly even when ``β`` follows a schedule. f32[].
  """

  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  momentum_buffer: Any  # tree like params, accumulator_dtype
  decay_product: jax.Array  # f32[]


def ema_momentum(
  decay: ScheduleOrScalar = 0.9, *, debias: bool = True, accumulator_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Exponential-moving-average momentum, optionally bias-corrected.

  .. math:: m_t = \beta m_{t-1} + (1 - \beta) g_t, \quad m_0 = 0, \qquad
     u_t = m_t \ \text{or, debiased,}\ m_t / (1 - \textstyle\prod_{s \le t} \beta_s)

  Equals ``optax.ema``, whose call and defaults it takes (``debias=True``). With a
  constant ``β`` the correction is Adam's ``1 - β^t``; with a schedule it is
  the exact ``1 - Π β_s``. Unlike PyTorch's dampening, the first step is
  ``(1 - β) g``.

  Args:
    decay: ``β`` in ``[0, 1]``, or a schedule ``step -> β`` evaluated at
      ``count``. Default 0.9.
    debias: divide by ``1 - Π β``. Default True, as in ``optax.ema``.
    accumulator_dtype: dtype ``m`` is stored in; updates keep the gradient's
      dtype. Default None: each param's dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an `EmaMomentumState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.ema_momentum(0.5, debias=False)
    >>> g = {"w": jnp.array([1.0, -2.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u, state = tx.update(g, state)  # 0.5·(0.5·g) + 0.5·g
    >>> print(u["w"])
    [ 0.75 -1.5 ]
    >>> print(omc.ema_momentum(0.5).update(g, state)[0]["w"])  # debiased: 0.875·g / 0.875
    [ 1. -2.]

  References:
    Kingma, Ba, *Adam: A Method for Stochastic Optimization*, 2015,
    https://arxiv.org/abs/1412.6980
  """
  fn = "ema_momentum"
  _validation.check_scalar(fn, "decay", decay, low=0.0, high=1.0, schedule=True)
  _validation.check_bool(fn, "debias", debias)
  _validation.check_dtype(fn, "accumulator_dtype", accumulator_dtype)

  def init_fn(params: Any) -> EmaMomentumState:
    return EmaMomentumState(
      **momentum_init(params, accumulator_dtype),
      decay_product=jnp.ones([], _norms.statistics_dtype(params)),
    )

  def update_fn(
    updates: Any, state: EmaMomentumState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, EmaMomentumState]:
    del params, extra_args
    _validation.check_tree_matches(fn, updates, state.momentum_buffer)
    new = ema_tree(updates, state.momentum_buffer, decay, state.count)
    dtype = state.decay_product.dtype
    product = state.decay_product * evaluate(decay, state.count, dtype)
    out = new
    if debias:
      correction = 1 - product
      # beta == 1 keeps m at zero; dividing by 1 then avoids 0/0.
      safe = jnp.where(correction > 0, correction, 1.0)
      out = jax.tree.map(lambda m: m / safe.astype(m.dtype), new)
    return cast_like(out, updates), EmaMomentumState(
      count=optax.safe_increment(state.count),
      momentum_buffer=cast_like(new, state.momentum_buffer),
      decay_product=product,
    )

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))
