"""`python -m optax_momclip demo`: an end-to-end quick run, its outputs, and its argument errors."""

import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest

from optax_momclip import cli
from optax_momclip.cli import demo as _demo

BASELINES = ("sgd, no clipping", "clip_by_global_norm(1)")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  status = cli.main(["demo", "--quick", "--no-progress", "--out", str(out)])
  return status, out


def test_quick_run_writes_plots_json_and_table(quick_run):
  status, out = quick_run
  assert status == 0
  for name in ("temporal_order.png", "digits_lr_sweep.png"):
    data = (out / name).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
  table = (out / "summary.txt").read_text()
  for name in BASELINES:  # a row in each task's table
    assert sum(line.startswith(name + "  ") for line in table.splitlines()) == 2
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["quick"] is True
  assert results["config"]["seeds"] == _demo.QUICK.seeds
  assert set(results["tasks"]) == {"temporal_order", "digits"}


def _runs(task):
  for arm in task["arms"]:
    for run in arm["runs"]:
      yield arm["name"], run


def test_quick_run_numbers_are_sane(quick_run):
  _, out = quick_run
  results = json.loads((out / "results.json").read_text())
  seeds = _demo.QUICK.seeds
  for key, task in results["tasks"].items():
    names = [a["name"] for a in task["arms"]]
    assert all(n in names for n in BASELINES), names
    assert len(names) == len(set(names))
    for _, run in _runs(task):
      accs = run["final_accuracy"]
      assert len(accs) == seeds == len(run["solved"]) == len(run["diverged"])
      assert all(0.0 <= a <= 1.0 for a in accs)
      for acc, solved, diverged, loss in zip(
        accs, run["solved"], run["diverged"], run["final_loss"], strict=True
      ):
        assert solved == (not diverged and acc >= task["solved_at"])
        if loss is None or loss > 2 * math.log(1 / task["chance_accuracy"]):
          assert diverged
      assert [len(c) for c in run["accuracy_curve"]] == [len(task["eval_steps"])] * seeds
      assert run["accuracy_curve"][0][-1] == accs[0]
      assert all(len(c) == len(task["curve_steps"]) for c in run["grad_norm_curve"])
    assert task["eval_steps"][-1] == task["steps"]
    if key == "digits":
      for _, run in _runs(task):
        assert run["lr"] in _demo.QUICK.mlp_lrs
  # The clip engaged on the temporal-order task and its state kept the statistics.
  clip = next(r for n, r in _runs(results["tasks"]["temporal_order"]) if n == BASELINES[1])
  frac = clip["final_metrics"]["clip_by_global_norm/clip_fraction"]
  assert all(0.0 < f <= 1.0 for f in frac)
  nclip = next(r for n, r in _runs(results["tasks"]["temporal_order"]) if n == BASELINES[0])
  assert nclip["final_metrics"] == {} and nclip["fraction_key"] is None


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "optax_momclip", *args], capture_output=True, text=True, timeout=120
  )


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["demo", "--seeds", "0"], "--seeds: expected a positive integer, got 0"),
    (["demo", "--steps", "ten"], "--steps: expected a positive integer, got 'ten'"),
    (["demo", "--task", "mnist"], "argument --task: invalid choice: 'mnist'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    ([], "usage: python -m optax_momclip {demo,bench}"),
  ],
)
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
  try:
    status = cli.main(args)
  except SystemExit as e:  # argparse's exit
    status = e.code
  assert status == 2
  assert message in capsys.readouterr().err


def test_bad_flag_from_the_shell_has_no_traceback():
  proc = _cli("demo", "--seeds", "-3")
  assert proc.returncode == 2
  assert "--seeds: expected a positive integer, got -3" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_help_exits_0(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["demo", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--quick" in out and "--out" in out


def test_missing_examples_extra_is_named(monkeypatch, capsys):
  monkeypatch.setitem(_demo.EXTRA_DEPS, "no_such_module_xyz", "no-such-package")
  assert cli.main(["demo", "--quick"]) == 1
  err = capsys.readouterr().err
  assert "no-such-package" in err and 'pip install -e ".[examples]"' in err


def test_bench_calls_the_bench_module(monkeypatch):
  calls = []
  fake = types.ModuleType("optax_momclip.cli.bench")
  fake.main = lambda argv: calls.append(list(argv)) or 0
  monkeypatch.setitem(sys.modules, "optax_momclip.cli.bench", fake)
  monkeypatch.setattr(cli, "bench", fake, raising=False)
  assert cli.main(["bench", "--size", "16M"]) == 0
  assert calls == [["--size", "16M"]]


def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(SystemExit) as e:
    cli.main(["demo", "--quick", "--out", str(blocker / "sub")])
  assert e.value.code == 2
  assert "--out: cannot create" in capsys.readouterr().err


def test_each_arm_trains_at_its_own_learning_rate():
  """Two arms of the same optimizer at two learning rates differ, and each equals a run alone."""
  import optax

  from optax_momclip.cli import tasks, train

  task = tasks.temporal_order_task()
  sgd = train.Arm("sgd", optax.sgd)
  run = lambda arms, lrs: train.train(task, arms, np.array(lrs), seeds=1, steps=4, evals=1)
  both = run([sgd, sgd], [[0.01], [0.3]])
  alone = run([sgd], [[0.3]])
  assert not np.allclose(both.loss[:, 0], both.loss[:, 1], rtol=1e-3)
  np.testing.assert_allclose(both.loss[:, 1], alone.loss[:, 0], rtol=1e-5)
