"""Flax NNX: an MLP on sklearn's digits trained with clipped momentum SGD.

Run:  python examples/flax_nnx_digits.py

Shows the three things an NNX training loop needs from optax_momclip:
``nnx.Optimizer(model, tx, wrt=nnx.Param)``, a jitted step that donates the
model and optimizer buffers, and ``omc.metrics(optimizer.opt_state)`` (the
pre-clip gradient norm and the clip fraction) read inside that step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
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


class MLP(nnx.Module):
  def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(din, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.out(x)


def make_optimizer(learning_rate: float = 0.05) -> optax.GradientTransformation:
  """Global-norm clip at 1, then SGD with heavy-ball momentum 0.9."""
  return omc.momclip_sgd(learning_rate, 0.9, max_norm=1.0)


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


# Donating the model and the optimizer lets XLA update parameters and momentum in place.
@nnx.jit(donate_argnums=(0, 1))
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss, omc.metrics(optimizer.opt_state)


@nnx.jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(model(x).argmax(-1) == y)


def train(steps: int = 300, batch_size: int = 64, seed: int = 0, log_every: int = 100):
  """Trains and returns ``(model, optimizer, test_accuracy, logged_metrics)``."""
  x_train, y_train, x_test, y_test = digits()
  model = MLP(x_train.shape[1], 128, 10, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, make_optimizer(), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  logged = []
  for step in range(1, steps + 1):
    idx = rng.integers(0, len(x_train), batch_size)
    loss, stats = train_step(model, optimizer, x_train[idx], y_train[idx])
    if step % log_every == 0 or step == steps:
      stats = {k: float(v) for k, v in stats.items()}
      logged.append({"step": step, "loss": float(loss), **stats})
      norm = next(v for k, v in stats.items() if k.endswith("/grad_norm"))
      frac = next(v for k, v in stats.items() if k.endswith("/clip_fraction"))
      print(f"step {step:4d}  loss {float(loss):.4f}  grad norm {norm:.3f}  clipped {frac:.0%}")
  test_acc = float(accuracy(model, x_test, y_test))
  return model, optimizer, test_acc, logged


if __name__ == "__main__":
  _, _, acc, _ = train()
  print(f"test accuracy {acc:.3f}")
