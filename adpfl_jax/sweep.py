"""Sweeps: many trials of one experiment family, trained together where their shapes allow.

A trial is a config plus a workdir. Its randomness is all in ``config.seed`` (model init, the base
PRNG key of ``ServerState``, the host sampling plan) and its privacy parameters (the calibrated
noise scale, clip and client learning rate are arrays in the controller state). Trials that only
differ in those compute the same jitted round on different state and round inputs, so
:func:`run_trials` trains such a group with ONE jitted step that ``vmap``s the un-jitted round
function (``Round.fn``) over a leading trial axis::

  step = jit(vmap(round.fn, in_axes=(0, None, None, 0)))   # (states, data_x, data_y, inputs)

(``trial_axis='vmap'``; ``'map'`` maps the trials with a rolled ``lax.map`` inside the same jitted
step instead, and ``'auto'`` picks ``map`` on CPU and ``vmap`` elsewhere). With several devices
(GPUs, or host devices forced by ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on CPU),
the trial axis is also split over them with ``shard_map``. Measured by
``benchmarks/sweep_vectorized.py`` for 8 small trials: on an H200, vmap 2.0x faster than the
trials one after another; on CPU, vmap is slower (per-trial weights make every convolution a
grouped convolution, 0.55x), ``map`` on one device about even (0.9-0.95x: one small trial keeps
about one core busy), and splitting the trials over one host device per core is what pays
(1.6x on 2 cores, 4.3x with 8 host devices on a 16-core machine).

The data are shared (``in_axes=None``); every trial keeps its own host privacy plan (ledgers,
budget stop), metrics and outputs, written exactly as :meth:`Trainer.run` writes them
(``config.json``, ``metrics.jsonl``, ``summary.json``, ``ledger.json``).

Grouping key (:func:`group_key`): the config with :data:`VARYING_KEYS` (seed, target ε, fixed
noise multiplier / calibration switch, δ and accountant, initial clip norm, client learning rate)
and :data:`HOST_KEYS` (logging, evaluation schedule, checkpoints, budget stop) removed, plus the
identity of the ``FederatedData`` object, the padded batch size ``plan.max_batch`` (a shape), the
resolved backend and the shapes of the initial state. Everything that stays in the key is either a
shape or a constant closed over by the jitted round (model, loss, optimisers, schedules, clip mode
and its estimator constants, sparsity, faults, rounds, local steps, batch size), so the group's
leader's round function is the round function of every member.

A group is trained by the project's one host loop, ``driver.run``, with a ``GroupExecutor``: each
trial keeps its own ``RunSession`` (budget stop, ledger, audit, evaluation, checkpoints, outputs),
exactly as a run alone does. A trial that stops (budget, non-finite model) is frozen — the jitted
step keeps its state unchanged (a per-trial mask) and its ledger records nothing more — while the
others continue. Results agree with running each trial alone via ``Trainer.run`` to float
tolerance (``tests/sweep_test.py``). In a group, ``seconds_per_round`` / ``examples_per_second``
are those of the whole group step (its trials train concurrently). Trials that do not share a
group with anyone, or whose backend is ``loop``, run one after another through ``Trainer.run``.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adpfl_jax.configs import identity
from adpfl_jax import distributed
from adpfl_jax import driver
from adpfl_jax import train
from adpfl_jax.data import federated as fed_data
from adpfl_jax.federated import backends
from adpfl_jax.privacy import accounting

# Config keys whose values only reach the jitted round through state arrays or host bookkeeping.
VARYING_KEYS = ('seed', 'privacy.target_epsilon', 'privacy.noise_multiplier', 'privacy.calibrate',
                'privacy.delta', 'privacy.accountant', 'privacy.clip_norm', 'fed.client_lr')
# Keys read by the host loop only (per trial in a group).
HOST_KEYS = ('log.progress', 'eval.every_rounds', 'eval.surface_metrics', 'eval.tensorboard',
             'checkpoint.every_rounds', 'checkpoint.keep', 'checkpoint.force',
             'privacy.stop_at_budget', 'privacy.unit')
# How a group's step maps its trials (see ``resolve_trial_axis``).
TRIAL_AXES = ('auto', 'vmap', 'map')


@jax.jit
def _stack(trees):
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)


def stack_trees(trees: Sequence):
  """Stacks identically structured pytrees along a new leading (trial) axis (one jitted call)."""
  return _stack(list(trees))


def take_tree(tree, i: int):
  """Trial ``i`` of a stacked pytree (fetch it once with ``jax.device_get`` to slice many)."""
  return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[i]), tree)


def group_key(trainer: train.Trainer) -> tuple:
  """What trials must share to be trained by one vmapped step (see the module docstring)."""
  flat = identity.flatten_config(identity.config_dict(trainer.config))
  static = {k: v for k, v in flat.items() if k not in VARYING_KEYS and k not in HOST_KEYS}
  shapes = jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), str(np.asarray(a).dtype)),
                                  trainer.initial_state)
  return (json.dumps(static, sort_keys=True), id(trainer.data), int(trainer.plan.max_batch),
          trainer.backend, str(jax.tree_util.tree_structure(trainer.initial_state)),
          str(jax.tree_util.tree_leaves(shapes)))


def vectorizable(trainer: train.Trainer) -> bool:
  """Whether the trainer's backend builds one jitted round function (``Round.fn``)."""
  return trainer.backend in backends.ONE_JIT and trainer.round.fn is not None


def resolve_trial_axis(trial_axis: str, platform: str | None = None) -> str:
  """``auto`` → ``map`` on CPU, ``vmap`` elsewhere (``benchmarks/sweep_vectorized.py``).

  On XLA:CPU, vmapping the round over trials gives every convolution per-trial weights, i.e.
  grouped convolutions, which run slower than the trials one after another; a rolled ``lax.map``
  over trials inside the same jitted step runs each trial's round at single-trial speed.
  """
  if trial_axis not in TRIAL_AXES:
    raise ValueError(f'trial_axis={trial_axis!r} is not one of {TRIAL_AXES}')
  if trial_axis != 'auto':
    return trial_axis
  return 'map' if (platform or jax.default_backend()) == 'cpu' else 'vmap'


def trial_mesh(lead: train.Trainer, num_trials: int) -> Mesh | None:
  """A 1-D ``trials`` mesh over the visible devices, or None (one device, one trial per
  device not possible, or the ``sharded`` client backend, which already uses the devices).

  With several processes the mesh spans every device of the cluster (a step must run on all of
  them); the group pads its trial axis with frozen trials to fill it.
  """
  devices = jax.devices()
  if len(devices) < 2 or num_trials < 2 or lead.backend == 'sharded':
    return None
  if distributed.is_multiprocess():
    return Mesh(np.array(devices), ('trials',))
  return Mesh(np.array(devices[:num_trials]), ('trials',))


def make_group_step(lead: train.Trainer, trial_axis: str = 'auto',
                    mesh: Mesh | None = None) -> Callable:
  """The jitted step of a group: ``(states, live, data_x, data_y, inputs) -> (states, outputs)``.

  ``states`` and ``inputs`` carry a leading trial axis; ``live`` (T,) bool freezes trials whose
  entry is False (their state is returned unchanged). ``trial_axis`` ('vmap', 'map' or 'auto') is
  how the trials are mapped inside the step; with a ``mesh`` (axis ``trials``) the trial axis is
  split over its devices with ``shard_map`` (T must then be a multiple of the device count).
  """
  axis = resolve_trial_axis(trial_axis)
  fn = lead.round.fn

  def local(states, live, data_x, data_y, inputs):
    if axis == 'vmap':
      new, outs = jax.vmap(fn, in_axes=(0, None, None, 0))(states, data_x, data_y, inputs)
    else:
      def one(a):
        state, inp, on = a
        run = lambda: fn(state, data_x, data_y, inp)
        # A frozen trial skips its round entirely (a real branch inside the rolled loop).
        idle = lambda: (state, jax.tree_util.tree_map(
            lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(run)[1]))
        return jax.lax.cond(on, run, idle)
      new, outs = jax.lax.map(one, (states, inputs, live))
    keep = lambda a, b: jnp.where(live.reshape(live.shape + (1,) * (a.ndim - 1)), a, b)
    return jax.tree_util.tree_map(keep, new, states), outs

  if mesh is None:
    return jax.jit(local)
  t = P('trials')
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(t, t, P(), P(), t), out_specs=t,
                               check_vma=False))


class GroupExecutor:
  """Steps the trials of one group together (``driver.run``'s executor for a sweep group)."""

  def __init__(self, trainers: Sequence[train.Trainer], *, trial_axis: str = 'auto',
               shard_trials: bool = True):
    keys = {group_key(t) for t in trainers}
    if len(keys) != 1 or not all(vectorizable(t) for t in trainers):
      raise ValueError('GroupExecutor: the trials do not share one group key; use '
                       'group_trainers')
    lead = trainers[0]
    self.n = len(trainers)
    self.mesh = trial_mesh(lead, self.n) if shard_trials else None
    # The trial axis is padded to a multiple of the mesh size with frozen copies of trial 0.
    self.pad = (-self.n) % self.mesh.devices.size if self.mesh is not None else 0
    self._step = make_group_step(lead, trial_axis, self.mesh)
    self._put = lambda tree: tree
    self._shared = None  # where the data go (None: default device)
    if self.mesh is not None:
      # With a mesh, place every argument as the step expects it (else it compiles twice).
      self._put = lambda tree: distributed.put(tree, NamedSharding(self.mesh, P('trials')))
      self._shared = NamedSharding(self.mesh, P())
    elif distributed.is_multiprocess():
      # Clients sharded over the global mesh: every argument replicated on it.
      self._shared = distributed.replicated(lead.mesh or backends.make_mesh())
      self._put = lambda tree: distributed.put(tree, self._shared)

  def place(self, data_x, data_y):
    if self._shared is not None:
      return distributed.put((data_x, data_y), self._shared)
    return jnp.asarray(data_x), jnp.asarray(data_y)

  def stack(self, states):
    return self._put(stack_trees(list(states) + [states[0]] * self.pad))

  def step(self, states, live, data_x, data_y, inputs):
    live = np.concatenate([np.asarray(live, bool), np.zeros(self.pad, bool)])
    stacked = self._put(stack_trees(list(inputs) + [inputs[0]] * self.pad))
    return self._step(states, self._put(jnp.asarray(live)), data_x, data_y, stacked)

  def outputs(self, outs):
    outs = distributed.to_host(outs)
    return [jax.tree_util.tree_map(lambda a, i=i: np.asarray(a)[i], outs)
            for i in range(self.n)]

  def fetch(self, states):
    host = distributed.to_host(states)
    return [take_tree(host, i) for i in range(self.n)]


def build_trainers(configs: Sequence, workdirs: Sequence[str],
                   data: fed_data.FederatedData | None = None) -> list[train.Trainer]:
  """One ``Trainer`` per config; all share ``data`` (or one load per distinct data config+seed)."""
  if len(configs) != len(workdirs):
    raise ValueError(f'run_trials: {len(configs)} configs but {len(workdirs)} workdirs')
  if len(set(os.path.abspath(w) for w in workdirs)) != len(workdirs):
    raise ValueError(f'run_trials: workdirs must be distinct, got {list(workdirs)}')
  cache = {}
  trainers = []
  for cfg, workdir in zip(configs, workdirs):
    d = data
    if d is None:
      key = (cfg.data.to_json_best_effort(sort_keys=True), int(cfg.seed))
      if key not in cache:
        cache[key] = fed_data.load(cfg.data, int(cfg.seed))
      d = cache[key]
    trainers.append(train.Trainer(cfg, workdir, data=d))
  return trainers


def group_trainers(trainers: Sequence[train.Trainer]) -> list[list[int]]:
  """Indices of the trainers, grouped by :func:`group_key` (first-seen order)."""
  groups: dict = {}
  for i, t in enumerate(trainers):
    key = group_key(t) if vectorizable(t) else ('single', i)
    groups.setdefault(key, []).append(i)
  return list(groups.values())


def share_compiled(trainers: Sequence[train.Trainer]) -> None:
  """Lets the members of one group reuse the leader's jitted functions (compile once).

  Valid because a group's members close over the same constants (see :func:`group_key`).
  """
  for t in trainers[1:]:
    t.share_compiled(trainers[0])


def run_trials(configs: Sequence, workdirs: Sequence[str],
               data: fed_data.FederatedData | None = None, vectorize: bool = True, *,
               trial_axis: str = 'auto', shard_trials: bool = True) -> list[dict]:
  """Trains every (config, workdir) trial; returns their summaries in the order given.

  Args:
    configs: trial configs (``get_config`` results).
    workdirs: one distinct output directory per trial.
    data: a federation shared by all trials (recommended for sweeps: trials of different seeds
      can then share a group). None: each trial loads its data as ``Trainer`` would, trials with
      the same data config and seed sharing one load.
    vectorize: train each group of > 1 compatible trials with one jitted step; False runs
      every trial one after another through ``Trainer.run`` (a group still compiles once).
    trial_axis: how the step maps a group's trials: 'vmap', 'map' (``lax.map``) or 'auto'
      (``resolve_trial_axis``).
    shard_trials: with several devices, split each group's trials over them (``trial_mesh``).

  Returns:
    The ``summary.json`` dict of every trial.
  """
  trainers = build_trainers(configs, workdirs, data)
  summaries: list = [None] * len(trainers)
  for idx in group_trainers(trainers):
    members = [trainers[i] for i in idx]
    if len(members) > 1:
      share_compiled(members)
    if vectorize and len(members) > 1:
      for i, s in zip(idx, run_group(members, trial_axis=trial_axis,
                                     shard_trials=shard_trials)):
        summaries[i] = s
    else:
      for i, t in zip(idx, members):
        summaries[i] = t.run()
  return summaries


def run_group(trainers: Sequence[train.Trainer], *, trial_axis: str = 'auto',
              shard_trials: bool = True) -> list[dict]:
  """Trains trials of one group (same :func:`group_key`) with one jitted step per round."""
  executor = GroupExecutor(trainers, trial_axis=trial_axis, shard_trials=shard_trials)
  return driver.run(trainers, executor, progress=False)


def composed_epsilons(workdirs: Sequence[str], delta: float) -> list[float]:
  """ε per silo that covers releasing EVERY trial of a sweep (their ledgers composed).

  Each trial's ε covers that trial's releases alone. Trials of one sweep train on the same silos,
  so publishing several of them (a frontier) is a composition of all their mechanisms; with keys
  and batches drawn from each trial's own identity (``configs.identity.run_identity``) the trials are
  independent mechanisms and their ledgers compose. Composed with RDP (a sum of vectors: cheap for
  many distinct σ, and an upper bound); PLD when a ledger holds steps RDP cannot account.
  """
  per_silo: list = []
  for workdir in workdirs:
    with open(os.path.join(workdir, 'ledger.json')) as f:
      ledgers = [accounting.Ledger.from_dict(d) for d in json.load(f)]
    for k, ledger in enumerate(ledgers):
      if k == len(per_silo):
        per_silo.append([])
      per_silo[k].extend(ledger.runs)
  out = []
  for runs in per_silo:
    laplace = any(s.mechanism == 'laplace' and s.sampling_rate < 1 for s, _ in runs)
    total = accounting.Ledger('pld' if laplace else 'rdp')
    total.extend(runs)
    out.append(float(total.epsilon(delta)))
  return out


def grid_configs(make_config: Callable[[str, int], object], methods: Sequence[str],
                 epsilons: Sequence[float], seeds: Sequence[int]) -> list[dict]:
  """A privacy-utility grid: every (method, target ε, seed), one cell per non-private seed.

  Args:
    make_config: ``(method, seed) -> config`` (a fresh config per call).
    methods: method names passed to ``make_config``.
    epsilons: target ε values; each private cell sets ``config.privacy.target_epsilon``.
    seeds: seeds.

  Returns:
    Dicts ``{'method', 'epsilon', 'seed', 'config'}``; methods whose config has
    ``privacy.mode == 'none'`` appear once per seed with ``epsilon = inf``.
  """
  cells = []
  for method in methods:
    for seed in seeds:
      probe = make_config(method, seed)
      if probe.privacy.mode == 'none':
        cells.append({'method': method, 'epsilon': float('inf'), 'seed': int(seed),
                      'config': probe})
        continue
      for eps in epsilons:
        if not float(eps) > 0:
          raise ValueError(f'grid_configs: target ε must be > 0, got {eps!r}')
        cfg = make_config(method, seed)
        cfg.privacy.target_epsilon = float(eps)
        cells.append({'method': method, 'epsilon': float(eps), 'seed': int(seed),
                      'config': cfg})
  return cells
