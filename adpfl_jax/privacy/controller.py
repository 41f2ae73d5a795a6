"""Privacy controllers: the pure ``(init, client_dp, update)`` transform that sets clip and noise.

The controller's state holds arrays only (clip per silo, the calibrated noise scale per silo, the
round, estimator state), so changing them never recompiles the round. The round calls
``client_dp`` to get each sampled client's parameters and ``update`` with the clients' *privatized*
reports; the training loop does not know which controller runs.

Modes (``config.privacy.clip_mode``):

* ``fixed`` — standard DP-FL: C is a constant, σ follows a public schedule. ε is the composition of
  the per-step Poisson-subsampled Gaussian (or Laplace) mechanism.
* ``quantile`` — Andrew et al. 2021 adaptive clipping per silo at the record level. Each local step
  also releases the centred count Σ(1[‖g_i‖ ≤ C] − ½) + N(0, σ_b²) on the same sample (sensitivity
  ½). Both queries are Gaussian on one sample, so they compose into one Gaussian of multiplier z
  with 1/z² = 1/z_Δ² + 1/(2σ_b)²: the gradient gets z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) and the ledger
  records the total z. C then moves geometrically, C ← C·exp(−η(b̄ − γ)), a post-processing of the
  noised count; noise in a round always uses the C that clipped it.
* ``percentile`` — the paper's rule (clip at the p-th percentile of per-example norms), privately:
  each step releases a noisy CDF of the norms on a public geometric grid of G thresholds (centred
  counts, L2 sensitivity √G/2, noise std σ_h), folded into the total z the same way
  (1/z² = 1/z_Δ² + 1/(2σ_h/√G)²). The next C is the smallest grid value whose noisy CDF reaches p,
  smoothed geometrically. The histogram's cost is in the ledger because the total z is.
* ``naive_percentile`` — the paper's rule on raw norms, for reproduction only. The raw percentile
  has unbounded sensitivity and is published through the noise scale; the reported ε is **not** a
  valid guarantee and runs are marked so. Implemented on the host from the clients' raw norm
  quantiles, which the client returns only in this mode.
* ``none`` — NP-FL: no clipping, no noise (C = ∞, z = 0), ε = ∞.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from adpfl_jax.federated.client import ClientDP
from adpfl_jax.privacy import plan as plan_lib
from adpfl_jax.privacy import schedules

CLIP_MODES = ('fixed', 'quantile', 'percentile', 'naive_percentile', 'none')


@flax.struct.dataclass
class ControllerState:
  clip: jax.Array  # (K,) current clip norm per silo
  noise_scale: jax.Array  # (K,) calibrated scale s_k; total z_k(t) = s_k · shape(t)
  lr_scale: jax.Array  # () client learning rate at round 0
  round: jax.Array  # () int32


class Controller(NamedTuple):
  """A privacy controller: pure functions over ``ControllerState``."""

  init: callable
  client_dp: callable  # (state, client_ids) -> (ClientDP, z_total (M,))
  update: callable  # (state, client_ids, reports) -> state
  mode: str
  count_std: np.ndarray  # (K,) σ_b per silo (0 when unused)
  grid: np.ndarray  # (G,) public clip grid for ``percentile``
  grid_std: np.ndarray  # (K,) σ_h per silo


def _split_multiplier(z_total, other_multiplier):
  """z_Δ with 1/z² = 1/z_Δ² + 1/o²; requires z < o (checked on the host in ``make``)."""
  inv = 1.0 / jnp.square(z_total) - 1.0 / jnp.square(other_multiplier)
  return jnp.where(z_total > 0, jax.lax.rsqrt(jnp.maximum(inv, 1e-30)), 0.0)


def make(privacy_cfg, fed_cfg, sizes: np.ndarray, rates: np.ndarray, noise_scale: np.ndarray,
         param_count: int) -> Controller:
  """Builds the controller named by ``privacy_cfg.clip_mode``.

  Args:
    privacy_cfg: ``config.privacy``.
    fed_cfg: ``config.fed`` (client learning rate and its schedule).
    sizes: (K,) public client sizes n_k.
    rates: (K,) Poisson sampling rates q_k.
    noise_scale: (K,) calibrated total-noise scale per silo (z_k(t) = scale_k · shape(t)).
    param_count: number of model parameters (for sparsity masks).
  """
  mode = privacy_cfg.clip_mode if privacy_cfg.mode != 'none' else 'none'
  if mode not in CLIP_MODES:
    raise ValueError(f'config.privacy.clip_mode={mode!r} is not one of {CLIP_MODES}')
  num_clients = len(sizes)
  expected = np.asarray(sizes, np.float64) * np.asarray(rates, np.float64)
  sched_params = plan_lib.schedule_params(privacy_cfg.noise_schedule,
                                          dict(privacy_cfg.noise_schedule_params),
                                          int(fed_cfg.rounds))
  shape_fn = schedules.jnp_schedule(privacy_cfg.noise_schedule, sched_params)
  max_shape = float(np.max(schedules.np_schedule(privacy_cfg.noise_schedule, sched_params)(
      np.arange(max(1, int(fed_cfg.rounds))))))
  count_std = np.zeros(num_clients)
  grid = np.ones(1, np.float32)
  grid_std = np.zeros(num_clients)
  if mode == 'quantile':
    count_std = expected * float(privacy_cfg.quantile.count_std_fraction)
    z_max = np.asarray(noise_scale) * max_shape
    bad = np.flatnonzero(z_max >= 2 * count_std)
    if bad.size:
      k = int(bad[0])
      raise ValueError(
          f'config.privacy.quantile: total noise multiplier z={z_max[k]:.3f} of client {k} is '
          f'>= 2·σ_b = {2 * count_std[k]:.3f} (σ_b = count_std_fraction · expected batch '
          f'{expected[k]:.1f}); the count query would need negative noise. Raise the expected '
          'batch (privacy.batch_size), raise quantile.count_std_fraction or lower the noise.')
  if mode == 'percentile':
    pc = privacy_cfg.percentile
    grid = np.geomspace(float(pc.grid_min), float(pc.grid_max), int(pc.grid_size)).astype(np.float32)
    # Noise multiplier of the histogram = σ_h / (√G/2); chosen as a multiple of z like σ_b.
    grid_std = expected * float(pc.count_std_fraction) * math.sqrt(len(grid))
    z_max = np.asarray(noise_scale) * max_shape
    hist_mult = 2 * grid_std / math.sqrt(len(grid))
    bad = np.flatnonzero(z_max >= hist_mult)
    if bad.size:
      k = int(bad[0])
      raise ValueError(
          f'config.privacy.percentile: total noise multiplier z={z_max[k]:.3f} of client {k} is '
          f'>= the histogram multiplier {hist_mult[k]:.3f}; raise privacy.batch_size or '
          'percentile.count_std_fraction.')
  clip0 = float(privacy_cfg.clip_norm)
  clip_min = float(privacy_cfg.get('clip_min', 1e-6))
  clip_max = float(privacy_cfg.get('clip_max', 1e6))
  lr_kind = fed_cfg.get('client_lr_schedule', 'constant')
  lr_shape = schedules.jnp_schedule(lr_kind, plan_lib.schedule_params(
      lr_kind, dict(fed_cfg.get('client_lr_schedule_params', {})), int(fed_cfg.rounds)))
  count_std_j = jnp.asarray(count_std, jnp.float32)
  grid_j = jnp.asarray(grid)
  grid_std_j = jnp.asarray(grid_std, jnp.float32)
  expected_j = jnp.asarray(expected, jnp.float32)
  hist_mult_j = 2 * grid_std_j / math.sqrt(len(grid))

  def init():
    return ControllerState(
        clip=jnp.full((num_clients,), jnp.inf if mode == 'none' else clip0, jnp.float32),
        noise_scale=jnp.asarray(noise_scale if mode != 'none' else np.zeros(num_clients),
                                jnp.float32),
        lr_scale=jnp.asarray(float(fed_cfg.client_lr), jnp.float32),
        round=jnp.zeros((), jnp.int32))

  def client_dp(state: ControllerState, ids):
    z_total = state.noise_scale[ids] * shape_fn(state.round)
    if mode == 'quantile':
      z_grad = _split_multiplier(z_total, 2 * count_std_j[ids])
    elif mode == 'percentile':
      z_grad = _split_multiplier(z_total, hist_mult_j[ids])
    else:
      z_grad = z_total
    m = ids.shape[0]
    dp = ClientDP(
        clip=state.clip[ids],
        noise_grad=z_grad,
        count_std=count_std_j[ids],
        grid=jnp.broadcast_to(grid_j, (m,) + grid_j.shape),
        grid_std=grid_std_j[ids],
        expected_batch=expected_j[ids],
        lr=jnp.broadcast_to(state.lr_scale * lr_shape(state.round), (m,)),
        sparsity_mask=jnp.ones((m,), jnp.float32))
    return dp, z_total

  def update(state: ControllerState, ids, reports, valid):
    """Next state from privatized reports; ``valid`` (M,) marks clients that reported."""
    clip = state.clip
    if mode == 'quantile':
      qc = privacy_cfg.quantile
      b = reports['unclipped_fraction']
      new = clip[ids] * jnp.exp(-float(qc.lr) * (b - float(qc.target)))
      new = jnp.clip(new, clip_min, clip_max)
      clip = clip.at[ids].set(jnp.where(valid, new, clip[ids]))
    elif mode == 'percentile':
      pc = privacy_cfg.percentile
      cdf = reports['norm_cdf']  # (M, G), noised
      reached = cdf >= float(pc.percentile) / 100.0
      first = jnp.argmax(reached, axis=1)
      target = jnp.where(jnp.any(reached, axis=1), grid_j[first], grid_j[-1])
      mom = float(pc.smoothing)
      new = jnp.exp(mom * jnp.log(clip[ids]) + (1 - mom) * jnp.log(target))
      new = jnp.clip(new, clip_min, clip_max)
      clip = clip.at[ids].set(jnp.where(valid, new, clip[ids]))
    return state.replace(clip=clip, round=state.round + 1)

  return Controller(init=init, client_dp=client_dp, update=update, mode=mode,
                    count_std=count_std, grid=grid, grid_std=grid_std)
