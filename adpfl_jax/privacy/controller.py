"""Privacy controllers: small composable rules that set each silo's clip, noise and step.

A controller is a chain of *rules* (like ``optax.chain``), one per concern, each a value with a
pure ``init`` / ``update`` over its own array state and a ``client`` function that contributes to
every sampled client's ``ClientDP``:

* a **clip rule** (``privacy.clip_mode``): ``fixed`` (standard DP-FL), ``quantile`` (Andrew et al.
  2021: C ← C·exp(−η(b̄ − γ)) from a noised unclipped count) or ``percentile`` (the paper's
  rule made private: the next C is the smallest value of a public grid whose noised CDF of the
  per-example norms reaches p, smoothed geometrically); NP-FL uses no clip (C = ∞);
* a **noise rule**: a public schedule, z_k(r) = s_k · shape(r), or data-driven noise
  (``privacy.adaptive_noise``): z is multiplied by ``factor`` whenever a noised estimate of the
  clipped training loss stops improving — accounted under a Rényi filter (``plan.py``);
* a **learning-rate rule**: the client lr schedule, times (C₀/C)^p with ``privacy.clip_lr_power``;
* a **sparsity rule** (``privacy.sparsity.mode``): a public mask from public randomness
  (``random``) or from the previous *global* update, already released (``topk_prev``).

Every state is arrays only (clip per silo, calibrated scale per silo, estimator state), so values
that change during training never recompile the round.

Auxiliary queries. A rule that learns from the data declares a ``Query``: Q values in [0, 1] per
example ('unclipped': 1[‖gᵢ‖ ≤ C]; 'cdf': 1[‖gᵢ‖ ≤ c_j] on the grid; 'loss': min(ℓᵢ, cap)/cap),
released by the client as the centred sum Σ(vᵢ − ½) (L2 sensitivity √Q/2) plus Gaussian noise of
std f·m·√Q per coordinate (f the query's ``count_std_fraction``, m the expected batch), i.e. noise
multiplier a = 2·f·m. Gaussian queries on one sample compose into one Gaussian whose multiplier
z satisfies 1/z² = 1/z_Δ² + Σ_j 1/a_j² (docs/privacy.md §4.3). The ledger records the total z of
the noise rule; the gradient gets z_Δ = (z⁻² − Σ_j a_j⁻²)^(−1/2) — *more* noise than z, so the
queries cost no extra ε. ``make`` refuses a config where z ≥ a (no z_Δ exists), naming the
queries' keys. Rules see only noised reports: clip and noise updates are post-processing.

A top-k of a silo's own raw gradient is not offered: its support is a data-dependent release
without noise (docs/privacy.md §6.5).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from adpfl_jax.privacy import schedules

CLIP_MODES = ('fixed', 'quantile', 'percentile')
SPARSITY_MODES = ('none', 'random', 'topk_prev')
_SPARSITY_SEED = 0x5BA5


class ClientDP(NamedTuple):
  """Per-client privacy parameters of one round (arrays; a leading client axis when stacked)."""

  clip: jax.Array  # clip norm C (L2 for Gaussian, L1 for Laplace)
  noise_grad: jax.Array  # noise multiplier applied to the gradient sum (z_Δ; total z if no aux)
  aux_std: jax.Array  # (Q,) noise std of each auxiliary coordinate (0 ⇒ none)
  grid: jax.Array  # (G,) clip grid for the private percentile histogram
  expected_batch: jax.Array  # q·n, public
  lr: jax.Array  # client learning rate
  sparsity_mask: jax.Array  # flat 0/1 mask over parameters (public randomness or public info)
  # Privacy audit (``privacy/audit.py``), None when off: the (m,) coordinates of this silo's
  # canaries and the (steps, m) 0/1 plan of which included canaries each step samples.
  canary_index: jax.Array | None = None
  canary_mask: jax.Array | None = None


class Query(NamedTuple):
  """An auxiliary DP query a rule needs the clients to release (see the module docstring)."""

  name: str  # 'unclipped' | 'cdf' | 'loss'
  size: int  # Q values per example
  std_fraction: float  # f: per-coordinate noise std f·m·√Q
  key: str  # the config key of f, for errors


class UpdateInputs(NamedTuple):
  ids: jax.Array  # (M,) client ids of the round
  reports: dict  # query name -> (M, Q) noised means in [0, 1]
  valid: jax.Array  # (M,) clients that reported
  weights: jax.Array  # (M,) public aggregation weights
  global_update: jax.Array  # (P,) the released global update of the round
  round: jax.Array  # () the round that produced the reports


class Rule(NamedTuple):
  """One privacy rule: ``init() -> state``, ``client(state, ids, round, fields) -> fields`` (the
  ``ClientDP`` fields it sets, seeing those set by earlier rules), ``update(state, UpdateInputs)
  -> state``, and the auxiliary queries it needs."""

  init: Callable[[], Any]
  client: Callable[..., dict]
  update: Callable[[Any, UpdateInputs], Any]
  queries: tuple = ()


@flax.struct.dataclass
class ClipState:
  clip: jax.Array  # (K,) current clip norm per silo


@flax.struct.dataclass
class NoiseState:
  scale: jax.Array  # (K,) calibrated scale s_k: total z_k(r) = s_k · shape(r) · adapt
  adapt: jax.Array  # () data-driven factor a(r) (1 with a public schedule)
  best_loss: jax.Array  # () best privatized loss estimate so far
  stall: jax.Array  # () rounds since the estimate last improved


@flax.struct.dataclass
class LrState:
  base: jax.Array  # () client learning rate at round 0


@flax.struct.dataclass
class SparsityState:
  prev_update: jax.Array  # (P,) previous global update (topk_prev), else (1,)


@flax.struct.dataclass
class ControllerState:
  rules: dict  # rule name -> its state
  round: jax.Array  # () int32

  @property
  def clip(self) -> jax.Array:
    return self.rules['clip'].clip

  @property
  def noise_scale(self) -> jax.Array:
    return self.rules['noise'].scale

  @property
  def adapt(self) -> jax.Array:
    return self.rules['noise'].adapt

  def with_noise_scale(self, scale) -> 'ControllerState':
    noise = self.rules['noise'].replace(scale=jnp.asarray(scale, jnp.float32))
    return self.replace(rules={**self.rules, 'noise': noise})


class Controller(NamedTuple):
  """A chain of rules: pure functions over ``ControllerState``."""

  init: Callable[[], ControllerState]
  client_dp: Callable  # (state, client_ids) -> (ClientDP, z_total (M,))
  total_noise: Callable  # state -> (K,) total noise multiplier of every silo at state.round
  update: Callable  # (state, client_ids, reports, valid, weights, global_update) -> state
  mode: str  # the clip rule ('none' for NP-FL)
  aux: tuple  # names of the auxiliary queries the client releases, in column order
  aux_multiplier: np.ndarray  # (K,) combined multiplier of the auxiliary queries (inf if none)
  grid: np.ndarray  # (G,) public clip grid
  adaptive_noise: bool
  sparsity: str


def split_multiplier(z_total, aux_multiplier):
  """z_Δ with 1/z² = 1/z_Δ² + 1/a² (a = ∞: z_Δ = z). Requires z < a (checked in ``make``)."""
  inv = 1.0 / jnp.square(z_total) - 1.0 / jnp.square(aux_multiplier)
  return jnp.where(z_total > 0, jax.lax.rsqrt(jnp.maximum(inv, 1e-30)), 0.0)


# ------------------------------------------------------------------------------------------------
# Clip rules.
# ------------------------------------------------------------------------------------------------
def _set_clip(clip, ids, valid, new, clip_min, clip_max):
  """``clip[ids] = new`` for valid clients only. Invalid entries (padding clients that repeat a
  real id, clients that did not report) are dropped from the scatter, so a duplicate index can
  never overwrite a real client's update."""
  return clip.at[jnp.where(valid, ids, clip.shape[0])].set(
      jnp.clip(new, clip_min, clip_max), mode='drop')


def fixed_clip(num_clients: int, clip0: float) -> Rule:
  """Constant C (standard DP-FL); C = ∞ means no clipping (NP-FL)."""
  return Rule(init=lambda: ClipState(jnp.full((num_clients,), clip0, jnp.float32)),
              client=lambda st, ids, r, f: {'clip': st.clip[ids]},
              update=lambda st, u: st)


def quantile_clip(num_clients: int, clip0: float, *, target: float, lr: float, clip_min: float,
                  clip_max: float, std_fraction: float) -> Rule:
  """Andrew et al. 2021: C ← C·exp(−η(b̄ − γ)) from the noised unclipped fraction b̄."""

  def update(st, u: UpdateInputs):
    b = u.reports['unclipped'][:, 0]
    new = st.clip[u.ids] * jnp.exp(-lr * (b - target))
    return st.replace(clip=_set_clip(st.clip, u.ids, u.valid, new, clip_min, clip_max))

  return Rule(init=lambda: ClipState(jnp.full((num_clients,), clip0, jnp.float32)),
              client=lambda st, ids, r, f: {'clip': st.clip[ids]}, update=update,
              queries=(Query('unclipped', 1, std_fraction,
                             'privacy.quantile.count_std_fraction'),))


def percentile_clip(num_clients: int, clip0: float, *, grid: np.ndarray, percentile: float,
                    smoothing: float, clip_min: float, clip_max: float,
                    std_fraction: float) -> Rule:
  """The next C: the smallest grid value whose noised CDF reaches p, smoothed geometrically."""
  grid_j = jnp.asarray(grid, jnp.float32)

  def update(st, u: UpdateInputs):
    reached = u.reports['cdf'] >= percentile / 100.0
    target = jnp.where(jnp.any(reached, axis=1), grid_j[jnp.argmax(reached, axis=1)], grid_j[-1])
    new = jnp.exp(smoothing * jnp.log(st.clip[u.ids]) + (1 - smoothing) * jnp.log(target))
    return st.replace(clip=_set_clip(st.clip, u.ids, u.valid, new, clip_min, clip_max))

  def client(st, ids, r, f):
    return {'clip': st.clip[ids], 'grid': jnp.broadcast_to(grid_j, ids.shape + grid_j.shape)}

  return Rule(init=lambda: ClipState(jnp.full((num_clients,), clip0, jnp.float32)),
              client=client, update=update,
              queries=(Query('cdf', len(grid), std_fraction,
                             'privacy.percentile.count_std_fraction'),))


# ------------------------------------------------------------------------------------------------
# Noise rules.
# ------------------------------------------------------------------------------------------------
def _noise_init(scale):
  return lambda: NoiseState(scale=jnp.asarray(scale, jnp.float32), adapt=jnp.ones((), jnp.float32),
                            best_loss=jnp.full((), jnp.inf, jnp.float32),
                            stall=jnp.zeros((), jnp.int32))


def _total_noise(shape_fn):
  return lambda st, ids, r, f: {'z_total': st.scale[ids] * shape_fn(r) * st.adapt}


def scheduled_noise(scale, shape_fn) -> Rule:
  """z_k(r) = s_k · shape(r): a public schedule fixed before training (plain composition)."""
  return Rule(init=_noise_init(scale), client=_total_noise(shape_fn), update=lambda st, u: st)


def data_driven_noise(scale, shape_fn, *, factor: float, min_factor: float, patience: int,
                      threshold: float, std_fraction: float) -> Rule:
  """z multiplied by ``factor`` (not below ``min_factor``) when the noised clipped training loss
  has not improved by ``threshold`` for ``patience`` rounds; accounted under a Rényi filter."""

  def update(st, u: UpdateInputs):
    w = jnp.where(u.valid, u.weights, 0.0)
    est = jnp.sum(w * u.reports['loss'][:, 0]) / jnp.maximum(jnp.sum(w), 1e-12)
    improved = est < st.best_loss * (1.0 - threshold)
    stall = jnp.where(improved, 0, st.stall + 1)
    drop = stall >= patience
    adapt = jnp.where(drop, jnp.maximum(st.adapt * factor, min_factor), st.adapt)
    return st.replace(adapt=adapt, best_loss=jnp.minimum(st.best_loss, est),
                      stall=jnp.where(drop, 0, stall))

  return Rule(init=_noise_init(scale), client=_total_noise(shape_fn), update=update,
              queries=(Query('loss', 1, std_fraction,
                             'privacy.adaptive_noise.count_std_fraction'),))


# ------------------------------------------------------------------------------------------------
# Learning-rate and sparsity rules.
# ------------------------------------------------------------------------------------------------
def client_lr(lr0: float, shape_fn, *, clip0: float = 1.0, clip_power: float = 0.0) -> Rule:
  """lr(r) = lr₀ · shape(r) · (C₀ / C)^p: a public function of the already-privatized C."""

  def client(st, ids, r, f):
    lr = jnp.broadcast_to(st.base * shape_fn(r), ids.shape)
    if clip_power:
      lr = lr * (clip0 / f['clip']) ** clip_power
    return {'lr': lr}

  return Rule(init=lambda: LrState(jnp.asarray(lr0, jnp.float32)), client=client,
              update=lambda st, u: st)


def sparsity(mode: str, param_count: int, fraction: float) -> Rule:
  """A public 0/1 mask keeping ``fraction`` of the coordinates (masking the clipped sum and the
  noise cannot raise the sensitivity above C)."""
  keep = max(1, int(round(fraction * param_count)))
  key = jax.random.key(_SPARSITY_SEED)
  size = param_count if mode == 'topk_prev' else 1

  def mask(st, r):
    noise = jax.random.uniform(jax.random.fold_in(key, r), (param_count,))
    if mode == 'random':
      scores = noise
    else:  # topk_prev; before any update exists, fall back to public randomness
      scores = jnp.where(jnp.any(st.prev_update != 0), jnp.abs(st.prev_update), noise)
    _, idx = jax.lax.top_k(scores, keep)
    return jnp.zeros((param_count,), jnp.float32).at[idx].set(1.0)

  def client(st, ids, r, f):
    if mode == 'none':
      return {'sparsity_mask': jnp.ones(ids.shape, jnp.float32)}
    return {'sparsity_mask': jnp.broadcast_to(mask(st, r), ids.shape + (param_count,))}

  def update(st, u: UpdateInputs):
    return st.replace(prev_update=u.global_update) if mode == 'topk_prev' else st

  return Rule(init=lambda: SparsityState(jnp.zeros((size,), jnp.float32)), client=client,
              update=update)


# ------------------------------------------------------------------------------------------------
# The chain.
# ------------------------------------------------------------------------------------------------
def chain(rules: dict, expected_batch: np.ndarray, *, noise_scale: np.ndarray,
          max_shape: float, mode: str, adaptive_noise: bool, sparsity_mode: str,
          grid: np.ndarray) -> Controller:
  """Combines named rules (applied in order) into one ``Controller``.

  Args:
    rules: name -> ``Rule``; needs 'clip' and 'noise' (whose states carry ``clip`` / ``scale``).
    expected_batch: (K,) public expected batch q_k·n_k.
    noise_scale: (K,) calibrated scale, to check that every query leaves room for z_Δ.
    max_shape: the largest value the noise schedule takes.
    mode, adaptive_noise, sparsity_mode, grid: descriptive (the clip rule's name, whether the
      noise is data-driven, the sparsity mode, the public clip grid).
  """
  queries = [q for rule in rules.values() for q in rule.queries]
  expected = np.asarray(expected_batch, np.float64)
  num_clients = len(expected)
  if queries:
    # Per-coordinate std f·m·√Q; multiplier a_j = 2·std/√Q = 2·f·m; combined 1/a² = Σ_j 1/a_j².
    stds = [expected * q.std_fraction * math.sqrt(q.size) for q in queries]
    aux_std = np.concatenate([np.repeat(s[:, None], q.size, axis=1)
                              for s, q in zip(stds, queries)], axis=1)
    mults = [2.0 * s / math.sqrt(q.size) for s, q in zip(stds, queries)]
    aux_mult = mults[0] if len(mults) == 1 else 1.0 / np.sqrt(sum(1.0 / np.square(a)
                                                                  for a in mults))
    z_max = np.asarray(noise_scale, np.float64) * max_shape
    bad = np.flatnonzero(z_max >= aux_mult)
    if bad.size:
      k = int(bad[0])
      keys = ', '.join(f'config.{q.key}' for q in queries)
      raise ValueError(
          f'{keys}: the total noise multiplier z={z_max[k]:.3f} of silo {k} is >= the auxiliary '
          f'query multiplier {aux_mult[k]:.3f} (2·f·m with expected batch m = {expected[k]:.1f}'
          f'{" combined over the queries" if len(queries) > 1 else ""}); the gradient would '
          'need negative noise. Raise privacy.batch_size or the count_std_fraction, or lower the '
          'noise.')
  else:
    aux_std = np.zeros((num_clients, 1))
    aux_mult = np.full(num_clients, np.inf)
  aux_std_j = jnp.asarray(aux_std, jnp.float32)
  aux_mult_j = jnp.asarray(aux_mult, jnp.float32)
  expected_j = jnp.asarray(expected, jnp.float32)
  names = tuple(rules)
  one = jnp.ones(1, jnp.float32)

  def init() -> ControllerState:
    return ControllerState(rules={n: rules[n].init() for n in names},
                           round=jnp.zeros((), jnp.int32))

  def client_dp(state: ControllerState, ids):
    fields: dict = {}
    for n in names:
      fields.update(rules[n].client(state.rules[n], ids, state.round, fields))
    z_total = fields['z_total']
    dp = ClientDP(clip=fields['clip'], noise_grad=split_multiplier(z_total, aux_mult_j[ids]),
                  aux_std=aux_std_j[ids],
                  grid=fields.get('grid', jnp.broadcast_to(one, ids.shape + (1,))),
                  expected_batch=expected_j[ids], lr=fields['lr'],
                  sparsity_mask=fields['sparsity_mask'])
    return dp, z_total

  def total_noise(state: ControllerState):
    ids = jnp.arange(num_clients)
    return rules['noise'].client(state.rules['noise'], ids, state.round, {})['z_total']

  def update(state: ControllerState, ids, reports, valid, weights, global_update):
    """Next state from privatized reports; ``valid`` (M,) marks clients that reported."""
    columns, col = {}, 0
    for q in queries:
      columns[q.name] = reports['aux'][:, col:col + q.size]
      col += q.size
    inputs = UpdateInputs(ids=ids, reports=columns, valid=valid, weights=weights,
                          global_update=global_update, round=state.round)
    new = {n: rules[n].update(state.rules[n], inputs) for n in names}
    return state.replace(rules=new, round=state.round + 1)

  return Controller(init=init, client_dp=client_dp, total_noise=total_noise, update=update,
                    mode=mode,
                    aux=tuple(q.name for q in queries), aux_multiplier=aux_mult,
                    grid=np.asarray(grid, np.float32), adaptive_noise=adaptive_noise,
                    sparsity=sparsity_mode)


def make(privacy_cfg, fed_cfg, sizes: np.ndarray, rates: np.ndarray, noise_scale: np.ndarray,
         param_count: int) -> Controller:
  """The controller for ``config.privacy``: the configured clip, noise, lr and sparsity rules.

  Args:
    privacy_cfg: ``config.privacy``.
    fed_cfg: ``config.fed`` (client learning rate and its schedule, rounds).
    sizes: (K,) public client sizes n_k.
    rates: (K,) Poisson sampling rates q_k.
    noise_scale: (K,) calibrated total-noise scale per silo (z_k(r) = scale_k · shape(r)).
    param_count: number of model parameters (for sparsity masks).
  """
  p = privacy_cfg
  private = p.mode != 'none'
  k = len(sizes)
  rounds = int(fed_cfg.rounds)
  expected = np.asarray(sizes, np.float64) * np.asarray(rates, np.float64)
  clip0, clip_min, clip_max = float(p.clip_norm), float(p.clip_min), float(p.clip_max)
  mode = p.clip_mode if private else 'none'
  grid = np.ones(1, np.float32)
  if mode == 'none':
    clip = fixed_clip(k, math.inf)
  elif mode == 'fixed':
    clip = fixed_clip(k, clip0)
  elif mode == 'quantile':
    q = p.quantile
    clip = quantile_clip(k, clip0, target=float(q.target), lr=float(q.lr), clip_min=clip_min,
                         clip_max=clip_max, std_fraction=float(q.count_std_fraction))
  elif mode == 'percentile':
    pc = p.percentile
    grid = np.geomspace(float(pc.grid_min), float(pc.grid_max),
                        int(pc.grid_size)).astype(np.float32)
    clip = percentile_clip(k, clip0, grid=grid, percentile=float(pc.percentile),
                           smoothing=float(pc.smoothing), clip_min=clip_min, clip_max=clip_max,
                           std_fraction=float(pc.count_std_fraction))
  else:
    raise ValueError(f'config.privacy.clip_mode={mode!r} is not one of {CLIP_MODES}')
  sched = schedules.params_from_config(p.noise_schedule, p.noise_schedule_params, rounds)
  shape_fn = schedules.jnp_schedule(p.noise_schedule, sched)
  max_shape = float(np.max(schedules.np_schedule(p.noise_schedule, sched)(
      np.arange(max(1, rounds)))))
  scale = np.asarray(noise_scale if private else np.zeros(k), np.float32)
  adaptive = private and bool(p.adaptive_noise.enabled)
  if adaptive:
    an = p.adaptive_noise
    noise = data_driven_noise(scale, shape_fn, factor=float(an.factor),
                              min_factor=float(an.min_factor), patience=int(an.patience),
                              threshold=float(an.threshold),
                              std_fraction=float(an.count_std_fraction))
  else:
    noise = scheduled_noise(scale, shape_fn)
  lr_kind = fed_cfg.client_lr_schedule
  lr_shape = schedules.jnp_schedule(lr_kind, schedules.params_from_config(
      lr_kind, fed_cfg.client_lr_schedule_params, rounds))
  lr = client_lr(float(fed_cfg.client_lr), lr_shape, clip0=clip0,
                 clip_power=float(p.clip_lr_power) if mode in ('quantile', 'percentile') else 0.0)
  if p.sparsity.mode not in SPARSITY_MODES:
    raise ValueError(f'config.privacy.sparsity.mode={p.sparsity.mode!r} is not one of '
                     f'{SPARSITY_MODES}')
  rules = {'clip': clip, 'noise': noise, 'lr': lr,
           'sparsity': sparsity(p.sparsity.mode, param_count, float(p.sparsity.fraction))}
  return chain(rules, expected, noise_scale=scale, max_shape=max_shape, mode=mode,
               adaptive_noise=adaptive, sparsity_mode=p.sparsity.mode, grid=grid)
