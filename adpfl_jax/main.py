"""The ``adpfl`` command (also ``python -m adpfl_jax``).

  adpfl train --config=CONFIG[:ARG] --workdir=DIR [--config.KEY=VALUE ...] [--show_config]
  adpfl audit --workdir=DIR [--significance 0.05] [--json]    (with --config=…: train audited)
  adpfl account --noise-multiplier 1.1 --sampling-rate 0.01 --steps 1000 --delta 1e-5
  adpfl data make-phantoms --task kits23 --out DIR --cases N
  adpfl data prepare --task kits23 --data-dir DIR --out DIR --config kits23

CONFIG is a config file (``experiments/quickstart.py``) or the name of a config that ships with
the package (quickstart, ham10000, kits23, brats2024). Errors are one line on stderr naming the
key, file or case, with exit status 2 (``--debug`` shows the traceback); Ctrl-C saves a checkpoint
and exits 130 (rerun the same command to resume).
"""

from __future__ import annotations

import os
import sys
import time

TRAIN_HELP = """usage: adpfl train --config=CONFIG[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

Trains one federated run and writes its outputs into DIR (a rerun resumes it).

  --config=CONFIG[:ARG]   a config file (e.g. experiments/quickstart.py, experiments/kits23.py:smoke)
                          or a packaged name: quickstart, ham10000, kits23, brats2024
  --workdir=DIR           output directory: config.json, metrics.jsonl, summary.json,
                          ledger.json, plots/, checkpoints/, tensorboard/
  --config.KEY=VALUE      override any config key, e.g. --config.privacy.target_epsilon=4
  --show_config           print the resolved config, every key with its meaning, and exit
  --debug                 show tracebacks instead of one-line errors
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                          one run over N processes (jax.distributed; every process gets the
                          same command with its own --process_id); only process 0 writes DIR
  --distributed           the same, with the cluster detected by JAX (e.g. inside srun)
  -v, --verbosity=N       log level of absl/orbax messages (default: warnings only)

Every key and its meaning: adpfl train --config=quickstart --show_config
"""


class UsageError(ValueError):
  """A command-line argument is wrong; the message names it."""


def _version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version('adpfl_jax')
  except metadata.PackageNotFoundError:
    return 'unknown (not installed)'


def parse_train_args(argv):
  """``--config``, ``--workdir``, ``--config.KEY=VALUE`` overrides and switches."""
  out = {'config': None, 'workdir': None, 'overrides': [], 'show_config': False,
         'debug': False, 'verbosity': None, 'help': False, 'coordinator_address': None,
         'num_processes': None, 'process_id': None, 'distributed': False}
  cluster_flags = ('--coordinator_address', '--num_processes', '--process_id')
  args = list(argv)
  while args:
    arg = args.pop(0)
    name, eq, value = arg.partition('=')
    takes_value = name in ('--config', '--workdir', '--verbosity', '-v') + cluster_flags or (
        name.startswith('--config.'))
    if takes_value and not eq:
      if not args:
        raise UsageError(f'{name} needs a value')
      value = args.pop(0)
    if name in ('-h', '--help', '--helpfull'):
      out['help'] = True
    elif name == '--config':
      out['config'] = value
    elif name == '--workdir':
      out['workdir'] = value
    elif name.startswith('--config.'):
      out['overrides'].append((name[len('--config.'):], value))
    elif name in ('--show_config', '--show-config'):
      out['show_config'] = True
    elif name == '--debug':
      out['debug'] = True
    elif name in ('--verbosity', '-v'):
      out['verbosity'] = value
    elif name in cluster_flags:
      out[name[2:]] = value
    elif name == '--distributed':
      out['distributed'] = True
    else:
      raise UsageError(f'unknown argument {arg!r} (adpfl train --help lists the flags)')
  return out


def _train(argv) -> int:
  args = parse_train_args(argv)
  if args['help']:
    print(TRAIN_HELP, end='')
    return 0
  if not args['config']:
    raise UsageError('--config is required (e.g. --config=quickstart)')
  from adpfl_jax.configs import loading  # pylint: disable=g-import-not-at-top
  config = loading.load(args['config'], args['overrides'])
  if args['show_config']:
    print(loading.describe(config, args['config']))
    return 0
  workdir = args['workdir']
  if not workdir:
    raise UsageError('--workdir is required')
  cluster = _join_cluster(args)
  t0 = time.time()
  print(f'adpfl train: {args["config"]} → {workdir}{cluster}', flush=True)
  from adpfl_jax.configs import identity  # pylint: disable=g-import-not-at-top
  if identity.check_workdir(config, workdir):
    print('  the workdir holds another config; resuming anyway (checkpoint.force)', flush=True)
  _quiet_logs(args['verbosity'])
  print('  loading JAX and checking the config…', flush=True)
  from adpfl_jax import train  # pylint: disable=g-import-not-at-top
  from adpfl_jax import validation  # pylint: disable=g-import-not-at-top
  validation.validate(config)
  print(f'  building the run (data, privacy plan, model) [{time.time() - t0:.1f} s]', flush=True)
  summary = train.train_and_evaluate(config, workdir)
  if summary['stopped_reason'].startswith('interrupted'):
    return 130
  return 0


def _join_cluster(args) -> str:
  """Joins a jax.distributed cluster when the flags ask for one (before any other JAX use).

  Returns a note for the first line. Processes other than 0 print nothing after it (process 0
  reports the run and writes every output).
  """
  names = ('coordinator_address', 'num_processes', 'process_id', 'distributed')
  if not any(args[k] for k in names):
    return ''  # one process: JAX is imported later, after the first line
  from adpfl_jax import distributed  # pylint: disable=g-import-not-at-top
  kwargs = distributed.parse_flags({k: args[k] for k in names})
  if not distributed.initialize(kwargs):
    return ''
  import jax  # pylint: disable=g-import-not-at-top
  note = (f' [process {jax.process_index()} of {jax.process_count()}, '
          f'{jax.local_device_count()} of {jax.device_count()} devices]')
  if not distributed.is_lead():
    print(f'adpfl train: {args["config"]}{note}: outputs are written by process 0', flush=True)
    sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with
  return note


def _quiet_logs(verbosity) -> None:
  """absl/orbax INFO logs (one per checkpoint step) drown a run's own output: warnings only,
  unless ``--verbosity`` asks for more."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING if verbosity is None else int(verbosity))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def run(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(__doc__.strip())
    return 0 if argv else 2
  if argv[0] == '--version':
    print(f'adpfl_jax {_version()}')
    return 0
  cmd, rest = argv[0], argv[1:]
  debug = '--debug' in rest or bool(os.environ.get('ADPFL_DEBUG'))
  try:
    if cmd == 'train':
      return _train(rest)
    if cmd == 'audit' and any(a.startswith('--config') for a in rest):
      return _train(rest + ['--config.privacy.audit.enabled=True'])
    if cmd == 'audit':
      from adpfl_jax import audit_cli  # pylint: disable=g-import-not-at-top
      return audit_cli.main(rest)
    if cmd == 'account':
      from adpfl_jax import account_cli  # pylint: disable=g-import-not-at-top
      return account_cli.main(rest)
    if cmd == 'data':
      from adpfl_jax import data_cli  # pylint: disable=g-import-not-at-top
      return data_cli.main(rest)
  except BrokenPipeError:  # `adpfl … | head`: the reader left; not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  except (ValueError, OSError) as err:
    if debug:
      raise
    message = ' '.join(str(err).split()) or type(err).__name__
    print(f'adpfl {cmd}: error: {message}', file=sys.stderr)
    return 2
  print(f'adpfl: unknown command {cmd!r} (adpfl --help lists them)', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(run())
