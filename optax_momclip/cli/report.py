"""The demo's results: per-run summaries, text tables, PNG plots and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

_CURVE_POINTS = 100


def _finite_or_none(x: float) -> float | None:
  return float(x) if math.isfinite(float(x)) else None


def _curve(per_step: np.ndarray, points: int = _CURVE_POINTS) -> tuple[list[int], np.ndarray]:
  """Window means of f[steps, ...] over at most ``points`` windows, and each window's last step."""
  steps = per_step.shape[0]
  width = max(1, steps // points)
  n = steps // width
  with np.errstate(invalid="ignore", over="ignore"):
    means = per_step[: n * width].reshape(n, width, *per_step.shape[1:]).mean(1)
  return [int((i + 1) * width) for i in range(n)], means


def _fraction_key(metrics: dict[str, np.ndarray]) -> str | None:
  """The first ``…_fraction`` statistic of an arm (how often it clipped or skipped)."""
  return next((k for k in metrics if k.endswith("_fraction")), None)


def summarise(task: Any, names: list[str], lrs: np.ndarray, runs: Any) -> dict[str, Any]:
  """JSON-ready per-arm, per-learning-rate, per-seed numbers of one task.

  A run is *diverged* when a final parameter is not finite or its mean
  training loss over the last tenth of the steps is not finite or above twice
  the chance loss ``ln K``; *solved* when it did not diverge and its final
  held-out accuracy is at least ``task.solved_at``.
  """
  steps = runs.loss.shape[0]
  tail = runs.loss[-max(1, steps // 10) :]
  with np.errstate(invalid="ignore", over="ignore"):
    final_loss = tail.mean(0)  # [A, G, S]
  diverged = ~runs.params_finite | ~np.isfinite(final_loss) | (final_loss > 2 * task.chance_loss)
  final_acc = runs.accuracy[-1]
  solved = ~diverged & (final_acc >= task.solved_at)
  curve_steps, loss_curve = _curve(runs.loss)
  _, norm_curve = _curve(runs.grad_norm)
  arms = []
  for a, name in enumerate(names):
    metrics = runs.final_metrics[a]
    frac_key = _fraction_key(metrics)
    per_lr = []
    for g, lr in enumerate(lrs[a]):
      per_lr.append(
        {
          "lr": float(lr),
          "final_accuracy": [float(x) for x in final_acc[a, g]],
          "final_loss": [_finite_or_none(x) for x in final_loss[a, g]],
          "solved": [bool(x) for x in solved[a, g]],
          "diverged": [bool(x) for x in diverged[a, g]],
          "accuracy_curve": [
            [float(x) for x in runs.accuracy[:, a, g, s]] for s in range(final_acc.shape[-1])
          ],
          "loss_curve": [
            [_finite_or_none(x) for x in loss_curve[:, a, g, s]] for s in range(final_acc.shape[-1])
          ],
          "grad_norm_curve": [
            [_finite_or_none(x) for x in norm_curve[:, a, g, s]] for s in range(final_acc.shape[-1])
          ],
          "final_metrics": {
            k: [_finite_or_none(x) for x in np.ravel(v[g])] for k, v in metrics.items()
          },
          "fraction_key": frac_key,
        }
      )
    arms.append({"name": name, "runs": per_lr})
  return {
    "title": task.title,
    "solved_at": task.solved_at,
    "chance_accuracy": 1.0 / task.num_classes,
    "steps": int(steps),
    "seeds": int(final_acc.shape[-1]),
    "eval_steps": [int(x) for x in runs.eval_steps],
    "curve_steps": curve_steps,
    "arms": arms,
  }


def _median(xs: list[float | None]) -> float:
  vals = [x for x in xs if x is not None]
  return float(np.median(vals)) if vals else float("nan")


def _took(res: dict[str, Any]) -> str:
  return f"; {res['wall_time_s']:g} s" if "wall_time_s" in res else ""


def _temporal_table(res: dict[str, Any]) -> list[str]:
  s = res["seeds"]
  lines = [
    f"{res['title']}: {s} seeds x {res['steps']} steps of batch-20 SGD; solved = held-out "
    f"accuracy >= {res['solved_at']:g} (chance {res['chance_accuracy']:g}){_took(res)}",
    f"{'arm':<32} {'lr':>6} {'solved':>7} {'median acc':>11} {'diverged':>9} {'clipped':>8}",
  ]
  for arm in res["arms"]:
    run = arm["runs"][0]
    frac = run["fraction_key"]
    clipped = f"{100 * _median(run['final_metrics'][frac]):.0f}%" if frac else "-"
    lines.append(
      f"{arm['name']:<32} {run['lr']:>6g} {sum(run['solved']):>5}/{s} "
      f"{np.median(run['final_accuracy']):>11.3f} {sum(run['diverged']):>7}/{s} {clipped:>8}"
    )
  return lines


def _sweep_table(res: dict[str, Any]) -> list[str]:
  s = res["seeds"]
  lrs = [r["lr"] for r in res["arms"][0]["runs"]]
  total = s * len(lrs)
  lines = [
    f"{res['title']}: {s} seeds x {res['steps']} steps of batch-64 SGD at each lr; "
    f"median held-out accuracy per lr; solved = accuracy >= {res['solved_at']:g}{_took(res)}",
    f"{'arm':<32} " + " ".join(f"{lr:>6g}" for lr in lrs) + f" {'solved':>7} {'diverged':>9}",
  ]
  for arm in res["arms"]:
    accs = " ".join(f"{np.median(r['final_accuracy']):>6.2f}" for r in arm["runs"])
    solved = sum(sum(r["solved"]) for r in arm["runs"])
    diverged = sum(sum(r["diverged"]) for r in arm["runs"])
    lines.append(f"{arm['name']:<32} {accs} {solved:>4}/{total} {diverged:>5}/{total}")
  return lines


def tables(results: dict[str, Any]) -> str:
  """The printed summary: one table per task that was run."""
  parts = []
  if "temporal_order" in results["tasks"]:
    parts.append("\n".join(_temporal_table(results["tasks"]["temporal_order"])))
  if "digits" in results["tasks"]:
    parts.append("\n".join(_sweep_table(results["tasks"]["digits"])))
  parts.append(
    "diverged = non-finite parameters, or final training loss non-finite or above 2 ln K; "
    "clipped = fraction of steps an arm's first clip (or skip) engaged."
  )
  return "\n\n".join(parts)


def write(results: dict[str, Any], text: str, out: Path) -> list[Path]:
  """Writes results.json, summary.txt and one PNG per task into ``out``."""
  files = [out / "results.json", out / "summary.txt"]
  files[0].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
  files[1].write_text(text + "\n")
  if "temporal_order" in results["tasks"]:
    files.append(_plot_temporal(results["tasks"]["temporal_order"], out / "temporal_order.png"))
  if "digits" in results["tasks"]:
    files.append(_plot_sweep(results["tasks"]["digits"], out / "digits_lr_sweep.png"))
  return files


def _pyplot() -> Any:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _colors(n: int) -> list[Any]:
  plt = _pyplot()
  cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
  return [cmap(i) for i in range(n)]


def _median_curve(curves: list[list[float | None]]) -> np.ndarray:
  arr = np.array([[np.nan if x is None else x for x in c] for c in curves], float)
  with np.errstate(all="ignore"):
    return np.nanmedian(arr, 0) if np.isfinite(arr).any() else arr[0]


def _plot_temporal(res: dict[str, Any], path: Path) -> Path:
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  for arm, color in zip(res["arms"], _colors(len(res["arms"])), strict=True):
    run = arm["runs"][0]
    label = f"{arm['name']} (lr {run['lr']:g})"
    axes[0].plot(res["curve_steps"], _median_curve(run["loss_curve"]), color=color, label=label)
    axes[1].plot(res["curve_steps"], _median_curve(run["grad_norm_curve"]), color=color)
    axes[2].plot(res["eval_steps"], np.median(run["accuracy_curve"], 0), color=color, marker=".")
  axes[0].set(title="training loss (median over seeds)", xlabel="step", ylabel="cross-entropy")
  axes[0].axhline(math.log(4), color="gray", ls=":", lw=1)
  axes[1].set(title="pre-clip gradient norm (median over seeds)", xlabel="step", yscale="log")
  axes[2].set(title="held-out accuracy (median over seeds)", xlabel="step", ylim=(0, 1.02))
  axes[2].axhline(res["chance_accuracy"], color="gray", ls=":", lw=1)
  fig.suptitle(res["title"])
  fig.legend(loc="lower center", ncol=4, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.12, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _plot_sweep(res: dict[str, Any], path: Path) -> Path:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(11, 5))
  for arm, color in zip(res["arms"], _colors(len(res["arms"])), strict=True):
    lrs = [r["lr"] for r in arm["runs"]]
    accs = np.array([r["final_accuracy"] for r in arm["runs"]])
    ax.plot(lrs, np.median(accs, 1), color=color, marker="o", label=arm["name"])
    ax.fill_between(lrs, accs.min(1), accs.max(1), color=color, alpha=0.12)
  ax.axhline(res["chance_accuracy"], color="gray", ls=":", lw=1, label="chance")
  ax.set(
    xscale="log",
    xlabel="learning rate",
    ylabel="held-out accuracy",
    ylim=(0, 1.02),
    title=res["title"] + "\n(median over seeds, band: min-max)",
  )
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
