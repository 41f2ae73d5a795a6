"""Several processes, one run: joining a ``jax.distributed`` cluster and placing arrays on it.

A multi-process run is multi-controller SPMD: every process runs the same program (the same host
loop, ``driver.run``), with the same config. Everything the host computes — sampling plans,
ledgers, the budget stop — is a pure function of (seed, identity, round), so it is identical on
every process; the device work of a round is one jitted step over the *global* device mesh
(``jax.devices()`` spans every process), its inputs global ``jax.Array``s built from the
(identical) host values each process holds (:func:`put`). Only process 0 writes outputs
(:func:`is_lead`); checkpoints are written by all processes together (orbax, global arrays).

Launch: ``adpfl train … --coordinator_address=host:port --num_processes=N --process_id=i`` on
each process, or ``--distributed`` where JAX detects the cluster itself (SLURM, Open MPI, TPU
pods). On CPU, collectives across processes go through gloo (set here before initialising).
"""

from __future__ import annotations

import argparse
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

FLAGS = ('--coordinator_address', '--num_processes', '--process_id')
SWITCH = '--distributed'

_initialized = False


class DistributedError(ValueError):
  """A distributed flag is wrong; the message names it."""


def parse_flags(values: dict) -> dict | None:
  """Checks ``{'coordinator_address', 'num_processes', 'process_id', 'distributed'}`` (strings or
  None) and returns ``jax.distributed.initialize`` keyword arguments, or None for one process."""
  given = {k: v for k, v in values.items() if k != 'distributed' and v is not None}
  auto = bool(values.get('distributed'))
  if not given:
    return {} if auto else None
  missing = [f'--{k}' for k in ('coordinator_address', 'num_processes', 'process_id')
             if k not in given]
  if missing:
    raise DistributedError(f'{missing[0]} is needed with '
                           + ' '.join(f'--{k}' for k in given) + ' (or give none of them and '
                           '--distributed to let JAX detect the cluster)')
  addr = given['coordinator_address']
  if not re.fullmatch(r'[^\s:]+:\d{1,5}', addr):
    raise DistributedError(f'--coordinator_address={addr!r} is not host:port')
  try:
    n = int(given['num_processes'])
  except ValueError:
    raise DistributedError(f"--num_processes={given['num_processes']!r} is not an integer") \
        from None
  if n < 1:
    raise DistributedError(f'--num_processes={n} must be >= 1')
  try:
    i = int(given['process_id'])
  except ValueError:
    raise DistributedError(f"--process_id={given['process_id']!r} is not an integer") from None
  if not 0 <= i < n:
    raise DistributedError(f'--process_id={i} must be in [0, {n}) (--num_processes={n})')
  return {'coordinator_address': addr, 'num_processes': n, 'process_id': i}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The distributed flags for an ``argparse`` command (``experiments/sweep.py``)."""
  parser.add_argument('--coordinator_address', default=None, metavar='HOST:PORT',
                      help='join a jax.distributed cluster whose process 0 listens here')
  parser.add_argument('--num_processes', default=None, help='processes in the cluster')
  parser.add_argument('--process_id', default=None, help='this process, 0 … num_processes-1')
  parser.add_argument('--distributed', action='store_true',
                      help='join a cluster JAX detects itself (SLURM, Open MPI, …)')


def initialize(kwargs: dict | None, *, initialization_timeout: int = 300) -> bool:
  """Joins the cluster (``kwargs`` from :func:`parse_flags`; None: one process, nothing to do).

  Must run before anything else touches a JAX backend. Returns whether a cluster was joined.
  """
  global _initialized
  if kwargs is None:
    return False
  if not _initialized:
    # Cross-process collectives on CPU need gloo; accelerators use their own (NCCL, ICI).
    before = jax.config.jax_cpu_collectives_implementation
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    try:
      jax.distributed.initialize(initialization_timeout=initialization_timeout, **kwargs)
    except (RuntimeError, ValueError) as err:
      jax.config.update('jax_cpu_collectives_implementation', before)
      first = ' '.join(str(err).split())[:300]
      if not kwargs:
        raise DistributedError(f'--distributed: JAX detected no cluster to join ({first}); give '
                               '--coordinator_address, --num_processes and --process_id') from None
      raise DistributedError(f'jax.distributed.initialize failed ({first})') from None
    _initialized = True
  return True


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_lead() -> bool:
  """Whether this process writes the outputs (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier over all processes (nothing with one process)."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any (a collective with several processes)."""
  if not is_multiprocess():
    return bool(flag)
  flags = multihost_utils.process_allgather(np.array([bool(flag)]), tiled=True)
  return bool(np.any(flags))


def put(tree, sharding):
  """Places a pytree of host values (identical on every process) with ``sharding``.

  One process: ``jax.device_put``. Several: each process builds the shards its devices hold
  from its own copy (``jax.make_array_from_callback``), which gives one global array.
  """
  if not is_multiprocess():
    return jax.device_put(tree, sharding)

  def one(leaf):
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
  return jax.tree_util.tree_map(one, tree)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree):
  """A pytree of (possibly global) arrays as host numpy arrays, the same on every process."""
  def one(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if leaf.is_fully_replicated:
        return np.asarray(leaf.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)
  return jax.tree_util.tree_map(one, tree)
