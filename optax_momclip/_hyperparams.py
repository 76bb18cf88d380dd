"""Hyperparameters, evaluated in the step's dtype: numbers, 0-d arrays of any dtype, schedules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_momclip import _validation

ScheduleOrScalar = float | jax.Array | Callable[[jax.Array], jax.Array]
Step = jax.Array | None  # None for a transformation without a step counter (and schedules)


def evaluate(value: ScheduleOrScalar, step: Step, dtype: Any = jnp.float32) -> jax.Array:
  """``value``, or a schedule's ``value(step)``, as a 0-d array of ``dtype``.

  ``dtype`` is float32, or float64 for float64 updates under x64, so a Python
  ``0.1`` is rounded once, to the precision the step is computed in; a bf16
  value injected by ``optax.inject_hyperparams`` is widened exactly.
  """
  if callable(value):
    assert step is not None, "a schedule needs a step counter"
    return jnp.asarray(value(step), dtype)
  return jnp.asarray(value, dtype)


def complement(value: ScheduleOrScalar, step: Step, dtype: Any = jnp.float32) -> jax.Array:
  """``1 - value`` as a 0-d array of ``dtype``, like `evaluate`.

  A concrete number is subtracted in float64 before rounding (as optax and
  PyTorch do with Python floats), so ``1 - 0.8`` is the float32 nearest 0.2,
  not ``1 - float32(0.8)``.
  """
  if not callable(value):
    v = _validation.concrete_float(value)
    if v is not None:
      return jnp.asarray(1.0 - v, dtype)
  return 1 - evaluate(value, step, dtype)


def bound(value: ScheduleOrScalar, step: Step, dtype: Any = jnp.float32) -> jax.Array:
  """A bound (``max_norm``, a threshold) like `evaluate`; a negative or NaN value reads 0.

  Only a traced value can be negative or NaN (a schedule's, or one injected
  by ``optax.inject_hyperparams``: concrete ones are checked at
  construction). Reading it as 0 zeroes what it bounds rather than flipping
  the update's sign or switching the clip off.
  """
  x = evaluate(value, step, dtype)
  return jnp.where(x >= 0, x, jnp.zeros_like(x))
