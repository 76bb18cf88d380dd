"""Every public transformation, as the contract tests build it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import optax

import optax_momclip as omc


@dataclasses.dataclass(frozen=True)
class Case:
  """How to build one public transformation for the contract tests.

  Attributes:
    name: the factory's public name (one Case per factory at least).
    make: builds the transformation with settings that make it do real work
      on the contract gradients (norms around 1-10).
    factory: the factory itself, for ``optax.inject_hyperparams``.
    numeric: keyword arguments of ``factory`` that inject_hyperparams turns
      into traced arrays (besides positional defaults).
    static_args: arguments that fix shapes or code paths (``ord``, window
      sizes), passed as ``static_args`` to ``optax.inject_hyperparams``.
    needs_params: update needs ``params``.
    eager_anchor: optax's nearest equivalent, whose eager update time bounds
      ours: ``"clip"`` (``optax.clip_by_global_norm``), ``"trace"``
      (``optax.trace``) or ``"chain"`` (the two chained with ``optax.scale``).
    make_complex: builds the transformation for the complex contract, where
      it acts on a complex leaf as on its real and imaginary parts side by
      side (None: ``make``).
    clips_modulus: it clips each element's modulus instead, ``z·min(1, c/|z|)``.
    first: the factory's first argument, for ``optax.inject_hyperparams(factory)(first)``
      (None: ``numeric``'s value of it).
    drive: ``(name, value)``: an injected hyperparameter that, set in the state to
      ``value``, changes the next updates (None: nothing numeric to inject).
    inject: keyword arguments that ``drive`` needs besides ``first``.
  """

  name: str
  make: Callable[[], optax.GradientTransformation]
  factory: Callable[..., optax.GradientTransformation]
  numeric: dict[str, Any]
  static_args: tuple[str, ...] = ()
  needs_params: bool = False
  eager_anchor: str = "clip"
  make_complex: Callable[[], optax.GradientTransformation] | None = None
  clips_modulus: bool = False
  first: Any = None
  drive: tuple[str, float] | None = None
  inject: dict[str, Any] = dataclasses.field(default_factory=dict)

  def first_arg(self) -> Any:
    name = next(iter(inspect.signature(self.factory).parameters))
    return self.numeric[name] if self.first is None else self.first


CASES: list[Case] = [
  Case(
    "clip_by_value",
    lambda: omc.clip_by_value(0.5),
    omc.clip_by_value,
    {"max_value": 0.5},
    clips_modulus=True,
    drive=("max_value", 0.05),
  ),
  Case(
    "clip_by_norm",
    lambda: omc.clip_by_norm(1.0, min_norm=0.1),
    omc.clip_by_norm,
    {"max_norm": 1.0, "min_norm": 0.1},
    static_args=("ord",),
    drive=("max_norm", 0.05),
  ),
  Case(
    "clip_by_global_norm",
    lambda: omc.clip_by_global_norm(1.0, min_norm=0.1),
    omc.clip_by_global_norm,
    {"max_norm": 1.0, "min_norm": 0.1},
    static_args=("ord",),
    drive=("max_norm", 0.05),
  ),
  Case(
    "adaptive_grad_clip",
    lambda: omc.adaptive_grad_clip(0.1),
    omc.adaptive_grad_clip,
    {"clipping": 0.1, "eps": 1e-3},
    needs_params=True,
    drive=("clipping", 0.001),
  ),
  Case(
    "autoclip",
    lambda: omc.autoclip(10.0, window=4),
    omc.autoclip,
    {"percentile": 10.0, "window": 4},
    static_args=("window", "ord"),
    drive=("percentile", 0.0),
  ),
  Case(
    "zclip",
    lambda: omc.zclip(1.0, warmup_steps=1),
    omc.zclip,
    {"z_threshold": 1.0, "alpha": 0.9, "warmup_steps": 1},
    drive=("warmup_steps", 1),
  ),
  Case(
    "skip_bad_steps",
    lambda: omc.skip_bad_steps(
      omc.clip_by_global_norm(1.0),
      max_norm=10.0,
      z_threshold=2.0,
      warmup_steps=1,
      max_consecutive_spikes=2,
    ),
    omc.skip_bad_steps,
    {
      "inner": omc.clip_by_global_norm(1.0),
      "max_norm": 10.0,
      "z_threshold": 2.0,
      "alpha": 0.9,
      "warmup_steps": 1,
      "max_consecutive_spikes": 2,
    },
    drive=("max_norm", 0.01),
    inject={"max_norm": 10.0},
  ),
  Case(  # the rolling-window rule
    "skip_bad_steps",
    lambda: omc.skip_bad_steps(
      omc.clip_by_global_norm(1.0), max_norm=10.0, z_threshold=2.0, window=4, min_history=2
    ),
    omc.skip_bad_steps,
    {
      "inner": omc.clip_by_global_norm(1.0),
      "max_norm": 10.0,
      "z_threshold": 2.0,
      "window": 4,
      "min_history": 2,
    },
    static_args=("window",),
    drive=("max_norm", 0.01),
    inject={"max_norm": 10.0},
  ),
  Case(  # ZClip's percentile mode, spikes kept out of its statistics
    "zclip",
    lambda: omc.zclip(1.0, warmup_steps=1, mode="percentile", record_spikes=False),
    omc.zclip,
    {"z_threshold": 1.0, "alpha": 0.9, "warmup_steps": 1, "mode": "percentile"},
    drive=("warmup_steps", 1),
  ),
  Case(
    "heavy_ball",
    lambda: omc.heavy_ball(omc.demon(0.9, total_steps=10), dampening=0.1),
    omc.heavy_ball,
    {"momentum": 0.9, "dampening": 0.1},
    eager_anchor="trace",
    drive=("momentum", 0.1),
  ),
  Case(
    "ema_momentum",
    lambda: omc.ema_momentum(0.8, debias=True),
    omc.ema_momentum,
    {"decay": 0.8},
    eager_anchor="trace",
    drive=("decay", 0.1),
  ),
  Case(
    "qhm",
    lambda: omc.qhm(0.9, 0.7),
    omc.qhm,
    {"momentum": 0.9, "nu": 0.7},
    eager_anchor="trace",
    drive=("nu", 0.1),
  ),
  # Powers of two: exact products, so XLA's FMA contraction under jit cannot differ from eager.
  Case(
    "aggmo",
    lambda: omc.aggmo((0.0, 0.5, 0.25)),
    omc.aggmo,
    {},
    eager_anchor="trace",
    first=(0.0, 0.5, 0.25),  # its only hyperparameter fixes the state's shape: nothing to drive
  ),
  Case(
    "clipped_momentum",
    lambda: omc.clipped_momentum(1.0, 0.5, nu=0.75),
    omc.clipped_momentum,
    {"max_norm": 1.0, "momentum": 0.5, "nu": 0.75},
    static_args=("ord",),
    eager_anchor="chain",
    drive=("max_norm", 0.05),
  ),
  Case(
    "normalized_momentum",
    lambda: omc.normalized_momentum(0.5),
    omc.normalized_momentum,
    {"momentum": 0.5, "eps": 1e-8},
    eager_anchor="chain",
    drive=("momentum", 0.1),
  ),
  # Powers of two again: with 0.9 and 1e-2 a scanned step and a looped one
  # contract different products into FMAs and differ by an ulp on cancelling sums.
  Case(
    "momclip_sgd",
    lambda: omc.momclip_sgd(
      optax.linear_schedule(0.1, 0.01, 10),
      0.5,
      max_norm=1.0,
      max_value=0.5,
      dampening=0.5,
      weight_decay=2**-6,
    ),
    omc.momclip_sgd,
    {"learning_rate": 0.1, "momentum": 0.5, "max_norm": 1.0, "weight_decay": 2**-6},
    needs_params=True,
    eager_anchor="chain",
    drive=("learning_rate", 0.5),
    # Its max_value clips each modulus: tested against NumPy in test_aliases.
    make_complex=lambda: omc.momclip_sgd(
      optax.linear_schedule(0.1, 0.01, 10), 0.5, max_norm=1.0, dampening=0.5, weight_decay=2**-6
    ),
  ),
  Case(
    "mars",
    lambda: omc.mars(0.5, 0.9),
    omc.mars,
    {"gamma": 0.5, "beta1": 0.9},
    drive=("gamma", 0.0),
  ),
  Case(
    "adagc",
    lambda: omc.adagc(1.05, beta=0.9, warmup_steps=2),
    omc.adagc,
    {"lambda_rel": 1.05, "beta": 0.9, "lambda_abs": 1.0, "warmup_steps": 2, "eps": 1e-8},
    drive=("lambda_rel", 0.5),
    inject={"warmup_steps": 2},
  ),
  Case(  # around momentum with its negative scale: some components climb the gradient
    "cautious",
    lambda: omc.cautious(optax.chain(omc.heavy_ball(0.9), optax.scale(-0.5))),
    omc.cautious,
    {"inner": optax.chain(omc.heavy_ball(0.9), optax.scale(-0.5))},
    eager_anchor="chain",
  ),
  # Later issues append their transformations here.
]

# Public names that are not transformations (checked elsewhere).
NOT_TRANSFORMS = {"global_norm", "metrics", "register_statistics", "with_value_checks", "demon"}
