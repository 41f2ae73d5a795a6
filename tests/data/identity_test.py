"""The pipeline gives the same federation as the loaders it replaced (fingerprints pinned).

`PINNED` was computed once with the code before the pipeline refactor (`loaders.load` /
`ham10000.load_federation`, commit c8d4aff) on these exact configs: the experiment config of each
task with tiny phantoms (written by the same writers, so the same files) and the variants below.
A fingerprint is the client names, train sizes, test sizes, a hash of every array (train padded,
test per client) and a hash of the per-client partition summary counts. JPEG decoding comes from
Pillow and NIfTI from nibabel: a new version of either that decodes differently changes the
array hashes without any change here.
"""

import hashlib
import importlib.util
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from adpfl_jax.configs import default
from adpfl_jax.data import federated
from adpfl_jax.data import phantoms_ham10000

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = {
    'kits23': dict(phantom_cases=12, phantom_shape=(8, 16, 16), volume_shape=(4, 8, 8),
                   target_spacing=(4.0, 2.0, 2.0)),
    'brats2024': dict(phantom_cases=16, phantom_shape=(8, 16, 16), volume_shape=(4, 8, 8),
                      target_spacing=(2.0, 2.0, 2.0)),
    'ham10000': dict(phantom_cases=36, phantom_shape=(24, 32), image_size=(12, 16)),
}
# name -> (seed, config.data overrides)
VARIANTS = {
    'kits23/natural': (0, {}),
    'kits23/iid': (3, dict(partition='iid', num_clients=2)),
    'kits23/dirichlet': (1, dict(partition='dirichlet', num_clients=2, alpha=1.0)),
    'kits23/max_cases': (1, dict(max_cases=9)),
    'kits23/largest2': (0, dict(num_clients=2)),
    'kits23/workers': (2, dict(num_workers=2)),
    'brats2024/natural': (0, {}),
    'brats2024/iid': (3, dict(partition='iid', num_clients=2)),
    'brats2024/max_cases': (1, dict(max_cases=9)),
    'brats2024/largest2': (0, dict(num_clients=2)),
    'ham10000/natural': (0, {}),
    'ham10000/iid': (5, dict(partition='iid', num_clients=2)),
    'ham10000/dirichlet': (1, dict(partition='dirichlet', num_clients=2, alpha=1.0)),
    'ham10000/all_images': (0, dict(one_image_per_lesion=False)),
    'ham10000/max_cases': (2, dict(max_cases=20)),
    'ham10000/largest2': (0, dict(num_clients=2)),
    'ham10000/workers': (0, dict(num_workers=2, test_fraction=0.3)),
}
# HAM10000 folders without sites (the natural partition falls back to 'dirichlet').
NO_SITES = {'ham10000/no_sites': dict(with_dataset_column=False),
            'ham10000/isic2018': dict(layout='isic2018')}
# name -> (client names, train sizes, test sizes, arrays hash, summary hash)
PINNED = {
    'kits23/natural': (['0', '1', '2'], [3, 3, 3], [1, 1, 1], '1e4c2cacf6900ef3',
                       '11419d411baf2cf6'),
    'kits23/iid': (['client_0', 'client_1'], [5, 5], [1, 1], '3f61b74064064240',
                   '831831e7702891a2'),
    'kits23/dirichlet': (['client_0', 'client_1'], [2, 7], [1, 2], '8708569af68177cf',
                         '256866f84388863b'),
    'kits23/max_cases': (['0', '1', '2'], [2, 2, 2], [1, 1, 1], 'ef082882e69a2059',
                         'be1d08cb8052117d'),
    'kits23/largest2': (['0', '1'], [3, 3], [1, 1], '16699eb453e6476f', '648bcb1afc52aec2'),
    'kits23/workers': (['0', '1', '2'], [3, 3, 3], [1, 1, 1], '7ada401e429d6095',
                       '11419d411baf2cf6'),
    'brats2024/natural': (['Duke', 'Indiana', 'Missouri'], [2, 2, 2], [3, 1, 2],
                          '3186b0a8f6ab595d', '262cda262a72445e'),
    'brats2024/iid': (['client_0', 'client_1'], [3, 4], [2, 1], '60e8fda3809db481',
                      'e76e987d5a411cde'),
    'brats2024/max_cases': (['Duke', 'Indiana'], [1, 2], [2, 1], '8c7b72235a3c26a7',
                            '1db76964bacb5c7c'),
    'brats2024/largest2': (['Duke', 'Missouri'], [2, 2], [3, 2], '1dc64dddf1cb27a1',
                           '5687007bf45095a8'),
    'ham10000/natural': (['rosendahl', 'vidir_modern', 'vidir_molemax'], [5, 8, 9], [2, 3, 3],
                         'a65fdcb1dc191f29', 'addb58c99b9875b8'),
    'ham10000/iid': (['client_0', 'client_1'], [9, 11], [6, 3], 'dd1bb3a3974c4246',
                     'd5c587176827db5f'),
    'ham10000/dirichlet': (['client_0', 'client_1'], [9, 12], [5, 3], '9b9e3b4fca7ddcc3',
                           '90bd4d96d3cab949'),
    'ham10000/all_images': (['rosendahl', 'vidir_modern', 'vidir_molemax'], [6, 11, 11],
                            [2, 3, 3], '6bce89778fdcf363', 'e12894c8dc0f7e4b'),
    'ham10000/max_cases': (['rosendahl', 'vidir_modern', 'vidir_molemax'], [4, 5, 2], [1, 2, 2],
                           '7bedf5e546db0585', '3c1688aa22f960b5'),
    'ham10000/largest2': (['vidir_modern', 'vidir_molemax'], [8, 9], [3, 3], '9c510b02c24ea966',
                          'efca9500031bb7c0'),
    'ham10000/workers': (['rosendahl', 'vidir_modern', 'vidir_molemax'], [5, 7, 8], [2, 5, 4],
                         '27655f2e52129cc9', 'f961058b9cd128a4'),
    'ham10000/no_sites': (['client_0', 'client_1'], [3, 9], [2, 4], '3d85c81a64cfbd52',
                          '89238430c63b89da'),
    'ham10000/isic2018': (['client_0', 'client_1'], [9, 10], [2, 3], '9941b6e95531d60e',
                          '1eadc3213249e4d3'),
    'phantom_skin/default': (['site_0', 'site_1'], [8, 8], [4, 4], '48f2c1f734a327ed',
                             '44136fa355b3678a'),
}
TASK = {'kits23': ('kits23', 4, (4.0, 2.0, 2.0)), 'brats2024': ('brats2024', 5, (2.0, 2.0, 2.0)),
        'ham10000': ('skin', 1, (1.0, 1.0)), 'phantom_skin': ('skin', 1, (1.0, 1.0))}


def _experiment_data(task):
  spec = importlib.util.spec_from_file_location(task, REPO / 'experiments' / f'{task}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None).data.to_dict()


def fingerprint(fd):
  """(names, train sizes, test sizes, arrays hash, summary hash) of a FederatedData."""
  h = hashlib.sha256()
  for a in [fd.train_x, fd.train_y, fd.sizes] + list(fd.test_x) + list(fd.test_y):
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  s = fd.partition_summary or {}
  part = json.dumps({k: s[k] for k in ('clients', 'total', 'num_clients') if k in s},
                    sort_keys=True)
  return (list(map(str, fd.client_names)), fd.sizes.tolist(), [len(t) for t in fd.test_x],
          h.hexdigest()[:16], hashlib.sha256(part.encode()).hexdigest()[:16])


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('phantom_cache')


def _check(name, fd):
  assert fingerprint(fd) == PINNED[name]
  task, num_classes, spacing = TASK[name.split('/')[0]]
  assert (fd.task, fd.num_classes, fd.spacing) == (task, num_classes, spacing)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_phantom_release_federation_is_unchanged(cache, name):
  task = name.split('/')[0]
  seed, overrides = VARIANTS[name]
  cfg = _experiment_data(task)
  cfg.update(TINY[task], dir='', cache_dir=str(cache), num_workers=0)
  cfg.update(overrides)
  _check(name, federated.load(ml_collections.ConfigDict(cfg), seed))


@pytest.mark.parametrize('name', list(NO_SITES))
def test_ham10000_without_sites_falls_back_as_before(tmp_path, name):
  root = phantoms_ham10000.write_phantoms(tmp_path / 'ham', cases=24, sites=2, seed=4,
                                          image_size=(24, 32), **NO_SITES[name])
  cfg = _experiment_data('ham10000')
  cfg.update(TINY['ham10000'], dir=str(root), num_workers=0, num_clients=2)
  _check(name, federated.load(ml_collections.ConfigDict(cfg), 0))


def test_phantom_skin_is_unchanged():
  c = default.get_config()
  c.data.num_clients, c.data.examples_per_client = 2, 8
  c.data.test_examples_per_client, c.data.image_size = 4, 16
  _check('phantom_skin/default', federated.load(c.data, 1))
