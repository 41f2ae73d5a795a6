"""Full-state checkpoints with orbax: exact resume, and the privacy ledgers never forgotten.

A checkpoint at round r holds two items:

* ``state`` — the whole ``ServerState`` pytree (round, params, server optimizer state, controller
  state, base PRNG key), saved with ``StandardSave``;
* ``host`` — JSON: every silo's ledger (the list of accounted runs, not only ε), the Rényi filters'
  ledgers, the privacy plan's bookkeeping, run counters, and the hash of the config.

Nothing else is needed to continue exactly: the data-pipeline position *is* the round, because
client participation and Poisson batches are pure functions of ``(seed, round)`` and the round keys
are ``fold_in(key, round)``. Orbax writes each step into a temporary directory and renames it when
complete, so a kill during a save leaves the previous checkpoint as the latest; a checkpoint that
fails to restore (truncated, corrupt) is skipped with a warning and the previous one is used.

In a multi-process run (``distributed.py``) every process calls ``save`` and ``restore`` together:
the state is saved as global arrays replicated over the global mesh (orbax writes each array once
and synchronises the processes) and restored onto that mesh; the JSON item is written by process 0.
The workdir must be on a file system every process sees.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from adpfl_jax import distributed


class Checkpointer:
  """Saves and restores ``(state, host)`` under ``workdir/checkpoints``.

  ``sharding``: with several processes, the replicated sharding over the global mesh the state is
  saved from and restored to (None: one process, host arrays).
  """

  def __init__(self, workdir: str, keep: int = 3, sharding=None):
    self.sharding = sharding
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'host'))

  def save(self, round_: int, state, host: dict, *, force: bool = False) -> None:
    state = jax.device_get(state) if self.sharding is None else distributed.put(
        distributed.to_host(state), self.sharding)
    self.manager.save(round_, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(_jsonable(host))),
                      force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(self, template) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint (older ones if the newest is damaged)."""
    for step in reversed(self.steps()):
      try:
        if self.sharding is None:
          abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        else:
          abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(
              np.shape(a), np.asarray(a).dtype, sharding=self.sharding), template)
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        state = got['state'] if self.sharding is None else distributed.to_host(got['state'])
        return step, state, got['host']
      except Exception as err:  # pylint: disable=broad-except
        msg = (f'checkpoint {os.path.join(self.directory, str(step))} could not be restored '
               f'({type(err).__name__}: {str(err)[:200]}); falling back to the previous one')
        logging.warning(msg)
        print(f'WARNING: {msg}', flush=True)
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  if isinstance(obj, float) and not np.isfinite(obj):
    return str(obj)
  return obj


def save_params(path: str, params) -> str:
  """Writes a parameter pytree as an orbax checkpoint at ``path`` (a new directory)."""
  path = os.path.abspath(path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, jax.device_get(params), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return path


def load_params(path: str, template):
  """Reads a parameter pytree written by ``save_params``; shapes must match ``template``."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'config.model.init_checkpoint={path!r}: no orbax checkpoint there')
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(path, abstract)
  finally:
    checkpointer.close()
  got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
  want = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), template)
  if got != want:
    raise ValueError(f'config.model.init_checkpoint={path!r} holds parameters of other shapes '
                     'than this model')
  return params
