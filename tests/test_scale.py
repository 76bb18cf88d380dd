"""Scale: an 8-device 2-D mesh, shard_map, and two jax.distributed processes on one machine."""

import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scale_worker as sw
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_momclip as omc

_ALL_GATHER = re.compile(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*?\ball-gather(?:-start)?\(")


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _all_gathers(hlo: str) -> list[tuple[int, ...]]:
  """Output shapes of every all-gather in compiled HLO text."""
  return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _ALL_GATHER.findall(hlo)]


def _train_sharded(tx, mesh):
  params = sw.shard(mesh, sw.init_params(), sw.param_specs())
  state = jax.jit(tx.init)(params)
  x, y = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in sw.data())
  step = sw.sharded_step(mesh, tx)
  hlo = step.lower(params, state, x, y).compile().as_text()
  for _ in range(sw.STEPS):
    params, state = step(params, state, x, y)
  return params, hlo


def _param_sizes() -> set[int]:
  return {int(np.prod(a.shape)) for a in jax.tree.leaves(sw.init_params())}


def _concat_norm_clip(max_norm):
  """A deliberately bad clip (norm of the concatenated, flattened leaves): the negative control."""

  def update(g, state, params=None):
    del params
    norm = jnp.linalg.norm(jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]))
    return jax.tree.map(lambda x: x * jnp.minimum(1.0, max_norm / norm), g), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def test_mesh_training_matches_one_device_without_parameter_all_gather():
  mesh = _mesh()
  params, hlo = _train_sharded(sw.optimizer(), mesh)
  want = sw.train_single()
  # The model really is sharded: dense1's kernel is split by column over "model".
  kernel = params["dense1"]["kernel"]
  assert kernel.sharding.spec == P(None, "model")
  assert kernel.addressable_shards[0].data.shape == (sw.IN, sw.HIDDEN // 2)
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-7)
  # Training moved the params, so the comparison above is not between two initialisations.
  init = jax.tree.leaves(sw.init_params())
  assert all(
    np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    for a, b in zip(jax.tree.leaves(want), init, strict=True)
  )
  sizes = _param_sizes()
  gathered = [s for s in _all_gathers(hlo) if int(np.prod(s)) in sizes]
  assert not gathered, f"parameter-sized all-gathers in the compiled step: {gathered}"


def test_all_gather_detector_catches_a_gathering_clip():
  """The HLO check above can fail: a norm of concatenated leaves gathers the gradients."""
  tx = optax.chain(_concat_norm_clip(sw.MAX_NORM), optax.trace(0.9), optax.scale(-0.1))
  _, hlo = _train_sharded(tx, _mesh())
  sizes = _param_sizes()
  assert any(int(np.prod(s)) in sizes for s in _all_gathers(hlo)), _all_gathers(hlo)


def _tree(seed):
  k = jax.random.split(jax.random.key(seed), 3)
  return {
    "a": jax.random.normal(k[0], (8, 5)) * 3.0,
    "b": jax.random.normal(k[1], (16,)),
    "c": jax.random.normal(k[2], (8, 2, 3)) * 0.5,
  }


@pytest.mark.parametrize("axes", [("i",), ("data", "model")], ids=["1d", "2d"])
def test_shard_map_axis_name_gives_the_global_norm(axes):
  devices = np.array(jax.devices()[:8]).reshape((8,) if len(axes) == 1 else (4, 2))
  mesh = Mesh(devices, axes)
  axis_name = axes[0] if len(axes) == 1 else axes
  tree = _tree(0)
  spec = P(axes)  # every leaf split along its first axis over all mesh axes
  tx = omc.clip_by_global_norm(1.0, axis_name=axis_name)

  def local(t):
    norms = [omc.global_norm(t, ord=o, axis_name=axis_name) for o in (1, 2, np.inf)]
    local_norm = omc.global_norm(t)
    u, s = tx.update(t, tx.init(t))
    return jnp.stack([*norms, local_norm])[None], u, s.grad_norm[None]

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=(P(axes), spec, P(axes))))
  norms, updates, state_norm = f(tree)
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
  want = [np.abs(flat).sum(), np.sqrt((flat**2).sum()), np.abs(flat).max()]
  np.testing.assert_allclose(np.asarray(norms)[:, :3], np.tile(want, (8, 1)), rtol=1e-6)
  # Without axis_name each shard sees only its own part: the reduction is what makes it global.
  assert np.all(np.asarray(norms)[:, 3] < want[1] * 0.9)
  np.testing.assert_allclose(np.asarray(state_norm), want[1], rtol=1e-6)
  ref = jax.tree.map(lambda x: x * (1.0 / want[1]), tree)
  for got, r in zip(jax.tree.leaves(updates), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(r), rtol=1e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  env.pop("XLA_FLAGS", None)
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale_worker.py")
  outs = [tmp_path / f"p{i}.npz" for i in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, worker, str(port), str(i), str(outs[i])],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=150)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{logs[i][-3000:]}"
  want = {
    jax.tree_util.keystr(k): np.asarray(v)
    for k, v in jax.tree_util.tree_leaves_with_path(sw.train_single())
  }
  for out in outs:
    got = np.load(out)
    assert sorted(got.files) == sorted(want)
    for k, v in want.items():
      np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
