"""Privacy controllers: the pure ``(init, client_dp, update)`` transform that sets clip and noise.

The controller's state holds arrays only (clip per silo, the calibrated noise scale per silo, the
round, estimator state), so changing them never recompiles the round. The round calls
``client_dp`` to get each sampled client's parameters and ``update`` with the clients'
*privatized* reports; the training loop does not know which controller runs.

Clip modes (``config.privacy.clip_mode``):

* ``fixed`` — standard DP-FL: C is a constant, σ follows a public schedule. ε is the composition of
  the per-step Poisson-subsampled Gaussian (or Laplace) mechanism.
* ``quantile`` — Andrew et al. 2021 adaptive clipping per silo at the record level. Each local step
  also releases the centred count Σ(1[‖g_i‖ ≤ C] − ½) + N(0, σ_b²) on the same sample (sensitivity
  ½). Both queries are Gaussian on one sample, so they compose into one Gaussian of multiplier z
  with 1/z² = 1/z_Δ² + 1/(2σ_b)²: the gradient gets z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) and the ledger
  records the total z. C then moves geometrically, C ← C·exp(−η(b̄ − γ)), a post-processing of the
  noised count; noise in a round always uses the C that clipped it. With
  ``privacy.clip_lr_power`` = p the client learning rate is multiplied by (C₀/C)^p, a public
  function of the already-privatized C.
* ``percentile`` — the paper's rule (clip at the p-th percentile of per-example norms), privately:
  each step releases a noisy CDF of the norms on a public geometric grid of G thresholds (centred
  counts, L2 sensitivity √G/2, per-count noise std σ_h), folded into the total z the same way. The
  next C is the smallest grid value whose noisy CDF reaches p, smoothed geometrically. The
  histogram's cost is in the ledger because the total z is.
* ``none`` — NP-FL: no clipping, no noise (C = ∞, z = 0), ε = ∞.

All auxiliary releases (unclipped count, CDF, the clipped training loss of the data-driven
schedule) are one vector query of Q values in [0, 1] per example, sensitivity √Q/2, per-coordinate
noise std ``aux_std`` = f·m·√Q, i.e. multiplier 2·f·m (f = ``count_std_fraction``, m the expected
batch): 1/z² = 1/z_Δ² + 1/(2fm)². ``make`` raises if z ≥ 2fm.

Noise: z_k(t) = scale_k · shape(t) · a(t), with shape a public schedule and scale_k calibrated per
silo. a(t) = 1 unless ``privacy.adaptive_noise.enabled``: then a(t) is lowered by ``factor``
whenever the privatized training-loss estimate (the 'loss' query, a noised statistic) has not
improved for ``patience`` rounds. Because σ then depends on (privatized) data, the run is
accounted under a Rényi privacy filter (``accounting.RdpFilter``): the budget is fixed in advance
and the run halts before any step would exceed it.

Sparsification (``privacy.sparsity.mode``): ``random`` keeps k coordinates drawn from public
randomness (a key derived from the public seed and the round, independent of data); ``topk_prev``
keeps the k largest coordinates of the previous *global* update, which was already released with
DP (post-processing). The mask multiplies the clipped sum and the noise, so sensitivity stays C.
A top-k of the raw private gradient is not offered: its support is data-dependent and would be
released without noise (docs/privacy.md §6.5).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from adpfl_jax.federated.client import ClientDP
from adpfl_jax.privacy import plan as plan_lib
from adpfl_jax.privacy import schedules

CLIP_MODES = ('fixed', 'quantile', 'percentile', 'none')
SPARSITY_MODES = ('none', 'random', 'topk_prev')
_SPARSITY_SEED = 0x5BA5


@flax.struct.dataclass
class ControllerState:
  clip: jax.Array  # (K,) current clip norm per silo
  noise_scale: jax.Array  # (K,) calibrated scale s_k; total z_k(t) = s_k · shape(t) · adapt
  adapt: jax.Array  # () data-driven noise factor a(t) (1 unless adaptive noise is on)
  best_loss: jax.Array  # () best privatized loss estimate so far
  stall: jax.Array  # () rounds since the estimate last improved
  lr_scale: jax.Array  # () client learning rate at round 0
  prev_update: jax.Array  # (P,) previous global update (topk_prev sparsity), else (1,)
  round: jax.Array  # () int32


class Controller(NamedTuple):
  """A privacy controller: pure functions over ``ControllerState``."""

  init: Callable
  client_dp: Callable  # (state, client_ids) -> (ClientDP, z_total (M,))
  update: Callable  # (state, client_ids, reports, valid, weights, global_update) -> state
  mode: str
  aux: tuple  # auxiliary queries the client releases
  aux_multiplier: np.ndarray  # (K,) noise multiplier of the auxiliary vector query (inf if none)
  grid: np.ndarray  # (G,) public clip grid
  adaptive_noise: bool
  sparsity: str


def split_multiplier(z_total, aux_multiplier):
  """z_Δ with 1/z² = 1/z_Δ² + 1/a² (a = ∞: z_Δ = z). Requires z < a (checked in ``make``)."""
  inv = 1.0 / jnp.square(z_total) - 1.0 / jnp.square(aux_multiplier)
  return jnp.where(z_total > 0, jax.lax.rsqrt(jnp.maximum(inv, 1e-30)), 0.0)


def make(privacy_cfg, fed_cfg, sizes: np.ndarray, rates: np.ndarray, noise_scale: np.ndarray,
         param_count: int) -> Controller:
  """Builds the controller for ``config.privacy``.

  Args:
    privacy_cfg: ``config.privacy``.
    fed_cfg: ``config.fed`` (client learning rate and its schedule, rounds).
    sizes: (K,) public client sizes n_k.
    rates: (K,) Poisson sampling rates q_k.
    noise_scale: (K,) calibrated total-noise scale per silo (z_k(t) = scale_k · shape(t)).
    param_count: number of model parameters (for sparsity masks).
  """
  private = privacy_cfg.mode != 'none'
  mode = privacy_cfg.clip_mode if private else 'none'
  if mode not in CLIP_MODES:
    raise ValueError(f'config.privacy.clip_mode={mode!r} is not one of {CLIP_MODES}')
  num_clients = len(sizes)
  rounds = int(fed_cfg.rounds)
  expected = np.asarray(sizes, np.float64) * np.asarray(rates, np.float64)
  sched = plan_lib.schedule_params(privacy_cfg.noise_schedule,
                                   dict(privacy_cfg.noise_schedule_params), rounds)
  shape_fn = schedules.jnp_schedule(privacy_cfg.noise_schedule, sched)
  max_shape = float(np.max(schedules.np_schedule(privacy_cfg.noise_schedule, sched)(
      np.arange(max(1, rounds)))))
  adaptive = bool(privacy_cfg.adaptive_noise.enabled) and private
  sparsity = privacy_cfg.sparsity.mode
  if sparsity not in SPARSITY_MODES:
    raise ValueError(f'config.privacy.sparsity.mode={sparsity!r} is not one of {SPARSITY_MODES}')

  aux = []
  if mode == 'quantile':
    aux.append('unclipped')
  if mode == 'percentile':
    aux.append('cdf')
  if adaptive:
    aux.append('loss')
  pc = privacy_cfg.percentile
  grid = (np.geomspace(float(pc.grid_min), float(pc.grid_max), int(pc.grid_size))
          if mode == 'percentile' else np.ones(1)).astype(np.float32)
  q_size = sum(len(grid) if a == 'cdf' else 1 for a in aux)
  frac = float(privacy_cfg.quantile.count_std_fraction if mode == 'quantile'
               else pc.count_std_fraction if mode == 'percentile'
               else privacy_cfg.adaptive_noise.count_std_fraction)
  if aux and private:
    aux_std = expected * frac * math.sqrt(q_size)
    aux_mult = 2.0 * aux_std / math.sqrt(q_size)
    z_max = np.asarray(noise_scale) * max_shape
    bad = np.flatnonzero(z_max >= aux_mult)
    if bad.size:
      k = int(bad[0])
      raise ValueError(
          f'config.privacy.{"quantile" if mode == "quantile" else "percentile"}'
          f'.count_std_fraction: the total noise multiplier z={z_max[k]:.3f} of silo {k} is >= '
          f'the auxiliary query multiplier 2·f·m = {aux_mult[k]:.3f} (expected batch m = '
          f'{expected[k]:.1f}); the gradient would need negative noise. Raise '
          'privacy.batch_size or count_std_fraction, or lower the noise.')
  else:
    aux_std = np.zeros(num_clients)
    aux_mult = np.full(num_clients, np.inf)

  clip0 = float(privacy_cfg.clip_norm)
  clip_min, clip_max = float(privacy_cfg.clip_min), float(privacy_cfg.clip_max)
  lr_power = float(privacy_cfg.get('clip_lr_power', 0.0))
  lr_kind = fed_cfg.client_lr_schedule
  lr_shape = schedules.jnp_schedule(lr_kind, plan_lib.schedule_params(
      lr_kind, dict(fed_cfg.client_lr_schedule_params), rounds))
  aux_std_j = jnp.asarray(aux_std, jnp.float32)
  aux_mult_j = jnp.asarray(aux_mult, jnp.float32)
  grid_j = jnp.asarray(grid)
  expected_j = jnp.asarray(expected, jnp.float32)
  keep = max(1, int(round(float(privacy_cfg.sparsity.fraction) * param_count)))
  an = privacy_cfg.adaptive_noise
  sparsity_key = jax.random.key(_SPARSITY_SEED)

  def init():
    return ControllerState(
        clip=jnp.full((num_clients,), jnp.inf if mode == 'none' else clip0, jnp.float32),
        noise_scale=jnp.asarray(noise_scale if private else np.zeros(num_clients), jnp.float32),
        adapt=jnp.ones((), jnp.float32),
        best_loss=jnp.full((), jnp.inf, jnp.float32),
        stall=jnp.zeros((), jnp.int32),
        lr_scale=jnp.asarray(float(fed_cfg.client_lr), jnp.float32),
        prev_update=jnp.zeros((param_count if sparsity == 'topk_prev' else 1,), jnp.float32),
        round=jnp.zeros((), jnp.int32))

  def _mask(state):
    """(P,) public 0/1 mask keeping ``keep`` coordinates."""
    if sparsity == 'random':
      scores = jax.random.uniform(jax.random.fold_in(sparsity_key, state.round), (param_count,))
    else:  # topk_prev; before any update exists, fall back to public randomness
      noise = jax.random.uniform(jax.random.fold_in(sparsity_key, state.round), (param_count,))
      have = jnp.any(state.prev_update != 0)
      scores = jnp.where(have, jnp.abs(state.prev_update), noise)
    _, idx = jax.lax.top_k(scores, keep)
    return jnp.zeros((param_count,), jnp.float32).at[idx].set(1.0)

  def lr_clip(state, ids):
    """(C₀ / C_k)^power: keeps the step size of clipped updates as C adapts (post-processing)."""
    if lr_power == 0.0 or mode in ('none', 'fixed'):
      return jnp.ones(ids.shape, jnp.float32)
    return (clip0 / state.clip[ids]) ** lr_power

  def total_noise(state, ids):
    return state.noise_scale[ids] * shape_fn(state.round) * state.adapt

  def client_dp(state: ControllerState, ids):
    z_total = total_noise(state, ids)
    m = ids.shape[0]
    if sparsity == 'none':
      mask = jnp.ones((m,), jnp.float32)
    else:
      mask = jnp.broadcast_to(_mask(state), (m, param_count))
    dp = ClientDP(
        clip=state.clip[ids],
        noise_grad=split_multiplier(z_total, aux_mult_j[ids]),
        aux_std=aux_std_j[ids],
        grid=jnp.broadcast_to(grid_j, (m,) + grid_j.shape),
        expected_batch=expected_j[ids],
        lr=jnp.broadcast_to(state.lr_scale * lr_shape(state.round), (m,)) * lr_clip(state, ids),
        sparsity_mask=mask)
    return dp, z_total

  def set_clip(clip, ids, valid, new):
    """``clip[ids] = new`` for valid clients only. Invalid entries (padding clients that repeat a
    real id, clients that did not report) are dropped from the scatter, so a duplicate index can
    never overwrite a real client's update."""
    return clip.at[jnp.where(valid, ids, num_clients)].set(
        jnp.clip(new, clip_min, clip_max), mode='drop')

  def update(state: ControllerState, ids, reports, valid, weights, global_update):
    """Next state from privatized reports; ``valid`` (M,) marks clients that reported."""
    clip = state.clip
    a = reports['aux']  # (M, Q) noised means in [0, 1]
    col = 0
    if mode == 'quantile':
      qc = privacy_cfg.quantile
      b = a[:, col]
      col += 1
      new = clip[ids] * jnp.exp(-float(qc.lr) * (b - float(qc.target)))
      clip = set_clip(clip, ids, valid, new)
    if mode == 'percentile':
      cdf = a[:, col:col + len(grid)]
      col += len(grid)
      reached = cdf >= float(pc.percentile) / 100.0
      target = jnp.where(jnp.any(reached, axis=1), grid_j[jnp.argmax(reached, axis=1)],
                         grid_j[-1])
      mom = float(pc.smoothing)
      new = jnp.exp(mom * jnp.log(clip[ids]) + (1 - mom) * jnp.log(target))
      clip = set_clip(clip, ids, valid, new)
    adapt, best, stall = state.adapt, state.best_loss, state.stall
    if adaptive:
      w = jnp.where(valid, weights, 0.0)
      est = jnp.sum(w * a[:, col]) / jnp.maximum(jnp.sum(w), 1e-12)
      improved = est < best * (1.0 - float(an.threshold))
      stall = jnp.where(improved, 0, stall + 1)
      best = jnp.minimum(best, est)
      drop = stall >= int(an.patience)
      adapt = jnp.where(drop, jnp.maximum(adapt * float(an.factor), float(an.min_factor)), adapt)
      stall = jnp.where(drop, 0, stall)
    prev = global_update if sparsity == 'topk_prev' else state.prev_update
    return state.replace(clip=clip, adapt=adapt, best_loss=best, stall=stall, prev_update=prev,
                         round=state.round + 1)

  return Controller(init=init, client_dp=client_dp, update=update, mode=mode, aux=tuple(aux),
                    aux_multiplier=aux_mult, grid=grid, adaptive_noise=adaptive,
                    sparsity=sparsity)
