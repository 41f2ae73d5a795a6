"""Server state and the federated round, as a value: ``FederatedRound(init, apply)``.

A round: the host picks the participating clients and their Poisson batches (a pure function of
the run's seed and identity, see ``sampling.py``); ``apply`` gathers the batches from the
device-resident client data, runs every sampled client's local DP-SGD through the configured
backend, drops clients whose update is not finite, averages the updates weighted by the clients'
(public) sizes, applies the server optimizer (FedAvg = SGD with lr 1 on the averaged update;
FedAvgM / FedAdam by config) and lets the controller update clip and noise from the clients'
privatized reports. For the ``vmap``/``map``/``sharded`` backends all of this is one jitted
function. Besides the new state, ``apply`` returns what the host needs before the next round —
``next_noise`` (the total noise multiplier every silo would use next, for the budget stop) and
``params_finite`` — so the host never copies parameters or calls the device again between rounds.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from adpfl_jax.federated import backends
from adpfl_jax.federated import client as client_lib
from adpfl_jax.privacy import controller as controller_lib

PyTree = Any


@flax.struct.dataclass
class ServerState:
  """Everything a round reads and writes; exactly what is checkpointed (with the host ledger)."""

  round: jax.Array  # () int32
  params: PyTree
  opt_state: PyTree
  controller: controller_lib.ControllerState
  key: jax.Array  # base PRNG key (uint32 key data); round keys are fold_in(key, round)
  # Parameter averaging (``fed.param_averaging='ema'``): an EMA of the released global models,
  # the model that is evaluated and published. Post-processing of released models; None when off.
  averaged: PyTree = None


SERVER_OPTIMIZERS = ('fedavg', 'fedavgm', 'fedadam')
PARAM_AVERAGING = ('none', 'ema')


def ema_decay(fed_cfg) -> float | None:
  """The EMA decay of ``fed.param_averaging='ema'``, or None when parameter averaging is off."""
  if fed_cfg.param_averaging == 'none':
    return None
  if fed_cfg.param_averaging == 'ema':
    return float(fed_cfg.ema_decay)
  raise ValueError(f'config.fed.param_averaging={fed_cfg.param_averaging!r} is not one of '
                   f'{PARAM_AVERAGING}')


def ema_update(averaged: PyTree, params: PyTree, round_: jax.Array, decay: float) -> PyTree:
  """One EMA step over the model released after round ``round_`` (0-based), with warm-up:
  the effective decay is min(decay, (1 + r) / (10 + r)), so early models do not dominate."""
  r = round_.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + r) / (10.0 + r))
  return jax.tree_util.tree_map(lambda a, p: d * a + (1.0 - d) * p, averaged, params)


def released_params(state: 'ServerState') -> PyTree:
  """The model a run evaluates and publishes: the EMA when parameter averaging is on."""
  return state.params if state.averaged is None else state.averaged


def server_optimizer(fed_cfg) -> optax.GradientTransformation:
  name = fed_cfg.server_optimizer
  if name == 'fedavg':
    return optax.sgd(float(fed_cfg.server_lr))
  if name == 'fedavgm':
    return optax.sgd(float(fed_cfg.server_lr), momentum=float(fed_cfg.server_momentum))
  if name == 'fedadam':
    return optax.adam(float(fed_cfg.server_lr), b1=0.9, b2=0.99, eps=1e-3)
  raise ValueError(f'config.fed.server_optimizer={name!r} is not one of {SERVER_OPTIMIZERS}')


def init_state(params: PyTree, tx: optax.GradientTransformation,
               controller: controller_lib.Controller, seed: int,
               identity: int = 0, averaging: bool = False) -> ServerState:
  """Round 0. The noise key is derived from ``(seed, identity)``: runs that differ in anything
  (``configs.identity.run_identity``) draw independent noise even with the same seed."""
  key = jax.random.key(seed)
  for word in (identity >> 32, identity & 0xFFFFFFFF):
    key = jax.random.fold_in(key, word)
  averaged = jax.tree_util.tree_map(jnp.array, params) if averaging else None
  return ServerState(round=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     controller=controller.init(), key=jax.random.key_data(key),
                     averaged=averaged)


class RoundInputs(NamedTuple):
  """Host-built plan of one round (see ``sampling.py``; canaries: ``privacy/audit.py``)."""

  client_ids: jax.Array  # (M,) int32; padding clients repeat an id and have weight 0
  indices: jax.Array  # (M, steps, B) int32 example indices
  mask: jax.Array  # (M, steps, B) float32
  weights: jax.Array  # (M,) float32 aggregation weights (public sizes; 0 for padding clients)
  active: jax.Array  # (M, steps) float32: 1 for local steps a client runs (fault injection)
  poison: jax.Array  # (M,) float32: 1 for clients whose update is replaced by NaN (fault test)
  canary_index: jax.Array | None = None  # (M, m) int32 audit canary coordinates, or None
  canary_mask: jax.Array | None = None  # (M, steps, m) float32 sampled included canaries


def _gather(data_x, data_y, inputs: RoundInputs):
  ids = inputs.client_ids[:, None, None]
  return data_x[ids, inputs.indices], data_y[ids, inputs.indices]


def _with_canaries(dp: controller_lib.ClientDP, inputs: RoundInputs) -> controller_lib.ClientDP:
  if inputs.canary_index is None:
    return dp
  return dp._replace(canary_index=inputs.canary_index, canary_mask=inputs.canary_mask)


def _client_keys(state: ServerState, client_ids):
  round_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.round)
  return jax.vmap(lambda c: jax.random.fold_in(round_key, c))(client_ids)


def _finish(state, tx, controller, inputs, deltas, reports, z_total, dp, decay=None):
  """Aggregation, server update and controller update (shared by all backends)."""
  # Fault injection: a poisoned client sends a non-finite update.
  deltas = jax.tree_util.tree_map(
      lambda d: jnp.where(inputs.poison.reshape((-1,) + (1,) * (d.ndim - 1)) > 0, jnp.nan, d),
      deltas)
  flat = jax.vmap(lambda d: ravel_pytree(d)[0])(deltas)
  update_finite = jnp.all(jnp.isfinite(flat), axis=1)
  finite = update_finite & (inputs.weights > 0)
  w = jnp.where(finite, inputs.weights, 0.0)
  total = jnp.sum(w)
  w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
  avg = jax.tree_util.tree_map(
      lambda d: jnp.tensordot(w, jnp.where(finite.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0), 1),
      deltas)
  # optax minimises: the pseudo-gradient is the negative average update.
  pseudo_grad = jax.tree_util.tree_map(jnp.negative, avg)
  updates, opt_state = tx.update(pseudo_grad, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  avg_flat = jnp.tensordot(w, jnp.where(finite[:, None], flat, 0.0), 1)
  ctrl = controller.update(state.controller, inputs.client_ids, reports, finite, inputs.weights,
                           avg_flat)
  metrics = {
      'train_loss': jnp.sum(jnp.where(finite, reports['train_loss'], 0.0) * w),
      'update_norm': optax.global_norm(avg),
      'client_update_finite': update_finite,
      'noise_multiplier': z_total,
      'noise_multiplier_grad': dp.noise_grad,
      'aux': reports['aux'],
      'noise_adapt': ctrl.adapt,
      # For the host's next round: every silo's total noise multiplier (budget stop) and
      # whether the new global model is finite (no parameter copy to the host needed).
      'next_noise': controller.total_noise(ctrl),
      'params_finite': jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf))
                                          for leaf in jax.tree_util.tree_leaves(params)])),
  }
  if dp.canary_index is not None:
    # The audit's scores: each client's released update at its canary coordinates, negated
    # (an included canary pushes its coordinate down). Post-processing of released updates.
    metrics['canary_scores'] = -jnp.take_along_axis(flat, dp.canary_index, axis=1)
  averaged = state.averaged
  if decay is not None:
    averaged = ema_update(averaged, params, state.round, decay)
  new_state = state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                            controller=ctrl, averaged=averaged)
  return new_state, metrics


class FederatedRound(NamedTuple):
  """A federated algorithm as a value (cf. fedjax's ``FederatedAlgorithm``).

  ``init(params, seed, identity) -> ServerState``; ``apply(state, data_x, data_y, inputs) ->
  (state, outputs)`` runs one round (jitted); ``noise(controller_state) -> (K,)`` the total noise
  multiplier of every silo at the state's round (jitted; the host needs it once, before the first
  round it runs — later ones come in ``outputs['next_noise']``).
  """

  init: Callable
  apply: Callable
  noise: Callable
  backend: str
  jitted: tuple  # the jitted function(s), for compile-count checks
  fn: Callable | None = None  # un-jitted ``apply`` (one-jit backends), to map over trials


def build_round(cfg: client_lib.ClientConfig, tx, controller: controller_lib.Controller,
                backend: str, *, chunk_size: int = 1, mesh=None,
                donate: bool = False, decay: float | None = None) -> FederatedRound:
  """Builds the round for ``backend`` (already resolved, not ``auto``); ``decay``: the EMA
  decay of parameter averaging (``ema_decay``), None for none."""
  per_client = lambda *a: client_lib.client_update(cfg, *a)
  init = lambda params, seed, identity=0: init_state(params, tx, controller, seed, identity,
                                                     averaging=decay is not None)
  noise = jax.jit(controller.total_noise)

  if backend in backends.ONE_JIT:
    mapped = backends.build(backend, per_client, chunk_size=chunk_size, mesh=mesh)

    def round_fn(state, data_x, data_y, inputs):
      xb, yb = _gather(data_x, data_y, inputs)
      dp, z_total = controller.client_dp(state.controller, inputs.client_ids)
      dp = _with_canaries(dp, inputs)
      keys = _client_keys(state, inputs.client_ids)
      deltas, reports = mapped(state.params, xb, yb, inputs.mask, dp, keys, inputs.active)
      return _finish(state, tx, controller, inputs, deltas, reports, z_total, dp, decay)

    jitted = jax.jit(round_fn, donate_argnums=(0,) if donate else ())
    return FederatedRound(init=init, apply=jitted, noise=noise, backend=backend,
                          jitted=(jitted,), fn=round_fn)

  if backend != 'loop':
    raise ValueError(f'unknown backend {backend!r}')
  client_jit = jax.jit(per_client)

  @jax.jit
  def prepare(state, data_x, data_y, inputs):
    xb, yb = _gather(data_x, data_y, inputs)
    dp, z_total = controller.client_dp(state.controller, inputs.client_ids)
    dp = _with_canaries(dp, inputs)
    return xb, yb, dp, z_total, _client_keys(state, inputs.client_ids)

  finish = jax.jit(lambda state, inputs, deltas, reports, z_total, dp: _finish(
      state, tx, controller, inputs, deltas, reports, z_total, dp, decay))
  mapped = backends.loop_clients(client_jit)

  def loop_round(state, data_x, data_y, inputs):
    xb, yb, dp, z_total, keys = prepare(state, data_x, data_y, inputs)
    deltas, reports = mapped(state.params, xb, yb, inputs.mask, dp, keys, inputs.active)
    return finish(state, inputs, deltas, reports, z_total, dp)

  return FederatedRound(init=init, apply=loop_round, noise=noise, backend='loop',
                        jitted=(prepare, client_jit, finish))
