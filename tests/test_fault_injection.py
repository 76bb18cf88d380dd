"""Fault injection: an MLP on load_digits survives NaN and x1000 gradients when protected.

Run as a script (``python tests/test_fault_injection.py``) to print the table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import optax_momclip as omc

STEPS, BATCH, SEED = 1000, 64, 0
RATE = 0.02  # of steps given NaN gradients, and as many given gradients x SPIKE
SPIKE = 1e3
FIRST = 50  # injections start after the detectors' warm-up (25 steps): the warm-up is unprotected


def _data():
  x, y = load_digits(return_X_y=True)
  perm = np.random.default_rng(SEED).permutation(len(y))
  x, y = (x[perm] / 16.0).astype(np.float32), y[perm].astype(np.int32)
  n_test = 360
  return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def _injections():
  rng = np.random.default_rng(SEED + 1)
  n = round(RATE * STEPS)
  steps = rng.choice(np.arange(FIRST, STEPS), size=2 * n, replace=False)
  nan_at, spike_at = np.zeros(STEPS, bool), np.zeros(STEPS, bool)
  nan_at[steps[:n]], spike_at[steps[n:]] = True, True
  return nan_at, spike_at


def _init(key):
  k1, k2 = jax.random.split(key)
  return {
    "hidden": {"kernel": jax.random.normal(k1, (64, 64)) / 8.0, "bias": jnp.zeros(64)},
    "out": {"kernel": jax.random.normal(k2, (64, 10)) / 8.0, "bias": jnp.zeros(10)},
  }


def _logits(params, x):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y).mean()


def _base():
  return optax.adam(1e-2)


ARMS = {
  "clean": (_base, False, False),
  "unprotected, spikes only": (_base, False, True),
  "unprotected": (_base, True, True),
  "skip_bad_steps": (
    lambda: omc.skip_bad_steps(_base(), z_threshold=6.0, warmup_steps=25),
    True,
    True,
  ),
  "zclip (+ skip NaN)": (
    lambda: omc.skip_bad_steps(optax.chain(omc.zclip(), _base())),
    True,
    True,
  ),
  "autoclip (+ skip NaN)": (
    lambda: omc.skip_bad_steps(optax.chain(omc.autoclip(), _base())),
    True,
    True,
  ),
}


def _train(make_tx, inject_nan, inject_spike):
  (xtr, ytr), (xte, yte) = jax.tree.map(jnp.asarray, _data())
  nan_at, spike_at = _injections()
  batches = np.random.default_rng(SEED + 2).integers(0, len(ytr), (STEPS, BATCH))
  tx = make_tx()

  @jax.jit
  def run(params, batches, nan_at, spike_at):
    def step(carry, xs):
      params, state = carry
      idx, nan, spike = xs
      g = jax.grad(_loss)(params, xtr[idx], ytr[idx])
      factor = jnp.where(nan & inject_nan, jnp.nan, 1.0) * jnp.where(
        spike & inject_spike, SPIKE, 1.0
      )
      g = jax.tree.map(lambda x: x * factor, g)
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
      m = omc.metrics(state)
      skipped = m.get("skip_bad_steps/last_step_skipped", jnp.array(False))
      scales = [v for k, v in m.items() if k.endswith("/clip_scale")]
      clipped = jnp.any(jnp.stack(scales) < 1.0) if scales else jnp.array(False)
      nonfinite = sum(jnp.sum(~jnp.isfinite(p)) for p in jax.tree.leaves(params))
      return (params, state), (skipped, clipped, nonfinite)

    params0 = _init(jax.random.key(SEED))
    (params, _), trace = jax.lax.scan(
      step, (params0, tx.init(params0)), (batches, nan_at, spike_at)
    )
    return params, trace

  params, (skipped, clipped, nonfinite) = run(
    _init(jax.random.key(SEED)), batches, nan_at, spike_at
  )
  accuracy = float(jnp.mean(jnp.argmax(_logits(params, xte), -1) == yte))
  return {
    "accuracy": 100.0 * accuracy,
    "skipped": np.asarray(skipped),
    "clipped": np.asarray(clipped),
    "nonfinite_ever": int(np.max(nonfinite)),
    "nonfinite_final": int(nonfinite[-1]),
  }


@functools.cache
def results():
  return {name: _train(*arm) for name, arm in ARMS.items()}


def table() -> str:
  nan_at, spike_at = _injections()
  rows = [
    "| arm | test accuracy (%) | steps skipped (at NaN / at spikes / other) "
    "| steps clipped (at spikes / other) | non-finite params (ever / final) |",
    "| --- | ---: | --- | --- | --- |",
  ]
  for name, r in results().items():
    s, c = r["skipped"], r["clipped"]
    rows.append(
      f"| {name} | {r['accuracy']:.2f} | {s.sum()} ({s[nan_at].sum()} / {s[spike_at].sum()} / "
      f"{s[~nan_at & ~spike_at].sum()}) | {c.sum()} ({c[spike_at].sum()} / {c[~spike_at].sum()}) "
      f"| {r['nonfinite_ever']} / {r['nonfinite_final']} |"
    )
  injected = f"{nan_at.sum()} NaN steps and {spike_at.sum()} x{SPIKE:g} steps in {STEPS}"
  return "\n".join([f"Fault injection, Adam(1e-2), MLP 64-64-10 on load_digits: {injected}", *rows])


PROTECTED = ["skip_bad_steps", "zclip (+ skip NaN)", "autoclip (+ skip NaN)"]


def test_clean_run_learns():
  assert results()["clean"]["accuracy"] > 90.0


@pytest.mark.parametrize("arm", PROTECTED)
def test_protected_training_matches_the_clean_run(arm):
  r, clean = results()[arm], results()["clean"]
  nan_at, spike_at = _injections()
  assert r["nonfinite_ever"] == 0
  assert abs(r["accuracy"] - clean["accuracy"]) <= 1.0
  skipped_at = np.flatnonzero(r["skipped"])
  if arm == "skip_bad_steps":  # every NaN and every spike, nothing else
    np.testing.assert_array_equal(skipped_at, np.flatnonzero(nan_at | spike_at))
  else:  # the NaN steps are skipped, the spikes clipped
    np.testing.assert_array_equal(skipped_at, np.flatnonzero(nan_at))
    assert r["skipped"].sum() == nan_at.sum()
    assert r["clipped"][spike_at].all()


def test_unprotected_training_is_damaged():
  r = results()
  assert r["unprotected"]["nonfinite_final"] > 0  # one NaN step poisons every parameter
  assert r["unprotected, spikes only"]["accuracy"] < r["clean"]["accuracy"] - 1.0
  print("\n" + table())


if __name__ == "__main__":
  print(table())
