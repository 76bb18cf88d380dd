"""Every transformation's state survives an orbax save/restore; training resumes bit-identically."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from registry import CASES, Case
from test_contract import _grads, _params

import optax_momclip as omc

BEFORE, AFTER = 5, 3  # steps before the save (autoclip's window of 4 wraps) and after it


@pytest.fixture(scope="module")
def checkpointer():
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  yield ckptr
  ckptr.close()


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _avals(tree):
  return [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert _avals(a) == _avals(b)  # shapes, dtypes and weak types: no retrace on resume
  assert _bits(a) == _bits(b)


def _composite():
  """A nested state: guard around clips, Adam (EmptyState, counts) and injected hyperparams."""
  inner = optax.chain(
    omc.autoclip(50.0, window=3),
    omc.zclip(2.0, warmup_steps=2),
    optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
  )
  return omc.skip_bad_steps(inner, z_threshold=2.0, warmup_steps=2, max_norm=15.0)


CHECKPOINTED = [*CASES, Case("composite", _composite, omc.skip_bad_steps, {})]


@pytest.mark.parametrize("case", CHECKPOINTED, ids=[c.name for c in CHECKPOINTED])
def test_state_survives_orbax_and_training_resumes_bit_identically(case, checkpointer, tmp_path):
  tx = case.make()
  params = _params()
  update = jax.jit(tx.update)

  def train(state, params, steps):
    outs = []
    for t in steps:
      u, state = update(_grads(t), state, params)
      params = optax.apply_updates(params, u)
      outs.append(u)
    return outs, state, params

  _, state, params = train(tx.init(params), params, range(BEFORE))
  checkpointer.save(tmp_path / "ckpt", {"opt_state": state, "params": params})
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"opt_state": state, "params": params})
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  _assert_bit_identical(restored["opt_state"], state)
  assert type(restored["opt_state"]) is type(state)

  steps = range(BEFORE, BEFORE + AFTER)
  want = train(state, params, steps)
  got = train(restored["opt_state"], restored["params"], steps)
  _assert_bit_identical(got, want)
