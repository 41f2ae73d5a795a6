"""Every command the README shows runs as written (small), and its Python API example works.

Commands run in a temporary directory with ``.venv/bin/adpfl`` as ``python -m adpfl_jax`` (the same
entry point). Trainings of full-size configs get ``--show_config`` appended: their config, every
override and the flags are checked, without the minutes of training. ``make`` targets are checked
with ``make -n``.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
README = open(os.path.join(ROOT, 'README.md')).read()


def _blocks(language):
  return re.findall(rf'```{language}\n(.*?)```', README, re.S)


def _commands():
  out = []
  for block in _blocks('bash'):
    for line in block.splitlines():
      line = line.split('  #')[0].strip()
      if line:
        out.append(line)
  return out


def _run(argv, cwd, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_readme_is_short_and_starts_with_the_two_commands():
  assert len(README.encode()) < 10_500
  first = _blocks('bash')[0].splitlines()
  assert first[0].startswith('make demo') and first[1].startswith('make test')
  assert '../shared' not in README


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp('readme')


def test_every_readme_command_runs(workdir):
  commands = _commands()
  assert len(commands) >= 12
  for line in commands:
    argv = shlex.split(line)
    if argv[0] == 'make':
      proc = _run(['make', '-n', '-C', ROOT, *argv[1:]], workdir)
      assert proc.returncode == 0, (line, proc.stderr)
      continue
    if argv[0] == '.venv/bin/adpfl':
      argv = [sys.executable, '-m', 'adpfl_jax', *argv[1:]]
      trains = argv[3] == 'train' or (argv[3] == 'audit' and any('--config' in a for a in argv))
      if trains and '--show_config' not in argv:
        argv.append('--show_config')
    elif argv[0] == 'python':
      argv[0] = sys.executable
    proc = _run(argv, workdir)
    assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stdout.strip(), line


def test_python_api_example_and_ledger_one_liner(workdir):
  (code,) = _blocks('python')
  proc = _run([sys.executable, '-c', code], workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r'Dice 0\.\d{3} at ε = [34]\.\d\d', proc.stdout), proc.stdout[-2000:]
  assert os.path.exists(workdir / 'runs' / 'api' / 'summary.json')
  # The README's one-liner recomputes ε from ledger.json with nothing but the ledger.
  one_liner = next(line for line in README.splitlines() if 'Ledger.from_dict' in line)
  command = one_liner.strip().strip('`').replace('runs/smoke', 'runs/api')
  proc = _run(shlex.split(command.replace('python ', f'{sys.executable} ', 1)), workdir)
  assert proc.returncode == 0, proc.stderr
  values = [float(v) for v in re.findall(r'[\d.]+', proc.stdout)]
  assert len(values) == 4 and all(3.9 < v <= 4.0 for v in values)
