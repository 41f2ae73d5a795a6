"""Phantom releases of every medical task, and their cache (docs/datasets.md §6).

`write(task, out_dir, cases, ...)` writes synthetic cases in the task's real on-disk layout with
`phantoms_ham10000.write_phantoms` (HAM10000: JPEG images, PNG masks, metadata CSV with the
`dataset` column), `phantoms3d.write_kits23_phantoms` (`dataset/case_XXXXX/`, KiTS affine,
`anony_sites.csv`) or `phantoms3d.write_brats2024_phantoms` (release folders, metadata sheet,
several time points per patient). `adpfl data make-phantoms` calls it, and so does `cached`, which
the pipeline uses when `config.data.dir` is empty: the phantoms are then read back through the same
readers as the real data.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Sequence

from adpfl_jax.data import phantoms3d
from adpfl_jax.data import phantoms_ham10000

PathLike = str | os.PathLike

#: Environment variable overriding the phantom cache root.
CACHE_ENV = 'ADPFL_CACHE_DIR'
#: Bumped whenever a phantom generator changes, so cached phantoms of an older recipe are not
#: reused.
VERSION = {'ham10000': 1, 'kits23': 2, 'brats2024': 2}
_COMPLETE = '.complete'


def _write_ham10000(out: pathlib.Path, cases: int, sites: int, seed: int,
                    shape: tuple[int, ...] | None) -> None:
  kw = {} if shape is None else {'image_size': shape}
  phantoms_ham10000.write_phantoms(out, cases, sites=sites, seed=seed, **kw)


def _write_kits23(out: pathlib.Path, cases: int, sites: int, seed: int,
                  shape: tuple[int, ...] | None) -> None:
  kw = {} if shape is None else {'shape': shape}
  phantoms3d.write_kits23_phantoms(out, cases, sites=sites, seed=seed, **kw)


def _write_brats2024(out: pathlib.Path, cases: int, sites: int, seed: int,
                     shape: tuple[int, ...] | None) -> None:
  kw = {} if shape is None else {'shape': shape}
  phantoms3d.write_brats2024_phantoms(out, cases, sites=sites, seed=seed, **kw)


_WRITERS = {'ham10000': _write_ham10000, 'kits23': _write_kits23,
            'brats2024': _write_brats2024}


def write(task: str, out_dir: PathLike, cases: int, sites: int = 3, seed: int = 0,
          shape: Sequence[int] | None = None) -> pathlib.Path:
  """Writes `cases` phantom cases of `task` in the real on-disk layout under `out_dir`.

  Args:
    task: 'ham10000', 'kits23' or 'brats2024'.
    out_dir: created if needed.
    cases: images (HAM10000) or labelled cases / time points (KiTS23, BraTS 2024).
    sites: acquisition sites (the natural clients).
    seed: seed of everything drawn.
    shape: (H, W) for HAM10000, (z, y, x) for the 3D tasks; None: the writer's default.

  Returns:
    `out_dir` as a Path.
  """
  if task not in _WRITERS:
    raise ValueError(f'Unknown task {task!r}; expected one of {tuple(_WRITERS)}.')
  if int(cases) < 1:
    raise ValueError(f'cases must be >= 1, got {cases}.')
  if int(sites) < 1:
    raise ValueError(f'sites must be >= 1, got {sites}.')
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  dims = None if shape is None else tuple(int(s) for s in shape)
  _WRITERS[task](out, int(cases), int(sites), int(seed), dims)
  return out


def _cache_root(cache_dir: PathLike | None = None) -> pathlib.Path:
  """`cache_dir`, else `$ADPFL_CACHE_DIR`, else `$XDG_CACHE_HOME/adpfl_jax/phantoms`."""
  if cache_dir:
    return pathlib.Path(cache_dir)
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(xdg) / 'adpfl_jax' / 'phantoms'


def cached(task: str, cases: int, sites: int, seed: int, shape: Sequence[int],
           cache_dir: PathLike | None = None) -> pathlib.Path:
  """Returns a cached phantom folder of `task`, writing it first if needed.

  The folder is `<root>/<task>-v<version>-<cases>-<seed>-s<sites>-<shape>` (version from
  `VERSION`, root from `_cache_root`; default `~/.cache/adpfl_jax/phantoms`). It is written into a
  temporary sibling folder and renamed into place when complete, so concurrent runs never see a
  half-written folder.
  """
  root = _cache_root(cache_dir)
  dims = 'x'.join(str(int(s)) for s in shape)
  final = root / f'{task}-v{VERSION[task]}-{int(cases)}-{int(seed)}-s{int(sites)}-{dims}'
  if (final / _COMPLETE).is_file():
    return final
  root.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{final.name}-incomplete-', dir=root))
  try:
    write(task, tmp, cases, sites, seed, shape)
    (tmp / _COMPLETE).write_text('written by adpfl_jax.data.phantoms.cached\n')
    if final.exists():  # A stale, incomplete folder (no marker): replace it.
      shutil.rmtree(final, ignore_errors=True)
    try:
      os.replace(tmp, final)
    except OSError:
      if not (final / _COMPLETE).is_file():  # Not a concurrent writer's success: re-raise.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final
