"""Client execution backends: how ``client_update`` is mapped over the clients of a round.

All backends compute the same function (to float tolerance); they differ in speed:

* ``vmap``: one jitted step, clients vectorised. Each client holds its own weights after the
  first local step, so convolutions become grouped convolutions, which XLA:CPU runs slowly.
* ``map``: one jitted step, ``lax.map`` over clients (``chunk_size`` > 1 vmaps inside a chunk).
  A rolled loop; fast on CPU only because every convolution has a forward-conv VJP
  (``adpfl_jax/ops/conv.py``).
* ``sharded``: one jitted step, clients split over the ``clients`` axis of a device mesh with
  ``shard_map``; ``lax.map`` over each device's clients. Needs several devices.
* ``loop``: a host loop over clients calling one jitted client function; aggregation is a second
  jitted function.
* ``auto``: the fastest on this platform according to ``benchmarks/round_throughput.py``;
  ``sharded`` over the global mesh in a multi-process run (``adpfl_jax/distributed.py``).

A backend maps ``per_client_fn`` to ``fn(params, xb, yb, mask, dp, keys, active)``, which returns
stacked per-client ``(deltas, reports)`` with a leading client axis.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

BACKENDS = ('vmap', 'map', 'sharded', 'loop', 'auto')
ONE_JIT = ('vmap', 'map', 'sharded')


def resolve(name: str, platform: str | None = None) -> str:
  """Resolves ``auto`` to a concrete backend for the platform.

  On CPU the benchmark (README, "Backends") found ``map`` fastest: it avoids vmap's grouped
  convolutions and the host loop's per-client dispatch; on accelerators ``vmap`` keeps the device
  busy with one large program.
  """
  if name not in BACKENDS:
    raise ValueError(f'fed.backend={name!r} is not one of {BACKENDS}')
  if jax.process_count() > 1:
    # Several processes: clients are split over the global mesh (every process's devices).
    if name == 'loop':
      raise ValueError("fed.backend='loop' dispatches clients from one process's host loop; "
                       "a multi-process run needs 'sharded' (or 'auto', 'map', 'vmap')")
    if name == 'auto':
      return 'sharded'
  if name != 'auto':
    return name
  platform = platform or jax.default_backend()
  return 'map' if platform == 'cpu' else 'vmap'


def vmap_clients(fn):
  return jax.vmap(fn, in_axes=(None, 0, 0, 0, 0, 0, 0))


def map_clients(fn, chunk_size: int = 1):
  def mapped(params, xb, yb, mask, dp, keys, active):
    body = lambda a: fn(params, *a)
    return jax.lax.map(body, (xb, yb, mask, dp, keys, active),
                       batch_size=chunk_size if chunk_size > 1 else None)
  return mapped


def make_mesh(num_devices: int | None = None) -> Mesh:
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'fed.num_devices={num_devices} but only {len(devices)} devices are visible')
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError(f'fed.num_devices={num_devices}: a multi-process run uses every device '
                       f'of the cluster ({len(devices)}); leave it 0')
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ('clients',))


def sharded_clients(fn, mesh: Mesh, chunk_size: int = 1):
  """Splits the client axis over ``mesh``; each device maps over its own clients."""
  inner = map_clients(fn, chunk_size)
  spec = P('clients')
  return jax.shard_map(inner, mesh=mesh, in_specs=(P(), spec, spec, spec, spec, spec, spec),
                       out_specs=spec, check_vma=False)


def build(name: str, fn, *, chunk_size: int = 1, mesh: Mesh | None = None):
  """The mapped client function for backend ``name`` (``loop`` is handled by the caller)."""
  if name == 'vmap':
    return vmap_clients(fn)
  if name == 'map':
    return map_clients(fn, chunk_size)
  if name == 'sharded':
    return sharded_clients(fn, mesh or make_mesh(), chunk_size)
  raise ValueError(f'backend {name!r} has no one-jit form')


def loop_clients(jitted_fn):
  """Host loop: calls a jitted one-client function for each client and stacks the results."""
  def mapped(params, xb, yb, mask, dp, keys, active):
    outs = []
    for i in range(xb.shape[0]):
      take = functools.partial(lambda a, i=i: a[i])
      outs.append(jitted_fn(params, xb[i], yb[i], mask[i], jax.tree_util.tree_map(take, dp),
                            keys[i], active[i]))
    return jax.tree_util.tree_map(lambda *a: jax.numpy.stack(a), *outs)
  return mapped
