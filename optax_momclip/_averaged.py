"""Momentum as an average: QHM (of the gradient and its EMA), AggMo (of several velocities)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_momclip import _eager, _norms, _validation
from optax_momclip._hyperparams import complement, evaluate
from optax_momclip._momentum import compute_dtype, ema_leaf, momentum_init, unzip


class QhmState(NamedTuple):
  """State of `qhm`.

  Attributes:
    count: steps taken (saturating). i32[].
    momentum_buffer: the moving average ``b``, a tree like the params in
      ``accumulator_dtype`` (default: each param's dtype).
  """

  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  momentum_buffer: Any  # tree like params, accumulator_dtype


def qhm(
  momentum: float | jax.Array = 0.999,
  nu: float | jax.Array = 0.7,
  *,
  accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Quasi-hyperbolic momentum: a ``ν``-weighted mix of the gradient and its EMA.

  .. math:: b_t = \beta b_{t-1} + (1 - \beta) g_t, \quad b_0 = 0, \qquad
     u_t = (1 - \nu) g_t + \nu b_t

  ``ν = 0`` is plain SGD, ``ν = 1`` is `ema_momentum`, and ``ν = β`` with
  the learning rate divided by ``1 - β`` is Nesterov `heavy_ball`. A learning
  rate tuned for SGD with momentum ``β'`` converts as ``lr / (1 - β')``.

  Args:
    momentum: ``β`` in ``[0, 1]``. Default 0.999 (the paper's).
    nu: ``ν`` in ``[0, 1]``. Default 0.7 (the paper's).
    accumulator_dtype: dtype ``b`` is stored in; updates keep the gradient's
      dtype. Default None: each param's dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `QhmState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.qhm(0.9, 0.5)
    >>> g = {"w": jnp.array([1.0, -2.0])}
    >>> u, state = tx.update(g, tx.init(g))  # 0.5·g + 0.5·0.1·g
    >>> print(u["w"].round(4))
    [ 0.55 -1.1 ]

  References:
    Ma, Yarats, *Quasi-hyperbolic momentum and Adam for deep learning*, 2019,
    https://arxiv.org/abs/1810.06801
  """
  fn = "qhm"
  _validation.check_scalar(fn, "momentum", momentum, low=0.0, high=1.0)
  _validation.check_scalar(fn, "nu", nu, low=0.0, high=1.0)
  _validation.check_dtype(fn, "accumulator_dtype", accumulator_dtype)

  def init_fn(params: Any) -> QhmState:
    return QhmState(**momentum_init(params, accumulator_dtype))

  def update_fn(
    updates: Any, state: QhmState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, QhmState]:
    del params, extra_args
    _validation.check_tree_matches(fn, updates, state.momentum_buffer)
    dtype = _norms.statistics_dtype(updates)
    beta, weight = evaluate(momentum, state.count, dtype), complement(momentum, state.count, dtype)
    v, one_minus_v = evaluate(nu, state.count, dtype), complement(nu, state.count, dtype)

    def leaf(g: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
      new = ema_leaf(g, b, beta, weight)
      dt = new.dtype
      out = one_minus_v.astype(dt) * g.astype(dt) + v.astype(dt) * new
      return out.astype(g.dtype), new.astype(b.dtype)

    out, buf = unzip(updates, jax.tree.map(leaf, updates, state.momentum_buffer))
    return out, QhmState(count=optax.safe_increment(state.count), momentum_buffer=buf)

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))


class AggmoState(NamedTuple):
  """State of `aggmo`.

  Attributes:
    count: steps taken (saturating). i32[].
    momentum_buffer: the ``K`` velocities stacked on a leading axis: a tree
      like the params whose leaves have shape ``(K, *param.shape)``, in
      ``accumulator_dtype`` (default: each param's dtype).
  """

  count: jax.Array  # type: ignore[assignment]  # i32[]; optax's name, shadows tuple.count
  momentum_buffer: Any  # tree of (K, *param.shape), accumulator_dtype


def aggmo(
  betas: Sequence[float] = (0.0, 0.9, 0.99), *, accumulator_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Aggregated momentum: the mean of several heavy-ball velocities.

  .. math:: v^{(i)}_t = \beta_i v^{(i)}_{t-1} + g_t, \quad v^{(i)}_0 = 0, \qquad
     u_t = \frac{1}{K} \sum_{i=1}^{K} v^{(i)}_t

  One beta is `heavy_ball` without dampening (``optax.trace``). The velocities
  are stacked on a leading axis so a step is one elementwise pass per leaf.

  Args:
    betas: the ``K >= 1`` damping factors, each in ``[0, 1)``. Default
      ``(0.0, 0.9, 0.99)`` (the paper's). A Python sequence: it fixes the
      state's shape (with ``optax.inject_hyperparams`` it stays static).
    accumulator_dtype: dtype the velocities are stored in; updates keep the
      gradient's dtype. Default None: each param's dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an `AggmoState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.aggmo((0.0, 0.5))
    >>> g = {"w": jnp.array([1.0, -2.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u, state = tx.update(g, state)  # mean(g, 1.5·g)
    >>> print(u["w"])
    [ 1.25 -2.5 ]

  References:
    Lucas, Sun, Zemel, Grosse, *Aggregated Momentum: Stability Through Passive
    Damping*, 2019, https://arxiv.org/abs/1804.00325
  """
  fn = "aggmo"
  if isinstance(betas, str) or not isinstance(betas, Sequence) or not betas:
    raise TypeError(f"{fn}: betas must be a non-empty sequence of numbers, got {betas!r}")
  for i, beta in enumerate(betas):
    _validation.check_scalar(fn, f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
  _validation.check_dtype(fn, "accumulator_dtype", accumulator_dtype)
  k = len(betas)

  def init_fn(params: Any) -> AggmoState:
    return AggmoState(**momentum_init(params, accumulator_dtype, (k,)))

  def update_fn(
    updates: Any, state: AggmoState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, AggmoState]:
    del params, extra_args
    _validation.check_tree_matches(
      fn, updates, state.momentum_buffer, shape_of=lambda shape: (k, *shape)
    )
    beta = jnp.stack([evaluate(b, state.count, _norms.statistics_dtype(updates)) for b in betas])

    def leaf(g: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
      dtype = compute_dtype(g.dtype, v.dtype)
      bcast = beta.astype(dtype).reshape((k,) + (1,) * g.ndim)
      new = bcast * v.astype(dtype) + g.astype(dtype)[None]
      return jnp.mean(new, axis=0).astype(g.dtype), new.astype(v.dtype)

    out, buf = unzip(updates, jax.tree.map(leaf, updates, state.momentum_buffer))
    return out, AggmoState(count=optax.safe_increment(state.count), momentum_buffer=buf)

  return optax.GradientTransformationExtraArgs(init_fn, _eager.compiled_when_reused(fn, update_fn))
