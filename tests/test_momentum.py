"""Momentum transformations against optax, NumPy re-derivations, identities and theory."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import optax_momclip as omc

STEPS = 12


def _grads(steps=STEPS, seed=0):
  """A stacked sequence of gradient trees (leading axis: step) of varied shapes."""
  k = jax.random.split(jax.random.key(seed), 3)
  return {
    "w": jax.random.normal(k[0], (steps, 3, 4)),
    "b": jax.random.normal(k[1], (steps, 4)) * 0.1,
    "s": jax.random.normal(k[2], (steps,)) * 5.0,
  }


def _params():
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), _grads(1))


def _run(tx, grads=None, params=None):
  """All updates of ``tx`` over the stacked ``grads``, in one jitted scan."""
  grads = _grads() if grads is None else grads
  params = _params() if params is None else params

  @jax.jit
  def run(grads):
    def body(state, g):
      u, state = tx.update(g, state, params)
      return state, u

    state, updates = jax.lax.scan(body, tx.init(params), grads)
    return updates, state

  return run(grads)


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _torch_sgd_rule(grads, mus, d, nesterov):
  """torch.optim.SGD's momentum direction, re-derived in float64 NumPy."""
  out, buf = [], None
  for t, g in enumerate(grads):
    mu = mus[t]
    if mu == 0:
      out.append(g)
      continue
    buf = g.copy() if buf is None else mu * buf + (1 - d) * g
    out.append(g + mu * buf if nesterov else buf)
  return np.stack(out)


def _leafwise(fn, grads, *args):
  return {k: fn(np.asarray(v, np.float64), *args) for k, v in grads.items()}


# heavy_ball


@pytest.mark.parametrize("nesterov", [False, True])
def test_heavy_ball_without_dampening_is_optax_trace(nesterov):
  ours, _ = _run(omc.heavy_ball(0.9, nesterov=nesterov))
  theirs, _ = _run(optax.trace(0.9, nesterov=nesterov))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
  "mu,d,nesterov", [(0.9, 0.5, False), (0.9, 0.0, True), (0.5, 0.1, False), (0.0, 0.5, False)]
)
def test_heavy_ball_is_pytorch_sgd_momentum(mu, d, nesterov):
  """First buffer undamped, then mu*b + (1-d)*g; zero momentum returns g (no buffer)."""
  ours, state = _run(omc.heavy_ball(mu, dampening=d, nesterov=nesterov))
  expected = _leafwise(_torch_sgd_rule, _grads(), [mu] * STEPS, d, nesterov)
  chex.assert_trees_all_close(_np(ours), expected, rtol=1e-5, atol=1e-6)
  assert int(state.count) == STEPS


def test_heavy_ball_first_step_is_the_undamped_gradient():
  g = {"w": jnp.array([2.0, -4.0])}
  tx = omc.heavy_ball(0.9, dampening=0.9)
  u, state = tx.update(g, tx.init(g))
  chex.assert_trees_all_equal(u, g)
  chex.assert_trees_all_equal(state.momentum_buffer, g)


def test_heavy_ball_momentum_schedule_is_evaluated_on_the_count():
  schedule = optax.linear_schedule(0.9, 0.1, STEPS)
  ours, _ = _run(omc.heavy_ball(schedule, dampening=0.25))
  mus = [float(schedule(t)) for t in range(STEPS)]
  expected = _leafwise(_torch_sgd_rule, _grads(), mus, 0.25, False)
  chex.assert_trees_all_close(_np(ours), expected, rtol=1e-5, atol=1e-6)


# ema_momentum


@pytest.mark.parametrize("debias", [False, True])
def test_ema_momentum_is_optax_ema(debias):
  ours, _ = _run(omc.ema_momentum(0.8, debias=debias))
  theirs, _ = _run(optax.ema(0.8, debias=debias))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)


def test_ema_momentum_debiases_a_schedule_exactly():
  """With a decay schedule the correction is 1 - prod(beta_s): a constant stream stays put."""
  schedule = optax.linear_schedule(0.5, 0.95, STEPS)
  g = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), _grads())
  ours, state = _run(omc.ema_momentum(schedule, debias=True), grads=g)
  chex.assert_trees_all_close(ours, g, rtol=1e-6)
  betas = np.array([float(schedule(t)) for t in range(STEPS)])
  np.testing.assert_allclose(state.decay_product, np.prod(betas), rtol=1e-6)


# qhm


def test_qhm_with_nu_equal_beta_is_nesterov_heavy_ball():
  beta = 0.9
  ours, _ = _run(optax.chain(omc.qhm(beta, beta), optax.scale(1 / (1 - beta))))
  nesterov, _ = _run(omc.heavy_ball(beta, nesterov=True))
  chex.assert_trees_all_close(ours, nesterov, rtol=1e-5, atol=1e-6)


def test_qhm_with_nu_one_is_ema_momentum_and_nu_zero_is_sgd():
  ours, _ = _run(omc.qhm(0.8, 1.0))
  ema, _ = _run(omc.ema_momentum(0.8, debias=False))
  chex.assert_trees_all_close(ours, ema, rtol=1e-6, atol=0)
  sgd, _ = _run(omc.qhm(0.8, 0.0))
  chex.assert_trees_all_equal(sgd, _grads())


def test_qhm_matches_its_rule():
  beta, nu = 0.99, 0.7

  def rule(g):
    b, out = np.zeros_like(g[0]), []
    for gt in g:
      b = beta * b + (1 - beta) * gt
      out.append((1 - nu) * gt + nu * b)
    return np.stack(out)

  ours, _ = _run(omc.qhm(beta, nu))
  chex.assert_trees_all_close(_np(ours), _leafwise(rule, _grads()), rtol=1e-6, atol=1e-7)


# aggmo


def test_aggmo_with_one_beta_is_heavy_ball():
  ours, _ = _run(omc.aggmo((0.9,)))
  theirs, _ = _run(omc.heavy_ball(0.9))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)


def test_aggmo_matches_its_rule():
  betas = (0.0, 0.9, 0.99)

  def rule(g):
    v, out = np.zeros((3, *g.shape[1:])), []
    for gt in g:
      v = np.array(betas).reshape((3,) + (1,) * gt.ndim) * v + gt
      out.append(v.mean(0))
    return np.stack(out)

  ours, state = _run(omc.aggmo(betas))
  chex.assert_trees_all_close(_np(ours), _leafwise(rule, _grads()), rtol=1e-6, atol=1e-7)
  assert state.momentum_buffer["w"].shape == (3, 3, 4)


# demon


def test_demon_matches_the_paper_formula():
  beta0, total = 0.9, 50
  schedule = omc.demon(beta0, total_steps=total)
  t = np.arange(0, 2 * total)
  frac = 1 - np.minimum(t, total) / total
  expected = beta0 * frac / ((1 - beta0) + beta0 * frac)
  got = jax.jit(jax.vmap(schedule))(jnp.asarray(t))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  assert got.dtype == jnp.float32
  assert float(got[0]) == pytest.approx(beta0) and float(got[-1]) == 0.0


def test_demon_with_huge_total_steps_is_constant_momentum():
  ours, _ = _run(omc.heavy_ball(omc.demon(0.9, total_steps=2**31 - 1)))
  constant, _ = _run(omc.heavy_ball(0.9))
  chex.assert_trees_all_close(ours, constant, rtol=1e-6, atol=0)


# accumulator_dtype


def _bf16(x):
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_bf16_accumulator_stores_bf16_and_returns_the_gradient_dtype():
  """The buffer is rounded to bf16 after each float32 step and is the update; updates stay f32."""
  mu, d = 0.9, 0.25
  params = _params()
  tx = omc.heavy_ball(mu, dampening=d, accumulator_dtype=jnp.bfloat16)
  state = tx.init(params)
  assert all(b.dtype == jnp.bfloat16 for b in jax.tree.leaves(state.momentum_buffer))
  ours, state = _run(tx)
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(ours))
  assert all(b.dtype == jnp.bfloat16 for b in jax.tree.leaves(state.momentum_buffer))

  def rule(g):
    buf, out = None, []
    for gt in g:
      buf = _bf16(gt if buf is None else mu * buf + (1 - d) * gt)
      out.append(buf)
    return np.stack(out), buf

  for name, g in _np(_grads()).items():
    expected, buf = rule(g)
    np.testing.assert_allclose(ours[name], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.momentum_buffer[name], np.float64), buf, rtol=1e-5)


@pytest.mark.parametrize(
  "make",
  [
    lambda dt: omc.ema_momentum(0.9, debias=True, accumulator_dtype=dt),
    lambda dt: omc.qhm(0.9, 0.7, accumulator_dtype=dt),
    lambda dt: omc.aggmo((0.0, 0.9), accumulator_dtype=dt),
  ],
  ids=["ema_momentum", "qhm", "aggmo"],
)
def test_bf16_accumulator_for_every_momentum(make):
  ours, state = _run(make(jnp.bfloat16))
  full, _ = _run(make(None))
  assert all(b.dtype == jnp.bfloat16 for b in jax.tree.leaves(state.momentum_buffer))
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(ours))
  chex.assert_trees_all_close(ours, full, rtol=3e-2, atol=3e-2)  # bf16 has 8 bits
  assert not all(
    np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, (ours, full)), strict=True)
  )


# errors


@pytest.mark.parametrize(
  "build,match",
  [
    (lambda: omc.heavy_ball(1.5), r"heavy_ball: momentum must be in \[0, 1\], got 1.5"),
    (lambda: omc.heavy_ball(0.9, dampening=-0.1), r"heavy_ball: dampening must be in"),
    (lambda: omc.heavy_ball(0.9, dampening=0.5, nesterov=True), r"nesterov=True needs"),
    (lambda: omc.heavy_ball(0.0, nesterov=True), r"nesterov=True needs momentum > 0"),
    (lambda: omc.ema_momentum(-0.5), r"ema_momentum: decay must be in \[0, 1\], got -0.5"),
    (lambda: omc.qhm(0.9, 1.2), r"qhm: nu must be in \[0, 1\], got 1.2"),
    (lambda: omc.aggmo((0.5, 1.0)), r"aggmo: betas\[1\] must be in \[0, 1\), got 1.0"),
    (lambda: omc.demon(0.9, total_steps=0), r"demon: total_steps must be >= 1, got 0"),
    (lambda: omc.demon(1.0, total_steps=10), r"demon: momentum_init must be in \[0, 1\)"),
  ],
)
def test_bad_hyperparameters_raise_value_error(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize(
  "build,match",
  [
    (lambda: omc.heavy_ball(0.9, nesterov="yes"), r"heavy_ball: nesterov must be a bool"),
    (lambda: omc.aggmo(0.9), r"aggmo: betas must be a non-empty sequence"),
    (lambda: omc.aggmo(()), r"aggmo: betas must be a non-empty sequence"),
    (lambda: omc.qhm(0.9, accumulator_dtype=jnp.int32), r"qhm: accumulator_dtype must be"),
    (lambda: omc.demon(0.9, total_steps=10.0), r"demon: total_steps must be an int"),
  ],
)
def test_bad_types_raise_type_error(build, match):
  with pytest.raises(TypeError, match=match):
    build()


def test_mismatching_tree_names_the_transform():
  tx = omc.heavy_ball(0.9)
  state = tx.init({"a": jnp.zeros(3)})
  with pytest.raises(AssertionError, match="heavy_ball"):
    tx.update({"b": jnp.zeros(3)}, state)


# convergence on an ill-conditioned quadratic (condition number 1000) against the predicted rates


LAM = np.logspace(0, 3, 100)
KAPPA = LAM[-1] / LAM[0]
SQK = np.sqrt(KAPPA)


def _f_ratio(tx, steps):
  """f(x_k)/f(x_0), k = 1..steps, on f = sum(lam x^2)/2 from x_0 = lam^-1/2 (equal energies)."""
  lam = jnp.asarray(LAM, jnp.float32)
  x0 = jnp.asarray(1 / np.sqrt(LAM), jnp.float32)
  f = lambda x: 0.5 * jnp.sum(lam * x * x)

  @jax.jit
  def run():
    def body(carry, _):
      x, state = carry
      u, state = tx.update(lam * x, state, x)
      x = x + u
      return (x, state), f(x) / f(x0)

    return jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)[1]

  return np.asarray(run())


def _first_below(ratios, level):
  hit = np.nonzero(ratios < level)[0]
  assert hit.size, f"never reached f/f0 < {level:g}; best {ratios.min():.3g}"
  return int(hit[0]) + 1


def _predicted(rate, decades):
  """Iterations for f (quadratic in x) to fall by 10^-decades at per-iteration rate ``rate``."""
  return decades * np.log(10) / (-2 * np.log(rate))


def test_momentum_is_sqrt_kappa_times_faster_on_an_ill_conditioned_quadratic():
  """Heavy ball and Nesterov at their optimal settings, against gradient descent.

  Heavy ball (Polyak): alpha = 4/(sqrt(L)+sqrt(mu))^2, beta = rho^2, rate
  rho = (sqrt(k)-1)/(sqrt(k)+1). Nesterov: alpha = 1/L, beta = rho, rate
  1 - 1/sqrt(k). GD: alpha = 2/(L+mu), rate (k-1)/(k+1). At heavy ball's
  optimum the two extreme eigenvalues are double roots (Jordan blocks), so its
  error is (1 + 2k/(sqrt(kappa)+1)) rho^k and the count to reach 1e-8 runs
  ~40% past rho alone; its asymptotic rate (iterations per further 10^-4 of f)
  is still checked within 10%.
  """
  rho = (SQK - 1) / (SQK + 1)
  hb = _f_ratio(optax.chain(omc.heavy_ball(rho**2), optax.scale(-4 / (SQK + 1) ** 2)), 400)
  nag = _f_ratio(optax.chain(omc.heavy_ball(rho, nesterov=True), optax.scale(-1 / KAPPA)), 500)
  gd = _f_ratio(optax.sgd(2 / (KAPPA + 1)), 4500)
  k_hb, k_nag, k_gd = (_first_below(r, 1e-8) for r in (hb, nag, gd))

  nag_rate, gd_rate = 1 - 1 / SQK, (KAPPA - 1) / (KAPPA + 1)
  assert abs(k_nag - _predicted(nag_rate, 8)) <= 0.1 * _predicted(nag_rate, 8), k_nag
  assert k_hb <= 1.5 * _predicted(rho, 8), k_hb
  tail_hb = _first_below(hb, 1e-12) - k_hb
  tail_nag = _first_below(nag, 1e-12) - k_nag
  assert abs(tail_hb - _predicted(rho, 4)) <= 0.1 * _predicted(rho, 4), tail_hb
  assert abs(tail_nag - _predicted(nag_rate, 4)) <= 0.1 * _predicted(nag_rate, 4), tail_nag
  assert abs(k_gd - _predicted(gd_rate, 8)) <= 0.25 * _predicted(gd_rate, 8), k_gd
  assert k_gd >= 10 * max(k_hb, k_nag), (k_gd, k_hb, k_nag)


def test_a_name_shared_with_optax_or_pytorch_takes_their_calls_and_defaults():
  """ema_momentum as optax.ema, adaptive_grad_clip as optax's (eps positional), momclip_sgd as
  torch.optim.SGD(params, lr): no momentum unless asked."""
  ours, _ = _run(omc.ema_momentum(0.8))
  theirs, _ = _run(optax.ema(0.8))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
  ours, _ = _run(omc.momclip_sgd(0.1))
  theirs, _ = _run(optax.sgd(0.1))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
  params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  grads = {"w": jnp.array([[0.5, -0.5], [0.01, 0.0]])}
  ours = omc.adaptive_grad_clip(0.01, 1e-3).update(
    grads, omc.adaptive_grad_clip().init(params), params
  )
  theirs = optax.adaptive_grad_clip(0.01, 1e-3).update(grads, None, params)
  chex.assert_trees_all_close(ours[0], theirs[0], rtol=1e-6)


@pytest.mark.parametrize(
  "make",
  [
    lambda: omc.momclip_sgd(0.1, lambda c: jnp.minimum(c, 3) * 0.3, max_norm=1.0),
    lambda: optax.chain(omc.heavy_ball(lambda c: jnp.minimum(c, 3) * 0.3), optax.scale(-0.1)),
    lambda: optax.inject_hyperparams(omc.momclip_sgd)(0.1, 0.9, max_norm=1.0),
    lambda: omc.skip_bad_steps(omc.momclip_sgd(0.1, 0.9, max_norm=1.0)),
  ],
  ids=["momclip_sgd schedule", "heavy_ball schedule", "injected", "guarded"],
)
def test_a_momentum_that_may_be_zero_still_updates_the_buffer_in_place(make):
  """Keeping the buffer through a select on it made XLA copy every donated buffer each step."""
  params = [jnp.ones((512, 256)) * i for i in range(4)]
  tx = make()

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
  copies = [
    line for line in hlo.as_text().splitlines() if "f32[512,256]" in line and " copy" in line
  ]
  assert not copies
