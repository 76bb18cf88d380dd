"""Exact, fast gradient clipping and momentum as optax GradientTransformations."""

from optax_momclip._adaptive import AutoClipState as AutoClipState
from optax_momclip._adaptive import ZClipState as ZClipState
from optax_momclip._adaptive import autoclip as autoclip
from optax_momclip._adaptive import zclip as zclip
from optax_momclip._aliases import MomclipSgdState as MomclipSgdState
from optax_momclip._aliases import momclip_sgd as momclip_sgd
from optax_momclip._averaged import AggmoState as AggmoState
from optax_momclip._averaged import QhmState as QhmState
from optax_momclip._averaged import aggmo as aggmo
from optax_momclip._averaged import qhm as qhm
from optax_momclip._clipping import ClipByGlobalNormState as ClipByGlobalNormState
from optax_momclip._clipping import ClipByNormState as ClipByNormState
from optax_momclip._clipping import ClipByValueState as ClipByValueState
from optax_momclip._clipping import clip_by_global_norm as clip_by_global_norm
from optax_momclip._clipping import clip_by_norm as clip_by_norm
from optax_momclip._clipping import clip_by_value as clip_by_value
from optax_momclip._combined import ClippedMomentumState as ClippedMomentumState
from optax_momclip._combined import NormalizedMomentumState as NormalizedMomentumState
from optax_momclip._combined import clipped_momentum as clipped_momentum
from optax_momclip._combined import normalized_momentum as normalized_momentum
from optax_momclip._corrections import MarsState as MarsState
from optax_momclip._corrections import mars as mars
from optax_momclip._guards import SkipBadStepsState as SkipBadStepsState
from optax_momclip._guards import skip_bad_steps as skip_bad_steps
from optax_momclip._masks import CautiousState as CautiousState
from optax_momclip._masks import cautious as cautious
from optax_momclip._metrics import metrics as metrics
from optax_momclip._metrics import register_statistics as register_statistics
from optax_momclip._metrics import with_value_checks as with_value_checks
from optax_momclip._momentum import EmaMomentumState as EmaMomentumState
from optax_momclip._momentum import HeavyBallState as HeavyBallState
from optax_momclip._momentum import ema_momentum as ema_momentum
from optax_momclip._momentum import heavy_ball as heavy_ball
from optax_momclip._norms import global_norm as global_norm
from optax_momclip._schedules import demon as demon
from optax_momclip._unitwise import AdaGCState as AdaGCState
from optax_momclip._unitwise import AdaptiveGradClipState as AdaptiveGradClipState
from optax_momclip._unitwise import adagc as adagc
from optax_momclip._unitwise import adaptive_grad_clip as adaptive_grad_clip

__version__ = "0.2.0"

__all__ = [
  "AdaGCState",
  "AdaptiveGradClipState",
  "AggmoState",
  "AutoClipState",
  "CautiousState",
  "ClipByGlobalNormState",
  "ClipByNormState",
  "ClipByValueState",
  "ClippedMomentumState",
  "EmaMomentumState",
  "HeavyBallState",
  "MarsState",
  "MomclipSgdState",
  "NormalizedMomentumState",
  "QhmState",
  "SkipBadStepsState",
  "ZClipState",
  "adagc",
  "adaptive_grad_clip",
  "aggmo",
  "autoclip",
  "cautious",
  "clip_by_global_norm",
  "clip_by_norm",
  "clip_by_value",
  "clipped_momentum",
  "demon",
  "ema_momentum",
  "global_norm",
  "heavy_ball",
  "mars",
  "metrics",
  "momclip_sgd",
  "normalized_momentum",
  "qhm",
  "register_statistics",
  "skip_bad_steps",
  "with_value_checks",
  "zclip",
]
