"""The benchmark runs end to end (`--quick` smoke run) and compares like with like."""

import json
import math
import mmap
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_momclip as omc
from optax_momclip.cli import bench as _bench


def test_quick_run_writes_every_row(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert _bench.main(["--quick", "--json", str(out)]) == 0
  res = json.loads(out.read_text())
  printed = capsys.readouterr().out
  assert "| target |" in printed and str(out) in printed
  assert "A quick run checks nothing" in printed
  assert all(t["met"] is None for t in res["targets"])  # no verdict from a smoke run
  assert res["config"]["quick"] and res["machine"]["threads"] >= 1
  assert [r["dtype"] for r in res["step"]] == ["float32", "bfloat16"]
  has_torch = res["machine"]["torch"] is not None
  for r in res["step"]:
    for key in ("ours_ms", "optax_ms", "kernel_ms", "roofline_ms", "bandwidth_GBps"):
      assert math.isfinite(r[key]) and r[key] > 0, key
    assert (r["torch_ms"] is not None) == has_torch
    assert len(r["samples_ms"]["ours"]) == res["config"]["repeats"]
    # The chain timed twice, round by round beside the first: the row's noise floor.
    again, first = r["samples_ms"]["optax again"], r["samples_ms"]["optax"]
    assert len(again) == res["config"]["repeats"]
    per_round = statistics.median(a / b for a, b in zip(again, first, strict=True))
    assert r["control_over_optax"] == pytest.approx(per_round, rel=1e-9)
  assert {"clip_by_global_norm", "stats-free clip"} <= set(res["overhead"]["ms"])
  methods = res["methods"]
  ours = {"mars + adamw", "cautious(adamw)", "adagc + adam"}
  plain = {"mars + adamw", "cautious(adamw)", "per-tensor clip + adam"}
  plain |= {"per-tensor clip on the total norm + adam"}
  assert set(methods["ms"]) == {"adamw", "adam"} | ours | {k + _bench.PLAIN for k in plain}
  assert set(methods["overhead"]) == set(methods["ms"]) - {"adamw", "adam"}
  assert methods["buffer_ms"] > 0
  for key in ("mars_extra_buffers", "plain_mars_extra_buffers", "adagc_overhead"):
    assert math.isfinite(methods[key]), key
  assert math.isfinite(methods["cautious_overhead"])
  for table in (methods, res["overhead"]):
    assert set(table["fresh_mib"]) == set(table["ms"])
    assert all(v is None or v >= 0 for v in table["fresh_mib"].values())
  assert "per-tensor clip on the total norm + adam (plain JAX) |" in printed
  assert res["compile"]["leaves"] == 30 and res["compile"]["ours_s"] > 0
  assert {r["transformation"] for r in res["eager"]["rows"]} == set(
    n for n in omc.__all__ if n[0].islower()
  ) - {"global_norm", "metrics", "register_statistics", "with_value_checks", "demon"}
  assert all(r["ratio"] > 0 for r in res["eager"]["rows"])
  assert [r["dtype"] for r in res["fence"]] == ["bfloat16", "float32"]
  names = {t["target"] for t in res["targets"]}
  assert {"time / optax chain", "fraction of roofline", "statistics overhead"} <= names
  assert ("time / PyTorch" in names) == has_torch
  assert {"compile time / optax", "eager update / optax (worst)"} <= names
  assert "CPU barrier: time without / with" in names


@pytest.mark.skipif(_bench.fresh_mib_per_step(lambda n: None) is None, reason="no page counts")
def test_fresh_memory_counts_pages_touched_for_the_first_time():
  size = 16 * _bench.MiB
  kept = np.zeros(size, np.uint8)
  kept[:] = 1  # mapped and touched once, before the count

  def reuse(steps):
    for _ in range(steps):
      kept[:] += 1

  def allocate(steps):
    for _ in range(steps):
      with mmap.mmap(-1, size) as fresh:  # an anonymous mapping: new pages, zeroed on first touch
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
          fresh.madvise(mmap.MADV_NOHUGEPAGE)  # counted in base pages
        view = np.frombuffer(fresh, np.uint8)
        view[:] = 1
        del view  # before the mapping closes

  assert _bench.fresh_mib_per_step(allocate) == pytest.approx(16, abs=1)
  assert _bench.fresh_mib_per_step(reuse) < 0.5


def test_targets_compare_against_their_limits():
  step = {
    "params": 16 * 2**20,
    "dtype": "float32",
    "ours_over_optax": 0.95,
    "control_over_optax": 1.01,
    "roofline_fraction": 0.78,
    "ours_over_torch": None,
  }
  res = {
    "machine": {"backend": "cpu (cpu)"},
    "config": {"quick": False},
    "step": [step, {**step, "dtype": "bfloat16", "ours_over_optax": 1.01}],
    "overhead": {"params": 16 * 2**20, "overhead": {"statistics": 0.03, "zclip": 0.01}},
    "methods": {
      "params": 16 * 2**20,
      "mars_extra_buffers": 1.5,
      "adagc_overhead": 0.08,
      "cautious_overhead": 0.2,
    },
    "compile": {"leaves": 300, "ours_over_optax": 1.3},
    "eager": {"rows": [{"transformation": "qhm", "ratio": 2.9}]},
    "fence": [{"params": 16 * 2**20, "dtype": "bfloat16", "unfenced_over_fenced": 4.5}],
  }
  got = {(t["target"], t["where"]): t["met"] for t in _bench.targets(res)}
  assert got == {
    ("time / optax chain", "16M float32"): True,
    ("fraction of roofline", "16M float32"): True,  # 0.78 >= 0.9 * 24/28 on XLA:CPU
    ("time / optax chain", "16M bfloat16"): False,
    ("statistics overhead", "16M f32"): False,
    ("zclip overhead", "16M f32"): True,
    ("MARS extra traffic, buffers", "16M f32"): False,
    ("AdaGC overhead over Adam", "16M f32"): True,
    ("cautious overhead over AdamW", "16M f32"): False,
    ("compile time / optax", "300 distinct shapes"): False,
    ("eager update / optax (worst)", "qhm"): True,
    ("CPU barrier: time without / with", "16M bf16"): True,
  }
  res["machine"]["backend"] = "gpu (NVIDIA H200)"
  got = {(t["target"], t["where"]): t["met"] for t in _bench.targets(res)}
  assert not got[("fraction of roofline", "16M float32")]  # 0.9 of the copy bandwidth there


def test_compared_variants_compute_the_same_step():
  """Ours, optax's chain and the stats-free clip give the same params; the probe is b = .9b + g."""
  params = _bench.make_tree(_bench.LEAVES * 256, jnp.float32, 0)
  grads = _bench.make_tree(_bench.LEAVES * 256, jnp.float32, 1)
  txs = [_bench.ours()[1], _bench.optax_chain(), _bench._omc_chain(_bench.stats_free_clip())]
  results = []
  for tx in txs:
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    step = _bench.jit_step(tx)
    for _ in range(2):
      p, s = step(p, s, grads)
    results.append(p)
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  copy = lambda t: jax.tree.map(jnp.copy, t)
  p, b = _bench.roofline_kernel()(copy(params), copy(grads), grads)
  np.testing.assert_allclose(np.asarray(b[0]), 1.9 * np.asarray(grads[0]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(p[0]), np.asarray(params[0]))


def test_plain_references_compute_the_methods():
  """The plain-JAX method rows do what mars, cautious and a per-tensor clip do, so the bench
  compares like with like."""
  n = _bench.LEAVES * 256
  params = _bench.make_tree(n, jnp.float32, 0)
  grads = [_bench.make_tree(n, jnp.float32, seed) for seed in (1, 2, 3)]
  adamw = lambda: optax.adamw(3e-3, b1=0.95, b2=0.99, weight_decay=0.01)
  pairs = [
    (optax.chain(omc.mars(), adamw()), optax.chain(_bench.plain_mars(), adamw())),
    (omc.cautious(adamw()), _bench.plain_cautious(adamw())),
  ]
  for ours, plain in pairs:
    finals = []
    for tx in (ours, plain):
      p, s = jax.tree.map(jnp.copy, params), tx.init(params)
      for g in grads:
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
      finals.append(p)
    for a, b in zip(*finals, strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  g64 = [np.asarray(g, np.float64) for g in grads[0]]
  want = [g / max(np.linalg.norm(g), 1.0) for g in g64]
  assert min(np.linalg.norm(g) for g in g64) > 10  # every tensor is clipped
  for on_total in (False, True):
    got, _ = _bench.plain_clips(on_total).update(grads[0], optax.EmptyState())
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6)


def test_torch_runner_matches_ours():
  torch = pytest.importorskip("torch")
  del torch
  n = _bench.LEAVES * 256
  params, grads = _bench.make_tree(n, jnp.float32, 0), _bench.make_tree(n, jnp.float32, 1)
  runner = _bench.TorchRunner(params, grads, threads=1)
  tx = _bench.ours()[1]
  p = jax.tree.map(jnp.copy, params)
  s = tx.init(p)
  step = _bench.jit_step(tx)
  for i in range(3):
    runner(1)
    if i == 1:
      runner.reallocate()  # fresh memory must not change the optimizer's state
    p, s = step(p, s, grads)
  # torch adds 1e-6 to the norm, and its clipped grads are clipped again (norm 1 -> ~1).
  for a, b in zip(jax.tree.leaves(p), runner.params, strict=True):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-5, atol=1e-6)
  assert omc.global_norm(grads) > 10 * _bench.MAX_NORM  # the clip is active in the bench


def test_torch_runs_where_jax_runs(monkeypatch):
  """On a GPU PyTorch is timed on the GPU too: CPU torch against GPU JAX compares machines."""
  torch = pytest.importorskip("torch")
  for backend, cuda, want in [("gpu", True, "cuda"), ("gpu", False, "cpu"), ("cpu", True, "cpu")]:
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    monkeypatch.setattr(torch.cuda, "is_available", lambda c=cuda: c)
    assert _bench.torch_device() == want, (backend, cuda)


def test_global_norm_hlo_grows_linearly_with_leaves():
  """Compile time of row (f): no kernel of the compiled norm takes every leaf's scalar as input.

  Scaling each leaf of the overflow rescue by the global maximum made XLA copy the cross-leaf
  max into every leaf's kernel, so the HLO (and compile time) grew with the square of the leaf
  count: 1000 leaves took minutes to compile.
  """
  sizes = {}
  for leaves in (50, 100):
    hlo = jax.jit(omc.global_norm).lower(_bench.compile_tree(leaves)).compile().as_text()
    sizes[leaves] = hlo.count("parameter(")
  assert sizes[100] < 2.5 * sizes[50], sizes


def test_the_roofline_counts_the_bytes_the_step_must_move():
  """24 bytes per float32 param (g read twice, p and b read and written): no more than what
  XLA's cost model says the compiled step moves (which adds XLA:CPU's read-back of the new
  momentum and the rescue branch's pass), and the probe's 12 what it says the probe moves."""
  n = _bench.LEAVES * 256 * 64
  params, grads = _bench.make_tree(n, jnp.float32, 0), _bench.make_tree(n, jnp.float32, 1)
  tx = _bench.ours()[1]
  step = _bench.jit_step(tx).lower(params, tx.init(params), grads).compile()
  moved = step.cost_analysis()["bytes accessed"] / (4 * n)
  probe = _bench.roofline_kernel().lower(params, params, grads).compile()
  probed = probe.cost_analysis()["bytes accessed"] / (4 * n)
  assert _bench.BYTES_PER_PARAM <= moved < _bench.BYTES_PER_PARAM + 4, moved
  assert abs(probed - _bench.KERNEL_BYTES_PER_PARAM) < 0.5, probed
