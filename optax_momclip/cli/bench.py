"""`python -m optax_momclip bench`: the performance targets, measured side by side.

The targets (ratios measured in one process; absolute times mean little on a shared CPU):
- the fused step (`momclip_sgd`: global-norm clip + heavy ball) takes no longer than optax's
  `clip_by_global_norm` + `trace` + `scale` at 16M and 64M float32 and 16M bfloat16 params,
  and reaches 0.9 of what the backend allows of the memory roofline (24 bytes per float32
  param): on XLA:CPU, which writes the momentum and reads it back (28 bytes), 0.9 × 24/28;
- it takes at most 0.7 of PyTorch's `clip_grad_norm_` + `SGD(momentum)` (foreach, same threads);
- the statistics kept in a clip's state cost at most 2%, `autoclip`, `zclip` and every
  `skip_bad_steps` mode at most 5% over a plain global-norm clip;
- MARS costs at most one extra buffer's traffic (a read and a write of a parameter-sized
  float32 buffer) over the AdamW it feeds; AdaGC over Adam and cautious masking over AdamW
  at most 10%;
- a step on a tree of many distinct leaf shapes compiles in at most 1.25× optax's time;
- an eager (un-jitted) update takes at most 3× the time of optax's nearest equivalent.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_momclip as omc
from optax_momclip import _norms, _replay, _scaling
from optax_momclip._scaling import Scale

LEARNING_RATE = 0.1
MOMENTUM = 0.9
MAX_NORM = 1.0
LEAVES = 8  # equal 2-D leaves per benchmark tree; sizes are multiples of LEAVES * 256
BYTES_PER_PARAM = 6  # itemsizes the fused step must move: g read twice, p and b read and written
KERNEL_BYTES_PER_PARAM = 3  # itemsizes the bandwidth probe moves: b and g read, b written
MiB = 2**20


# ----------------------------------------------------------------------------------------------
# The optimizers under test.


def ours(max_norm: float = MAX_NORM) -> tuple[str, optax.GradientTransformation]:
  """`momclip_sgd` with a global-norm clip and heavy-ball momentum."""
  return "momclip_sgd", omc.momclip_sgd(LEARNING_RATE, MOMENTUM, max_norm=max_norm)


def optax_chain(max_norm: float = MAX_NORM) -> optax.GradientTransformation:
  """The equivalent plain optax chain."""
  return optax.chain(
    optax.clip_by_global_norm(max_norm), optax.trace(MOMENTUM), optax.scale(-LEARNING_RATE)
  )


def _omc_chain(clip: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.chain(clip, optax.trace(MOMENTUM), optax.scale(-LEARNING_RATE))


def stats_free_clip(max_norm: float = MAX_NORM) -> optax.GradientTransformation:
  """`clip_by_global_norm` without its statistics: same norm and scale, empty state."""

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    del params
    norm = _norms.global_norms([updates])[0]  # as clip_by_global_norm: exact beyond float32 too
    scale: Scale = _scaling.range_scale(norm, jnp.float32(max_norm))
    return _scaling.scale_tree(updates, scale), state

  return optax.GradientTransformation(init_fn, update_fn)


def _traced_with(
  tx: optax.GradientTransformation, module: Any = _norms, **switches: bool
) -> optax.GradientTransformation:
  """``tx`` whose update is traced with a library module's benchmark switches set."""

  def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    saved = {k: getattr(module, k) for k in switches}
    for k, v in switches.items():
      setattr(module, k, v)
    try:
      return tx.update(updates, state, params)
    finally:
      for k, v in saved.items():
        setattr(module, k, v)

  return optax.GradientTransformation(tx.init, update_fn)


CONTROL = "clip_by_global_norm (control)"
NO_RESCUE = "clip_by_global_norm, no rescue branch"
SELECT_AFTER = "skip_bad_steps, results selected after"


def overhead_variants() -> dict[str, Callable[[], optax.GradientTransformation]]:
  """The transformations whose cost is compared with a plain global-norm clip (+ momentum)."""
  variants: dict[str, Callable[[], optax.GradientTransformation]] = {
    "clip_by_global_norm": lambda: _omc_chain(omc.clip_by_global_norm(MAX_NORM)),
    "stats-free clip": lambda: _omc_chain(stats_free_clip(MAX_NORM)),
    # The same transformation again: its "overhead" is the noise floor of this run.
    CONTROL: lambda: _omc_chain(omc.clip_by_global_norm(MAX_NORM)),
  }
  # The one conditional left, compiled out: what its host round trip costs (on a GPU).
  variants[NO_RESCUE] = lambda: _traced_with(
    _omc_chain(omc.clip_by_global_norm(MAX_NORM)), RESCUE_OUT_OF_RANGE=False
  )
  variants["autoclip"] = lambda: _omc_chain(omc.autoclip())
  variants["zclip"] = lambda: _omc_chain(omc.zclip())
  variants["skip_bad_steps"] = lambda: omc.skip_bad_steps(
    _omc_chain(omc.clip_by_global_norm(MAX_NORM))
  )
  # What selecting each new-state value as it is computed saves against selecting after.
  variants[SELECT_AFTER] = lambda: _traced_with(
    omc.skip_bad_steps(_omc_chain(omc.clip_by_global_norm(MAX_NORM))),
    _replay,
    SELECT_AS_COMPUTED=False,
  )
  guarded = lambda **kw: omc.skip_bad_steps(_omc_chain(omc.clip_by_global_norm(MAX_NORM)), **kw)
  variants["skip_bad_steps(z_threshold=6)"] = lambda: guarded(z_threshold=6.0)
  variants["skip_bad_steps(window=128)"] = lambda: guarded(z_threshold=6.0, window=128)
  variants["skip_bad_steps(loss and norm, window=128)"] = lambda: _with_loss(
    guarded(z_threshold=6.0, window=128, spike_on="either", std="sample", record_spikes=True)
  )
  variants["skip_bad_steps(loss and norm, EMA)"] = lambda: _with_loss(
    guarded(z_threshold=6.0, spike_on="either")
  )
  variants["zclip(mode='percentile')"] = lambda: _omc_chain(omc.zclip(mode="percentile"))
  variants["zclip(clip_option='mean', record_spikes=False)"] = lambda: _omc_chain(
    omc.zclip(clip_option="mean", record_spikes=False)
  )
  return variants


def _with_loss(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` given a loss (a constant here: the cost is the same) as ``value``, every step."""

  def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    return optax.with_extra_args_support(tx).update(updates, state, params, value=jnp.float32(2.5))

  return optax.GradientTransformation(tx.init, update_fn)


PLAIN = " (plain JAX)"


def method_variants() -> dict[str, tuple[Callable[[], optax.GradientTransformation], str]]:
  """MARS, AdaGC and cautious masking, each ``(maker, the optimizer it feeds or wraps)``.

  Beside each, the same arithmetic in a few lines of plain JAX (no statistics, no
  rescue, no checks): what the backend's compiler makes of the method itself.
  """
  adamw = lambda: optax.adamw(3e-3, b1=0.95, b2=0.99, weight_decay=0.01)
  adam = lambda: optax.adam(1e-3)
  return {
    "adamw": (adamw, ""),
    "mars + adamw": (lambda: optax.chain(omc.mars(), adamw()), "adamw"),
    "mars + adamw" + PLAIN: (lambda: optax.chain(plain_mars(), adamw()), "adamw"),
    "cautious(adamw)": (lambda: omc.cautious(adamw()), "adamw"),
    "cautious(adamw)" + PLAIN: (lambda: plain_cautious(adamw()), "adamw"),
    "adam": (adam, ""),
    "adagc + adam": (lambda: optax.chain(omc.adagc(), adam()), "adam"),
    "per-tensor clip + adam" + PLAIN: (lambda: optax.chain(plain_clips(False), adam()), "adam"),
    "per-tensor clip on the total norm + adam" + PLAIN: (
      lambda: optax.chain(plain_clips(True), adam()),
      "adam",
    ),
  }


def plain_mars(gamma: float = 0.025, beta1: float = 0.95) -> optax.GradientTransformation:
  """``c = g + γβ₁/(1−β₁)·(g − g_prev)``, divided by ``max(‖c‖, 1)`` per tensor."""
  weight = gamma * beta1 / (1 - beta1)

  def update_fn(grads: Any, previous: Any, params: Any = None) -> tuple[Any, Any]:
    del params
    c = jax.tree.map(lambda g, p: g + weight * (g - p), grads, previous)
    return jax.tree.map(lambda x: x / jnp.maximum(jnp.linalg.norm(x), 1.0), c), grads

  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), update_fn)


def plain_cautious(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner``'s update ``u`` kept where ``u·g < 0``, times ``n/(kept + 1)`` per tensor."""

  def mask(u: jax.Array, g: jax.Array) -> jax.Array:
    keep = u * g < 0
    return jnp.where(keep, u * (u.size / (jnp.sum(keep) + 1)), 0.0)

  def update_fn(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    u, state = inner.update(grads, state, params)
    return jax.tree.map(mask, u, grads), state

  return optax.GradientTransformation(inner.init, update_fn)


def plain_clips(on_total: bool) -> optax.GradientTransformation:
  """Each tensor divided by ``max(‖g‖, 1)``.

  With ``on_total``, every factor also depends on the norm of all tensors
  (through a select that never changes it), as AdaGC's warm-up clip and the one
  rescue branch make every factor wait for every norm.
  """

  def update_fn(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    del params
    norms = jax.tree.map(jnp.linalg.norm, grads)
    total = jnp.sqrt(sum(jnp.square(n) for n in jax.tree.leaves(norms)))
    gate = jnp.where(total > jnp.inf, 0.0, 1.0) if on_total else 1.0
    return jax.tree.map(lambda g, n: g * (gate / jnp.maximum(n, 1.0)), grads, norms), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


# ----------------------------------------------------------------------------------------------
# Runners: each performs `inner` steps and blocks until they are done.


def make_tree(n: int, dtype: Any, seed: int) -> list[jax.Array]:
  """``LEAVES`` equal ``(n / LEAVES / 256, 256)`` leaves of standard normal values."""
  rows = max(n // (LEAVES * 256), 1)
  keys = jax.random.split(jax.random.PRNGKey(seed), LEAVES)
  return [jax.random.normal(k, (rows, 256), jnp.float32).astype(dtype) for k in keys]


def jit_step(tx: optax.GradientTransformation) -> Any:
  """One optimizer step ``(params, state, grads) -> (params, state)``, params and state donated."""

  def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def roofline_kernel() -> Callable[..., Any]:
  """The bandwidth probe: ``b = 0.9 b + g`` in place (STREAM's triad; 3 itemsizes per param).

  One fused elementwise kernel per leaf, b donated; ``params`` passes through
  untouched so the probe runs in the same harness as the optimizers. The
  arithmetic is float32 with one rounding to the leaf dtype, as in a fused
  optimizer kernel: bf16 arithmetic would round after each operation, and on
  XLA:CPU those conversions, not memory, would set the probe's speed.
  """

  def triad(b: jax.Array, g: jax.Array) -> jax.Array:
    return (b.astype(jnp.float32) * 0.9 + g.astype(jnp.float32)).astype(b.dtype)

  def kernel(params: Any, buf: Any, grads: Any) -> tuple[Any, Any]:
    return params, jax.tree.map(triad, buf, grads)

  return jax.jit(kernel, donate_argnums=(0, 1))


class JaxRunner:
  """A donated, jitted step applied again and again to its own params and state."""

  def __init__(self, fn: Callable[..., Any], params: Any, state: Any, grads: Any):
    self.fn, self.params, self.state, self.grads = fn, params, state, grads

  def __call__(self, inner: int) -> None:
    p, s = self.params, self.state
    for _ in range(inner):
      p, s = self.fn(p, s, self.grads)
    jax.block_until_ready((p, s))
    self.params, self.state = p, s

  def reallocate(self) -> None:
    """Moves params and state to freshly allocated buffers (see `time_interleaved`)."""
    self.params, self.state = jax.block_until_ready(
      jax.tree.map(jnp.copy, (self.params, self.state))
    )


def jax_runner(tx: optax.GradientTransformation, params: Any, grads: Any) -> JaxRunner:
  params = jax.tree.map(jnp.copy, params)
  # A state whose fields share one array (one zero for several counters) cannot be donated.
  state = jax.tree.map(jnp.copy, tx.init(params))
  return JaxRunner(jit_step(tx), params, state, grads)


def kernel_runner(params: Any, grads: Any) -> JaxRunner:
  params = jax.tree.map(jnp.copy, params)
  return JaxRunner(roofline_kernel(), params, jax.tree.map(jnp.zeros_like, params), grads)


class TorchRunner:
  """``clip_grad_norm_(foreach=True)`` then ``SGD(momentum, foreach=True).step()``.

  On ``device`` (see `torch_device`); on a GPU each call waits for its steps to finish,
  as `JaxRunner` does, so both are timed to completion.
  """

  def __init__(self, params: Any, grads: Any, threads: int, device: str = "cpu"):
    import torch  # optional: never a library dependency

    torch.set_num_threads(threads)
    self.torch, self.device = torch, device

    def to_torch(x: jax.Array) -> Any:
      t = torch.from_numpy(np.array(x.astype(jnp.float32)))
      return t.to(device=device, dtype=getattr(torch, jnp.dtype(x.dtype).name))

    self.params = [torch.nn.Parameter(to_torch(p)) for p in params]
    for p, g in zip(self.params, grads, strict=True):
      p.grad = to_torch(g)
    self.opt = torch.optim.SGD(self.params, lr=LEARNING_RATE, momentum=MOMENTUM, foreach=True)

  def __call__(self, inner: int) -> None:
    for _ in range(inner):
      self.torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)
      self.opt.step()
    if self.device != "cpu":
      self.torch.cuda.synchronize()

  def reallocate(self) -> None:
    """Moves params, grads and momentum buffers to freshly allocated memory."""
    for p in self.params:
      p.data = p.data.clone()
      if p.grad is not None:
        p.grad = p.grad.clone()
      state = self.opt.state.get(p, {})
      if state.get("momentum_buffer") is not None:
        state["momentum_buffer"] = state["momentum_buffer"].clone()


def torch_device() -> str:
  """Where PyTorch runs beside JAX: ``"cuda"`` when JAX runs on a GPU torch can use, else CPU.

  PyTorch on the CPU against JAX on a GPU would compare two machines, not two optimizers.
  """
  import torch

  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def time_interleaved(
  runners: dict[str, Callable[[int], None]], *, repeats: int, warmup: int, min_sample_s: float
) -> dict[str, list[float]]:
  """Seconds per step of each runner: ``repeats`` samples, variants interleaved in each round.

  Each runner is warmed up (compiling) ``warmup`` times; then each runner's
  number of steps per sample is set so its sample lasts about
  ``min_sample_s`` (a count set by the slowest variant left the fast ones a
  few steps per sample, dominated by the after-effects of the variant before).
  Each sample follows one untimed step of the same runner, which absorbs
  those after-effects (caches, memory the previous variant freed). Each
  round visits the variants in a fresh random order, so a burst of load from
  elsewhere falls on all of them alike and no variant always follows the
  same one. Halfway through,
  every runner moves its buffers to fresh memory in reverse order of
  creation: where a buffer lands (pages reused from an earlier size, or fresh
  ones) changes a kernel's speed by several percent, and this spreads that
  effect over all variants instead of letting it favour one.
  """
  first = {}
  for name, run in runners.items():
    for _ in range(warmup):
      t = time.perf_counter()
      run(1)
      first[name] = time.perf_counter() - t
  inner = {k: max(1, int(np.ceil(min_sample_s / max(v, 1e-6)))) for k, v in first.items()}
  names = list(runners)
  samples: dict[str, list[float]] = {name: [] for name in names}
  rng = np.random.default_rng(0)
  for r in range(repeats):
    if r == repeats // 2:
      for name in reversed(names):
        getattr(runners[name], "reallocate", lambda: None)()
    for name in rng.permutation(names):
      runners[name](1)
      t = time.perf_counter()
      runners[name](inner[name])
      samples[name].append((time.perf_counter() - t) / inner[name])
  return samples


def compile_seconds(tx: optax.GradientTransformation, params: Any, grads: Any) -> float:
  """Wall time to trace, lower and compile one donated step of ``tx`` (a fresh jit each call)."""
  state = tx.init(params)
  t = time.perf_counter()
  jit_step(tx).lower(params, state, grads).compile()
  return time.perf_counter() - t


def compile_tree(leaves: int) -> list[jax.Array]:
  """``leaves`` leaves of distinct shapes (as a real model's are), 128 to 23K elements each."""
  return [jnp.ones((8 + i, 16 + (7 * i) % 61), jnp.float32) * (i + 1) for i in range(leaves)]


def eager_cases() -> dict[str, tuple[Callable[[], optax.GradientTransformation], str]]:
  """Every transformation with optax's nearest equivalent: its eager time is compared to that."""
  return {
    "clip_by_value": (lambda: omc.clip_by_value(0.5), "clip"),
    "clip_by_norm": (lambda: omc.clip_by_norm(1.0), "clip"),
    "clip_by_global_norm": (lambda: omc.clip_by_global_norm(1.0), "clip"),
    "adaptive_grad_clip": (lambda: omc.adaptive_grad_clip(0.1), "clip"),
    "autoclip": (lambda: omc.autoclip(), "clip"),
    "zclip": (lambda: omc.zclip(), "clip"),
    "adagc": (lambda: omc.adagc(), "clip"),
    "mars": (lambda: omc.mars(), "clip"),
    "skip_bad_steps": (
      lambda: omc.skip_bad_steps(omc.clip_by_global_norm(1.0), z_threshold=3.0),
      "clip",
    ),
    "heavy_ball": (lambda: omc.heavy_ball(0.9), "trace"),
    "ema_momentum": (lambda: omc.ema_momentum(0.9), "trace"),
    "qhm": (lambda: omc.qhm(), "trace"),
    "aggmo": (lambda: omc.aggmo(), "trace"),
    "clipped_momentum": (lambda: omc.clipped_momentum(1.0), "chain"),
    "normalized_momentum": (lambda: omc.normalized_momentum(), "chain"),
    "momclip_sgd": (lambda: omc.momclip_sgd(0.1, max_norm=1.0), "chain"),
    "cautious": (lambda: omc.cautious(omc.momclip_sgd(0.1, 0.9, max_norm=1.0)), "chain"),
  }


EAGER_NAMES = {
  "clip": "optax.clip_by_global_norm",
  "trace": "optax.trace",
  "chain": "clip_by_global_norm + trace + scale",
}
EAGER_ANCHORS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "clip": lambda: optax.clip_by_global_norm(1.0),
  "trace": lambda: optax.trace(0.9),
  "chain": lambda: optax_chain(),
}


def eager_tree() -> dict[str, Any]:
  """A small model's parameters: a dense kernel and bias and a scalar."""
  return {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)), "scale": jnp.ones(())}


class EagerRunner:
  """Un-jitted updates of one transformation, each waited for."""

  def __init__(self, tx: optax.GradientTransformation):
    self.tx, self.params = tx, eager_tree()
    self.grads = jax.tree.map(lambda x: 2.0 * x, self.params)
    self.state = tx.init(self.params)

  def __call__(self, inner: int) -> None:
    for _ in range(inner):
      jax.block_until_ready(self.tx.update(self.grads, self.state, self.params))


# ----------------------------------------------------------------------------------------------
# The benchmark.


@dataclasses.dataclass
class Config:
  sizes: tuple[int, ...]
  bf16_size: int
  overhead_size: int
  compile_leaves: int
  eager_repeats: int
  repeats: int
  warmup: int
  min_sample_s: float
  compile_repeats: int
  torch: bool
  quick: bool


def _median_ms(xs: Sequence[float]) -> float:
  return 1e3 * statistics.median(xs)


def paired_ratio(samples: dict[str, list[float]], a: str, b: str) -> float:
  """The median over rounds of ``a``'s time over ``b``'s in the same round.

  Both ran back to back in each round, so load from elsewhere that drifts
  between rounds cancels in each ratio.
  """
  return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))


def fresh_mib_per_step(run: Callable[[int], None], steps: int = 3) -> float | None:
  """MiB per step of memory the process touches for the first time while ``run`` runs.

  Minor page faults times the page size: pages the allocator mapped afresh
  instead of reusing (XLA:CPU maps each step's parameter-sized temporaries
  anew, and the kernel zeroes every page on first touch). None where the
  operating system does not count page faults.
  """
  try:
    import resource
  except ImportError:  # Windows
    return None
  run(1)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  run(steps)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  return faults * resource.getpagesize() / steps / MiB


def _measure(
  runners: dict[str, Callable[[int], None]], cfg: Config
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float | None]]:
  """Times ``runners`` interleaved: ``(samples in s, median ms, fresh MiB per step)``.

  Frees what the runners held.
  """
  samples = time_interleaved(
    runners, repeats=cfg.repeats, warmup=cfg.warmup, min_sample_s=cfg.min_sample_s
  )
  fresh = {name: fresh_mib_per_step(run) for name, run in runners.items()}
  runners.clear()
  gc.collect()
  return samples, {k: _median_ms(v) for k, v in samples.items()}, fresh


def bench_step(n: int, dtype: Any, cfg: Config, threads: int) -> dict[str, Any]:
  """Rows (a)-(d) at one size and dtype."""
  params, grads = make_tree(n, dtype, 0), make_tree(n, dtype, 1)
  ours_name, ours_tx = ours()
  runners: dict[str, Callable[[int], None]] = {
    "kernel": kernel_runner(params, grads),
    "ours": jax_runner(ours_tx, params, grads),
    "optax": jax_runner(optax_chain(), params, grads),
    # The same chain again: how far its ratio to optax is from 1 is this row's noise floor.
    "optax again": jax_runner(optax_chain(), params, grads),
  }
  if cfg.torch:
    runners["torch"] = TorchRunner(params, grads, threads, torch_device())
  del params
  samples, ms, _ = _measure(runners, cfg)
  itemsize = jnp.dtype(dtype).itemsize
  bandwidth = KERNEL_BYTES_PER_PARAM * itemsize * n / (ms["kernel"] * 1e-3)
  roofline_ms = 1e3 * BYTES_PER_PARAM * itemsize * n / bandwidth
  row = {
    "params": n,
    "dtype": jnp.dtype(dtype).name,
    "ours": ours_name,
    "ours_ms": ms["ours"],
    "optax_ms": ms["optax"],
    "kernel_ms": ms["kernel"],
    "bandwidth_GBps": bandwidth / 1e9,
    "roofline_ms": roofline_ms,
    "ours_over_optax": paired_ratio(samples, "ours", "optax"),
    "control_over_optax": paired_ratio(samples, "optax again", "optax"),
    "roofline_fraction": BYTES_PER_PARAM
    / KERNEL_BYTES_PER_PARAM
    / paired_ratio(samples, "ours", "kernel"),
    "torch_ms": ms.get("torch"),
    "ours_over_torch": paired_ratio(samples, "ours", "torch") if "torch" in ms else None,
    "samples_ms": {k: [1e3 * x for x in v] for k, v in samples.items()},
  }
  return row


def bench_overhead(n: int, cfg: Config) -> dict[str, Any]:
  """Row (e): each variant's time over the plain clip's (and the plain clip's over stats-free)."""
  params, grads = make_tree(n, jnp.float32, 0), make_tree(n, jnp.float32, 1)
  variants = overhead_variants()
  runners: dict[str, Callable[[int], None]] = {
    name: jax_runner(make(), params, grads) for name, make in variants.items()
  }
  base = "clip_by_global_norm"
  del params
  samples, ms, fresh = _measure(runners, cfg)
  overhead = {"statistics": paired_ratio(samples, base, "stats-free clip") - 1.0}
  for name in ms:
    if name not in (base, "stats-free clip"):
      overhead[name] = paired_ratio(samples, name, base) - 1.0
  samples_ms = {k: [1e3 * x for x in v] for k, v in samples.items()}
  return {
    "params": n,
    "ms": ms,
    "overhead": overhead,
    "fresh_mib": fresh,
    "samples_ms": samples_ms,
  }


def bench_methods(n: int, cfg: Config) -> dict[str, Any]:
  """MARS's cost in buffers of traffic over AdamW; AdaGC's over Adam, cautious's over AdamW."""
  params, grads = make_tree(n, jnp.float32, 0), make_tree(n, jnp.float32, 1)
  runners: dict[str, Callable[[int], None]] = {"kernel": kernel_runner(params, grads)}
  variants = method_variants()
  runners.update({name: jax_runner(make(), params, grads) for name, (make, _) in variants.items()})
  del params
  samples, ms, fresh = _measure(runners, cfg)
  # The probe reads b and g and writes b: a buffer's read and write is 2/3 of its time.
  buffer = [k * 2 / 3 for k in samples["kernel"]]

  def extra_buffers(name: str) -> float:
    pairs = zip(samples[name], samples["adamw"], buffer, strict=True)
    return statistics.median((a - b) / c for a, b, c in pairs)

  overhead = {k: paired_ratio(samples, k, base) - 1.0 for k, (_, base) in variants.items() if base}
  return {
    "params": n,
    "ms": {k: v for k, v in ms.items() if k != "kernel"},
    "buffer_ms": ms["kernel"] * 2 / 3,
    "over": {k: base for k, (_, base) in variants.items() if base},
    "overhead": overhead,
    "mars_extra_buffers": extra_buffers("mars + adamw"),
    "plain_mars_extra_buffers": extra_buffers("mars + adamw" + PLAIN),
    "adagc_overhead": overhead["adagc + adam"],
    "cautious_overhead": overhead["cautious(adamw)"],
    "fresh_mib": {k: v for k, v in fresh.items() if k != "kernel"},
    "samples_ms": {k: [1e3 * x for x in v] for k, v in samples.items()},
  }


def bench_compile(cfg: Config) -> dict[str, Any]:
  """Row (f): compile time of a step on a ``compile_leaves``-leaf tree, ours against optax."""
  params = compile_tree(cfg.compile_leaves)
  grads = jax.tree.map(lambda x: x * 0.5, params)
  makers = {"ours": lambda: ours()[1], "optax": optax_chain}
  small = compile_tree(4)
  for make in makers.values():  # untimed, as every other row warms up before it is timed
    compile_seconds(make(), small, small)
  times: dict[str, list[float]] = {k: [] for k in makers}
  rng = np.random.default_rng(0)
  for _ in range(cfg.compile_repeats):
    for name in rng.permutation(list(makers)):  # neither always compiles first
      gc.collect()  # no compile pays for collecting garbage an earlier one left
      times[name].append(compile_seconds(makers[name](), params, grads))
  s = {k: statistics.median(v) for k, v in times.items()}
  return {
    "leaves": cfg.compile_leaves,
    "ours_s": s["ours"],
    "optax_s": s["optax"],
    "ours_over_optax": statistics.median(
      x / y for x, y in zip(times["ours"], times["optax"], strict=True)
    ),
    "samples_s": times,
  }


def bench_eager(cfg: Config) -> dict[str, Any]:
  """Eager (un-jitted) update time of every transformation over optax's nearest equivalent."""
  cases = eager_cases()
  runners: dict[str, Callable[[int], None]] = {
    f"optax {k}": EagerRunner(make()) for k, make in EAGER_ANCHORS.items()
  }
  runners.update({name: EagerRunner(make()) for name, (make, _) in cases.items()})
  samples = time_interleaved(
    runners, repeats=cfg.eager_repeats, warmup=3, min_sample_s=cfg.min_sample_s / 5
  )
  ms = {k: _median_ms(v) for k, v in samples.items()}
  rows = [
    {
      "transformation": name,
      "anchor": anchor,
      "ms": ms[name],
      "anchor_ms": ms[f"optax {anchor}"],
      "ratio": paired_ratio(samples, name, f"optax {anchor}"),
    }
    for name, (_, anchor) in cases.items()
  ]
  return {"rows": rows, "tree": "dense kernel (3, 4), bias (4,), scalar"}


def bench_fence(cfg: Config) -> list[dict[str, Any]]:
  """The fused step with and without the XLA:CPU optimization barrier on narrow gradients."""
  if jax.default_backend() != "cpu":
    return []  # the barrier is only ever lowered for the CPU
  rows = []
  for dtype in (jnp.bfloat16, jnp.float32):
    params, grads = make_tree(cfg.bf16_size, dtype, 0), make_tree(cfg.bf16_size, dtype, 1)
    tx = ours()[1]
    runners: dict[str, Callable[[int], None]] = {
      "fenced": jax_runner(tx, params, grads),
      "unfenced": jax_runner(_traced_with(tx, FENCE_NARROW_ON_CPU=False), params, grads),
    }
    del params
    samples, ms, _ = _measure(runners, cfg)
    rows.append(
      {
        "params": cfg.bf16_size,
        "dtype": jnp.dtype(dtype).name,
        "fenced_ms": ms["fenced"],
        "unfenced_ms": ms["unfenced"],
        "unfenced_over_fenced": paired_ratio(samples, "unfenced", "fenced"),
      }
    )
  return rows


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Target by target (see the module's docstring): the ratio, the limit, whether it is met."""
  out = []

  def add(name: str, where: str, value: float | None, limit: float, below: bool) -> None:
    if value is None:
      return
    met = value <= limit if below else value >= limit
    op = "<=" if below else ">="
    out.append(
      {
        "target": name,
        "where": where,
        "value": value,
        "limit": f"{op} {limit:g}",
        "met": None if results["config"]["quick"] else bool(met),
      }
    )

  on_cpu = results["machine"]["backend"].startswith("cpu")
  # XLA:CPU writes the new momentum and reads it back: 7 itemsizes per param, not 6.
  roofline = 0.9 * BYTES_PER_PARAM / (BYTES_PER_PARAM + 1) if on_cpu else 0.9
  big = [r for r in results["step"] if r["params"] >= 16 * MiB] or results["step"]
  for r in big:
    where = f"{_size(r['params'])} {r['dtype']}"
    add("time / optax chain", where, r["ours_over_optax"], 1.0, True)
    if r["dtype"] == "float32":
      add("fraction of roofline", where, r["roofline_fraction"], roofline, False)
  for r in results["step"]:
    add("time / PyTorch", f"{_size(r['params'])} {r['dtype']}", r["ours_over_torch"], 0.7, True)
  ov = results["overhead"]
  where = f"{_size(ov['params'])} f32"
  add("statistics overhead", where, ov["overhead"]["statistics"], 0.02, True)
  for name, value in ov["overhead"].items():
    if name not in ("statistics", CONTROL, NO_RESCUE, SELECT_AFTER):
      add(f"{name} overhead", where, value, 0.05, True)
  mt = results["methods"]
  where = f"{_size(mt['params'])} f32"
  add("MARS extra traffic, buffers", where, mt["mars_extra_buffers"], 1.0, True)
  add("AdaGC overhead over Adam", where, mt["adagc_overhead"], 0.10, True)
  add("cautious overhead over AdamW", where, mt["cautious_overhead"], 0.10, True)
  c = results["compile"]
  add("compile time / optax", f"{c['leaves']} distinct shapes", c["ours_over_optax"], 1.25, True)
  worst = max(results["eager"]["rows"], key=lambda r: r["ratio"])
  add("eager update / optax (worst)", worst["transformation"], worst["ratio"], 3.0, True)
  for r in results["fence"]:
    if r["dtype"] == "bfloat16":
      where = f"{_size(r['params'])} bf16"
      add("CPU barrier: time without / with", where, r["unfenced_over_fenced"], 1.0, False)
  return out


# ----------------------------------------------------------------------------------------------
# Reporting.


def _size(n: int) -> str:
  if n % MiB == 0:
    return f"{n // MiB}M"
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _parse_size(text: str) -> int:
  text = text.strip().upper()
  mult = {"K": 1024, "M": MiB, "G": 1024 * MiB}.get(text[-1:], 1)
  n = int(float(text.rstrip("KMG")) * mult)
  unit = LEAVES * 256
  if n <= 0 or n % unit:
    raise argparse.ArgumentTypeError(f"size must be a positive multiple of {unit}, got {text!r}")
  return n


def _fmt(x: float | None, spec: str) -> str:
  return "—" if x is None else format(x, spec)


def format_tables(results: dict[str, Any]) -> str:
  """The results as Markdown tables, ready to paste into the README."""
  m = results["machine"]
  lines = [
    f"optax_momclip bench — {results['date']} — {m['cpu']}, {m['threads']} threads, "
    f"{m['backend']} — jax {m['jax']}, optax {m['optax']}, torch {m['torch'] or 'absent'}",
    f"command: `{results['command']}`"
    + ("  (QUICK: smoke run, numbers meaningless)" if results["config"]["quick"] else ""),
    f"ours = {results['step'][0]['ours']}; times: median of {results['config']['repeats']} "
    "interleaved rounds after warm-up; ratios: median of the per-round ratios; roofline: "
    f"{BYTES_PER_PARAM} itemsizes/param at the bandwidth of `b = 0.9 b + g` (donated)",
    "",
    "| params | dtype | ours ms | optax ms | ours/optax | optax again/optax "
    "| roofline ms (GB/s) | of roofline | torch ms | ours/torch |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results["step"]:
    lines.append(
      f"| {_size(r['params'])} | {r['dtype']} | {r['ours_ms']:.2f} | {r['optax_ms']:.2f} "
      f"| {r['ours_over_optax']:.3f} | {r['control_over_optax']:.3f} "
      f"| {r['roofline_ms']:.2f} ({r['bandwidth_GBps']:.1f}) "
      f"| {r['roofline_fraction']:.3f} | {_fmt(r['torch_ms'], '.2f')} "
      f"| {_fmt(r['ours_over_torch'], '.3f')} |"
    )
  ov = results["overhead"]
  lines += [
    "",
    f"| overhead at {_size(ov['params'])} f32 | ms | fresh MiB/step | overhead |",
    "|---|---|---|---|",
  ]
  for name, t in ov["ms"].items():
    if name == "clip_by_global_norm":
      note = f"{ov['overhead']['statistics']:+.1%} vs stats-free (statistics)"
    elif name == "stats-free clip":
      note = "—"
    else:
      note = f"{ov['overhead'][name]:+.1%} vs clip_by_global_norm"
      if name == CONTROL:
        note += " (noise floor: same transformation)"
      if name == NO_RESCUE:
        note += " (what the one conditional costs)"
      if name == SELECT_AFTER:
        note += " (skip_bad_steps without its replay)"
    lines.append(
      f"| {name} (+trace+scale) | {t:.2f} | {_fmt(ov['fresh_mib'][name], '.1f')} | {note} |"
    )
  mt = results["methods"]
  lines += [
    "",
    f"| methods at {_size(mt['params'])} f32 | ms | fresh MiB/step "
    "| over the optimizer it feeds or wraps |",
    "|---|---|---|---|",
  ]
  notes = {k: f"{v:+.1%} over {mt['over'][k]}" for k, v in mt["overhead"].items()}
  for name, key in (
    ("mars + adamw", "mars_extra_buffers"),
    ("mars + adamw" + PLAIN, "plain_mars_extra_buffers"),
  ):
    notes[name] = f"{mt[key]:+.2f} buffers' traffic (one: {mt['buffer_ms']:.2f} ms) over adamw"
  for name, t in mt["ms"].items():
    fresh = _fmt(mt["fresh_mib"][name], ".1f")
    lines.append(f"| {name} | {t:.2f} | {fresh} | {notes.get(name, '—')} |")
  c = results["compile"]
  lines += [
    "",
    f"| compile, {c['leaves']} leaves of distinct shapes | ours s | optax s | ours/optax |",
    "|---|---|---|---|",
    f"| trace+lower+compile | {c['ours_s']:.2f} | {c['optax_s']:.2f} "
    f"| {c['ours_over_optax']:.3f} |",
    "",
    f"| eager update, {results['eager']['tree']} | ms | optax's nearest | its ms | ours/optax |",
    "|---|---|---|---|---|",
  ]
  for r in results["eager"]["rows"]:
    lines.append(
      f"| {r['transformation']} | {r['ms']:.3f} | {EAGER_NAMES[r['anchor']]} "
      f"| {r['anchor_ms']:.3f} | {r['ratio']:.2f} |"
    )
  if results["fence"]:
    lines += [
      "",
      "| XLA:CPU barrier on narrow gradients | with ms | without ms | without/with |",
      "|---|---|---|---|",
    ]
    for r in results["fence"]:
      lines.append(
        f"| {_size(r['params'])} {r['dtype']} | {r['fenced_ms']:.2f} | {r['unfenced_ms']:.2f} "
        f"| {r['unfenced_over_fenced']:.3f} |"
      )
  lines += ["", "| target | where | measured | limit | met |", "|---|---|---|---|---|"]
  for t in results["targets"]:
    met = "—" if t["met"] is None else ("yes" if t["met"] else "NO")
    lines.append(f"| {t['target']} | {t['where']} | {t['value']:.3f} | {t['limit']} | {met} |")
  if results["config"]["quick"]:
    lines.append("\nA quick run checks nothing: its sizes are too small for any verdict.")
  return "\n".join(lines)


def machine_info(threads: int) -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  torch_version = None
  if torch_available():
    import torch

    torch_version, device = str(torch.__version__), torch_device()
    if device != "cpu":
      torch_version += f" on {device}"
  dev = jax.devices()[0]
  return {
    "cpu": cpu,
    "threads": threads,
    "backend": f"{dev.platform} ({getattr(dev, 'device_kind', '')})",
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "optax_momclip": omc.__version__,
    "torch": torch_version,
  }


def xla_threads() -> int:
  """The threads XLA's CPU client runs on: the CPUs this process may use."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m optax_momclip bench",
    description="Time momclip_sgd against optax, PyTorch and the memory roofline; check the "
    "performance targets.",
  )
  p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds; numbers are noise)")
  p.add_argument(
    "--sizes",
    type=lambda s: tuple(map(_parse_size, s.split(","))),
    default=None,
    help="float32 sizes, e.g. 1M,16M,64M (default)",
  )
  p.add_argument("--repeats", type=int, default=None, help="timed samples per variant")
  p.add_argument("--no-torch", action="store_true", help="skip PyTorch even when installed")
  p.add_argument("--json", default="momclip_out/bench.json", help="where to write the results")
  return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
  torch_ok = not args.no_torch and torch_available()
  if args.quick:
    small = 64 * 1024
    return Config(
      sizes=args.sizes or (small,),
      bf16_size=small,
      overhead_size=small,
      compile_leaves=30,
      eager_repeats=3,
      repeats=args.repeats or 3,
      warmup=1,
      min_sample_s=0.002,
      compile_repeats=1,
      torch=torch_ok,
      quick=True,
    )
  return Config(
    sizes=args.sizes or (MiB, 16 * MiB, 64 * MiB),
    bf16_size=16 * MiB,
    overhead_size=16 * MiB,
    compile_leaves=300,
    eager_repeats=11,
    repeats=args.repeats or 21,
    warmup=2,
    min_sample_s=0.05,
    compile_repeats=5,
    torch=torch_ok,
    quick=False,
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark, prints its tables and writes its JSON; returns the exit status."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cfg = make_config(args)
  threads = xla_threads()
  results: dict[str, Any] = {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "command": "python -m optax_momclip bench " + " ".join(sys.argv[1:] if argv is None else argv),
    "machine": machine_info(threads),
    "config": dataclasses.asdict(cfg),
    "step": [],
  }
  plan = [(n, jnp.float32) for n in cfg.sizes] + [(cfg.bf16_size, jnp.bfloat16)]
  for n, dtype in plan:
    print(f"[bench] step, {_size(n)} {jnp.dtype(dtype).name} ...", file=sys.stderr, flush=True)
    results["step"].append(bench_step(n, dtype, cfg, threads))
  print(f"[bench] overhead, {_size(cfg.overhead_size)} ...", file=sys.stderr, flush=True)
  results["overhead"] = bench_overhead(cfg.overhead_size, cfg)
  print(
    f"[bench] MARS, AdaGC, cautious, {_size(cfg.overhead_size)} ...", file=sys.stderr, flush=True
  )
  results["methods"] = bench_methods(cfg.overhead_size, cfg)
  print(f"[bench] compile, {cfg.compile_leaves} leaves ...", file=sys.stderr, flush=True)
  results["compile"] = bench_compile(cfg)
  print("[bench] eager updates ...", file=sys.stderr, flush=True)
  results["eager"] = bench_eager(cfg)
  print(f"[bench] XLA:CPU barrier, {_size(cfg.bf16_size)} ...", file=sys.stderr, flush=True)
  results["fence"] = bench_fence(cfg)
  results["targets"] = targets(results)
  print(format_tables(results))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
