"""Trains every (arm, learning rate, seed) of a task side by side in one jitted scan."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optax_momclip as omc
from optax_momclip.cli.tasks import Task


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer configuration of the demo.

  Attributes:
    name: the key in the JSON and the row label in the tables.
    make: ``learning_rate -> optax transformation``; the learning rate is a
      traced scalar (runs at several learning rates are vmapped).
  """

  name: str
  make: Callable[[Any], optax.GradientTransformation]


@dataclasses.dataclass
class Runs:
  """Results of ``A`` arms x ``G`` learning rates x ``S`` seeds, as NumPy arrays.

  Attributes:
    loss: training loss per step, f32[steps, A, G, S].
    grad_norm: global norm of the raw (pre-clip) gradient per step, f32[steps, A, G, S].
    eval_steps: steps after which the held-out accuracy was measured, i32[E].
    accuracy: held-out accuracy after each of ``eval_steps``, f32[E, A, G, S].
    params_finite: whether every final parameter is finite, bool[A, G, S].
    final_metrics: per arm, `optax_momclip.metrics` of its final optimizer
      state, each value f[G, S].
  """

  loss: np.ndarray
  grad_norm: np.ndarray
  eval_steps: np.ndarray
  accuracy: np.ndarray
  params_finite: np.ndarray
  final_metrics: list[dict[str, np.ndarray]]


def _over_lrs_and_seeds(f: Callable[..., Any]) -> Callable[..., Any]:
  """``f(lr, *trees)`` vmapped over a learning-rate axis, then a seed axis of the trees."""
  return jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=0)


def _batched_metrics(state: Any) -> dict[str, np.ndarray]:
  """`metrics` of a state stacked over learning rates and seeds, each value f[G, S]."""
  if not jax.tree.leaves(state):
    return {}
  return {k: np.asarray(v) for k, v in jax.vmap(jax.vmap(omc.metrics))(state).items()}


def train(
  task: Task,
  arms: list[Arm],
  lrs: np.ndarray,
  *,
  seeds: int,
  steps: int,
  evals: int,
  on_chunk: Callable[[int], None] | None = None,
) -> Runs:
  """Trains ``task`` with every arm at every learning rate in ``lrs[a]`` from ``seeds`` seeds.

  Each seed fixes an initialisation and a data stream that every arm and
  learning rate shares, so arms differ only by their optimizer. Steps run in a
  ``lax.scan``, ``evals`` chunks of ``steps // evals`` steps, each chunk one
  call of a single compiled function with donated buffers; ``on_chunk(n)`` is
  called after each with the number of steps done.

  Args:
    task: the problem.
    arms: the optimizer configurations.
    lrs: learning rates, f32[A, G]: arm ``a`` runs at each of ``lrs[a]``.
    seeds: runs per (arm, learning rate).
    steps: training steps per run, a multiple of ``evals``.
    evals: how many times the held-out accuracy is measured.
    on_chunk: progress callback.

  Returns:
    The per-step and per-evaluation results.
  """
  if steps % evals:
    raise ValueError(f"train: steps ({steps}) must be a multiple of evals ({evals})")
  chunk = steps // evals
  seed_keys = jax.random.split(jax.random.key(0), seeds)
  data_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(seed_keys)
  params0 = jax.vmap(task.init)(seed_keys)  # [S, ...]
  params0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (*lrs.shape, *x.shape)), params0)
  start, advance = _compiled_steps(task, arms, jnp.asarray(lrs, jnp.float32), data_keys, chunk)
  carry = start(params0)
  losses, norms, accs = [], [], []
  for c in range(evals):
    carry, (loss, gnorm), acc = advance(carry, jnp.asarray(c * chunk, jnp.int32))
    losses.append(loss)
    norms.append(gnorm)
    accs.append(acc)
    if on_chunk is not None:
      jax.block_until_ready(acc)
      on_chunk((c + 1) * chunk)
  finite = jax.tree.reduce(
    jnp.logical_and,
    jax.tree.map(lambda x: jnp.all(jnp.isfinite(x), axis=tuple(range(3, x.ndim))), carry[0]),
  )
  return Runs(
    loss=np.concatenate([np.asarray(x) for x in losses]),
    grad_norm=np.concatenate([np.asarray(x) for x in norms]),
    eval_steps=np.arange(1, evals + 1) * chunk,
    accuracy=np.stack([np.asarray(x) for x in accs]),
    params_finite=np.asarray(finite),
    final_metrics=[_batched_metrics(st) for st in carry[1]],
  )


def _compiled_steps(
  task: Task, arms: list[Arm], lr_table: jax.Array, data_keys: jax.Array, chunk: int
) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """``start(params) -> carry`` and ``advance(carry, first_step)``, ``chunk`` steps, jitted."""

  def init_states(params: Any) -> tuple[Any, ...]:
    return tuple(
      _over_lrs_and_seeds(lambda lr, p, arm=arm: arm.make(lr).init(p))(
        lr_table[a], jax.tree.map(lambda x, a=a: x[a], params)
      )
      for a, arm in enumerate(arms)
    )

  def step(carry: tuple[Any, Any], i: jax.Array) -> tuple[tuple[Any, Any], Any]:
    params, states = carry
    batch = jax.vmap(task.batch, in_axes=(0, None))(data_keys, i)  # [S, ...]
    per_seed = jax.vmap(jax.value_and_grad(task.loss), in_axes=(0, 0))
    loss, grads = jax.vmap(jax.vmap(per_seed, in_axes=(0, None)), in_axes=(0, None))(params, batch)
    gnorm = jax.vmap(jax.vmap(jax.vmap(omc.global_norm)))(grads)
    new_params, new_states = [], []
    for a, arm in enumerate(arms):
      pick = lambda t, a=a: jax.tree.map(lambda x: x[a], t)

      def update(lr: Any, gsp: tuple[Any, Any, Any], arm: Arm = arm) -> tuple[Any, Any]:
        g, s, p = gsp
        u, s = arm.make(lr).update(g, s, p)
        return optax.apply_updates(p, u), s

      p, s = _over_lrs_and_seeds(update)(lr_table[a], (pick(grads), states[a], pick(params)))
      new_params.append(p)
      new_states.append(s)
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *new_params)
    return (params, tuple(new_states)), (loss, gnorm)

  accuracy = jax.vmap(jax.vmap(jax.vmap(task.accuracy)))

  def advance(carry: tuple[Any, Any], first: jax.Array) -> tuple[Any, Any, jax.Array]:
    carry, logs = lax.scan(step, carry, first + jnp.arange(chunk))
    return carry, logs, accuracy(carry[0])

  start = jax.jit(lambda params: (params, init_states(params)))
  return start, jax.jit(advance, donate_argnums=0)
