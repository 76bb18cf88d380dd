"""A small Flax MLP trained by optax_momclip: on one device, on a mesh, or as one of two processes.

Run as a script it is one process of the two-process test: ``python scale_worker.py PORT ID OUT``.
"""

from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_momclip as omc

IN, HIDDEN, OUT, BATCH = 12, 24, 6, 40
STEPS = 4
MAX_NORM = 0.05  # far below the gradient norm, so the clip acts on every step


class MLP(nn.Module):
  """Two dense layers, tanh in between."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.tanh(nn.Dense(HIDDEN, name="dense1")(x))
    return nn.Dense(OUT, name="dense2")(x)


def data() -> tuple[np.ndarray, np.ndarray]:
  """The whole batch, as NumPy arrays (the same in every process)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH, IN)).astype(np.float32)
  y = rng.standard_normal((BATCH, OUT)).astype(np.float32) * 3.0
  return x, y


def init_params() -> Any:
  return MLP().init(jax.random.key(0), jnp.zeros((1, IN)))["params"]


def optimizer() -> optax.GradientTransformation:
  """Global-norm clip then heavy-ball momentum."""
  return omc.momclip_sgd(0.1, 0.9, max_norm=MAX_NORM)


def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(MLP().apply({"params": params}, x) - y))


def make_step(tx: optax.GradientTransformation) -> Any:
  def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def param_specs() -> dict[str, Any]:
  """Megatron-style model sharding: dense1 by output column, dense2 by input row."""
  return {
    "dense1": {"kernel": P(None, "model"), "bias": P("model")},
    "dense2": {"kernel": P("model", None), "bias": P()},
  }


def train_single() -> Any:
  """The reference: the whole batch on one device."""
  tx = optimizer()
  params = init_params()
  state = tx.init(params)
  x, y = data()
  step = jax.jit(make_step(tx))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params


def shard(mesh: jax.sharding.Mesh, tree: Any, specs: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


def sharded_step(mesh: jax.sharding.Mesh, tx: optax.GradientTransformation) -> Any:
  """The step jitted with params model-sharded and the batch data-sharded, params donated."""
  p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs())
  batch = NamedSharding(mesh, P("data", None))
  return jax.jit(
    make_step(tx),
    in_shardings=(p_sh, None, batch, batch),
    out_shardings=(p_sh, None),
    donate_argnums=(0, 1),
  )


def train_two_process(port: int, process_id: int) -> Any:
  """One of two processes: each feeds its half of the batch to a (data=2, model=2) mesh."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  # Each process's two devices form one row of the data axis: its half of the batch stays local.
  devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))).reshape(2, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "model"))
  tx = optimizer()
  params = shard(mesh, init_params(), param_specs())
  state = jax.jit(tx.init)(params)
  x, y = data()
  half = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)
  batch = NamedSharding(mesh, P("data", None))
  xs = jax.make_array_from_process_local_data(batch, x[half], (BATCH, IN))
  ys = jax.make_array_from_process_local_data(batch, y[half], (BATCH, OUT))
  step = sharded_step(mesh, tx)
  for _ in range(STEPS):
    params, state = step(params, state, xs, ys)
  replicated = NamedSharding(mesh, P())
  params = jax.jit(lambda p: p, out_shardings=replicated)(params)
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)


def main(argv: list[str]) -> None:
  port, process_id, out = int(argv[0]), int(argv[1]), argv[2]
  params = train_two_process(port, process_id)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(out, **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
