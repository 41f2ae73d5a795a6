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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

# Keys that may differ between the run that wrote a checkpoint and the run that resumes it,
# because they do not change the result.
NEUTRAL_KEYS = ('log.progress', 'checkpoint.every_rounds', 'checkpoint.keep',
                'checkpoint.force', 'eval.batch_size', 'eval.tensorboard')


def flatten_config(cfg: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in cfg.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten_config(v, key + '.'))
    else:
      out[key] = v
  return out


def config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_hash(config) -> str:
  flat = {k: v for k, v in flatten_config(config_dict(config)).items() if k not in NEUTRAL_KEYS}
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


# Sections that only decide what is evaluated, logged or saved, and keys that only choose how the
# same function is executed or where the same data come from (backends compute the same round; a
# prepared folder holds the same arrays as its raw release): none changes what trains.
_NOT_IDENTITY = ('eval.', 'log.', 'checkpoint.', 'fed.backend', 'fed.chunk_size',
                 'fed.num_devices', 'model.fast_conv', 'data.dir', 'data.num_workers',
                 'data.cache_dir')


def run_identity(config) -> int:
  """A 64-bit identity of what a run trains: a hash of every config key except ``_NOT_IDENTITY``.

  The run's secret randomness (DP noise, Poisson batches, audit canaries) is derived from
  ``(seed, identity)``, so two runs that differ in any training key — sweep trials of one seed at
  several ε, say — never share noise or batches, while a run and its resume, or a sweep trial and
  the same config run alone, do.
  """
  flat = {k: v for k, v in flatten_config(config_dict(config)).items()
          if not k.startswith(_NOT_IDENTITY)}
  digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).digest()
  return int.from_bytes(digest[:8], 'little')


def config_differences(saved: dict, current: dict) -> list[str]:
  a, b = flatten_config(saved), flatten_config(current)
  keys = sorted(set(a) | set(b))
  return [k for k in keys if k not in NEUTRAL_KEYS and a.get(k, '<missing>') != b.get(k,
                                                                                     '<missing>')]


class Checkpointer:
  """Saves and restores ``(state, host)`` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'host'))

  def save(self, round_: int, state, host: dict, *, force: bool = False) -> None:
    state = jax.device_get(state)
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
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        return step, got['state'], got['host']
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
