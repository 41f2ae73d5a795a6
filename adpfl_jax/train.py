"""``Trainer(config, workdir).run()``: one federated run, from config to ``summary.json``.

``Trainer`` assembles a run from its config, in this order (all before anything compiles):
validate → data → privacy plan (calibration, ledgers, budget; ``privacy/plan.py``) → model → the
privacy controller (``privacy/controller.py``) → the round (``federated/server.py``: a
``FederatedRound`` value) → evaluators. ``open`` starts (or resumes) the run's ``RunSession``:
its outputs in the workdir and its host-side bookkeeping. The rounds themselves are driven by
``driver.run``, the one host loop of the project, for one run or for a group of sweep trials.
``docs/architecture.md`` follows one round from config to ledger.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from adpfl_jax import checkpointing
from adpfl_jax.configs import identity
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
from adpfl_jax.metrics import lesionwise
from adpfl_jax.metrics import plots
from adpfl_jax.metrics import regions as metrics_regions
from adpfl_jax.metrics import writers
from adpfl_jax.privacy import audit as audit_lib
from adpfl_jax.privacy import controller as controller_lib
from adpfl_jax.privacy import plan as plan_lib

# Files a run writes into its workdir; a fresh start removes every one of them first, so outputs of
# two different runs never mix.
OUTPUTS = ('config.json', 'partition.json', 'metrics.jsonl', 'summary.json', 'ledger.json',
           'audit.json', 'audit_scores.npz', 'plots', 'tensorboard', 'checkpoints')


def regions_for(task: str, num_classes: int):
  """Evaluation regions (name → labels) of a task, from ``metrics.regions.REGIONS``."""
  if task in metrics_regions.REGIONS:
    return dict(metrics_regions.REGIONS[task])
  if num_classes == 1:
    return {'lesion': (1,)}
  return {f'class_{c}': (c,) for c in range(1, num_classes)}


class Trainer:
  """The pieces of one run, built from its config; ``run`` trains it (``driver.run``)."""

  def __init__(self, config, workdir: str, data: fed_data.FederatedData | None = None):
    validation.validate(config)
    self.config = config
    self.workdir = workdir
    self.data = data if data is not None else fed_data.load(config.data, config.seed)
    validation.validate_data(config, self.data)
    self.regions = regions_for(self.data.task, self.data.num_classes)
    self.participation = sampling.participation(
        int(config.seed), int(config.fed.rounds), self.data.num_clients,
        int(config.fed.clients_per_round))
    self.plan = plan_lib.PrivacyPlan.from_config(config, self.data.sizes, self.participation)
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
    self.set_identity(identity.run_identity(config))
    self.controller = controller_lib.make(config.privacy, config.fed, self.data.sizes,
                                          self.plan.rates, self.plan.noise_scale,
                                          self.param_count)
    self.backend = backends.resolve(config.fed.backend)
    self.mesh = None
    if self.backend == 'sharded':
      self.mesh = backends.make_mesh(int(config.fed.num_devices) or None)
    self.client_cfg = client_lib.ClientConfig(
        loss_fn=loss_fn, private=self.plan.private, mechanism=config.privacy.mechanism,
        momentum=float(config.fed.client_momentum),
        sparsify=self.controller.sparsity != 'none', aux=self.controller.aux,
        loss_cap=float(config.privacy.adaptive_noise.loss_cap), audit=self.audit is not None,
        canary_scale=float(config.privacy.clip_norm),
        example_chunk=int(config.fed.example_chunk))
    self.round = server.build_round(self.client_cfg, server.server_optimizer(config.fed),
                                    self.controller, self.backend,
                                    chunk_size=int(config.fed.chunk_size), mesh=self.mesh)
    self.initial_state = self.round.init(params, config.seed, self.identity)
    self.evaluator = dice_lib.make_evaluator(apply_fn, list(self.regions.values()),
                                             int(config.eval.batch_size))
    self.predict = jax.jit(lambda p, x: losses.predict_labels(
        jax.vmap(lambda xi: apply_fn(p, xi))(x)))
    self.final_state = None

  def set_identity(self, identity: int) -> None:
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

  def share_compiled(self, lead: 'Trainer') -> None:
    """Reuses ``lead``'s compiled round and evaluators (same group key: same constants)."""
    self.round, self.evaluator, self.predict = lead.round, lead.evaluator, lead.predict

  # --------------------------------------------------------------------------------------------
  def round_inputs(self, round_: int):
    """Host plan of one round — clients, Poisson batches, faults, canaries — pure in the round.

    Returns (RoundInputs, participating client ids, local steps each of them runs).
    """
    cfg = self.config
    clients = np.flatnonzero(self.participation[round_]).astype(np.int32)
    steps = int(cfg.fed.local_steps)
    idx, mask, _ = sampling.round_plan(self.entropy, round_, clients, self.data.sizes,
                                       self.plan.rates, steps, self.plan.max_batch)
    fc = cfg.faults
    faults = sampling.fault_plan(
        cfg.seed, round_, clients, steps, dropout=float(fc.dropout),
        straggler_fraction=float(fc.straggler_fraction),
        straggler_min_steps=int(fc.straggler_min_steps),
        nan_clients=sampling.client_ids(fc.nan_clients))
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

  def expected_examples(self, clients, ran) -> float:
    """Examples a round processes in expectation: Σ q_k·n_k × steps run — public quantities only
    (the realised Poisson counts are private and never leave the round)."""
    return float(np.sum(self.plan.rates[clients] * self.plan.sizes[clients] * ran))

  def releases_raw_loss(self) -> bool:
    """The raw training loss is not covered by ε: released in DP runs only on explicit request."""
    return not self.plan.private or bool(self.config.log.raw_train_loss)

  # --------------------------------------------------------------------------------------------
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

  def surface_evaluate(self, params, max_cases: int | None = None) -> dict:
    """Challenge-style metrics on the pooled test split: per region Dice, HD95, NSD (host).

    Uses ``metrics/regions.py`` (DeepMind surface elements, the task's official NSD tolerances and
    empty-mask conventions) in physical units from the examples' voxel spacing. BraTS tasks also
    get the challenge's lesion-wise Dice and HD95 per region (``metrics/lesionwise.py``).
    """
    task = self.data.task if self.data.task in metrics_regions.REGIONS else None
    if task is None:
      return {}
    cases = []
    spacing = self.data.spacing or (1.0,) * (len(self.data.example_shape) - 1)
    for k in range(self.data.num_clients):
      x, y = self.data.test_x[k], self.data.test_y[k]
      for s in range(0, len(x), 16):
        pred = np.asarray(self.predict(params, jnp.asarray(x[s:s + 16])))
        for p_i, t_i in zip(pred, y[s:s + 16]):
          t_i = np.asarray(t_i)
          case = metrics_regions.evaluate_case(p_i, t_i, spacing, task,
                                               metrics=('dice', 'hd95', 'nsd'))
          if task in lesionwise.PRESETS:
            for region, scores in lesionwise.lesionwise_case(p_i, t_i, spacing, task).items():
              case[region].update(lesionwise_dice=scores['lesionwise_dice'],
                                  lesionwise_hd95=scores['lesionwise_hd95'])
          cases.append(case)
      if max_cases and len(cases) >= max_cases:
        break
    return metrics_regions.aggregate(cases)

  # --------------------------------------------------------------------------------------------
  def open(self, *, checkpoints: bool = True) -> 'RunSession':
    """Starts or resumes this run's session (outputs, checkpoint, bookkeeping)."""
    return RunSession(self, checkpoints=checkpoints)

  def run(self) -> dict:
    """Trains the run to its end (or budget stop, or signal); returns ``summary.json``."""
    from adpfl_jax import driver  # pylint: disable=g-import-not-at-top
    return driver.run([self])[0]


class RunSession:
  """One run's host side while the driver trains it: outputs, checkpoints, ledger, stopping.

  Opening a session checks the workdir: a run of the *same* config resumes from its newest
  readable checkpoint (exactly: sampling, noise keys and ledgers continue); a workdir holding a
  *different* config is refused, naming the differing keys, unless ``checkpoint.force``; a fresh
  start removes every earlier output first (``OUTPUTS``). The driver then calls, per round:
  ``plan_round`` → ``budget_stop`` → (device) → ``record`` → ``wants_host`` → ``after_round``;
  at the end ``finish``.
  """

  def __init__(self, trainer: Trainer, *, checkpoints: bool = True):
    self.trainer = t = trainer
    cfg = t.config
    os.makedirs(t.workdir, exist_ok=True)
    self.every = int(cfg.checkpoint.every_rounds) if checkpoints else 0
    self.rounds = int(cfg.fed.rounds)
    self.metrics_path = os.path.join(t.workdir, 'metrics.jsonl')
    self.ckpt = None
    self.nonfinite: set = set()
    self.speed = _Throughput()
    self.stopped = 'completed'
    self.live = True
    self.finite = True
    self.last_eval = None
    self.last_out = None
    state, wall = self._start()
    self.state = state
    self.round = int(state.round)
    self.t_start = time.time() - wall
    self.noise = np.asarray(t.round.noise(state.controller), np.float64)
    self.tb = writers.TensorBoardWriter(t.workdir, purge_step=self.round + 1,
                                        names=t.data.client_names) \
        if cfg.eval.tensorboard else None
    self.last_eval = _last_row(self.metrics_path, self.round)
    if self.round == 0:
      t.plan.print_header(t.data.client_names, self.rounds)
    self.live = self.round < self.rounds

  # -- start / resume ----------------------------------------------------------------------------
  def _start(self):
    t = self.trainer
    cfg = t.config
    t.set_identity(identity.run_identity(cfg))
    self.audit_scores = audit_lib.AuditScores(t.audit) if t.audit is not None else None
    cfg_path = os.path.join(t.workdir, 'config.json')
    try:
      diff = identity.check_workdir(cfg, t.workdir)
    except ValueError as err:
      raise validation.ConfigError(str(err)) from None
    if self.every or os.path.isdir(os.path.join(t.workdir, 'checkpoints')):
      self.ckpt = checkpointing.Checkpointer(t.workdir, int(cfg.checkpoint.keep))
      got = self.ckpt.restore_latest(t.initial_state) if self.ckpt.steps() else None
      if got is not None:
        step, state, host = got
        if host.get('config_hash') != identity.config_hash(cfg) and not cfg.checkpoint.force:
          raise validation.ConfigError(
              f'config.checkpoint: the checkpoint of round {step} in {t.workdir} was written by a '
              'different config than the workdir\'s config.json; use another --workdir or '
              '--config.checkpoint.force=True')
        return self._resume(step, state, host, same_config=not diff), float(host['wall'])
    self._fresh_start(cfg_path)
    if not self.every and self.ckpt is not None:
      self.ckpt.close()
      self.ckpt = None
    return t.initial_state, 0.0

  def _resume(self, step, state, host, *, same_config):
    t = self.trainer
    old = np.asarray(state.controller.noise_scale, np.float64)
    try:
      scales = t.plan.load_host_state(host['plan'], step, old, same_config=same_config)
    except ValueError as err:
      raise validation.ConfigError(str(err)) from err
    if not np.array_equal(np.float32(scales), np.float32(old)):
      # A forced resume under another plan: the remaining rounds run at the recalibrated noise,
      # so the run still lands on (never above) the target.
      state = state.replace(controller=state.controller.with_noise_scale(scales))
      tqdm.tqdm.write('Forced resume: noise scale per silo recalibrated for the remaining rounds '
                      'from ' + ', '.join(f'{a:.4g}' for a in old) + ' to '
                      + ', '.join(f'{b:.4g}' for b in scales))
    if int(host.get('identity', t.identity)) != t.identity:
      # A forced resume keeps the randomness the run started with (its noise key is in the
      # checkpoint; batches and canaries follow the same identity).
      t.set_identity(int(host['identity']))
      self.audit_scores = audit_lib.AuditScores(t.audit) if t.audit is not None else None
    if self.audit_scores is not None and 'audit' in host:
      self.audit_scores.load(host['audit'])
    _truncate_metrics(self.metrics_path, step)
    tqdm.tqdm.write(f'Resumed from round {step} ({self.ckpt.directory}).')
    return state

  def _fresh_start(self, cfg_path):
    t = self.trainer
    if self.ckpt is not None:
      self.ckpt.close()
      self.ckpt = None
    for name in OUTPUTS:
      path = os.path.join(t.workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    with open(cfg_path, 'w') as f:
      f.write(t.config.to_json_best_effort(indent=2, sort_keys=True))
    if t.data.partition_summary:
      jsonio.write(os.path.join(t.workdir, 'partition.json'), t.data.partition_summary, indent=2)
    if self.every:
      self.ckpt = checkpointing.Checkpointer(t.workdir, int(t.config.checkpoint.keep))

  # -- one round ---------------------------------------------------------------------------------
  def plan_round(self, round_: int):
    """(RoundInputs, clients, steps run) of round ``round_`` (host, a pure function of it)."""
    return self.trainer.round_inputs(round_)

  def budget_stop(self, plan) -> bool:
    """Stops the session if its next round would exceed a silo's budget; True if stopped."""
    t = self.trainer
    _, clients, ran = plan
    blocked = t.plan.would_exceed(self.round, clients, self.noise[clients], ran)
    if blocked is None:
      return False
    self.stopped = (f'budget: round {self.round} would take silo {blocked} past the target '
                    f'ε={t.plan.target_epsilon} at δ={t.plan.delta}')
    tqdm.tqdm.write(f'{t.workdir}: stopping before round {self.round}: {self.stopped}')
    self.live = False
    return True

  def record(self, plan, out: dict, seconds: float) -> None:
    """Books a round the device ran: ledger, audit scores, faults, timing, next noise."""
    t = self.trainer
    _, clients, ran = plan
    m = len(clients)
    t.plan.record_round(self.round, clients, np.asarray(out['noise_multiplier'])[:m], ran)
    ok = np.asarray(out['client_update_finite'])[:m]
    self.nonfinite.update(int(c) for c, good, s in zip(clients, ok, ran) if s > 0 and not good)
    if self.audit_scores is not None:
      self.audit_scores.add(clients, np.where(ok, ran, 0),
                            np.asarray(out['canary_scores'])[:m])
    self.speed.add(seconds, t.expected_examples(clients, ran))
    self.noise = np.asarray(out['next_noise'], np.float64)
    self.last_out = out
    self.round += 1
    self.finite = bool(out['params_finite'])
    if not self.finite:
      self.stopped = f'non-finite global model at round {self.round - 1}'
      tqdm.tqdm.write(f'{t.workdir}: {self.stopped}')
      self.live = False
    elif self.round >= self.rounds:
      self.live = False

  def wants_host(self, interrupted: bool) -> bool:
    """Whether ``after_round`` needs this session's state on the host (evaluation, checkpoint)."""
    return self._eval_due() or self._checkpoint_due(interrupted)

  def _eval_due(self) -> bool:
    return self.round % int(self.trainer.config.eval.every_rounds) == 0 or not self.live

  def _checkpoint_due(self, interrupted: bool) -> bool:
    """Every ``checkpoint.every_rounds`` rounds, at the end and on a signal — never a
    non-finite model (a rerun resumes from the last finite one)."""
    if self.ckpt is None or not self.every or not self.finite:
      return False
    return self.round % self.every == 0 or not self.live or interrupted

  def after_round(self, state, interrupted: bool) -> None:
    """Evaluation and checkpoint after a round (``state`` on the host when ``wants_host``)."""
    if self._eval_due():
      self.log(state)
    if self._checkpoint_due(interrupted):
      self.ckpt.save(self.round, state, self.host_state())
    if interrupted and self.live:
      self.stopped = f'interrupted by a signal after round {self.round}'
      self.live = False

  def host_state(self) -> dict:
    t = self.trainer
    host = {'plan': t.plan.host_state(), 'wall': time.time() - self.t_start,
            'config_hash': identity.config_hash(t.config), 'identity': str(t.identity)}
    if self.audit_scores is not None:
      host['audit'] = self.audit_scores.state()
    return host

  def log(self, state) -> dict:
    """Evaluates and writes one row to ``metrics.jsonl`` (and TensorBoard)."""
    t = self.trainer
    ev = t.evaluate(state.params)
    eps = t.plan.epsilons()
    m = self.last_out
    row = {
        'round': self.round,
        **ev,
        'epsilon': float(np.max(eps)),
        'epsilon_per_client': [float(e) for e in eps],
        'delta': t.plan.delta,
        'privacy_unit': t.plan.unit,
        'accountant': t.plan.accountant,
        'clip_norm': [float(c) for c in np.asarray(state.controller.clip)],
        'noise_multiplier': t.plan.current_noise(),
        **self.speed.report(),
        'wall_seconds': time.time() - self.t_start,
    }
    if m is not None and t.releases_raw_loss():
      row['train_loss'] = float(m['train_loss'])
    if m is not None:
      # Clients whose update was non-finite since the last evaluation: excluded from the
      # aggregate, still charged for the steps they ran.
      row['nonfinite_clients'] = sorted(self.nonfinite)
      self.nonfinite = set()
      if t.controller.mode == 'quantile':
        row['unclipped_fraction_noisy'] = [float(v) for v in np.asarray(m['aux'])[:, 0]]
      row['update_norm'] = float(m['update_norm'])
      row['noise_adapt'] = float(m['noise_adapt'])
    spent = t.plan.spent_epsilons()
    if spent is not None:
      row['epsilon_spent_rdp'] = [float(e) for e in spent]
    with open(self.metrics_path, 'a') as f:
      f.write(jsonio.dumps(row) + '\n')
    if self.tb is not None:
      self.tb.write(row)
    self.last_eval = row
    return row

  def progress(self) -> dict:
    """Short numbers for a progress bar."""
    if self.last_eval is None:
      return {}
    return {'dice': f"{self.last_eval['dice']:.3f}", 'eps': f"{self.last_eval['epsilon']:.2f}"}

  # -- the end -----------------------------------------------------------------------------------
  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None
    if self.ckpt is not None:
      self.ckpt.close()
      self.ckpt = None

  def finish(self, state) -> dict:
    """Writes ``summary.json``, ``ledger.json`` (and the audit); returns the summary."""
    t = self.trainer
    if self.last_eval is None or self.last_eval['round'] != int(state.round):
      self.log(state)
    self.close()
    t.final_state = state
    last = self.last_eval
    eps = t.plan.epsilons(final=True)
    surface = t.surface_evaluate(state.params) if t.config.eval.surface_metrics else {}
    summary = {
        'dice': last['dice'],
        'dice_per_client': last['dice_per_client'],
        'dice_per_region': last['dice_per_region'],
        'epsilon': float(np.max(eps)),
        'epsilon_per_client': [float(e) for e in eps],
        'delta': t.plan.delta,
        'privacy_unit': t.plan.unit,
        'privacy_mode': t.config.privacy.mode,
        'clip_mode': t.controller.mode,
        'accountant': t.plan.accountant,
        'target_epsilon': t.plan.target_epsilon if t.plan.private else None,
        'noise_multiplier': t.plan.current_noise(),
        'rounds': int(state.round),
        'backend': t.backend,
        'wall_seconds': time.time() - self.t_start,
        'stopped_reason': self.stopped,
        'epsilon_is_valid': t.plan.valid_guarantee,
        # Data-dependent numbers written out WITHOUT noise, hence not covered by ε.
        'unprivatized_outputs': ['train_loss'] if t.plan.private and t.releases_raw_loss() else [],
    }
    if surface:
      summary['surface_metrics'] = surface  # region → {dice, hd95 (mm), nsd}
      summary['hd95'] = float(np.nanmean([v['hd95'] for v in surface.values()]))
      summary['nsd'] = float(np.nanmean([v['nsd'] for v in surface.values()]))
    if self.audit_scores is not None:
      audit = audit_lib.report(self.audit_scores, eps, t.plan.delta,
                               float(t.config.privacy.audit.significance), t.data.client_names)
      jsonio.write(os.path.join(t.workdir, 'audit.json'), audit, indent=2)
      audit_lib.save_scores(os.path.join(t.workdir, 'audit_scores.npz'), self.audit_scores,
                            eps, t.plan.delta, t.data.client_names)
      summary['epsilon_lower_bound'] = audit['epsilon_lower_bound']
      summary['audit_consistent'] = audit['consistent']
    jsonio.write(os.path.join(t.workdir, 'summary.json'), summary, indent=2)
    jsonio.write(os.path.join(t.workdir, 'ledger.json'), t.plan.ledgers_json())
    with open(self.metrics_path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    plots.plot_run(rows, os.path.join(t.workdir, 'plots'), t.data.client_names,
                   t.plan.target_epsilon if t.plan.private else None)
    return summary


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
    if not self._rounds or self._seconds <= 0:
      return {'seconds_per_round': None, 'examples_per_second': None}
    out = {'seconds_per_round': self._seconds / self._rounds,
           'examples_per_second': self._examples / self._seconds}
    self._seconds, self._examples, self._rounds = 0.0, 0.0, 0
    return out


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


def format_summary(summary: dict) -> str:
  eps = jsonio.unbounded(summary['epsilon'])
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
  if 'epsilon_lower_bound' in summary:
    lines.append(f"  audit: ε lower bound {summary['epsilon_lower_bound']:.3f} (95%), "
                 f"{'consistent' if summary['audit_consistent'] else 'ABOVE the accounted ε'}")
  if not summary.get('epsilon_is_valid', True):
    lines.append('  WARNING: this run used a non-private rule; its ε is NOT a valid guarantee.')
  lines.append('=' * 64)
  return '\n'.join(lines)


def train_and_evaluate(config, workdir: str) -> dict:
  trainer = Trainer(config, workdir)
  summary = trainer.run()
  print(format_summary(summary), flush=True)
  return summary
