"""Tests for the data pipeline `adpfl_jax.data.federated.load` (real layouts -> FederatedData).

Every configuration starts from the task's experiment config (`experiments/<task>.py`), which owns
the defaults of every `config.data` key, with tiny shapes set on top.
"""

import importlib.util
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from adpfl_jax import train
from adpfl_jax import validation
from adpfl_jax.data import brats
from adpfl_jax.data import federated
from adpfl_jax.data import ham10000
from adpfl_jax.data import kits23
from adpfl_jax.data import phantoms
from adpfl_jax.data import phantoms_ham10000
from adpfl_jax.metrics import regions as metrics_regions

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_3D = (8, 16, 16)  # phantom shape (z, y, x)
TINY_2D = (24, 32)  # phantom image (H, W)
# Per task: phantom cases, the `config.data` keys of a tiny load, example shape, labels.
CFG = {
    'kits23': dict(volume_shape=(4, 8, 8), target_spacing=(4.0, 2.0, 2.0), num_workers=0),
    'brats2024': dict(volume_shape=(4, 8, 8), target_spacing=(2.0, 2.0, 2.0), num_workers=0),
    'ham10000': dict(image_size=(12, 16), num_workers=0),
}
CASES = {'kits23': 12, 'brats2024': 16, 'ham10000': 36}
EXAMPLE = {'kits23': (4, 8, 8, 1), 'brats2024': (4, 8, 8, 4), 'ham10000': (12, 16, 3)}
LABELS = {'kits23': {0, 1, 2, 3}, 'brats2024': {0, 1, 2, 3, 4}, 'ham10000': {0, 1}}
NUM_CLASSES = {'kits23': 4, 'brats2024': 5, 'ham10000': 1}
EVAL_TASK = {'kits23': 'kits23', 'brats2024': 'brats2024', 'ham10000': 'skin'}
SPACING = {'kits23': (4.0, 2.0, 2.0), 'brats2024': (2.0, 2.0, 2.0), 'ham10000': (1.0, 1.0)}


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
  """One tiny phantom release per task, in the real layout (3 sites)."""
  out = {}
  for task, cases in CASES.items():
    shape = TINY_2D if task == 'ham10000' else TINY_3D
    out[task] = phantoms.write(task, tmp_path_factory.mktemp(task), cases, sites=3, shape=shape)
  return out


def _experiment(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _cfg(task, root, **kw):
  """`config.data` of experiments/<task>.py (every key) with the tiny settings and `kw`."""
  cfg = _experiment(task).data.to_dict()
  cfg.update(CFG[task], dir=str(root), **kw)
  return cfg


def _groups_of(task, root):
  """Patient (lesion) id and site of every case the readers find, by case (image) id."""
  if task == 'ham10000':
    return {r.image_id: (r.lesion_id, r.site) for r in ham10000.scan(root)}
  if task == 'kits23':
    cases = kits23.scan(root, site_csv=str(pathlib.Path(root) / kits23.SITE_CSV))
  else:
    cases = brats.scan(root)
  return {c.case_id: (c.patient_id, str(c.site)) for c in cases}


def _spy_split(monkeypatch):
  """Records the (train, test) indices and groups `load` hands to `partition_summary`."""
  calls = []
  real = federated.partition.partition_summary

  def spy(names, train_idx, test_idx, labels=None, groups=None, meta=None):
    calls.append(dict(names=list(names), train=[np.asarray(t) for t in train_idx],
                      test=[np.asarray(t) for t in test_idx], groups=np.asarray(groups)))
    return real(names, train_idx, test_idx, labels=labels, groups=groups, meta=meta)

  monkeypatch.setattr(federated.partition, 'partition_summary', spy)
  return calls


@pytest.mark.parametrize('task', list(CASES))
def test_load_shapes_dtypes_classes_and_spacing(data_dirs, task):
  fd = federated.load(_cfg(task, data_dirs[task]), seed=0)
  assert fd.num_clients == 3 and fd.task == EVAL_TASK[task]
  assert fd.num_classes == NUM_CLASSES[task]
  assert fd.example_shape == EXAMPLE[task]
  assert fd.train_x.dtype == np.float32 and fd.train_y.dtype == np.uint8
  assert fd.train_x.shape == (3, int(fd.sizes.max())) + EXAMPLE[task]
  assert fd.train_y.shape == fd.train_x.shape[:-1]
  assert fd.spacing == pytest.approx(SPACING[task])
  assert np.isfinite(fd.train_x).all()
  assert set(np.unique(fd.train_y).tolist()) <= LABELS[task]
  assert len(fd.test_x) == len(fd.test_y) == 3
  for k in range(3):
    assert fd.sizes[k] >= 1 and len(fd.test_x[k]) >= 1
    assert fd.test_x[k].shape[1:] == EXAMPLE[task] and fd.test_x[k].dtype == np.float32
    assert fd.test_y[k].dtype == np.uint8
    assert set(np.unique(fd.test_y[k]).tolist()) <= LABELS[task]
    assert not fd.train_x[k, fd.sizes[k]:].any()  # Padding rows are zero.
  summary = fd.partition_summary
  assert [c['train'] for c in summary['clients']] == fd.sizes.tolist()
  assert [c['test'] for c in summary['clients']] == [len(t) for t in fd.test_x]
  # The trainer's regions for this task are the challenge regions.
  assert train.regions_for(fd.task, fd.num_classes) == metrics_regions.REGIONS[EVAL_TASK[task]]


@pytest.mark.parametrize('task,partition', [('kits23', 'natural'), ('brats2024', 'natural'),
                                            ('ham10000', 'natural'), ('brats2024', 'iid'),
                                            ('kits23', 'dirichlet'), ('ham10000', 'iid'),
                                            ('ham10000', 'dirichlet')])
def test_no_patient_on_both_sides_nor_in_two_clients(data_dirs, monkeypatch, task, partition):
  calls = _spy_split(monkeypatch)
  extra = {} if partition == 'natural' else dict(num_clients=2, alpha=1.0)
  fd = federated.load(_cfg(task, data_dirs[task], partition=partition, **extra), seed=3)
  (call,) = calls
  groups = call['groups']
  owner = {}
  for k, (tr, te) in enumerate(zip(call['train'], call['test'])):
    assert len(tr) == fd.sizes[k] and len(te) == len(fd.test_x[k])
    train_g, test_g = set(groups[tr].tolist()), set(groups[te].tolist())
    assert not train_g & test_g, f'client {k}: a patient is in train and test'
    for g in train_g | test_g:
      assert owner.setdefault(g, k) == k, f'patient {g} in clients {owner[g]} and {k}'
    # One training example per privacy unit (patient / lesion).
    assert len(train_g) == len(tr)
  assert len(owner) == len(set(groups.tolist()))  # Every patient is used once.
  if partition == 'natural':  # Natural clients are the sites of the metadata.
    sites = {}
    for patient, site in _groups_of(task, data_dirs[task]).values():
      sites.setdefault(site, set()).add(patient)
    assert sorted(map(str, call['names'])) == sorted(sites)
    for k, name in enumerate(call['names']):
      assert {g for g, c in owner.items() if c == k} == sites[str(name)]


@pytest.mark.parametrize('task', list(CASES))
def test_a_kept_site_splits_alike_whatever_sites_are_dropped(data_dirs, task):
  """A site's train/test split is seeded by its place among all sites, not among the kept ones."""
  every = federated.load(_cfg(task, data_dirs[task]), seed=4)
  assert every.num_clients == 3
  for k in (1, 2):
    kept = federated.load(_cfg(task, data_dirs[task], num_clients=k), seed=4)
    assert f'dropped to keep num_clients={k}' in kept.partition_summary['dropped_sites']
    for j, name in enumerate(kept.client_names):
      i = every.client_names.index(name)
      np.testing.assert_array_equal(kept.train_x[j, :kept.sizes[j]],
                                    every.train_x[i, :every.sizes[i]])
      np.testing.assert_array_equal(kept.test_y[j], every.test_y[i])


def test_ham10000_without_sites_falls_back_to_dirichlet(tmp_path):
  root = phantoms_ham10000.write_phantoms(tmp_path / 'ham', cases=40, sites=2,
                                          image_size=TINY_2D, with_dataset_column=False)
  fd = federated.load(_cfg('ham10000', root), seed=0)  # num_clients=0: one per HAM source.
  assert fd.client_names == [f'client_{k}' for k in range(len(ham10000.SOURCES))]
  summary = fd.partition_summary
  assert summary['partition'].startswith('dirichlet with 4 clients (natural unavailable: 40 of')
  assert summary['skew'] == 'dx'


def test_brats_trains_on_the_earliest_time_point(data_dirs, monkeypatch):
  calls = _spy_split(monkeypatch)
  federated.load(_cfg('brats2024', data_dirs['brats2024']), seed=0)
  cases = brats.scan(data_dirs['brats2024'])
  assert len({c.patient_id for c in cases}) < len(cases)  # Some patients have several.
  call = calls[-1]
  for tr in call['train']:
    for i in tr.tolist():
      same = [c.timepoint for c in cases if c.patient_id == cases[i].patient_id]
      assert cases[i].timepoint == min(same)


@pytest.mark.parametrize('task', ['kits23', 'ham10000'])
def test_reproducible_from_the_seed(data_dirs, task):
  cfg = _cfg(task, data_dirs[task], partition='iid', num_clients=2)
  a, b = federated.load(cfg, seed=5), federated.load(cfg, seed=5)
  np.testing.assert_array_equal(a.train_x, b.train_x)
  np.testing.assert_array_equal(a.train_y, b.train_y)
  for k in range(2):
    np.testing.assert_array_equal(a.test_x[k], b.test_x[k])
  assert a.partition_summary == b.partition_summary
  c = federated.load(cfg, seed=6)
  assert (a.train_x.shape != c.train_x.shape or not np.array_equal(a.train_x, c.train_x))


def test_phantom_cache_is_written_once_and_reused(tmp_path, monkeypatch):
  writes = []
  real = phantoms.write

  def counting(*args, **kw):
    writes.append(args)
    return real(*args, **kw)

  monkeypatch.setattr(phantoms, 'write', counting)
  monkeypatch.setenv(phantoms.CACHE_ENV, str(tmp_path / 'env_cache'))
  cfg = _cfg('kits23', '', phantom_cases=6, phantom_sites=2, phantom_shape=TINY_3D)
  a = federated.load(cfg, seed=0)
  root = tmp_path / 'env_cache'
  (folder,) = [p for p in root.iterdir()]
  name = f'kits23-v{phantoms.VERSION["kits23"]}-6-0-s2-8x16x16'  # Recipe version in it.
  assert folder.name == name
  assert (folder / '.complete').is_file() and (folder / 'dataset' / 'case_00000').is_dir()
  b = federated.load(cfg, seed=0)
  assert len(writes) == 1  # Second load reads the cache.
  np.testing.assert_array_equal(a.train_x, b.train_x)
  assert a.num_clients == 2

  # cache_dir wins over the environment; an incomplete folder (no marker) is rewritten.
  cfg['cache_dir'] = str(tmp_path / 'own')
  stale = tmp_path / 'own' / name
  (stale / 'dataset').mkdir(parents=True)
  federated.load(cfg, seed=0)
  assert len(writes) == 2 and (stale / '.complete').is_file()
  assert len(list((stale / 'dataset').glob('case_*'))) == 6
  assert sorted(p.name for p in (tmp_path / 'own').iterdir()) == [stale.name]  # No temp left.


@pytest.mark.parametrize('key,value', [
    ('partition', 'random'),
    ('num_clients', -1),
    ('test_fraction', 0.0),
    ('test_fraction', 1.0),
    ('volume_shape', (4, 8)),
    ('volume_shape', (0, 8, 8)),
    ('volume_shape', 'big'),
    ('target_spacing', (1.0, -1.0, 1.0)),
    ('max_cases', -2),
    ('name', 'kits19'),
])
def test_bad_config_values_name_the_key(data_dirs, key, value):
  cfg = _cfg('kits23', data_dirs['kits23'])
  cfg[key] = value
  with pytest.raises(federated.DataConfigError, match=rf'config\.data\.{key}'):
    federated.load(cfg, seed=0)


@pytest.mark.parametrize('task,key', [('kits23', 'volume_shape'), ('kits23', 'site_csv'),
                                      ('brats2024', 'site_column'), ('ham10000', 'image_size'),
                                      ('ham10000', 'test_fraction'), ('kits23', 'num_workers')])
def test_a_missing_key_is_an_error_naming_it(data_dirs, task, key):
  cfg = _cfg(task, data_dirs[task])
  del cfg[key]
  with pytest.raises(federated.DataConfigError, match=rf'config\.data\.{key} is missing'):
    federated.load(cfg, seed=0)


def test_empty_dir_reads_the_phantom_keys(tmp_path):
  cfg = _cfg('kits23', '', cache_dir=str(tmp_path))
  del cfg['phantom_shape']
  with pytest.raises(federated.DataConfigError, match=r'config\.data\.phantom_shape'):
    federated.load(cfg, seed=0)


def test_bad_client_counts_name_the_key(data_dirs):
  root = data_dirs['kits23']
  with pytest.raises(federated.DataConfigError, match=r'config\.data\.num_clients=0.*iid'):
    federated.load(_cfg('kits23', root, partition='iid', num_clients=0), seed=0)
  with pytest.raises(federated.DataConfigError, match=r'config\.data\.num_clients=5.*3 site'):
    federated.load(_cfg('kits23', root, num_clients=5), seed=0)
  with pytest.raises(federated.DataConfigError, match=r'config\.data\.num_clients=9'):
    federated.load(_cfg('kits23', root, partition='iid', num_clients=9), seed=0)
  with pytest.raises(federated.DataConfigError, match=r'config\.data\.image_size'):
    federated.load(_cfg('ham10000', data_dirs['ham10000'], image_size=(16, 0)), seed=0)


@pytest.mark.parametrize('task', list(CASES))
def test_empty_or_missing_data_dir_names_config_data_dir(tmp_path, task):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(federated.DataConfigError, match=r'config\.data\.dir=.*empty.*make-phantoms'):
    federated.load(_cfg(task, tmp_path / 'empty'), seed=0)
  with pytest.raises(federated.DataConfigError, match=r'config\.data\.dir=.*does not exist'):
    federated.load(_cfg(task, tmp_path / 'nowhere'), seed=0)


def test_max_cases_keeps_whole_patients(data_dirs, monkeypatch):
  calls = _spy_split(monkeypatch)
  fd = federated.load(_cfg('brats2024', data_dirs['brats2024'], max_cases=9), seed=1)
  call = calls[-1]
  used = np.concatenate(call['train'] + call['test'])
  assert len(call['groups']) <= 9
  assert fd.partition_summary['max_cases'] == 9
  # Every time point of a kept patient is kept.
  per_patient = {}
  for c in brats.scan(data_dirs['brats2024']):
    per_patient[c.patient_id] = per_patient.get(c.patient_id, 0) + 1
  kept = call['groups'].tolist()
  assert all(kept.count(p) == per_patient[p] for p in set(kept))
  assert len(used) <= len(kept)


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize('task', list(CASES))
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_experiment_configs_are_valid(task, arg):
  c = _experiment(task, arg)
  assert c.data.name == task and c.data.dir == ''
  assert c.privacy.mode == 'dp' and c.privacy.target_epsilon == 8.0 and c.privacy.delta == 1e-5
  assert c.model.name == ('unet2d' if task == 'ham10000' else 'unet3d')
  opts = federated.options(c.data)  # Every key the pipeline reads is there and valid.
  assert opts.partition == 'natural'
  with pytest.raises(AttributeError):
    c.data.dri = '/x'  # Locked: a typo fails.


@pytest.mark.parametrize('key,value', [('name', 'kits19'), ('partition', 'random')])
def test_validate_checks_the_data_choices(key, value):
  c = _experiment('brats2024')
  c.data[key] = value
  with pytest.raises(validation.ConfigError, match=rf'config\.data\.{key}=.*must be one of'):
    validation.validate(c)


def test_tiny_kits23_training_reports_every_region(data_dirs, tmp_path):
  c = _experiment('kits23', 'smoke')
  c.data.dir = str(data_dirs['kits23'])
  c.data.volume_shape = (4, 8, 8)
  c.data.target_spacing = (4.0, 2.0, 2.0)
  c.data.test_fraction = 0.25
  c.data.num_workers = 0
  c.model.features = 4
  c.model.depth = 1
  c.fed.rounds = 2
  c.fed.local_steps = 1
  c.privacy.batch_size = 2
  c.eval.every_rounds = 1
  c.eval.surface_metrics = False
  c.eval.tensorboard = False
  c.checkpoint.every_rounds = 0
  summary = train.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [1, 2]
  for r in rows:
    assert set(r['dice_per_region']) == {'kidney_and_mass', 'mass', 'tumor'}
    assert all(0.0 <= v <= 1.0 for v in r['dice_per_region'].values())
    assert r['privacy_unit'] == 'patient' and r['epsilon'] <= 8.0 + 1e-9
  assert set(summary['dice_per_region']) == {'kidney_and_mass', 'mass', 'tumor'}


def test_pipeline_accepts_a_config_dict(data_dirs):
  cfg = ml_collections.ConfigDict(_cfg('kits23', data_dirs['kits23']))
  fd = federated.load(cfg, seed=0)
  assert fd.example_shape == EXAMPLE['kits23'] and fd.num_clients == 3
