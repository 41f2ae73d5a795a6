"""``train_and_evaluate(config, workdir)``: the training loop, one readable function.

Sections: validate → data → privacy plan (calibration, ledgers, budget) → model and round →
rounds (host sampling plan, jitted round, ledger, evaluation, metrics) → summary. Everything the
host needs to know about privacy lives in ``privacy/plan.py``; the jitted round only sees arrays.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from adpfl_jax import checkpointing
from adpfl_jax import jsonio
from adpfl_jax import losses
from adpfl_jax import models
from adpfl_jax import validation
from adpfl_jax.data import federated as fed_data
from adpfl_jax.federated import backends
from adpfl_jax.federated import client as client_lib
from adpfl_jax.federated import sampling
from adpfl_jax.federated import server
from adpfl_jax.metrics import dice as dice_lib
from adpfl_jax.metrics import regions as metrics_regions
from adpfl_jax.metrics import writers
from adpfl_jax.privacy import audit as audit_lib
from adpfl_jax.privacy import controller as controller_lib
from adpfl_jax.privacy import plan as plan_lib


def regions_for(task: str, num_classes: int):
  """Evaluation regions (name → labels) of a task, from ``metrics.regions.REGIONS``."""
  if task in metrics_regions.REGIONS:
    return dict(metrics_regions.REGIONS[task])
  if num_classes == 1:
    return {'lesion': (1,)}
  return {f'class_{c}': (c,) for c in range(1, num_classes)}


class Trainer:
  """Holds the pieces built from a config; ``run`` trains. Built once, before anything compiles."""

  def __init__(self, config, workdir: str, data: fed_data.FederatedData | None = None):
    validation.validate(config)
    self._nonfinite = set()
    self._speed = _Throughput()
    self._tb = None
    self.config = config
    self.workdir = workdir
    self.data = data if data is not None else fed_data.load(config.data, config.seed)
    validation.validate_data(config, self.data)
    self.regions = regions_for(self.data.task, self.data.num_classes)
    self.plan = plan_lib.PrivacyPlan.from_config(config, self.data.sizes)
    first = self.plan.first_exceeding_silo()
    if first is not None:
      raise validation.ConfigError(
          f'config.privacy.target_epsilon={config.privacy.target_epsilon} is already exceeded by '
          f'the first round of silo {first} (noise multiplier '
          f'{self.plan.noise_scale[first]:.4g}); lower the noise steps or raise the budget.')
    self.model = models.get_model(config.model, self.data.example_shape,
                                  self.data.num_classes)
    region_labels = list(self.regions.values()) if self.data.num_classes > 1 else None
    apply_fn = self.model.apply

    def loss_fn(params, x, y):
      return losses.segmentation_loss(apply_fn(params, x), y, regions=region_labels,
                                      dice_weight=config.loss.dice_weight,
                                      ce_weight=config.loss.ce_weight)

    self.loss_fn = loss_fn
    params = self.model.init(jax.random.key(config.seed))
    self.param_count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    # The run's secret randomness (noise, batches, canaries) comes from (seed, identity).
    self._set_identity(checkpointing.run_identity(config))
    self.controller = controller_lib.make(config.privacy, config.fed, self.data.sizes,
                                          self.plan.rates, self.plan.noise_scale,
                                          self.param_count)
    self.tx = server.server_optimizer(config.fed)
    self.backend = backends.resolve(config.fed.backend)
    self.mesh = None
    if self.backend == 'sharded':
      self.mesh = backends.make_mesh(int(config.fed.num_devices) or None)
    self.client_cfg = client_lib.ClientConfig(
        loss_fn=loss_fn, private=self.plan.private, mechanism=config.privacy.mechanism,
        momentum=float(config.fed.client_momentum),
        sparsify=self.controller.sparsity != 'none', aux=self.controller.aux,
        loss_cap=float(config.privacy.adaptive_noise.loss_cap), audit=self.audit is not None,
        canary_scale=float(config.privacy.clip_norm))
    self.noise_fn = jax.jit(lambda c, ids: self.controller.client_dp(c, ids)[1])
    self.round = server.build_round(self.client_cfg, self.tx, self.controller, self.backend,
                                    chunk_size=int(config.fed.chunk_size), mesh=self.mesh)
    self.initial_state = server.init_state(params, self.tx, self.controller, config.seed,
                                           self.identity)
    self.evaluator = dice_lib.make_evaluator(apply_fn, list(self.regions.values()),
                                             int(config.eval.batch_size))

  def _set_identity(self, identity: int) -> None:
    """The run's secret randomness: Poisson batches and audit canaries from (seed, identity)."""
    cfg = self.config
    self.identity = int(identity)
    self.entropy = (int(cfg.seed), self.identity)
    self.audit = None
    if cfg.privacy.audit.enabled:
      self.audit = audit_lib.AuditPlan.make(
          seed=int(cfg.seed), identity=self.identity, num_clients=self.data.num_clients,
          param_count=self.param_count, canaries=int(cfg.privacy.audit.canaries),
          rates=self.plan.rates, scale=float(cfg.privacy.clip_norm))
    self.audit_scores = audit_lib.AuditScores(self.audit) if self.audit is not None else None

  # --------------------------------------------------------------------------------------------
  def round_inputs(self, round_: int):
    """Host plan of one round — clients, Poisson batches, injected faults — from (seed, round).

    Returns (RoundInputs, participating client ids, local steps each of them ran).
    """
    cfg = self.config
    clients = sampling.participating_clients(cfg.seed, round_, self.data.num_clients,
                                             int(cfg.fed.clients_per_round))
    steps = int(cfg.fed.local_steps)
    idx, mask, _ = sampling.round_plan(self.entropy, round_, clients, self.data.sizes,
                                       self.plan.rates, steps, self.plan.max_batch)
    fc = cfg.faults
    faults = sampling.fault_plan(
        cfg.seed, round_, clients, steps, dropout=float(fc.dropout),
        straggler_fraction=float(fc.straggler_fraction),
        straggler_min_steps=int(fc.straggler_min_steps), nan_clients=_int_list(fc.nan_clients))
    weights = np.where(faults.dropped, 0.0, self.data.sizes[clients]).astype(np.float32)
    canaries = ()
    if self.audit is not None:
      canaries = self.audit.round_arrays(round_, clients, steps)
    arrays = self._pad_clients(clients, idx, mask, weights, faults.active, faults.poison,
                               *canaries)
    ids, idx, mask, weights, active, poison, *canaries = [jnp.asarray(a) for a in arrays]
    inputs = server.RoundInputs(client_ids=ids, indices=idx, mask=mask, weights=weights,
                                active=active, poison=poison,
                                **dict(zip(('canary_index', 'canary_mask'), canaries)))
    return inputs, clients, faults.active.sum(1).astype(np.int64)

  def _pad_clients(self, clients, *arrays):
    """Pads the client axis to a multiple of the device count (sharded backend)."""
    if self.mesh is None:
      return (clients, *arrays)
    extra = (-len(clients)) % self.mesh.devices.size
    if not extra:
      return (clients, *arrays)
    rep = lambda a, v: np.concatenate([a, np.full((extra,) + a.shape[1:], v, a.dtype)])
    return (rep(clients, clients[0]), *[rep(a, 0) for a in arrays])

  def evaluate(self, params):
    """Per-client and pooled test Dice (per region)."""
    per_client = []
    all_rows = []
    for k in range(self.data.num_clients):
      rows = self.evaluator(params, self.data.test_x[k], self.data.test_y[k])
      all_rows.append(rows)
      per_client.append(rows.mean(0) if len(rows) else np.full(len(self.regions), np.nan))
    pooled = np.concatenate(all_rows).mean(0)
    names = list(self.regions)
    return {
        'dice': float(np.mean(pooled)),
        'dice_per_client': [float(np.mean(c)) for c in per_client],
        'dice_per_region': {n: float(pooled[i]) for i, n in enumerate(names)},
    }

  # --------------------------------------------------------------------------------------------
  def _resume(self, ckpt, metrics_path):
    """Restores the newest readable checkpoint, or starts fresh. Returns (state, host)."""
    cfg = self.config
    cfg_path = os.path.join(self.workdir, 'config.json')
    if ckpt is not None and ckpt.steps():
      with open(cfg_path) as f:
        saved = json.load(f)
      diff = checkpointing.config_differences(saved, checkpointing.config_dict(cfg))
      if diff and not cfg.checkpoint.force:
        raise validation.ConfigError(
            f'config.checkpoint: the workdir {self.workdir} holds a run with a different config; '
            f'differing keys: {diff}. Use another --workdir, or --config.checkpoint.force=True '
            'to resume anyway (the result is then not that of either config).')
      got = ckpt.restore_latest(self.initial_state)
      if got is not None:
        step, state, host = got
        old = np.asarray(state.controller.noise_scale, np.float64)
        try:
          scales = self.plan.load_host_state(host['plan'], step, old, same_config=not diff)
        except ValueError as err:
          raise validation.ConfigError(str(err)) from err
        if not np.array_equal(np.float32(scales), np.float32(old)):
          # A forced resume under another plan: the remaining rounds run at the recalibrated
          # noise, so the run still lands on (never above) the target.
          state = state.replace(controller=state.controller.replace(
              noise_scale=jnp.asarray(scales, jnp.float32)))
          tqdm.tqdm.write('Forced resume: noise scale per silo recalibrated for the remaining '
                          'rounds from ' + ', '.join(f'{a:.4g}' for a in old) + ' to '
                          + ', '.join(f'{b:.4g}' for b in scales))
        if int(host.get('identity', self.identity)) != self.identity:
          # A forced resume keeps the randomness the run started with (its noise key is in the
          # checkpoint; batches and canaries follow the same identity).
          self._set_identity(int(host['identity']))
        if self.audit is not None and 'audit' in host:
          self.audit_scores.load(host['audit'])
        _truncate_metrics(metrics_path, step)
        tqdm.tqdm.write(f'Resumed from round {step} ({ckpt.directory}).')
        return state, host
    # Fresh start: nothing of an earlier, checkpoint-less attempt may leak into this run.
    if os.path.exists(metrics_path):
      os.remove(metrics_path)
    with open(cfg_path, 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    return self.initial_state, {'wall': 0.0}

  def _host_state(self, wall):
    host = {'plan': self.plan.host_state(), 'wall': wall,
            'config_hash': checkpointing.config_hash(self.config),
            'identity': str(self.identity)}
    if self.audit is not None:
      host['audit'] = self.audit_scores.state()
    return host

  def surface_evaluate(self, params, max_cases: int | None = None) -> dict:
    """Challenge-style metrics on the pooled test split: per region Dice, HD95, NSD (host).

    Uses ``metrics/regions.py`` (DeepMind surface elements, the task's official NSD tolerances and
    empty-mask conventions) in physical units from the examples' voxel spacing.
    """
    task = self.data.task if self.data.task in metrics_regions.REGIONS else None
    if task is None:
      return {}
    predict = self._predict_fn()
    cases = []
    spacing = self.data.spacing or (1.0,) * (len(self.data.example_shape) - 1)
    for k in range(self.data.num_clients):
      x, y = self.data.test_x[k], self.data.test_y[k]
      for s in range(0, len(x), 16):
        pred = np.asarray(predict(params, jnp.asarray(x[s:s + 16])))
        for p_i, t_i in zip(pred, y[s:s + 16]):
          cases.append(metrics_regions.evaluate_case(p_i, np.asarray(t_i), spacing, task,
                                                     metrics=('dice', 'hd95', 'nsd')))
      if max_cases and len(cases) >= max_cases:
        break
    return metrics_regions.aggregate(cases)

  def _predict_fn(self):
    if not hasattr(self, '_predict'):
      apply_fn = self.model.apply
      self._predict = jax.jit(lambda p, x: losses.predict_labels(
          jax.vmap(lambda xi: apply_fn(p, xi))(x)))
    return self._predict

  def run(self):
    cfg = self.config
    os.makedirs(self.workdir, exist_ok=True)
    every = int(cfg.checkpoint.every_rounds)
    ckpt = checkpointing.Checkpointer(self.workdir, int(cfg.checkpoint.keep)) if every else None
    metrics_path = os.path.join(self.workdir, 'metrics.jsonl')
    self._set_identity(checkpointing.run_identity(cfg))
    state, host = self._resume(ckpt, metrics_path)
    start = int(state.round)
    data_x = jnp.asarray(self.data.train_x)
    data_y = jnp.asarray(self.data.train_y)
    rounds = int(cfg.fed.rounds)
    if start == 0:
      self.plan.print_header(self.data.client_names, rounds)
    t_start = time.time() - float(host['wall'])
    stopped = 'completed'
    last_eval = _last_row(metrics_path, start)
    m = None
    interrupted = _SignalFlag()
    self._nonfinite = set()
    self._speed = _Throughput()
    self._tb = writers.TensorBoardWriter(self.workdir) if cfg.eval.tensorboard else None
    bar = tqdm.tqdm(range(start, rounds), desc='rounds', disable=not cfg.log.progress,
                    file=sys.stdout, dynamic_ncols=True, initial=start, total=rounds)
    try:
      with open(metrics_path, 'a') as mf:
        for r in bar:
          t_round = time.time()
          inputs, clients, ran = self.round_inputs(r)
          z_next = np.asarray(self.noise_fn(state.controller, jnp.asarray(inputs.client_ids)),
                              np.float64)[:len(clients)]
          blocked = self.plan.would_exceed(r, clients, z_next, ran)
          if blocked is not None:
            stopped = (f'budget: round {r} would take silo {blocked} past the target '
                       f'ε={self.plan.target_epsilon} at δ={self.plan.delta}')
            tqdm.tqdm.write(f'Stopping before round {r}: {stopped}')
            break
          state, m = self.round.step(state, data_x, data_y, inputs)
          m = jax.device_get(m)
          self.plan.record_round(r, clients, np.asarray(m['noise_multiplier'])[:len(clients)],
                                 ran)
          ok = np.asarray(m['client_update_finite'])[:len(clients)]
          self._nonfinite.update(int(c) for c, good, s in zip(clients, ok, ran)
                                 if s > 0 and not good)
          if self.audit_scores is not None:
            self.audit_scores.add(clients, np.where(ok, ran, 0),
                                  np.asarray(m['canary_scores'])[:len(clients)])
          self._speed.add(time.time() - t_round, self._expected_examples(clients, ran))
          if not np.all(np.isfinite(jax.tree_util.tree_leaves(
              jax.tree_util.tree_map(lambda a: np.isfinite(np.asarray(a)).all(),
                                     state.params)))):
            stopped = f'non-finite global model at round {r}'
            tqdm.tqdm.write(stopped)
            break
          if (r + 1) % int(cfg.eval.every_rounds) == 0 or r + 1 == rounds:
            last_eval = self._log(mf, r + 1, state, m, clients, t_start)
            bar.set_postfix(dice=f"{last_eval['dice']:.3f}", eps=f"{last_eval['epsilon']:.2f}")
          if ckpt is not None and ((r + 1) % every == 0 or r + 1 == rounds or interrupted.set):
            ckpt.save(r + 1, state, self._host_state(time.time() - t_start))
          if interrupted.set:
            stopped = f'interrupted by signal {interrupted.signum} after round {r + 1}'
            tqdm.tqdm.write(f'{stopped}; checkpoint saved, rerun the same command to resume.')
            break
    finally:
      interrupted.restore()
      if self._tb is not None:
        self._tb.close()
        self._tb = None
      if ckpt is not None:
        ckpt.close()
    if last_eval is None or last_eval['round'] != int(state.round):
      with open(metrics_path, 'a') as mf:
        last_eval = self._log(mf, int(state.round), state, m, None, t_start)
    self.final_state = state
    return self._summary(last_eval, int(state.round), stopped, time.time() - t_start)

  def _expected_examples(self, clients, ran) -> float:
    """Examples a round processes in expectation: Σ q_k·n_k × steps run — public quantities only
    (the realised Poisson counts are private and never leave the round)."""
    return float(np.sum(self.plan.rates[clients] * self.plan.sizes[clients] * ran))

  def _release_raw_loss(self) -> bool:
    """The raw training loss is not covered by ε: released in DP runs only on explicit request."""
    return not self.plan.private or bool(self.config.log.raw_train_loss)

  def _log(self, mf, round_, state, m, clients, t_start):
    ev = self.evaluate(state.params)
    eps = self.plan.epsilons()
    wall = time.time() - t_start
    row = {
        'round': round_,
        **ev,
        'epsilon': float(np.max(eps)),
        'epsilon_per_client': [float(e) for e in eps],
        'delta': self.plan.delta,
        'privacy_unit': self.plan.unit,
        'accountant': self.plan.accountant,
        'clip_norm': [float(c) for c in np.asarray(state.controller.clip)],
        'noise_multiplier': self.plan.current_noise(),
        **self._speed.report(),
        'wall_seconds': wall,
    }
    if m is not None and self._release_raw_loss():
      row['train_loss'] = float(m['train_loss'])
    if m is not None:
      # Clients whose update was non-finite since the last evaluation: excluded from the
      # aggregate, still charged for the steps they ran.
      row['nonfinite_clients'] = sorted(self._nonfinite)
      self._nonfinite = set()
      if self.controller.mode == 'quantile':
        row['unclipped_fraction_noisy'] = [float(v) for v in np.asarray(m['aux'])[:, 0]]
      row['update_norm'] = float(m['update_norm'])
      row['noise_adapt'] = float(m['noise_adapt'])
    spent = self.plan.spent_epsilons()
    if spent is not None:
      row['epsilon_spent_rdp'] = [float(e) for e in spent]
    mf.write(jsonio.dumps(row) + '\n')
    mf.flush()
    if self._tb is not None:
      self._tb.write(row)
    return row

  def _summary(self, last, rounds, stopped, wall):
    eps = self.plan.epsilons(final=True)
    surface = {}
    if self.config.eval.surface_metrics:
      surface = self.surface_evaluate(self.final_state.params)
    summary = {
        'dice': last['dice'],
        'dice_per_client': last['dice_per_client'],
        'dice_per_region': last['dice_per_region'],
        'epsilon': float(np.max(eps)),
        'epsilon_per_client': [float(e) for e in eps],
        'delta': self.plan.delta,
        'privacy_unit': self.plan.unit,
        'privacy_mode': self.config.privacy.mode,
        'clip_mode': self.controller.mode,
        'accountant': self.plan.accountant,
        'target_epsilon': self.plan.target_epsilon if self.plan.private else None,
        'noise_multiplier': self.plan.current_noise(),
        'rounds': rounds,
        'backend': self.backend,
        'wall_seconds': wall,
        'stopped_reason': stopped,
        'epsilon_is_valid': self.plan.valid_guarantee,
        # Data-dependent numbers written out WITHOUT noise, hence not covered by ε.
        'unprivatized_outputs': (['train_loss'] if self.plan.private and
                                 self._release_raw_loss() else []),
    }
    if surface:
      summary['surface_metrics'] = surface  # region → {dice, hd95 (mm), nsd}
      summary['hd95'] = float(np.nanmean([v['hd95'] for v in surface.values()]))
      summary['nsd'] = float(np.nanmean([v['nsd'] for v in surface.values()]))
    if self.audit is not None:
      audit = audit_lib.report(self.audit_scores, eps, self.plan.delta,
                               float(self.config.privacy.audit.significance),
                               self.data.client_names)
      jsonio.write(os.path.join(self.workdir, 'audit.json'), audit, indent=2)
      audit_lib.save_scores(os.path.join(self.workdir, 'audit_scores.npz'), self.audit_scores,
                            eps, self.plan.delta, self.data.client_names)
      summary['epsilon_lower_bound'] = audit['epsilon_lower_bound']
      summary['audit_consistent'] = audit['consistent']
    jsonio.write(os.path.join(self.workdir, 'summary.json'), summary, indent=2)
    jsonio.write(os.path.join(self.workdir, 'ledger.json'), self.plan.ledgers_json())
    return summary


def _int_list(value) -> list[int]:
  if isinstance(value, str):
    return [int(v) for v in value.replace(' ', '').split(',') if v]
  return [int(v) for v in value]


def _truncate_metrics(path: str, last_round: int) -> None:
  """Drops evaluations written after the checkpoint being resumed (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  keep = [line for line in rows if json.loads(line)['round'] <= last_round]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _last_row(path: str, round_: int):
  if round_ == 0 or not os.path.exists(path):
    return None
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows[-1] if rows and rows[-1]['round'] == round_ else None


class _Throughput:
  """Seconds per round and expected examples per second since the last report.

  The first round after a (re)start is left out: it includes compilation.
  """

  def __init__(self):
    self._seen = 0
    self._seconds = 0.0
    self._examples = 0.0
    self._rounds = 0

  def add(self, seconds: float, expected_examples: float) -> None:
    self._seen += 1
    if self._seen == 1:
      return
    self._seconds += seconds
    self._examples += expected_examples
    self._rounds += 1

  def report(self) -> dict:
    if not self._rounds:
      return {'seconds_per_round': None, 'examples_per_second': None}
    out = {'seconds_per_round': self._seconds / self._rounds,
           'examples_per_second': self._examples / self._seconds}
    self._seconds, self._examples, self._rounds = 0.0, 0.0, 0
    return out


class _SignalFlag:
  """SIGINT/SIGTERM set a flag; the loop checkpoints after the current round and stops."""

  def __init__(self):
    self.set = False
    self.signum = None
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.set:  # a second signal: stop now
      raise KeyboardInterrupt
    self.set = True
    self.signum = signum

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def format_summary(summary: dict) -> str:
  eps = summary['epsilon']
  eps_s = '∞ (no privacy)' if not np.isfinite(eps) else f'{eps:.3f}'
  lines = [
      '',
      '=' * 64,
      f"  Dice (pooled test): {summary['dice']:.4f}",
      '  Dice per client:    ' + ', '.join(f'{d:.3f}' for d in summary['dice_per_client']),
      f"  ε (max over silos): {eps_s} at δ = {summary['delta']:g}"
      f" [{summary['accountant']}, unit: {summary['privacy_unit']}]",
      f"  rounds: {summary['rounds']}   wall: {summary['wall_seconds']:.1f} s   "
      f"backend: {summary['backend']}",
      f"  stopped: {summary['stopped_reason']}",
  ]
  if not summary.get('epsilon_is_valid', True):
    lines.append('  WARNING: this run used a non-private rule; its ε is NOT a valid guarantee.')
  lines.append('=' * 64)
  return '\n'.join(lines)


def train_and_evaluate(config, workdir: str) -> dict:
  trainer = Trainer(config, workdir)
  summary = trainer.run()
  print(format_summary(summary), flush=True)
  return summary
