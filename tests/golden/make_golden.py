"""PyTorch reference trajectories for the momclip_sgd parity tests, and the JAX side of them.

``python tests/golden/make_golden.py`` runs ``clip_grad_norm_`` -> ``clip_grad_value_`` ->
``torch.optim.SGD`` over the parity grid on two problems and writes ``momclip_sgd_torch.npz``
next to this file. ``--report`` prints the largest deviation of ``momclip_sgd`` from PyTorch
per configuration (live when torch is installed, else against the stored file).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "momclip_sgd_torch.npz")
STEPS = 100
LR = {"mlp": 0.1, "tree": 0.05}
HIDDEN, BATCH = 16, 64
TREE_SHAPES = {"a": (3, 4), "b": (5,), "c": ()}
MLP_NAMES = ("w1", "b1", "w2", "b2")
TREE_STEPS = (1, 2, 3, 10, 50, 100)  # steps whose params the tree problem stores
PROBLEMS = ("mlp", "tree")


def grid() -> list[dict[str, Any]]:
  """The parity grid, less what torch.optim.SGD rejects (Nesterov needs mu > 0 and d = 0)."""
  out = []
  for mu, d, nesterov, wd, max_norm, clip_value in itertools.product(
    (0.0, 0.9), (0.0, 0.5), (False, True), (0.0, 1e-2), (None, 0.5), (None, 0.1)
  ):
    if nesterov and (mu == 0 or d != 0):
      continue
    out.append(
      dict(
        momentum=mu,
        dampening=d,
        nesterov=nesterov,
        weight_decay=wd,
        max_norm=max_norm,
        clip_value=clip_value,
      )
    )
  return out


def key(cfg: dict[str, Any]) -> str:
  return (
    f"mu={cfg['momentum']:g} d={cfg['dampening']:g} nest={int(cfg['nesterov'])} "
    f"wd={cfg['weight_decay']:g} norm={cfg['max_norm']} value={cfg['clip_value']}"
  )


# Inputs: deterministic, and stored in the golden file as well.


def inputs() -> dict[str, np.ndarray]:
  """Initial params, the digits batch order and the tree problem's gradient stream."""
  rng = np.random.default_rng(0)
  out = {
    "mlp/init/w1": rng.normal(0, 1 / 8, (64, HIDDEN)),
    "mlp/init/b1": np.zeros(HIDDEN),
    "mlp/init/w2": rng.normal(0, 1 / 4, (HIDDEN, 10)),
    "mlp/init/b2": np.zeros(10),
    "mlp/perm": rng.permutation(1797).astype(np.int16),
  }
  scale = np.where(np.arange(STEPS) % 4 == 0, 3.0, 0.2)  # norms above and below the clip
  for name, shape in TREE_SHAPES.items():
    out[f"tree/init/{name}"] = rng.normal(0, 1, shape)
    out[f"tree/grads/{name}"] = rng.normal(0, 1, (STEPS, *shape)) * scale.reshape(
      (STEPS,) + (1,) * len(shape)
    )
  return {k: v.astype(np.int16 if k == "mlp/perm" else np.float32) for k, v in out.items()}


def digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  return (x / 16.0).astype(np.float32), y.astype(np.int32)


def batches(perm: np.ndarray) -> np.ndarray:
  """Row indices of each step's batch: consecutive slices of ``perm``, wrapping around."""
  idx = (np.arange(STEPS)[:, None] * BATCH + np.arange(BATCH)[None, :]) % len(perm)
  return perm.astype(np.int64)[idx]


def params0(data: dict[str, np.ndarray], problem: str) -> dict[str, np.ndarray]:
  names = MLP_NAMES if problem == "mlp" else tuple(TREE_SHAPES)
  return {n: data[f"{problem}/init/{n}"] for n in names}


# PyTorch side.


def torch_run(problem: str, cfg: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, Any]:
  """PyTorch's trajectory: ``{"params": {step: {name: array}}, "loss": array or None}``."""
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(1)
  init = params0(data, problem)
  names = list(init)
  ps = [torch.tensor(init[n], requires_grad=True) for n in names]
  opt = torch.optim.SGD(
    ps,
    lr=LR[problem],
    momentum=cfg["momentum"],
    dampening=cfg["dampening"],
    nesterov=cfg["nesterov"],
    weight_decay=cfg["weight_decay"],
  )
  if problem == "mlp":
    x, y = digits()
    x, y = torch.tensor(x), torch.tensor(y, dtype=torch.int64)
    rows = torch.tensor(batches(data["mlp/perm"]))
  record = range(1, STEPS + 1) if problem == "mlp" else TREE_STEPS
  out: dict[str, Any] = {"params": {}, "loss": []}
  for t in range(STEPS):
    opt.zero_grad()
    if problem == "mlp":
      w1, b1, w2, b2 = ps
      xb, yb = x[rows[t]], y[rows[t]]
      loss = F.cross_entropy(torch.tanh(xb @ w1 + b1) @ w2 + b2, yb)
      loss.backward()
      out["loss"].append(loss.item())
    else:
      for p, n in zip(ps, names, strict=True):
        p.grad = torch.tensor(data[f"tree/grads/{n}"][t])
    if cfg["max_norm"] is not None:
      torch.nn.utils.clip_grad_norm_(ps, cfg["max_norm"])
    if cfg["clip_value"] is not None:
      torch.nn.utils.clip_grad_value_(ps, cfg["clip_value"])
    opt.step()
    if t + 1 in record and (problem == "tree" or t + 1 == STEPS):
      out["params"][t + 1] = {n: p.detach().numpy().copy() for n, p in zip(names, ps, strict=True)}
  out["loss"] = np.array(out["loss"], np.float32) if out["loss"] else None
  return out


def torch_all(data: dict[str, np.ndarray]) -> dict[tuple[str, str], dict[str, Any]]:
  return {(pb, key(c)): torch_run(pb, c, data) for pb in PROBLEMS for c in grid()}


def _names(problem: str) -> tuple[str, ...]:
  return MLP_NAMES if problem == "mlp" else tuple(TREE_SHAPES)


def _steps(problem: str) -> tuple[int, ...]:
  return (STEPS,) if problem == "mlp" else TREE_STEPS


def write_golden(path: str = GOLDEN) -> None:
  """Stores the inputs and, per problem, one array of flattened params (config, step, value)."""
  data = inputs()
  results = torch_all(data)
  arrays = dict(data)
  keys = [key(c) for c in grid()]
  arrays["configs"] = np.array(keys)
  for pb in PROBLEMS:
    arrays[f"{pb}/params"] = np.stack(
      [
        [
          np.concatenate([results[(pb, k)]["params"][s][n].ravel() for n in _names(pb)])
          for s in _steps(pb)
        ]
        for k in keys
      ]
    )
  arrays["mlp/loss"] = np.stack([results[("mlp", k)]["loss"] for k in keys])
  import torch

  arrays["torch_version"] = np.array(torch.__version__)
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB, {len(arrays)} arrays)")


def load_golden(path: str = GOLDEN) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def golden_results(gold: dict[str, np.ndarray]) -> dict[tuple[str, str], dict[str, Any]]:
  """The stored trajectories in `torch_run`'s format."""
  keys = [str(k) for k in gold["configs"]]
  assert keys == [key(c) for c in grid()], "the golden file was made for another grid"
  out = {}
  for pb in PROBLEMS:
    shapes = {n: gold[f"{pb}/init/{n}"].shape for n in _names(pb)}
    for i, k in enumerate(keys):
      params = {}
      for j, s in enumerate(_steps(pb)):
        flat, tree, at = gold[f"{pb}/params"][i, j], {}, 0
        for n, shape in shapes.items():
          size = int(np.prod(shape))
          tree[n] = flat[at : at + size].reshape(shape)
          at += size
        params[s] = tree
      out[(pb, k)] = {"params": params, "loss": gold["mlp/loss"][i] if pb == "mlp" else None}
  return out


# JAX side: one compiled scan per structural group, hyperparameters traced.


@functools.cache
def _jax_runner(problem: str, nesterov: bool, max_norm: float | None, clip_value: float | None):
  import jax
  import jax.numpy as jnp
  import optax

  import optax_momclip as omc

  def run(init, stream, mu, d, wd):
    tx = omc.momclip_sgd(
      LR[problem],
      mu,
      max_norm=max_norm,
      max_value=clip_value,
      nesterov=nesterov,
      dampening=d,
      weight_decay=wd,
    )
    if problem == "mlp":
      xs, ys = stream

      def loss_fn(p, xb, yb):
        logits = jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

      def body(carry, batch):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, *batch)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (p, loss)

      (_, _), (ps, losses) = jax.lax.scan(body, (init, tx.init(init)), (xs, ys))
      return ps, losses

    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      return (p, s), p

    (_, _), ps = jax.lax.scan(body, (init, tx.init(init)), stream)
    return ps, None

  return jax.jit(run)


def jax_run(problem: str, cfg: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, Any]:
  """momclip_sgd's trajectory, in `torch_run`'s format."""
  import jax.numpy as jnp

  init = {n: jnp.asarray(v) for n, v in params0(data, problem).items()}
  if problem == "mlp":
    x, y = digits()
    rows = batches(data["mlp/perm"])
    stream: Any = (jnp.asarray(x[rows]), jnp.asarray(y[rows]))
  else:
    stream = {n: jnp.asarray(data[f"tree/grads/{n}"]) for n in TREE_SHAPES}
  runner = _jax_runner(problem, cfg["nesterov"], cfg["max_norm"], cfg["clip_value"])
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  ps, losses = runner(
    init, stream, f32(cfg["momentum"]), f32(cfg["dampening"]), f32(cfg["weight_decay"])
  )
  params = {s: {n: np.asarray(v[s - 1]) for n, v in ps.items()} for s in _steps(problem)}
  return {"params": params, "loss": None if losses is None else np.asarray(losses)}


def jax_all(data: dict[str, np.ndarray]) -> dict[tuple[str, str], dict[str, Any]]:
  return {(pb, key(c)): jax_run(pb, c, data) for pb in PROBLEMS for c in grid()}


# Comparison.

ATOL = 1e-6  # params that end near zero are compared absolutely below this scale


def deviation(ours: dict[str, Any], ref: dict[str, Any]) -> float:
  """Largest ``|ours - ref| / (|ref| + ATOL/RTOL)`` over every recorded param (an rtol)."""
  worst = 0.0
  for step, tree in ref["params"].items():
    for n, r in tree.items():
      o = ours["params"][step][n]
      worst = max(worst, float(np.max(np.abs(o - r) / (np.abs(r) + ATOL / 1e-5))))
  return worst


def deviations(ours, refs) -> Iterator[tuple[str, str, float]]:
  for (pb, k), ref in refs.items():
    yield pb, k, deviation(ours[(pb, k)], ref)


def report() -> None:
  data = inputs()
  try:
    refs, source = torch_all(data), "live torch"
  except ImportError:
    refs, source = golden_results(load_golden()), f"golden file {os.path.basename(GOLDEN)}"
  ours = jax_all(data)
  table: dict[str, dict[str, float]] = {}
  for pb, k, dev in deviations(ours, refs):
    table.setdefault(k, {})[pb] = dev
  print(f"momclip_sgd vs PyTorch ({source}), {STEPS} steps, float32;")
  print("largest |jax - torch| / (|torch| + 0.1), i.e. an rtol with atol 1e-6:")
  print(f"| {'configuration':<52} | {'mlp':>8} | {'tree':>8} |")
  print(f"|{'-' * 54}|{'-' * 10}|{'-' * 10}|")
  for k, row in table.items():
    print(f"| {k:<52} | {row['mlp']:8.1e} | {row['tree']:8.1e} |")
  print(f"max: {max(max(r.values()) for r in table.values()):.2e}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--report", action="store_true", help="print the deviation table only")
  args = parser.parse_args()
  if args.report:
    report()
  else:
    write_golden()
