"""Running statistics of a norm: a warm-up mean and variance, then EMAs; z-scores against them."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# ZClip's eps in the z-score denominator (reference implementation).
Z_EPS = 1e-6
# The smallest spread, relative to the mean, that a z-score is taken against (see `zscore`).
_INFORMATIVE = 1e-2


def norm_statistics(
  norm: jax.Array,
  fed: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  count: jax.Array,
  warmup_steps: Any,
  alpha: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Feeds ``norm`` (where ``fed``) into a warm-up mean/variance, then an EMA of both.

  While ``count < warmup_steps`` the mean and population variance of the norms
  so far are kept (Welford's update); afterwards
  ``μ ← αμ + (1-α)x, σ² ← ασ² + (1-α)(x - μ_new)²`` (ZClip's order). Returns
  ``(mean, var, count)``, unchanged where not ``fed``.
  """
  warm = count < warmup_steps
  k = (count + 1).astype(mean.dtype)
  delta = norm - mean
  w_mean = mean + delta / k
  w_var = var + (delta * (norm - w_mean) - var) / k
  e_mean = alpha * mean + (1.0 - alpha) * norm
  e_var = alpha * var + (1.0 - alpha) * jnp.square(norm - e_mean)
  new_mean = jnp.where(fed, jnp.where(warm, w_mean, e_mean), mean)
  new_var = jnp.where(fed, jnp.where(warm, w_var, e_var), var)
  new_count = jnp.where(fed & warm, count + 1, count)
  return new_mean, new_var, new_count


def zscore(
  norm: jax.Array, mean: jax.Array, var: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(z, σ, informative)``: ZClip's ``z = (norm - μ)/(σ + 1e-6)``, where σ says something.

  A z-score measures a norm against the spread of the recent ones. Where
  that spread is below ``0.01·|μ|`` (identical norms, a warm-up of one step,
  or a spread that ZClip's own clipping has shrunk away) it says nothing: a
  division by ``1e-6`` would call every larger norm a spike and, as spikes
  never (or, clipped, barely) enter the statistics, freeze the rule forever.
  There ``informative`` is false and ``z`` is 0: no step is a spike, and the
  norms that follow restore the spread. Safe to differentiate at ``σ = 0``.
  """
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1)), 0)
  informative = positive & (std >= _INFORMATIVE * jnp.abs(mean))
  z = jnp.where(informative, (norm - mean) / (std + Z_EPS), 0)
  return z, std, informative
