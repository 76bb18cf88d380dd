"""Exact, fast gradient clipping and momentum as optax GradientTransformations."""

from optax_momclip._adaptive import AutoClipState as AutoClipState
from optax_momclip._adaptive import ZClipState as ZClipState
from optax_momclip._adaptive import autoclip as autoclip
from optax_momclip._adaptive import zclip as zclip
from optax_momclip._agc import AdaptiveGradClipState as AdaptiveGradClipState
from optax_momclip._agc import adaptive_grad_clip as adaptive_grad_clip
from optax_momclip._clipping import ClipByGlobalNormState as ClipByGlobalNormState
from optax_momclip._clipping import ClipByNormState as ClipByNormState
from optax_momclip._clipping import ClipByValueState as ClipByValueState
from optax_momclip._clipping import clip_by_global_norm as clip_by_global_norm
from optax_momclip._clipping import clip_by_norm as clip_by_norm
from optax_momclip._clipping import clip_by_value as clip_by_value
from optax_momclip._guards import SkipBadStepsState as SkipBadStepsState
from optax_momclip._guards import skip_bad_steps as skip_bad_steps
from optax_momclip._metrics import metrics as metrics
from optax_momclip._metrics import with_value_checks as with_value_checks
from optax_momclip._norms import global_norm as global_norm

__version__ = "0.1.0"

__all__ = [
  "AdaptiveGradClipState",
  "AutoClipState",
  "ClipByGlobalNormState",
  "ClipByNormState",
  "ClipByValueState",
  "SkipBadStepsState",
  "ZClipState",
  "adaptive_grad_clip",
  "autoclip",
  "clip_by_global_norm",
  "clip_by_norm",
  "clip_by_value",
  "global_norm",
  "metrics",
  "skip_bad_steps",
  "with_value_checks",
  "zclip",
]
