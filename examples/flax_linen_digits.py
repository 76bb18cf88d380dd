"""Flax linen: an MLP on sklearn's digits with a ``TrainState`` and clipped momentum SGD.

Run:  python examples/flax_linen_digits.py

The optimizer is an ordinary optax transformation, so ``TrainState.create(...,
tx=...)`` takes it as is; the jitted step donates the whole ``TrainState`` and
returns ``omc.metrics(state.opt_state)`` computed inside it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits

import optax_momclip as omc


def digits(seed: int = 0):
  """Standardised ``load_digits``: ``(x_train, y_train, x_test, y_test)``, 360 test images."""
  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order].astype(np.float32), y[order].astype(np.int32)
  x_train, x_test, y_train, y_test = x[360:], x[:360], y[360:], y[:360]
  mean, std = x_train.mean(0), x_train.std(0) + 1e-3
  return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


class MLP(nn.Module):
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def make_optimizer(learning_rate: float = 0.05) -> optax.GradientTransformation:
  """Global-norm clip at 1, then SGD with heavy-ball momentum 0.9."""
  return omc.momclip_sgd(learning_rate, 0.9, max_norm=1.0)


def create_state(seed: int = 0, din: int = 64) -> train_state.TrainState:
  model = MLP()
  params = model.init(jax.random.key(seed), jnp.zeros((1, din)))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer())


# Donating the state lets XLA update parameters and momentum in place.
@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: train_state.TrainState, x: jax.Array, y: jax.Array):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads=grads)
  return state, loss, omc.metrics(state.opt_state)


@jax.jit
def accuracy(state: train_state.TrainState, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(state.apply_fn({"params": state.params}, x).argmax(-1) == y)


def train(steps: int = 300, batch_size: int = 64, seed: int = 0, log_every: int = 100):
  """Trains and returns ``(state, test_accuracy, logged_metrics)``."""
  x_train, y_train, x_test, y_test = digits()
  state = create_state(seed, x_train.shape[1])
  rng = np.random.default_rng(seed)
  logged = []
  for step in range(1, steps + 1):
    idx = rng.integers(0, len(x_train), batch_size)
    state, loss, stats = train_step(state, x_train[idx], y_train[idx])
    if step % log_every == 0 or step == steps:
      stats = {k: float(v) for k, v in stats.items()}
      logged.append({"step": step, "loss": float(loss), **stats})
      norm = next(v for k, v in stats.items() if k.endswith("/grad_norm"))
      frac = next(v for k, v in stats.items() if k.endswith("/clip_fraction"))
      print(f"step {step:4d}  loss {float(loss):.4f}  grad norm {norm:.3f}  clipped {frac:.0%}")
  return state, float(accuracy(state, x_test, y_test)), logged


if __name__ == "__main__":
  _, acc, _ = train()
  print(f"test accuracy {acc:.3f}")
