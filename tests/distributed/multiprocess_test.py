"""Two local processes (gloo CPU collectives, 2 host devices each) give the answers of one process.

Each test launches ``adpfl train`` (or ``experiments/sweep.py``) as 2 processes that form one
``jax.distributed`` cluster with a 4-device global mesh, and compares with the same run in this
pytest process (4 forced host devices, ``tests/conftest.py``): params to float tolerance, ledgers
and ε identical, ``metrics.jsonl`` equal up to timing fields. A hung collective fails the test
after ``TIMEOUT`` seconds instead of hanging.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
TIMEOUT = 240
# One persistent compilation cache for every launched process of this module: a relaunch (the
# resume test) loads the compiled round instead of compiling it again.
CACHE = tempfile.mkdtemp(prefix='adpfl_mp_jit_cache_')
TIMING = ('wall_seconds', 'examples_per_second', 'seconds_per_round')
# The tiny config of tests/conftest.py as overrides of the packaged quickstart config (both are
# configs/default.py plus these keys), 4 rounds, a checkpoint every round, clients sharded.
TINY = {
    'data.num_clients': 4, 'data.examples_per_client': 24, 'data.test_examples_per_client': 4,
    'data.image_size': 8, 'model.features': 4, 'model.depth': 1, 'model.groups': 2,
    'fed.rounds': 4, 'fed.local_steps': 2, 'fed.clients_per_round': 4, 'privacy.batch_size': 6,
    'privacy.accountant': 'rdp', 'eval.every_rounds': 1, 'eval.batch_size': 8,
    'log.progress': False, 'checkpoint.every_rounds': 1, 'fed.backend': 'sharded',
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(args, n: int = 2):
  """Starts ``python ARGS`` as ``n`` processes of one cluster; returns the Popen objects."""
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  return [subprocess.Popen(
      [sys.executable, *args, f'--coordinator_address=localhost:{port}',
       f'--num_processes={n}', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(n)]


def wait_all(procs, timeout: float = TIMEOUT):
  """Waits for every process; kills them all and fails on a timeout or a non-zero exit."""
  deadline = time.time() + timeout
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
      outs.append(out)
  except subprocess.TimeoutExpired:
    kill_all(procs)
    pytest.fail(f'multi-process run did not finish in {timeout} s (hung collective?)')
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()


def train_args(workdir):
  return ['-m', 'adpfl_jax', 'train', '--config=quickstart', f'--workdir={workdir}',
          *[f'--config.{k}={v}' for k, v in TINY.items()]]


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in f if line.strip()]


def read_json(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def final_params(workdir):
  """(round, params leaves) of the newest checkpoint (saved by any number of processes), read
  onto this process's first device."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = os.path.join(os.path.abspath(workdir), 'checkpoints')
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  path = os.path.join(ckpt, str(step), 'state')
  reader = ocp.StandardCheckpointer()
  meta = reader.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  state = reader.restore(path, abstract)
  reader.close()
  return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(state['params'])]


def assert_same_run(a, b, *, rtol=1e-5, atol=1e-6):
  """Two workdirs of the same config: same ledgers and ε, metrics, final params (tolerance)."""
  assert read_json(a, 'ledger.json') == read_json(b, 'ledger.json')
  sa, sb = read_json(a, 'summary.json'), read_json(b, 'summary.json')
  assert sa['epsilon_per_client'] == sb['epsilon_per_client']
  assert sa['rounds'] == sb['rounds']
  ra, rb = rows(a), rows(b)
  assert [r['round'] for r in ra] == [r['round'] for r in rb]
  for x, y in zip(ra, rb):
    for key in x:
      if key.startswith('dice') or key in ('update_norm', 'train_loss'):
        np.testing.assert_allclose(_nums(x[key]),
                                   _nums(y[key]), rtol=1e-4, atol=1e-5, err_msg=key)
      else:
        assert x[key] == y[key], key
  (step_a, pa), (step_b, pb) = final_params(a), final_params(b)
  assert step_a == step_b == sa['rounds']
  for u, v in zip(pa, pb):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def _nums(v):
  if isinstance(v, dict):
    return np.array([v[k] for k in sorted(v)], np.float64)
  return np.asarray(v, np.float64)


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """The tiny run trained uninterrupted by 2 processes × 2 devices."""
  workdir = str(tmp_path_factory.mktemp('mp') / 'run')
  outs = wait_all(launch(train_args(workdir)))
  assert 'process 0 of 2, 2 of 4 devices' in outs[0]
  assert 'outputs are written by process 0' in outs[1]
  return workdir


def test_two_processes_equal_one_process(two_process_run, tiny_config, tmp_path):
  from adpfl_jax import train  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4
  ref = str(tmp_path / 'one_process')
  trainer = train.Trainer(tiny_config(**TINY), ref)
  trainer.run()
  assert trainer.round.jitted[0]._cache_size() == 1  # the sharded step compiles once
  assert_same_run(two_process_run, ref)
  assert read_json(two_process_run, 'summary.json')['backend'] == 'sharded'
  # And one device (clients mapped, not sharded): the same function, to float tolerance.
  one = str(tmp_path / 'one_device')
  train.Trainer(tiny_config(**{**TINY, 'fed.backend': 'map'}), one).run()
  assert read_json(one, 'ledger.json') == read_json(two_process_run, 'ledger.json')
  (_, pa), (_, pb) = final_params(one), final_params(two_process_run)
  for u, v in zip(pa, pb):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_sigkill_both_processes_and_resume(two_process_run, tmp_path):
  workdir = str(tmp_path / 'killed')
  procs = launch(train_args(workdir))
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + TIMEOUT
  logged = 0
  while time.time() < deadline and all(p.poll() is None for p in procs) and logged < 2:
    time.sleep(0.02)
    if os.path.exists(metrics):
      with open(metrics) as f:
        logged = sum(1 for line in f if line.strip())
  kill_all(procs)
  assert logged >= 2, 'the run ended or hung before its second round'
  assert not os.path.exists(os.path.join(workdir, 'summary.json')), 'killed too late'
  outs = wait_all(launch(train_args(workdir)))
  assert 'Resumed from round' in outs[0]
  assert_same_run(two_process_run, workdir, rtol=0, atol=0)


def test_sweep_group_two_processes(tmp_path):
  """A 2-trial sweep group (seeds 0, 1) on 2 processes equals the same sweep in one process."""
  args = ['experiments/sweep.py', '--smoke', '--epsilons', '8', '--seeds', '0', '1',
          '--methods', 'dpfl', '--no-reference', '--set', 'fed.rounds=2',
          '--set', 'data.image_size=8', '--set', 'data.examples_per_client=24',
          '--set', 'data.test_examples_per_client=4', '--set', 'model.depth=1']
  multi = str(tmp_path / 'multi')
  outs = wait_all(launch([*args, '--out', multi]))
  assert '2 trials' in outs[0]
  spec = importlib.util.spec_from_file_location(
      'sweep_under_test', os.path.join(ROOT, 'experiments', 'sweep.py'))
  sweep_script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep_script)
  single = str(tmp_path / 'single')
  assert sweep_script.main([*args[1:], '--out', single]) == 0
  trials = [os.path.join('dpfl', 'eps_8', f'seed_{s}') for s in (0, 1)]
  for t in trials:
    assert_same_run(os.path.join(multi, t), os.path.join(single, t))
  with open(os.path.join(multi, 'frontier.csv')) as f, \
       open(os.path.join(single, 'frontier.csv')) as g:
    assert len(f.read().splitlines()) == len(g.read().splitlines()) == 3
