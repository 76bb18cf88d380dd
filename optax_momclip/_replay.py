"""Updating with a new state selected against the old one as each of its values is computed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

# For the benchmark, which measures both ways: False selects the finished results instead.
SELECT_AS_COMPUTED = True


def update_keeping_state(
  update: Callable[..., tuple[Any, Any]],
  skip: jax.Array,
  updates: Any,
  state: Any,
  params: Any,
  extra_args: dict[str, Any],
) -> tuple[Any, Any]:
  """``update(updates, state, params)``, with its state kept and its update ``-0.0`` on a skip.

  Selecting the finished results would leave XLA two readers of each old state
  buffer after the donated state has been overwritten in place: the select and
  the update, which is computed from the unselected new state. XLA:CPU copies
  every such buffer at the start of the step, which made a heavy-ball step 3.2
  times as slow. So ``update`` is replayed from its jaxpr, and each value of
  the new state is selected the moment it is computed: everything after it,
  the update included, reads the selected state, and each old buffer has one
  reader. On an applied step every selected value is the new one bit for bit,
  so the results are exactly those of ``update``; on a skipped step the state
  is the old one and the update ``-0.0``, whatever was computed.
  """
  if not isinstance(skip, jax.core.Tracer) or not SELECT_AS_COMPUTED:
    # Run eagerly, nothing is donated, and ``update`` may branch on concrete values.
    new_updates, new_state = update(updates, state, params, **extra_args)
    _check_same_structure(state, new_state)
    return _skipped_as_zero(skip, new_updates), jax.tree.map(
      lambda old, new: jnp.where(skip, old, new), state, new_state
    )
  closed, (shape_updates, shape_state) = jax.make_jaxpr(
    lambda u, s, p: update(u, s, p, **extra_args), return_shape=True
  )(updates, state, params)
  _check_same_structure(state, shape_state)
  n_updates = len(jax.tree.leaves(shape_updates))
  state_vars = closed.jaxpr.outvars[n_updates:]
  old_state = jax.tree.leaves(state)
  keep = _kept_variables(state_vars, old_state, jax.tree.leaves(shape_state))
  env = _replay(closed, jax.tree.leaves((updates, state, params)), keep, skip)
  read = lambda var: var.val if isinstance(var, jex_core.Literal) else env[var]
  new_state = []
  for var, old in zip(state_vars, old_state, strict=True):
    selected = isinstance(var, jex_core.Var) and keep.get(var) is old
    new_state.append(read(var) if selected else jnp.where(skip, old, read(var)))
  new_updates = [read(v) for v in closed.jaxpr.outvars[:n_updates]]
  return (
    _skipped_as_zero(skip, jax.tree.unflatten(jax.tree.structure(shape_updates), new_updates)),
    jax.tree.unflatten(jax.tree.structure(state), new_state),
  )


def _kept_variables(state_vars: list[Any], old: list[Any], new: list[Any]) -> dict[Any, Any]:
  """The jaxpr variables of the new state to select as computed, each with its old value.

  A variable returned in several fields is selected against the first field's
  old value as it is computed, and against each other field's at the end; so
  are literals and fields whose dtype or shape changes.
  """
  keep: dict[jex_core.Var, Any] = {}
  for var, o, n in zip(state_vars, old, new, strict=True):
    same_type = (np.shape(o), jnp.result_type(o)) == (n.shape, n.dtype)
    if isinstance(var, jex_core.Var) and same_type:
      keep.setdefault(var, o)
  return keep


def _replay(closed: Any, args: list[Any], keep: dict[Any, Any], skip: jax.Array) -> dict:
  """Binds each equation of ``closed`` again, selecting each variable of ``keep`` as written.

  As `jax.core.eval_jaxpr` does, each equation keeps its source and name
  scope; nested calls (``jit``, ``scan``, ``cond``, ``custom_vjp``,
  ``shard_map``, ``pallas_call``) are bound whole, so state they compute is
  selected when they return.
  """
  jaxpr = closed.jaxpr
  env: dict[jex_core.Var, Any] = {}

  def read(var: Any) -> Any:
    return var.val if isinstance(var, jex_core.Literal) else env[var]

  def write(var: jex_core.Var, value: Any) -> None:
    env[var] = jnp.where(skip, keep[var], value) if var in keep else value

  for var, value in zip(jaxpr.constvars, closed.consts, strict=True):
    write(var, value)
  for var, value in zip(jaxpr.invars, args, strict=True):
    write(var, value)
  for eqn in jaxpr.eqns:
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with (
      source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
      eqn.ctx.manager,
    ):
      out = eqn.primitive.bind(*map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params))
    out = out if eqn.primitive.multiple_results else [out]
    for var, value in zip(eqn.outvars, out, strict=True):
      write(var, value)
  return env


def _skipped_as_zero(skip: jax.Array, updates: Any) -> Any:
  # -0.0 is the identity of IEEE addition: p + (-0.0) == p bit for bit, -0.0 included.
  return jax.tree.map(lambda u: jnp.where(skip, jnp.array(-0.0, jnp.result_type(u)), u), updates)


def _check_same_structure(state: Any, new_state: Any) -> None:
  # Any: jaxlib ships no type stub for PyTreeDef, and mypy rejects comparing two.
  old_def: Any = jax.tree.structure(state)
  new_def: Any = jax.tree.structure(new_state)
  if new_def != old_def:
    raise ValueError(
      "skip_bad_steps: inner.update returned a state of another structure than its input: "
      f"{new_def} for {old_def}"
    )
