"""`python -m optax_momclip demo`: clipping and momentum on two tasks where they matter."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optax

import optax_momclip as omc
from optax_momclip.cli import report
from optax_momclip.cli.tasks import digits_task, temporal_order_task
from optax_momclip.cli.train import Arm, train

EXTRA_DEPS = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "tqdm": "tqdm"}


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of a demo run; `QUICK` is the smoke-test setting.

  Attributes:
    seeds: runs per (arm, learning rate); each seed fixes an initialisation
      and a data stream shared by every arm.
    rnn_steps: SGD steps on the temporal-order task.
    rnn_evals: held-out evaluations (and progress updates) during them.
    mlp_steps: SGD steps per learning rate on digits.
    mlp_evals: held-out evaluations during them.
    mlp_lrs: the learning-rate sweep on digits.
  """

  seeds: int = 5
  rnn_steps: int = 2500
  rnn_evals: int = 10
  mlp_steps: int = 400
  mlp_evals: int = 8
  mlp_lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


QUICK = Config(
  seeds=2, rnn_steps=150, rnn_evals=3, mlp_steps=60, mlp_evals=2, mlp_lrs=(0.01, 0.3, 3.0)
)


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  """An optimizer configuration of the demo.

  Attributes:
    name: the row label.
    make: ``learning_rate -> transformation``; the learning rate may be traced.
    lr: learning rate on the temporal-order task (None: not run there).
    sweep: whether it takes part in the digits learning-rate sweep.
  """

  name: str
  make: Callable[[Any], optax.GradientTransformation]
  lr: float | None = None
  sweep: bool = True


def _sgd(lr: Any) -> optax.GradientTransformation:
  return optax.scale_by_learning_rate(lr)


def _chain(*txs: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.chain(*txs)


# Learning rates: every clip at 0.1 (where unclipped SGD fails), momentum 0.9 at 0.01 (the
# same effective step), normalized momentum (steps of length lr) at 0.01. Thresholds: c = 1
# (Pascanu et al.); clipped_momentum clips its EMA buffer, whose norm stayed below 1 in our
# runs, so c = 0.1; AGC at 0.1 (0.05 clipped every step and solved fewer seeds in a 5-seed
# check); autoclip and zclip at their papers' defaults.
ARMS: tuple[ArmSpec, ...] = (
  ArmSpec("sgd, no clipping", lambda lr: _sgd(lr), lr=0.01),
  ArmSpec("sgd, no clipping (large lr)", lambda lr: _sgd(lr), lr=0.1, sweep=False),
  ArmSpec(
    "clip_by_global_norm(1)",
    lambda lr: _chain(omc.clip_by_global_norm(1.0), _sgd(lr)),
    lr=0.1,
  ),
  ArmSpec(
    "adaptive_grad_clip(0.1)",
    lambda lr: _chain(omc.adaptive_grad_clip(0.1), _sgd(lr)),
    lr=0.1,
  ),
  ArmSpec(
    "autoclip(10)",
    lambda lr: _chain(omc.autoclip(10.0), _sgd(lr)),
    lr=0.1,
  ),
  ArmSpec("zclip(2.5)", lambda lr: _chain(omc.zclip(2.5), _sgd(lr)), lr=0.1),
  ArmSpec(
    "skip_bad_steps(z=3)",
    lambda lr: omc.skip_bad_steps(_sgd(lr), z_threshold=3.0),
    lr=0.1,
  ),
  ArmSpec(
    "heavy_ball(0.9), no clipping",
    lambda lr: _chain(omc.heavy_ball(0.9), _sgd(lr)),
    lr=0.01,
  ),
  ArmSpec(
    "momclip_sgd(0.9, max_norm=1)",
    lambda lr: omc.momclip_sgd(lr, 0.9, max_norm=1.0),
    lr=0.01,
  ),
  ArmSpec(
    "clipped_momentum(0.1, 0.9)",
    lambda lr: _chain(omc.clipped_momentum(0.1, 0.9), _sgd(lr)),
    lr=0.1,
  ),
  ArmSpec(
    "normalized_momentum(0.9)",
    lambda lr: _chain(omc.normalized_momentum(0.9), _sgd(lr)),
    lr=0.01,
  ),
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m optax_momclip demo",
    description=(
      "Trains Pascanu et al.'s temporal-order task (tanh RNN, exploding gradients) and a "
      "learning-rate sweep of a deep plain MLP on sklearn's digits with no clipping, "
      "clip_by_global_norm, adaptive_grad_clip, autoclip, zclip, skip_bad_steps and momentum "
      "variants over several seeds; prints a table and writes PNG plots and results.json."
    ),
  )
  parser.add_argument("--quick", action="store_true", help="a smoke run of well under a minute")
  parser.add_argument("--out", default="momclip_out", help="output folder (default: %(default)s)")
  parser.add_argument("--seeds", type=_positive_int, help="seeds per arm (default 5, quick 2)")
  parser.add_argument(
    "--steps", type=_positive_int, help="SGD steps on the temporal-order task (default 2500)"
  )
  parser.add_argument(
    "--task",
    choices=("all", "temporal_order", "digits"),
    default="all",
    help="which task to run (default: %(default)s)",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def missing_extras() -> list[str]:
  """The pip names of the ``examples`` extra's packages that are not installed."""
  return [pip for mod, pip in EXTRA_DEPS.items() if importlib.util.find_spec(mod) is None]


def _config(args: argparse.Namespace) -> Config:
  config = QUICK if args.quick else Config()
  if args.seeds is not None:
    config = dataclasses.replace(config, seeds=args.seeds)
  if args.steps is not None:
    evals = math.gcd(args.steps, config.rnn_evals) if args.steps >= config.rnn_evals else 1
    config = dataclasses.replace(config, rnn_steps=args.steps, rnn_evals=evals)
  return config


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the demo; returns the process exit status."""
  parser = build_parser()
  args = parser.parse_args(argv)
  missing = missing_extras()
  if missing:
    print(
      "The demo needs the 'examples' extra, which is not fully installed (missing: "
      f'{", ".join(missing)}).\nInstall it with:  pip install -e ".[examples]"  '
      "(or  pip install " + " ".join(missing) + ")",
      file=sys.stderr,
    )
    return 1
  config = _config(args)

  out = Path(args.out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    parser.error(f"--out: cannot create {str(out)!r}: {e.strerror}")

  arms = list(ARMS)
  progress = Progress(enabled=not args.no_progress)
  t0 = time.perf_counter()
  results: dict[str, Any] = {
    "config": {**dataclasses.asdict(config), "quick": args.quick, "task": args.task},
    "versions": _versions(),
    "tasks": {},
  }
  for name, run in (("temporal_order", run_temporal_order), ("digits", run_digits)):
    if args.task in ("all", name):
      start = time.perf_counter()
      results["tasks"][name] = run(arms, config, progress)
      results["tasks"][name]["wall_time_s"] = round(time.perf_counter() - start, 1)
  results["wall_time_s"] = round(time.perf_counter() - t0, 1)

  text = report.tables(results)
  print(text)
  files = report.write(results, text, out)
  print(f"\nwall time {results['wall_time_s']} s; wrote " + ", ".join(str(f) for f in files))
  return 0


def _versions() -> dict[str, str]:
  import jax
  import optax

  import optax_momclip

  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "optax_momclip": optax_momclip.__version__,
    "backend": jax.default_backend(),
    "devices": str(jax.devices()[0].device_kind),
  }


class Progress:
  """A progress bar on a terminal; elsewhere (CI logs, nohup, notebooks) a line per phase."""

  def __init__(self, enabled: bool):
    self.enabled, self.terminal = enabled, sys.stderr.isatty()

  def track(self, name: str, steps: int) -> Any:
    """A context giving ``on_chunk(done)`` for a task of ``steps`` steps."""
    if self.terminal:
      from tqdm.auto import tqdm

      return _BarTracker(
        tqdm(
          total=steps, desc=f"{name} (compiling)", unit="step", disable=not self.enabled, leave=True
        ),
        name,
      )
    return _LineTracker(name, steps, self.enabled)


class _BarTracker:
  def __init__(self, bar: Any, name: str):
    self.bar, self.name = bar, name

  def __enter__(self) -> Callable[[int], None]:
    def on_chunk(done: int) -> None:
      self.bar.set_description(self.name)
      self.bar.update(done - self.bar.n)

    return on_chunk

  def __exit__(self, *exc: object) -> None:
    self.bar.close()


class _LineTracker:
  def __init__(self, name: str, steps: int, enabled: bool):
    self.name, self.steps, self.enabled = name, steps, enabled
    self.start = time.perf_counter()

  def say(self, text: str) -> None:
    if self.enabled:
      elapsed = time.perf_counter() - self.start
      print(f"[demo] {self.name}: {text} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

  def __enter__(self) -> Callable[[int], None]:
    self.say("compiling the training step")
    return lambda done: self.say(f"{done}/{self.steps} steps")

  def __exit__(self, *exc: object) -> None:
    pass


def _train(
  task: Any,
  arms: list[Arm],
  lrs: np.ndarray,
  config: Config,
  steps: int,
  evals: int,
  progress: Progress,
) -> Any:
  with progress.track(task.name, steps) as on_chunk:
    return train(task, arms, lrs, seeds=config.seeds, steps=steps, evals=evals, on_chunk=on_chunk)


def run_temporal_order(specs: list[ArmSpec], config: Config, progress: Progress) -> dict:
  """Each arm at its own learning rate on the temporal-order task."""
  task = temporal_order_task()
  specs = [s for s in specs if s.lr is not None]
  lrs = np.array([[s.lr] for s in specs], np.float64)
  arms = [Arm(s.name, s.make) for s in specs]
  runs = _train(task, arms, lrs, config, config.rnn_steps, config.rnn_evals, progress)
  return report.summarise(task, [s.name for s in specs], lrs, runs)


def run_digits(specs: list[ArmSpec], config: Config, progress: Progress) -> dict:
  """Every sweeping arm at every learning rate of ``config.mlp_lrs`` on digits."""
  task = digits_task()
  specs = [s for s in specs if s.sweep]
  lrs = np.array([config.mlp_lrs] * len(specs), np.float64)
  arms = [Arm(s.name, s.make) for s in specs]
  runs = _train(task, arms, lrs, config, config.mlp_steps, config.mlp_evals, progress)
  return report.summarise(task, [s.name for s in specs], lrs, runs)
