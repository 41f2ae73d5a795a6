"""Adaptive privacy controller: clip trajectories, feedback sign, what the ledger charges,
Laplace noise, sparsity and the Rényi filter stop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

from adpfl_jax import train
from adpfl_jax.configs import common
from adpfl_jax.configs import default
from adpfl_jax.federated import client as client_lib
from adpfl_jax.privacy import accounting
from adpfl_jax.privacy import clipping
from adpfl_jax.privacy import controller as controller_lib


def _cfg(**kw):
  c = default.get_config()
  c.fed.rounds = 5
  for key, value in kw.items():
    common.set_path(c, key, value)
  return c


def _controller(cfg, z=0.0, k=2, n=100):
  sizes = np.full(k, n)
  rates = np.full(k, cfg.privacy.batch_size / n)
  return controller_lib.make(cfg.privacy, cfg.fed, sizes, rates, np.full(k, z), 10)


def _reports(b):
  return {'aux': jnp.asarray(b, jnp.float32).reshape(-1, 1)}


def _update(ctrl, state, b):
  ids = jnp.arange(2)
  return ctrl.update(state, ids, _reports(b), jnp.ones(2, bool), jnp.ones(2), jnp.zeros(10))


def test_deterministic_trajectory_multiplies_by_e_inverse():
  cfg = _cfg(**{'privacy.clip_mode': 'quantile', 'privacy.quantile.target': 0.0,
                'privacy.quantile.lr': 1.0, 'privacy.clip_norm': 5.0, 'privacy.clip_min': 1e-6})
  ctrl = _controller(cfg)
  state = ctrl.init()
  for t in range(1, 6):
    state = _update(ctrl, state, [1.0, 1.0])  # every norm below C, no count noise
    np.testing.assert_allclose(np.asarray(state.clip), 5.0 * math.exp(-t), rtol=1e-6)


def test_client_reports_exact_unclipped_fraction_without_count_noise():
  loss_fn = lambda p, x, y: jnp.sum(p['w'] * x)
  params = {'w': jnp.ones(3)}
  x = jnp.arange(12.0).reshape(1, 4, 3) / 10  # per-example gradient = x, norms < 100
  dp = controller_lib.ClientDP(clip=jnp.float32(100.0), noise_grad=jnp.float32(0.0),
                           aux_std=jnp.float32(0.0), grid=jnp.ones(1),
                           expected_batch=jnp.float32(4.0), lr=jnp.float32(0.1),
                           sparsity_mask=jnp.float32(1.0))
  cfg = client_lib.ClientConfig(loss_fn=loss_fn, aux=('unclipped',))
  _, rep = client_lib.client_update(cfg, params, x, jnp.zeros((1, 4)), jnp.ones((1, 4)), dp,
                                    jax.random.key(0))
  assert float(rep['aux'][0]) == 1.0
  dp = dp._replace(clip=jnp.float32(0.01))  # now every norm is above C
  _, rep = client_lib.client_update(cfg, params, x, jnp.zeros((1, 4)), jnp.ones((1, 4)), dp,
                                    jax.random.key(0))
  assert float(rep['aux'][0]) == 0.0


def test_feedback_sign():
  cfg = _cfg(**{'privacy.clip_mode': 'quantile'})
  ctrl = _controller(cfg)
  state = ctrl.init()
  c0 = float(state.clip[0])
  assert float(_update(ctrl, state, [0.0, 0.0]).clip[0]) > c0  # all clipped ⇒ C grows
  assert float(_update(ctrl, state, [1.0, 1.0]).clip[0]) < c0  # none clipped ⇒ C shrinks


@pytest.mark.parametrize('power', [0.0, 0.5, 1.0])
def test_clip_lr_power_scales_the_step_by_the_privatized_clip(power):
  cfg = _cfg(**{'privacy.clip_mode': 'quantile', 'privacy.clip_norm': 2.0,
                'privacy.clip_lr_power': power, 'fed.client_lr': 0.1})
  ctrl = _controller(cfg)
  state = _update(ctrl, ctrl.init(), [1.0, 0.0])  # silo 0: C shrinks, silo 1: C grows
  dp, _ = ctrl.client_dp(state, jnp.arange(2))
  expected = 0.1 * (2.0 / np.asarray(state.clip)) ** power
  np.testing.assert_allclose(np.asarray(dp.lr), expected, rtol=1e-6)
  assert (power == 0.0) == bool(np.allclose(np.asarray(dp.lr), 0.1))
  fixed = _controller(_cfg(**{'privacy.clip_lr_power': power}))  # fixed C: never rescaled
  dp, _ = fixed.client_dp(fixed.init(), jnp.arange(2))
  np.testing.assert_allclose(np.asarray(dp.lr), 0.1, rtol=1e-6)


@pytest.mark.parametrize('c0', [0.01, 100.0])
def test_closed_loop_converges_to_the_quantile_from_both_sides(c0):
  """Simulated record norms ~ LogNormal(0, 0.5): C tracks their median (1.0)."""
  cfg = _cfg(**{'privacy.clip_mode': 'quantile', 'privacy.clip_norm': c0,
                'privacy.clip_min': 1e-4, 'privacy.clip_max': 1e4, 'privacy.batch_size': 50})
  ctrl = _controller(cfg)
  state = ctrl.init()
  rng = np.random.default_rng(0)
  sigma_b = 50 * cfg.privacy.quantile.count_std_fraction
  for _ in range(300):
    norms = rng.lognormal(0.0, 0.5, size=(2, 50))
    count = (norms <= np.asarray(state.clip)[:, None]).sum(1) - 25 + rng.normal(0, sigma_b, 2)
    state = _update(ctrl, state, np.clip(0.5 + count / 50, 0, 1))
  np.testing.assert_allclose(np.asarray(state.clip), 1.0, rtol=0.25)


def test_z_at_least_two_sigma_b_is_rejected():
  cfg = _cfg(**{'privacy.clip_mode': 'quantile', 'privacy.batch_size': 10})
  with pytest.raises(ValueError, match='count_std_fraction'):
    _controller(cfg, z=1.0)  # σ_b = 0.5: 2σ_b = 1.0 ≤ z


def test_z_delta_formula():
  z, sb = 1.0, 5.0
  got = float(controller_lib.split_multiplier(jnp.float32(z), jnp.float32(2 * sb)))
  np.testing.assert_allclose(got, (z**-2 - (2 * sb)**-2) ** -0.5, rtol=1e-6)
  np.testing.assert_allclose(got, 1.0050, atol=1e-4)  # docs/privacy.md §4.3 table


@pytest.fixture(scope='module')
def _tiny(tiny_config):
  """The shared tiny run with 40 images per silo, an expected batch of 20, target ε = 20."""
  return lambda **kw: tiny_config(**{'data.examples_per_client': 40, 'privacy.batch_size': 20,
                                     'privacy.target_epsilon': 20.0, **kw})


@pytest.mark.parametrize('mode', ['quantile', 'percentile'])
def test_ledger_charges_total_z_including_estimator(mode, tmp_path, _tiny):
  trainer = train.Trainer(_tiny(**{'privacy.clip_mode': mode}), str(tmp_path))
  inputs, clients, _ = trainer.round_inputs(0)
  state, m = trainer.round.apply(trainer.initial_state, jnp.asarray(trainer.data.train_x),
                                 jnp.asarray(trainer.data.train_y), inputs)
  z_total = np.asarray(m['noise_multiplier'])
  z_grad = np.asarray(m['noise_multiplier_grad'])
  assert np.all(z_grad > z_total)  # the gradient gets z_Δ > z; the estimator takes the rest
  trainer.plan.record_round(0, clients, z_total, 2)
  spec, count = trainer.plan.ledgers[0].runs[0]
  assert spec.noise_multiplier == pytest.approx(float(z_total[0]))
  # ε of the ledger = ε of PoissonSampled(G(z_total)) alone: the estimator's cost is inside z.
  want = accounting.Ledger('rdp')
  want.record(accounting.StepSpec(spec.sampling_rate, float(z_total[0]), 'gaussian',
                                  spec.truncated_batch_size, spec.dataset_size), count)
  assert trainer.plan.ledgers[0].epsilon(1e-5) == want.epsilon(1e-5)
  assert state.controller.clip.shape == (4,)


def test_laplace_noise_scale_ks():
  loss_fn = lambda p, x, y: jnp.sum(p['w'] * x)
  params = {'w': jnp.zeros(4000)}
  lam, clip, m = 0.8, 2.0, 5.0
  dp = controller_lib.ClientDP(clip=jnp.float32(clip), noise_grad=jnp.float32(lam),
                           aux_std=jnp.float32(0.0), grid=jnp.ones(1),
                           expected_batch=jnp.float32(m), lr=jnp.float32(1.0),
                           sparsity_mask=jnp.float32(1.0))
  cfg = client_lib.ClientConfig(loss_fn=loss_fn, mechanism='laplace')
  delta, _ = client_lib.client_update(cfg, params, jnp.zeros((1, 3, 4000)), jnp.zeros((1, 3)),
                                      jnp.zeros((1, 3)), dp, jax.random.key(5))
  noise = -np.asarray(delta['w']) * m  # = Laplace(scale λ·C)
  b = lam * clip
  assert stats.kstest(noise, 'laplace', args=(0, b)).pvalue > 1e-3
  assert stats.kstest(noise, 'laplace', args=(0, b * 2 / 3)).pvalue < 1e-6
  assert stats.kstest(noise, 'laplace', args=(0, b * 3 / 2)).pvalue < 1e-6


def test_laplace_clips_in_l1():
  g = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(6, 50)), jnp.float32)}
  s_full, _ = clipping.clip_and_sum(g, jnp.ones(6), jnp.float32(1.5), norm='l1')
  for i in range(6):
    s_minus, _ = clipping.clip_and_sum(g, jnp.ones(6).at[i].set(0), jnp.float32(1.5), norm='l1')
    assert float(jnp.sum(jnp.abs(s_full['w'] - s_minus['w']))) <= 1.5 * (1 + 1e-5)


@pytest.mark.parametrize('mode', ['random', 'topk_prev'])
def test_sparsified_updates_keep_the_clip_bound(mode):
  cfg = _cfg(**{'privacy.sparsity.mode': mode, 'privacy.sparsity.fraction': 0.3})
  ctrl = controller_lib.make(cfg.privacy, cfg.fed, np.full(2, 100), np.full(2, 0.32),
                             np.full(2, 1.0), 40)
  state = ctrl.init()
  if mode == 'topk_prev':
    state = state.replace(rules={**state.rules, 'sparsity': state.rules['sparsity'].replace(
        prev_update=jnp.arange(40.0))})
  dp, _ = ctrl.client_dp(state, jnp.arange(2))
  mask = dp.sparsity_mask[0]
  assert int(mask.sum()) == 12  # exactly 30% kept
  if mode == 'topk_prev':
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(28, 40))
  # The public mask is the same for both clients and a function of the round only.
  np.testing.assert_array_equal(dp.sparsity_mask[0], dp.sparsity_mask[1])
  g = {'w': jnp.asarray(np.random.default_rng(1).normal(size=(5, 40)) * 3, jnp.float32)}
  full, _ = clipping.clip_and_sum(g, jnp.ones(5), jnp.float32(1.0))
  for i in range(5):
    part, _ = clipping.clip_and_sum(g, jnp.ones(5).at[i].set(0), jnp.float32(1.0))
    diff = (ravel_pytree(full)[0] - ravel_pytree(part)[0]) * mask
    assert float(jnp.linalg.norm(diff)) <= 1.0 + 1e-5


def test_adaptive_noise_filter_halts_before_exceeding(tmp_path, _tiny):
  cfg = _tiny(**{'privacy.adaptive_noise.enabled': True, 'privacy.adaptive_noise.patience': 1,
                 'privacy.adaptive_noise.threshold': 0.5, 'fed.rounds': 6,
                 'privacy.target_epsilon': 20.0})
  trainer = train.Trainer(cfg, str(tmp_path))
  summary = trainer.run()
  assert summary['stopped_reason'].startswith('budget'), summary['stopped_reason']
  assert summary['rounds'] < 6
  for f in trainer.plan.filters:
    assert np.all(f.spent <= f.budget)
    assert f.spent_epsilon() <= 20.0 and f.epsilon_bound() <= 20.0
  # σ was lowered by the data-driven rule (adapt < 1) at some point.
  assert float(trainer.final_state.controller.adapt) < 1.0


def test_query_errors_name_the_key_in_use():
  # Review finding: with clip_mode='fixed' and adaptive noise the error named
  # privacy.percentile.count_std_fraction although adaptive_noise.count_std_fraction was used.
  cfg = _cfg(**{'privacy.adaptive_noise.enabled': True, 'privacy.accountant': 'rdp',
                'privacy.batch_size': 10})
  with pytest.raises(ValueError) as err:
    _controller(cfg, z=1.0)  # 2·f·m = 1.0 ≤ z
  assert 'privacy.adaptive_noise.count_std_fraction' in str(err.value)
  assert 'percentile' not in str(err.value) and 'quantile' not in str(err.value)


def test_rules_compose_and_their_queries_share_one_total_multiplier():
  # quantile clip + data-driven noise: two queries, each with its own std, fold into one z.
  cfg = _cfg(**{'privacy.clip_mode': 'quantile', 'privacy.adaptive_noise.enabled': True,
                'privacy.accountant': 'rdp', 'privacy.batch_size': 40,
                'privacy.quantile.count_std_fraction': 0.5,
                'privacy.adaptive_noise.count_std_fraction': 0.25})
  ctrl = _controller(cfg, z=1.0)
  assert ctrl.aux == ('unclipped', 'loss')
  a = [2 * 0.5 * 40, 2 * 0.25 * 40]
  np.testing.assert_allclose(ctrl.aux_multiplier, (a[0]**-2 + a[1]**-2) ** -0.5, rtol=1e-6)
  dp, z = ctrl.client_dp(ctrl.init(), jnp.arange(2))
  np.testing.assert_allclose(np.asarray(dp.aux_std), [[0.5 * 40, 0.25 * 40]] * 2, rtol=1e-6)
  z_grad = float(dp.noise_grad[0])
  np.testing.assert_allclose(z_grad**-2 + a[0]**-2 + a[1]**-2, float(z[0])**-2, rtol=1e-4)
