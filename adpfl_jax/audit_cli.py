"""``adpfl audit``: the one-run privacy audit of a run (``adpfl_jax/privacy/audit.py``).

  adpfl audit --config=experiments/quickstart.py --workdir=runs/a [--config.key=value ...]
      trains with the audit on (``privacy.audit.enabled=True``), like ``adpfl train`` (the
      ``adpfl`` command dispatches this form to training)
  adpfl audit --workdir=runs/a [--significance 0.01] [--json]
      reports the audit of a finished run, per silo, at any significance (from its saved canary
      scores, ``audit_scores.npz``)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from adpfl_jax import jsonio


def build_parser(prog: str = 'adpfl audit') -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=prog, description='Empirical ε lower bound (one-run audit, Steinke, Nasr & Jagielski '
      '2023) of a finished run next to its accounted ε, per silo. With --config, train a run '
      'with the audit on instead (same flags as adpfl train).')
  parser.add_argument('--workdir', required=True, help='a run directory with audit_scores.npz')
  parser.add_argument('--significance', type=float, default=0.05,
                      help='1 - confidence of the lower bound (default 0.05: 95%%)')
  parser.add_argument('--json', action='store_true', help='print the report as one JSON object')
  return parser


def report_run(workdir: str, significance: float) -> dict:
  from adpfl_jax.privacy import audit  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'audit_scores.npz')
  if not os.path.exists(path):
    raise ValueError(f'{path} does not exist: train with --config.privacy.audit.enabled=True '
                     '(or `adpfl audit --config=... --workdir=...`) first')
  if not 0 < significance < 0.5:
    raise ValueError(f'--significance must be in (0, 0.5), got {significance}')
  scores, accounted, delta, names = audit.load_scores(path)
  return audit.report(scores, accounted, delta, significance, names)


def readable(report: dict) -> str:
  lines = [f"One-run audit at {100 * report['confidence']:g}% confidence, δ = {report['delta']:g}, "
           f"{report['canaries_per_silo']} canaries per silo:"]
  for s in report['silos']:
    eps = 'inf' if s['epsilon'] == float('inf') else f"{s['epsilon']:.4f}"
    flag = '' if s['consistent'] else '   <-- ABOVE the accounted ε: the guarantee is refuted'
    lines.append(f"  {s['silo']}: accounted ε = {eps}, audited lower bound = "
                 f"{s['epsilon_lower_bound']:.4f}{flag}")
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    report = report_run(args.workdir, args.significance)
  except ValueError as err:
    print(f'{parser.prog}: error: {err}', file=sys.stderr)
    return 2
  print(jsonio.dumps(report) if args.json else readable(report))
  return 0 if report['consistent'] else 1


if __name__ == '__main__':
  sys.exit(main())
