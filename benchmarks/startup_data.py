"""Data start-up time of KiTS23 training: raw release vs a folder from `adpfl data prepare`.

  python benchmarks/startup_data.py [--json] [--cases 60] [--shape 32,48,48] [--repeats 3]

Writes `--cases` KiTS23 phantoms in the real layout (`adpfl data make-phantoms --task kits23
--shape`, default: its default shape), prepares them once per setting with the preprocessing keys of
`experiments/kits23.py` (`full`: volume 32 x 64 x 64 at 5 x 3.2 x 3.2 mm; `smoke`: its `:smoke`
settings) exactly as `adpfl data prepare --config experiments/kits23.py[:smoke]` does, and then
times the data start-up of training in fresh processes: `federated.load(config.data, seed)` from
the raw folder (scan, NIfTI decoding, resampling, normalisation, cropping on `num_workers` threads)
and from the prepared folder (index from metadata.json, array_record reads). Each row gives the
median over `--repeats` processes of `load_s` (`federated.load` alone) and `command_s` (process
start to FederatedData ready, imports included), the one-off `prepare_s`, and whether both
folders gave the same arrays. With `--json` stdout is one JSON object (progress goes to stderr).

The phantoms are far smaller than real KiTS23 volumes (~500 x 512 x 512 voxels), whose decoding
and resampling dominate the raw start-up; the prepared start-up does not depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

REPO = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {'full': None, 'smoke': 'smoke'}


def _config(arg):
  from adpfl_jax.configs import loading  # pylint: disable=g-import-not-at-top
  return loading.load('kits23' + (f':{arg}' if arg else ''))


def _child(setting: str, data_dir: str) -> None:
  """Runs in the measured process: one `federated.load`, prints timing and an array hash."""
  from adpfl_jax.data import federated  # pylint: disable=g-import-not-at-top
  c = _config(SETTINGS[setting])
  c.data.dir = data_dir
  t = time.perf_counter()
  fd = federated.load(c.data, c.seed)
  load_s = time.perf_counter() - t
  h = hashlib.sha256()
  for a in [fd.train_x, fd.train_y] + list(fd.test_x) + list(fd.test_y):
    h.update(a.tobytes())
  print(json.dumps({'load_s': load_s, 'hash': h.hexdigest()[:16],
                    'clients': fd.num_clients, 'train': int(fd.sizes.sum()),
                    'example_shape': list(fd.example_shape)}))


def _measure(setting: str, data_dir: pathlib.Path) -> dict:
  cmd = [sys.executable, __file__, '--child', setting, '--data', str(data_dir)]
  t = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  command_s = time.perf_counter() - t
  if out.returncode != 0:
    raise RuntimeError(f'{setting} load of {data_dir} failed:\n{out.stderr[-3000:]}')
  return dict(json.loads(out.stdout.strip().splitlines()[-1]), command_s=command_s)


def _prepare(setting: str, raw: pathlib.Path, out: pathlib.Path) -> float:
  from adpfl_jax.data import tfds_3d  # pylint: disable=g-import-not-at-top
  data = _config(SETTINGS[setting]).data
  t = time.perf_counter()
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress.
    tfds_3d.prepare('kits23_seg', raw, out, shape=tuple(data.volume_shape),
                    target_spacing=tuple(data.target_spacing))
  return time.perf_counter() - t


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', type=int, default=60)
  parser.add_argument('--shape', default=None, help='phantom Z,Y,X (make-phantoms default)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--work', default=None, help='folder for phantoms and prepared sets')
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--child', choices=sorted(SETTINGS), help=argparse.SUPPRESS)
  parser.add_argument('--data', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.child, args.data)
    return

  from adpfl_jax.data import phantoms  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(args.work or tmp)
    shape = None if args.shape is None else tuple(int(v) for v in args.shape.split(','))
    raw = work / f'kits_raw_{args.cases}_{args.shape or "default"}'
    if not raw.is_dir():
      phantoms.write('kits23', raw, args.cases, shape=shape)
    rows = {}
    for setting in SETTINGS:
      prep = work / f'{raw.name}_prepared_{setting}'
      prepare_s = _prepare(setting, raw, prep)
      runs = {kind: [_measure(setting, path) for _ in range(args.repeats)]
              for kind, path in (('raw', raw), ('prepared', prep))}
      row = {'prepare_s': round(prepare_s, 3)}
      for kind, results in runs.items():
        row[f'{kind}_load_s'] = round(statistics.median(r['load_s'] for r in results), 3)
        row[f'{kind}_command_s'] = round(statistics.median(r['command_s'] for r in results), 3)
      row['load_speedup'] = round(row['raw_load_s'] / row['prepared_load_s'], 1)
      row['identical'] = len({r['hash'] for rs in runs.values() for r in rs}) == 1
      first = runs['raw'][0]
      row.update(clients=first['clients'], train=first['train'],
                 example_shape=first['example_shape'])
      rows[setting] = row
      if not args.json:
        print(setting, row, flush=True)
  result = {'benchmark': 'startup_data', 'task': 'kits23', 'cases': args.cases,
            'phantom_shape': args.shape or 'make-phantoms default', 'repeats': args.repeats,
            'cpus': os.cpu_count(), 'settings': rows}
  print(json.dumps(result))


if __name__ == '__main__':
  main()
