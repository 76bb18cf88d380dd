"""Schedules for momentum: Demon's decaying momentum."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from optax_momclip import _validation
from optax_momclip._hyperparams import complement, evaluate


def demon(
  momentum_init: float | jax.Array = 0.9, *, total_steps: int
) -> Callable[[jax.Array], jax.Array]:
  r"""The Demon decaying-momentum schedule, to pass as ``momentum=`` of `heavy_ball`.

  .. math:: \beta_t = \frac{\beta_0 (1 - t/T)}{(1 - \beta_0) + \beta_0 (1 - t/T)}

  Starts at ``β_0``, decays to 0 at ``t = T`` and stays there (``t`` is
  clipped to ``[0, T]``). Computed in float32 with a real-valued ``t/T``
  (mlpack's integer ``t/T`` is not the paper's rule).

  Args:
    momentum_init: ``β_0`` in ``[0, 1)``. Default 0.9.
    total_steps: ``T``, a positive int (keyword-only).

  Returns:
    A schedule ``step -> β_t``: a jit-traceable function of an integer step
    returning a float32 scalar.

  Examples:
    >>> import optax_momclip as omc
    >>> schedule = omc.demon(0.9, total_steps=100)
    >>> print(schedule(0).round(4), schedule(50).round(4), schedule(100))
    0.9 0.8182 0.0

  References:
    Chen, Wolfe, Li, Kyrillidis, *Demon: Improved Neural Network Training with
    Momentum Decay*, 2022, https://arxiv.org/abs/1910.04952
  """
  fn = "demon"
  _validation.check_scalar(fn, "momentum_init", momentum_init, low=0.0, high=1.0, high_open=True)
  _validation.check_positive_int(fn, "total_steps", total_steps)

  def schedule(step: jax.Array) -> jax.Array:
    beta0 = evaluate(momentum_init, step)
    # (T - t)/T rather than 1 - t/T: exact 0 at t = T even when XLA divides by a reciprocal.
    t = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, float(total_steps))
    left = (float(total_steps) - t) / float(total_steps)
    return beta0 * left / (complement(momentum_init, step) + beta0 * left)

  return schedule
