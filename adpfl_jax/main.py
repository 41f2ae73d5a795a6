"""The ``adpfl`` command line (also ``python -m adpfl_jax``). Intentionally kept short.

  adpfl train --config=experiments/quickstart.py[:arg] --workdir=DIR [--config.key=value ...]
  adpfl account --noise-multiplier 1.1 --sampling-rate 0.01 --steps 1000 --delta 1e-5 --json
  adpfl audit --workdir=DIR [--significance 0.05] [--json]   (or --config=... to train audited)
  adpfl data make-phantoms --task ham10000 --out DIR --cases N
  adpfl data prepare --task kits23 --data-dir DIR --out DIR
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__


def _train(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'Directory for config.json, metrics.jsonl, summary.json.')
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (get_config).',
                                  lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir'])
  # absl/orbax INFO logs (one per checkpoint step) drown the run's own output: WARNING by
  # default, unless the user asks for a level with absl's --verbosity / -v.
  quiet = not any(a.split('=')[0] in ('--verbosity', '-v', '--v') for a in argv)

  def main(_):
    if quiet:
      logging.set_verbosity(logging.WARNING)
    # Hide accelerators from TensorFlow if a dataset reader imports it.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import jax  # pylint: disable=g-import-not-at-top
    from adpfl_jax import train  # pylint: disable=g-import-not-at-top
    logging.info('JAX devices: %s', jax.devices())
    summary = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    return 0 if summary is not None else 1

  app.run(main, argv=['adpfl train'] + argv)


def run(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(USAGE)
    return 0 if argv else 2
  cmd, rest = argv[0], argv[1:]
  if cmd == 'train':
    _train(rest)
    return 0
  if cmd == 'account':
    from adpfl_jax import account_cli  # pylint: disable=g-import-not-at-top
    return account_cli.main(rest)
  if cmd == 'audit' and any(a.startswith('--config') for a in rest):
    _train(rest + ['--config.privacy.audit.enabled=True'])
    return 0
  if cmd == 'audit':
    from adpfl_jax import audit_cli  # pylint: disable=g-import-not-at-top
    return audit_cli.main(rest)
  if cmd == 'data':
    from adpfl_jax import data_cli  # pylint: disable=g-import-not-at-top
    return data_cli.main(rest)
  print(f'adpfl: unknown command {cmd!r}\n{USAGE}', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(run())
