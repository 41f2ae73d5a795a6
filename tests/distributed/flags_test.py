"""The distributed flags: checked before anything starts, one-line errors naming the flag."""

import pytest

from adpfl_jax import distributed
from adpfl_jax import main


def _flags(**kw):
  base = {'coordinator_address': None, 'num_processes': None, 'process_id': None,
          'distributed': False}
  return distributed.parse_flags({**base, **kw})


def test_no_flags_is_one_process_and_distributed_alone_autodetects():
  assert _flags() is None
  assert _flags(distributed=True) == {}
  assert _flags(coordinator_address='node1:1234', num_processes='4', process_id='3') == {
      'coordinator_address': 'node1:1234', 'num_processes': 4, 'process_id': 3}


@pytest.mark.parametrize('kw, flag', [
    ({'coordinator_address': 'localhost:1'}, '--num_processes'),
    ({'coordinator_address': 'localhost', 'num_processes': '2', 'process_id': '0'},
     '--coordinator_address'),
    ({'coordinator_address': 'h:1', 'num_processes': 'two', 'process_id': '0'},
     '--num_processes'),
    ({'coordinator_address': 'h:1', 'num_processes': '0', 'process_id': '0'}, '--num_processes'),
    ({'coordinator_address': 'h:1', 'num_processes': '2', 'process_id': '2'}, '--process_id'),
])
def test_bad_flags_name_the_flag(kw, flag):
  with pytest.raises(distributed.DistributedError, match=flag):
    _flags(**kw)


def test_train_cli_reports_a_bad_flag_in_one_line(capsys):
  code = main.run(['train', '--config=quickstart', '--workdir=/tmp/unused',
                   '--coordinator_address=localhost:1', '--num_processes=2',
                   '--process_id=5'])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert len(err.splitlines()) == 1 and '--process_id=5' in err, err
  args = main.parse_train_args(['--config=q', '--num_processes', '2', '--distributed'])
  assert args['num_processes'] == '2' and args['distributed']


def test_distributed_without_a_cluster_is_a_one_line_error(capsys, monkeypatch):
  for var in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(var, raising=False)
  code = main.run(['train', '--config=quickstart', '--workdir=/tmp/unused', '--distributed'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and '--distributed' in err, err
