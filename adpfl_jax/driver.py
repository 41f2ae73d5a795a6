"""The one host loop: drives a run, or a group of sweep trials, round by round.

``run(trainers, executor)`` opens one ``train.RunSession`` per trainer (resuming where a
checkpoint exists) and loops until every session has stopped:

  1. host: each live session plans its next round (clients, Poisson batches, faults, canaries —
     pure functions of seed, identity and round) and its budget stop judges that round's steps
     at the noise the device will use (``RunSession.noise``, which the previous round returned);
  2. device: the executor runs one round of every live session in ONE jitted call (a single run:
     ``FederatedRound.apply``; a sweep group: the round mapped over a leading trial axis, see
     ``sweep.GroupExecutor``); meanwhile the host plans the following round;
  3. host: each session books what the round released (ledger, audit scores, non-finite clients,
     timing, the next noise, whether the model is finite), then evaluates and checkpoints when due
     — only then is its state copied to the host.

SIGINT/SIGTERM set a flag: the round in flight finishes, every session checkpoints and stops, and
a rerun of the same command resumes. Progress is a bar over the lead session's rounds.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np
import tqdm

from adpfl_jax import distributed
from adpfl_jax.federated import backends


class SingleExecutor:
  """Runs one session's rounds with its ``FederatedRound.apply``.

  In a multi-process run (``distributed.py``) data, state and each round's inputs are global
  arrays replicated over the global mesh, so ``apply`` is one SPMD step across the processes
  (the ``sharded`` backend splits the clients over every process's devices).
  """

  def __init__(self, trainer):
    self.trainer = trainer
    self.sharding = None
    if distributed.is_multiprocess() or trainer.mesh is not None:
      # Also with one process and the ``sharded`` backend: arguments placed as the step returns
      # its state (replicated on the mesh), so round 2 does not compile the step again.
      self.sharding = distributed.replicated(trainer.mesh or backends.make_mesh())

  def _put(self, tree):
    return tree if self.sharding is None else distributed.put(tree, self.sharding)

  def place(self, data_x, data_y):
    if self.sharding is not None:
      return self._put((data_x, data_y))
    return jnp.asarray(data_x), jnp.asarray(data_y)

  def stack(self, states):
    (state,) = states
    return state if self.sharding is None else self._put(distributed.to_host(state))

  def step(self, state, live, data_x, data_y, inputs):
    del live  # one session: the driver only calls step while it is live
    state, out = self.trainer.round.apply(state, data_x, data_y, self._put(inputs[0]))
    return state, [out]

  def outputs(self, outs):
    return distributed.to_host(outs)

  def fetch(self, state):
    return [distributed.to_host(state)]


def run(trainers: Sequence, executor=None, *, progress: bool | None = None) -> list[dict]:
  """Trains every trainer's run to its end; returns their ``summary.json`` dicts, in order.

  Args:
    trainers: ``train.Trainer`` objects; more than one only with an ``executor`` that steps them
      together (``sweep.GroupExecutor``), so they must share data and compiled round.
    executor: how rounds run on the device; default ``SingleExecutor`` (one trainer).
    progress: show a progress bar (default: the lead config's ``log.progress``).
  """
  if executor is None:
    if len(trainers) != 1:
      raise ValueError('driver.run: several trainers need a group executor (sweep.run_trials)')
    executor = SingleExecutor(trainers[0])
  lead = trainers[0]
  show = bool(lead.config.log.progress) if progress is None else progress
  sessions = [t.open() for t in trainers]
  interrupted = _SignalFlag()
  bar = tqdm.tqdm(total=sessions[0].rounds, initial=sessions[0].round, desc='rounds',
                  disable=not show, file=sys.stdout, dynamic_ncols=True)
  try:
    data_x, data_y = executor.place(lead.data.train_x, lead.data.train_y)
    states = executor.stack([s.state for s in sessions])
    for s in sessions:
      s.state = None  # the executor holds the states from here on
    plans = [s.plan_round(s.round) if s.live else None for s in sessions]
    inputs = [p[0] if p else None for p in plans]
    while True:
      t0 = time.time()
      for s, p in zip(sessions, plans):
        if s.live:
          s.budget_stop(p)
      live = np.array([s.live for s in sessions])
      if not live.any():
        break
      inputs = [p[0] if p else last for p, last in zip(plans, inputs)]
      states, outs = executor.step(states, live, data_x, data_y, inputs)
      # The next round's host plans, while the device computes this one.
      upcoming = [s.plan_round(s.round + 1) if s.live and s.round + 1 < s.rounds else None
                  for s in sessions]
      outs = executor.outputs(outs)
      seconds = time.time() - t0
      for s, p, out, on in zip(sessions, plans, outs, live):
        if on:
          s.record(p, out, seconds)
      # Every process stops after the same round (a signal may reach only some of them).
      stop = distributed.any_process(interrupted.set)
      hosts = None
      for i, (s, on) in enumerate(zip(sessions, live)):
        if on and s.wants_host(stop):
          hosts = hosts if hosts is not None else executor.fetch(states)
          s.after_round(hosts[i], stop)
        elif on and stop:
          s.after_round(None, stop)
      bar.update(int(live[0]))
      bar.set_postfix(sessions[0].progress())
      if stop:
        tqdm.tqdm.write('interrupted: checkpoint saved, rerun the same command to resume.')
        break
      plans = [u if s.live else None for s, u in zip(sessions, upcoming)]
    hosts = executor.fetch(states)
    return [s.finish(h) for s, h in zip(sessions, hosts)]
  finally:
    bar.close()
    interrupted.restore()
    for s in sessions:
      s.close()


class _SignalFlag:
  """SIGINT/SIGTERM set a flag: the loop checkpoints after the current round and stops."""

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
