"""A run's identity: which configs are the same run, and the secret randomness a run draws.

Light (no JAX): the CLI checks a workdir against its config in the first second of ``adpfl
train``, before data or calibration.

* ``config_differences`` / ``config_hash``: two configs are the same run unless they differ in a
  key outside ``NEUTRAL_KEYS`` (keys that cannot change a result: progress bar, checkpoint
  cadence, evaluation batch size, TensorBoard). A workdir holds one run: ``check_workdir`` refuses
  another config's workdir, naming the differing keys; checkpoints carry the hash too.
* ``run_identity``: the seed of a run's secret randomness (see below).
"""

from __future__ import annotations

import hashlib
import json
import os

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
                 'fed.example_chunk',
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


def check_workdir(config, workdir: str) -> list[str]:
  """Refuses a workdir that is a file, or that holds a run of a different config.

  Returns the differing keys (empty for the same run or a new workdir); raises ``ValueError``
  naming ``config.checkpoint`` unless ``checkpoint.force`` accepts the difference.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir} is a file, not a directory')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  diff = config_differences(saved, config_dict(config))
  if diff and not config.checkpoint.force:
    raise ValueError(
        f'config.checkpoint: the workdir {workdir} holds a run with a different config; '
        f'differing keys: {", ".join(diff)}. Use another --workdir, or '
        '--config.checkpoint.force=True to resume anyway (the result is then not that of either '
        'config).')
  return diff
