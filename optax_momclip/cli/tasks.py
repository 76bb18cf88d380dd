"""The demo's two tasks: Pascanu's temporal-order RNN problem and a deep plain MLP on digits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """A supervised problem the demo trains many runs of side by side.

  Attributes:
    name: short key used in the JSON and file names.
    title: one line for tables and plots.
    init: ``key -> params`` of one run.
    batch: ``(key, step) -> batch`` of one run's training stream.
    loss: ``(params, batch) -> scalar`` mean cross-entropy.
    accuracy: ``params -> scalar`` accuracy on a fixed held-out set.
    num_classes: for the chance level ``1/K`` and chance loss ``ln K``.
    solved_at: the held-out accuracy that counts as solving the task.
  """

  name: str
  title: str
  init: Callable[[jax.Array], Params]
  batch: Callable[[jax.Array, jax.Array], Any]
  loss: Callable[[Params, Any], jax.Array]
  accuracy: Callable[[Params], jax.Array]
  num_classes: int
  solved_at: float

  @property
  def chance_loss(self) -> float:
    return math.log(self.num_classes)


# --- Temporal order (Hochreiter & Schmidhuber 1997, task 6a; Pascanu et al. 2013) ---

_SYMBOLS = 6  # 0, 1: the two relevant symbols X, Y; 2..5: distractors a, b, c, d
_ORDER_CLASSES = 4  # XX, YX, XY, YY


def temporal_order_batch(
  key: jax.Array, batch_size: int, min_len: int, max_len: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sequences whose class is the order of two relevant symbols among distractors.

  As in Pascanu et al.'s code: for a sequence of length ``L`` the first
  relevant symbol sits in ``[L/10, 2L/10)``, the second in ``[5L/10, 6L/10)``,
  each X or Y; every other step is one of four distractors. Sequences are
  padded with zero inputs to ``max_len``.

  Returns:
    ``(x, y, lengths)``: one-hot inputs f32[max_len, batch, 6], labels
    i32[batch] in ``[0, 4)``, lengths i32[batch] in ``[min_len, max_len]``.
  """
  k_len, k_p0, k_p1, k_v0, k_v1, k_sym = jax.random.split(key, 6)
  n = (batch_size,)
  length = jax.random.randint(k_len, n, min_len, max_len + 1)
  tenth = jnp.maximum(length // 10, 1)
  p0 = jax.random.randint(k_p0, n, tenth, 2 * tenth)
  p1 = jax.random.randint(k_p1, n, 5 * tenth, 6 * tenth)
  v0 = jax.random.randint(k_v0, n, 0, 2)
  v1 = jax.random.randint(k_v1, n, 0, 2)
  t = jnp.arange(max_len)[:, None]
  sym = jax.random.randint(k_sym, (max_len, batch_size), 2, _SYMBOLS)
  sym = jnp.where(t == p0, v0, jnp.where(t == p1, v1, sym))
  x = jax.nn.one_hot(sym, _SYMBOLS) * (t < length)[..., None]
  return x, v0 + 2 * v1, length


def rnn_init(key: jax.Array, hidden: int, spectral_radius: float = 1.0) -> Params:
  """A tanh RNN: ``h_t = tanh(x_t W_x + h_{t-1} W_h + b_h)``, logits ``h_L W_y + b_y``.

  ``W_h`` is Gaussian with standard deviation ``spectral_radius/sqrt(hidden)``,
  so its spectral radius is about ``spectral_radius``; at 1 gradients through
  time sit at the edge of exploding, the regime of Pascanu et al.
  """
  kx, kh, ky = jax.random.split(key, 3)
  return {
    "w_x": 0.1 * jax.random.normal(kx, (_SYMBOLS, hidden)),
    "w_h": spectral_radius / math.sqrt(hidden) * jax.random.normal(kh, (hidden, hidden)),
    "b_h": jnp.zeros((hidden,)),
    "w_y": 0.1 * jax.random.normal(ky, (hidden, _ORDER_CLASSES)),
    "b_y": jnp.zeros((_ORDER_CLASSES,)),
  }


def rnn_apply(params: Params, x: jax.Array, length: jax.Array) -> jax.Array:
  """Logits f32[batch, 4] read from each sequence's last real step."""

  def cell(h: jax.Array, inp: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    x_t, t = inp
    h_new = jnp.tanh(x_t @ params["w_x"] + h @ params["w_h"] + params["b_h"])
    return jnp.where((t < length)[:, None], h_new, h), None

  h0 = jnp.zeros((x.shape[1], params["w_h"].shape[0]), x.dtype)
  h, _ = lax.scan(cell, h0, (x, jnp.arange(x.shape[0])))
  return h @ params["w_y"] + params["b_y"]


def temporal_order_task(
  *,
  hidden: int = 50,
  batch_size: int = 20,
  min_len: int = 20,
  max_len: int = 40,
  test_size: int = 1000,
  spectral_radius: float = 1.0,
) -> Task:
  """The temporal-order task with a fixed held-out set of ``test_size`` sequences."""
  test = temporal_order_batch(jax.random.key(12345), test_size, min_len, max_len)

  def loss(params: Params, batch: Any) -> jax.Array:
    x, y, length = batch
    logits = rnn_apply(params, x, length)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def accuracy(params: Params) -> jax.Array:
    x, y, length = test
    return jnp.mean(rnn_apply(params, x, length).argmax(-1) == y)

  return Task(
    name="temporal_order",
    title=f"temporal order, tanh RNN H={hidden}, lengths {min_len}-{max_len}",
    init=lambda key: rnn_init(key, hidden, spectral_radius),
    batch=lambda key, step: temporal_order_batch(
      jax.random.fold_in(key, step), batch_size, min_len, max_len
    ),
    loss=loss,
    accuracy=accuracy,
    num_classes=_ORDER_CLASSES,
    solved_at=0.99,  # Pascanu et al.: solved when the test error is below 1%
  )


# --- Deep plain MLP on sklearn's digits ---


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
  """``load_digits`` standardised per feature: ``(x_train, y_train, x_test, y_test)``."""
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order].astype(np.float32), y[order].astype(np.int32)
  n_test = round(len(x) * test_fraction)
  x_train, x_test = x[n_test:], x[:n_test]
  mean, std = x_train.mean(0), x_train.std(0) + 1e-3
  return (x_train - mean) / std, y[n_test:], (x_test - mean) / std, y[:n_test]


def mlp_init(key: jax.Array, sizes: tuple[int, ...]) -> Params:
  """He-initialised ReLU layers ``{"layer_i": {"kernel": (in, out), "bias": (out,)}}``."""
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"layer_{i}": {
      "kernel": jax.random.normal(k, (n_in, n_out)) * math.sqrt(2.0 / n_in),
      "bias": jnp.zeros((n_out,)),
    }
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
  }


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
  """A plain ReLU MLP (no normalisation layers); returns logits."""
  n = len(params)
  for i in range(n):
    layer = params[f"layer_{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def digits_task(*, depth: int = 8, width: int = 64, batch_size: int = 64) -> Task:
  """A ``depth``-layer ReLU MLP of ``width`` units on ``load_digits``, minibatch SGD."""
  x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in load_digits_split())
  sizes = (x_train.shape[1], *([width] * (depth - 1)), 10)

  def batch(key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    idx = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, x_train.shape[0])
    return x_train[idx], y_train[idx]

  def loss(params: Params, batch: Any) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()

  def accuracy(params: Params) -> jax.Array:
    return jnp.mean(mlp_apply(params, x_test).argmax(-1) == y_test)

  return Task(
    name="digits",
    title=f"digits, plain ReLU MLP depth {depth} width {width}, lr sweep",
    init=lambda key: mlp_init(key, sizes),
    batch=batch,
    loss=loss,
    accuracy=accuracy,
    num_classes=10,
    solved_at=0.9,
  )
