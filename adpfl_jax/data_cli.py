"""``adpfl data``: write phantoms in the real on-disk layouts, or prepare TFDS array_record sets.

  adpfl data make-phantoms --task {ham10000,kits23,brats2024} --out DIR --cases N \
      [--sites S] [--seed 0] [--shape 32,48,48]
  adpfl data prepare --task {ham10000,kits23,brats2024} --data-dir DIR --out DIR \
      [--config experiments/kits23.py[:smoke]] [--shape 32,64,64] [--target-spacing 5,3.2,3.2] \
      [--image-size 64,64] [--test-fraction 0.2] [--max-cases N] [--overwrite]

`make-phantoms` writes synthetic cases through the same writers the pipeline's phantom cache uses
(`adpfl_jax.data.phantoms.write`): HAM10000 (`HAM10000_images_part_{1,2}/`, Tschandl masks,
metadata CSV with the `dataset` site column), KiTS23 (`dataset/case_XXXXX/`, KiTS affine,
`anony_sites.csv`) or BraTS 2024 GLI (`training_data1_v2/BraTS-GLI-PPPPP-TTT/...`, several time
points per patient, metadata sheet with a `Site` column). Train on them with
`adpfl train --config=experiments/<task>.py:smoke --config.data.dir=DIR`.

`prepare` runs the TFDS builders without TensorFlow: `tfds_ham10000.prepare` (`ham10000_seg`,
images resized to the image size) or `tfds_3d.prepare` (`kits23_seg` / `brats2024_seg`, each case
preprocessed to the volume shape at the target spacing), and prints the prepared folder. The
preprocessing keys come from the training config given with `--config` (`config.data.image_size`,
or `volume_shape`, `target_spacing` and the site keys `site_csv` / `site_column`); `--shape`,
`--target-spacing` and `--image-size` set or override them. Training with the same config and
`--config.data.dir=OUT` then reads the prepared arrays (docs/datasets.md §8.2) and gets the same
federation as from the raw release, without decoding or resampling a single image.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

from adpfl_jax.data import phantoms
from adpfl_jax.data import sources
from adpfl_jax.data import tfds_3d
from adpfl_jax.data import tfds_ham10000

_TFDS_3D = {'kits23': 'kits23_seg', 'brats2024': 'brats2024_seg'}


class UsageError(ValueError):
  """A bad command-line value (reported with exit code 2)."""


def _ints(text: str) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in text.replace('x', ',').split(','))
  except ValueError:  # Empty fields ('8,,8', '8,x,8') are errors, not silently dropped.
    raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of integers')
  if not out or min(out) < 1:
    raise argparse.ArgumentTypeError(f'{text!r} must hold positive integers')
  return out


def _floats(text: str) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in text.split(',') if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of numbers')
  if len(out) != 3 or min(out) <= 0:
    raise argparse.ArgumentTypeError(f'{text!r} must be 3 positive numbers (mm)')
  return out


def build_parser(prog: str = 'adpfl data') -> argparse.ArgumentParser:
  """The argument parser of ``adpfl data``."""
  parser = argparse.ArgumentParser(prog=prog, description='Data tools: phantoms and TFDS.')
  sub = parser.add_subparsers(dest='command', required=True)

  mk = sub.add_parser('make-phantoms', help='write phantom cases in the real on-disk layout')
  mk.add_argument('--task', choices=sources.TASKS, required=True)
  mk.add_argument('--out', required=True, help='output folder (created if needed)')
  mk.add_argument('--cases', type=int, required=True,
                  help='images (ham10000) or labelled cases / time points (kits23, brats2024)')
  mk.add_argument('--sites', type=int, default=3, help='acquisition sites (natural clients)')
  mk.add_argument('--seed', type=int, default=0)
  mk.add_argument('--shape', type=_ints, default=None,
                  help='H,W (ham10000) or Z,Y,X (3D); default: the writer default '
                  '(96,128 / 32,48,48 / 32,48,40)')

  pr = sub.add_parser('prepare', help='prepare a TFDS array_record data set from a release')
  pr.add_argument('--task', choices=sources.TASKS, required=True)
  pr.add_argument('--data-dir', required=True, help='the raw release folder (TFDS manual_dir)')
  pr.add_argument('--out', required=True, help='TFDS data_dir to write into')
  pr.add_argument('--config', default=None,
                  help='training config FILE[:ARG] whose config.data preprocessing keys to use')
  pr.add_argument('--image-size', type=_ints, default=None,
                  help='ham10000: H,W (default: config.data.image_size)')
  pr.add_argument('--shape', type=_ints, default=None,
                  help='3D: Z,Y,X of every example (default: config.data.volume_shape)')
  pr.add_argument('--target-spacing', type=_floats, default=None,
                  help='3D: Z,Y,X in mm (default: config.data.target_spacing)')
  pr.add_argument('--test-fraction', type=float, default=None,
                  help='3D: fraction of patients in a test split (default 0: train only)')
  pr.add_argument('--max-cases', type=int, default=None, help='3D: keep the first N cases')
  pr.add_argument('--overwrite', action='store_true',
                  help='replace an existing prepared data set built with other options')
  return parser


def _count_files(root: pathlib.Path) -> int:
  return sum(1 for p in root.rglob('*') if p.is_file())


def _make_phantoms(args) -> int:
  if args.cases < 1:
    raise UsageError(f'--cases must be >= 1, got {args.cases}')
  if args.sites < 1:
    raise UsageError(f'--sites must be >= 1, got {args.sites}')
  want = 2 if args.task == 'ham10000' else 3
  if args.shape is not None and len(args.shape) != want:
    raise UsageError(f'--shape for {args.task} needs {want} integers, '
                     f'got {",".join(map(str, args.shape))}')
  out = pathlib.Path(args.out)
  t = time.time()
  phantoms.write(args.task, out, args.cases, args.sites, args.seed, args.shape)
  what = 'images' if args.task == 'ham10000' else 'cases'
  print(f'wrote {args.cases} {args.task} phantom {what} from {args.sites} site(s) '
        f'(seed {args.seed}) in the real layout to {out} ({_count_files(out)} files, '
        f'{time.time() - t:.1f} s):')
  for p in sorted(out.iterdir()):
    n = _count_files(p) if p.is_dir() else 0
    print(f'  {p.name}{"/" if p.is_dir() else ""}' + (f'  ({n} files)' if p.is_dir() else ''))
  print(f'train on them: adpfl train --config={args.task}:smoke '
        f'--config.data.dir={out} --workdir=WORKDIR')
  return 0


def _config_data(spec: str, task: str) -> Any:
  """`config.data` of the experiment config `FILE[:ARG]` (its `get_config(ARG)`)."""
  from adpfl_jax.configs import loading  # pylint: disable=g-import-not-at-top
  try:
    data = loading.load(spec).data
  except loading.ConfigLoadError as err:
    raise UsageError(str(err)) from None
  if data.name != task:
    raise UsageError(f'--config {spec} is a {data.name!r} config (config.data.name), not {task!r}')
  return data


def _preprocessing(args) -> dict[str, Any]:
  """The preprocessing keys of `prepare`: the flags, else the `--config` file's `config.data`."""
  data = _config_data(args.config, args.task) if args.config else None

  def pick(value, key: str, flag: str) -> tuple:
    if value is None and data is not None:
      value = data[key]
    if not value:
      raise UsageError(f'{flag} (or --config with a non-empty config.data.{key}) is required '
                       f'for {args.task}')
    return (value, value) if isinstance(value, int) else tuple(value)

  if args.task == 'ham10000':
    size = pick(args.image_size, 'image_size', '--image-size')
    if len(size) == 1:
      size = size * 2
    if len(size) != 2:
      raise UsageError('--image-size needs H,W')
    return {'image_size': size}
  shape = pick(args.shape, 'volume_shape', '--shape')
  if len(shape) != 3:
    raise UsageError('--shape needs Z,Y,X')
  cfg = {'shape': shape,
         'target_spacing': pick(args.target_spacing, 'target_spacing', '--target-spacing')}
  if data is not None and args.task == 'kits23' and data.site_csv:
    cfg['site_csv'] = data.site_csv
  if data is not None and args.task == 'brats2024':
    cfg['site_column'] = data.site_column
  return cfg


def _prepare(args) -> int:
  data_dir = pathlib.Path(args.data_dir)
  if not data_dir.is_dir():
    raise UsageError(f'--data-dir {data_dir} is not a directory')
  cfg = _preprocessing(args)
  t = time.time()
  if args.task == 'ham10000':
    path = tfds_ham10000.prepare(data_dir, args.out, overwrite=args.overwrite, **cfg)
  else:
    if args.test_fraction is not None:
      cfg['test_fraction'] = args.test_fraction
    if args.max_cases is not None:
      cfg['max_cases'] = args.max_cases
    path = tfds_3d.prepare(_TFDS_3D[args.task], data_dir, args.out, overwrite=args.overwrite,
                           **cfg)
    print(json.dumps(tfds_3d.prepared_config(path), indent=2))
  print(f'prepared {args.task} from {data_dir} in {time.time() - t:.1f} s: {path}')
  print(f'train on it: adpfl train --config={args.config or "CONFIG"} '
        f'--config.data.dir={args.out} --workdir=WORKDIR'
        + ('' if args.config else f'  (CONFIG: the preprocessing keys above, {cfg})'))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``adpfl data`` with `argv` (without the program name); returns the exit code."""
  args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
  try:
    rc = _make_phantoms(args) if args.command == 'make-phantoms' else _prepare(args)
    sys.stdout.flush()  # A closed pipe shows up here, inside the handler below.
    return rc
  except UsageError as e:
    print(f'adpfl data {args.command}: {e}', file=sys.stderr)
    return 2
  except BrokenPipeError:  # `adpfl data ... | head`: the reader left; not an error.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Exit-time flush: no error.
    return 0
  except (ValueError, OSError) as e:  # Readers' errors name the bad file, case or column.
    print(f'adpfl data {args.command}: {type(e).__name__}: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
