"""Running statistics of a norm or a loss (EMA or rolling window) and spikes against them."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# ZClip's eps in the z-score denominator (reference implementation).
Z_EPS = 1e-6
# The smallest spread, relative to the mean, that a spike is measured against (`informative`).
INFORMATIVE = 1e-3


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
  ``(mean, var, count)``, unchanged where not ``fed``. Callers leave values that are
  not `squarable` unfed.
  """
  warm = count < warmup_steps
  k = (count + 1).astype(mean.dtype)
  delta = norm - mean
  w_mean = mean + delta / k
  w_var = var + (delta * (norm - w_mean) - var) / k
  e_mean = alpha * mean + (1.0 - alpha) * norm
  e_var = alpha * var + (1.0 - alpha) * jnp.square(norm - e_mean)
  new_mean = jnp.where(fed, jnp.where(warm, w_mean, e_mean), mean)
  new_var = jnp.where(
    fed, jnp.minimum(jnp.where(warm, w_var, e_var), jnp.finfo(var.dtype).max), var
  )
  new_count = jnp.where(fed & warm, count + 1, count)
  return new_mean, new_var, new_count


def squarable(value: jax.Array) -> jax.Array:
  """Whether ``value``'s square fits its dtype (``|value| <= 1.8e19`` in float32).

  A larger value never enters the EMA statistics: its variance could not be
  held, it would overflow to inf and then NaN, and every later step would be
  judged against a NaN spread. Such a value is a blow-up whichever rule judges
  it. (A window, recomputed from its values, reads an inf spread while the
  value is in it, and recovers when it leaves.)
  """
  return jnp.abs(value) <= jnp.sqrt(jnp.finfo(jnp.asarray(value).dtype).max)


def informative(std: jax.Array, mean: jax.Array) -> jax.Array:
  """Whether a spread ``σ`` says anything about the values: ``σ > 1e-3·|μ|`` (NaN: yes).

  Below it (identical values, a warm-up of one step, or a spread that ZClip's
  own clipping has shrunk away) a division by σ would call every larger
  value a spike and, as spikes never (or, clipped, barely) enter the
  statistics, freeze the rule forever. There no step is a spike, and the
  values that follow restore the spread. A NaN spread (a window poisoned by
  a recorded NaN, as OLMo-core and MaxText record it) decides, as theirs does.
  """
  return ~(std <= INFORMATIVE * jnp.abs(mean))


def zscore(
  value: jax.Array, mean: jax.Array, var: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(z, σ, informative)``: ZClip's ``z = (value - μ)/(σ + 1e-6)``, 0 where σ says nothing.

  Safe to differentiate at ``σ = 0``.
  """
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1)), 0)
  useful = informative(std, mean)
  return jnp.where(useful, (value - mean) / (std + Z_EPS), 0), std, useful


def window_moments(values: jax.Array, size: jax.Array, ddof: int) -> tuple[jax.Array, jax.Array]:
  """``(mean, var)`` of the first ``size`` slots of a ring buffer; ``ddof=1``: the sample variance.

  As MaxText computes them (masked sums; a variance over one value is 0).
  """
  held = jnp.arange(values.shape[0]) < size
  n = jnp.maximum(size, 1).astype(values.dtype)
  mean = jnp.sum(jnp.where(held, values, 0)) / n
  squares = jnp.sum(jnp.where(held, jnp.square(values - mean), 0))
  return mean, squares / jnp.maximum(size - ddof, 1).astype(values.dtype)


def window_push(
  values: jax.Array, size: jax.Array, index: jax.Array, value: jax.Array, fed: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(values, size, index)`` of a ring buffer with ``value`` written at ``index`` if ``fed``."""
  n = values.shape[0]
  return (
    jnp.where(fed, values.at[index].set(value.astype(values.dtype)), values),
    jnp.where(fed, jnp.minimum(size + 1, n), size),
    jnp.where(fed, (index + 1) % n, index),
  )
