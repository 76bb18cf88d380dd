"""Un-jitted calls of an update, run as one compiled step once the transformation is reused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_momclip import _validation

Update = Callable[..., tuple[Any, Any]]


def _as_arrays(tree: Any) -> Any:
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), tree)


def _traced(tree: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _arrays_only(tree: Any) -> bool:
  return all(isinstance(x, jax.Array | int | float | complex) for x in jax.tree.leaves(tree))


def compiled_when_reused(fn: str, update_fn: Update, *, passes_extra_args: bool = False) -> Update:
  """``update_fn``, whose eager calls from the second on run under one cached ``jax.jit``.

  Python numbers among the updates and params become arrays first, so every
  transformation accepts them as leaves. Called outside ``jit``, an update
  would dispatch each of its small array operations on its own, tens per
  leaf; compiled, a call is one dispatch. The first call runs as written, so
  a transformation built anew for every step (as ``optax.inject_hyperparams``
  does when not jitted) never waits for a compile; op by op, it can round
  differently from the compiled calls in the last bit (XLA fuses and
  reorders arithmetic), as optax's eager and jitted updates do. Calls under a trace
  (``jit``, ``vmap``, ``grad``, ``scan``) run as written and are compiled with
  the caller's step.

  Every call first refuses integer and boolean gradients (see
  `_validation.check_gradients`).

  Args:
    fn: the public name of the transformation, for error messages.
    update_fn: ``update(updates, state, params=None, **extra_args)``.
    passes_extra_args: ``update_fn`` reads its extra arguments (a wrapper
      passing them on); they then enter the compiled call, which is skipped
      when one is not an array or a number. Otherwise they are dropped there.
      A wrapper whose inner update cannot be traced runs as written.
  """
  compiled: Update | None = None
  reused = traceable = False

  def update(updates: Any, opt_state: Any, params: Any = None, **extra_args: Any) -> Any:
    nonlocal compiled, reused, traceable
    _validation.check_gradients(fn, updates)
    updates, params = _as_arrays(updates), _as_arrays(params)
    first, reused = not reused, True
    if (
      first
      or (compiled is not None and not traceable)
      or _traced((updates, opt_state, params, extra_args))
      or (passes_extra_args and not _arrays_only(extra_args))
    ):
      return update_fn(updates, opt_state, params, **extra_args)
    if compiled is None:
      compiled, traceable = jax.jit(update_fn), True
    extra = extra_args if passes_extra_args else {}
    try:
      return compiled(updates, opt_state, params, **extra)
    except jax.errors.JAXTypeError:
      traceable = False  # an inner transformation that needs concrete values
      return update_fn(updates, opt_state, params, **extra_args)

  return update
