"""Peak memory of `tfds_3d.prepare('kits23_seg', ...)` for 20 vs 200 phantom cases.

  python benchmarks/prepare_memory.py [--json] [--shape 32 64 64] [--small 20] [--large 200]

Writes tiny KiTS23 phantoms (8 x 16 x 16 voxels in the real layout) once, then
prepares them in fresh child processes and reads each child's peak resident set
size (`ru_maxrss` from `os.wait4`, i.e. `getrusage` of that child only). The
prepared examples are padded to `--shape` (default 32 x 64 x 64, 640 KiB per
case) so that a writer that buffers the whole split would show clearly:
200 cases = 125 MiB of examples.

Rows:
* `streaming`: `tfds_3d.prepare` (ShardBasedBuilder, one case in flight).
* `generator`: the same examples through a plain `GeneratorBasedBuilder`
  (tfds' in-memory shuffle buffer), for comparison.
* `import_only`: a child that only imports the modules (fixed cost).

Goal: streaming peak RSS for the large run within 20% of the small run.
With `--json` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))


def _child(args: argparse.Namespace) -> None:
  """Runs inside the measured subprocess."""
  from adpfl_jax.data import tfds_3d  # pylint: disable=g-import-not-at-top
  if args.mode == 'import_only':
    return
  cfg = dict(shape=tuple(args.shape), target_spacing=(5.0, 0.78, 0.78), cases_per_shard=4)
  if args.mode == 'streaming':
    tfds_3d.prepare('kits23_seg', args.data, args.out, **cfg)
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from adpfl_jax.data import kits23  # pylint: disable=g-import-not-at-top
  config = tfds_3d.make_config('kits23_seg', **cfg)

  class Kits23SegGenerator(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'phantoms'

    def _info(self):
      return tfds.core.DatasetInfo(builder=self,
                                   features=tfds_3d.make_features(config.shape, 1))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(dl_manager.manual_dir)}

    def _generate_examples(self, data_dir):
      for case in kits23.scan(data_dir):
        yield case.case_id, tfds_3d.kits23_example(case, config)

  builder = Kits23SegGenerator(data_dir=args.out, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=args.data))


def _measure(mode: str, data: pathlib.Path, out: pathlib.Path, shape) -> dict:
  cmd = [sys.executable, __file__, '--child', '--mode', mode, '--data', str(data), '--out',
         str(out), '--shape', *map(str, shape)]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  err = proc.stderr.read().decode(errors='replace')
  proc.stderr.close()
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    raise RuntimeError(f'child {mode} on {data} failed ({proc.returncode}):\n{err[-3000:]}')
  return {'mode': mode, 'peak_rss_mib': usage.ru_maxrss / 1024.0}  # Linux: KiB.


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--mode', default='streaming',
                      choices=('streaming', 'generator', 'import_only'))
  parser.add_argument('--data', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  parser.add_argument('--shape', type=int, nargs=3, default=(32, 64, 64))
  parser.add_argument('--small', type=int, default=20)
  parser.add_argument('--large', type=int, default=200)
  parser.add_argument('--skip-generator', action='store_true')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  if args.child:
    _child(args)
    return

  import numpy as np  # pylint: disable=g-import-not-at-top
  from adpfl_jax.data import phantoms3d  # pylint: disable=g-import-not-at-top
  results = {'shape': list(args.shape), 'cases': [args.small, args.large], 'rows': []}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    data = {}
    for n in (args.small, args.large):
      data[n] = tmp / f'kits_{n}'
      phantoms3d.write_kits23_phantoms(data[n], n, sites=3, seed=0, shape=(8, 16, 16),
                                       with_instances=False)
    modes = ['streaming'] + ([] if args.skip_generator else ['generator'])
    base = _measure('import_only', data[args.small], tmp / 'unused', args.shape)
    results['import_only_mib'] = base['peak_rss_mib']
    for mode in modes:
      row = {'mode': mode}
      for n in (args.small, args.large):
        row[f'peak_rss_mib_{n}'] = _measure(mode, data[n], tmp / f'out_{mode}_{n}',
                                            args.shape)['peak_rss_mib']
      row['ratio'] = row[f'peak_rss_mib_{args.large}'] / row[f'peak_rss_mib_{args.small}']
      results['rows'].append(row)
  example_mib = (4 * 1 + 1) * int(np.prod(args.shape)) / 2**20
  print(f'prepared example: {tuple(args.shape)} float32 image + uint8 label = '
        f'{example_mib:.2f} MiB/case; import-only child: {results["import_only_mib"]:.1f} MiB')
  print(f'{"mode":<10} {"cases=" + str(args.small):>12} {"cases=" + str(args.large):>12} '
        f'{"ratio":>7}')
  for row in results['rows']:
    print(f'{row["mode"]:<10} {row[f"peak_rss_mib_{args.small}"]:>10.1f}Mi '
          f'{row[f"peak_rss_mib_{args.large}"]:>10.1f}Mi {row["ratio"]:>7.3f}')
  streaming = results['rows'][0]['ratio']
  results['goal_met'] = bool(streaming <= 1.2)
  print(f'streaming goal (ratio <= 1.20): {"met" if results["goal_met"] else "NOT met"}')
  if args.json:
    print(json.dumps(results))


if __name__ == '__main__':
  main()
