"""``adpfl account``: ε of a planned DP-SGD run, or the noise multiplier for a target ε.

Record-level DP inside one silo, add/remove-one neighbours, Poisson sampling at rate q, ``steps``
local steps. Examples::

  python -m adpfl_jax.account_cli --noise-multiplier 1.1 --sampling-rate 0.01 --steps 1000 \
      --delta 1e-5 --json
  python -m adpfl_jax.account_cli --target-epsilon 2 --sampling-rate 0.01 --steps 1000 \
      --delta 1e-5 --accountant pld
  python -m adpfl_jax.account_cli --noise-multiplier 1.5 --sampling-rate 0.05 --steps 200 \
      --delta 1e-5 --schedule exponential --schedule-param rate=0.99 --steps-per-round 2

With ``--schedule`` the step's σ is ``noise_multiplier · shape(round)``, rounds =
steps / steps-per-round, and ``--noise-multiplier`` (or the calibrated value) is the scale. The
plan and the calibration are training's own (``calibration.SiloPlan`` / ``calibrate``): for the
same inputs ``--target-epsilon`` prints the σ a training run uses, to the last digit.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Optional, Sequence

from adpfl_jax import jsonio
from adpfl_jax.configs import default
from adpfl_jax.privacy import accounting
from adpfl_jax.privacy import calibration
from adpfl_jax.privacy import schedules


def _parse_param(text: str) -> tuple[str, Any]:
  if '=' not in text:
    raise argparse.ArgumentTypeError(f'--schedule-param {text!r} must look like key=value')
  key, value = text.split('=', 1)
  key = key.strip()
  try:
    number: Any = float(value)
  except ValueError as err:
    raise argparse.ArgumentTypeError(
        f'--schedule-param {text!r}: value {value!r} is not a number') from err
  if number.is_integer() and key in ('every', 'rounds'):
    number = int(number)
  return key, number


def build_parser(prog: str = 'adpfl account') -> argparse.ArgumentParser:
  """The argument parser of ``adpfl account``."""
  parser = argparse.ArgumentParser(
      prog=prog, description='Record-level (ε, δ) of Poisson-subsampled DP-SGD in one silo '
      '(add/remove-one neighbours), computed with dp-accounting.')
  noise = parser.add_mutually_exclusive_group(required=True)
  noise.add_argument('--noise-multiplier', type=float,
                     help='noise std / clip norm (the schedule scale with --schedule)')
  noise.add_argument('--target-epsilon', type=float,
                     help='print the smallest noise multiplier (scale) with ε ≤ this value')
  parser.add_argument('--sampling-rate', type=float, required=True, help='Poisson rate q')
  parser.add_argument('--steps', type=int, required=True, help='number of local steps')
  parser.add_argument('--delta', type=float, required=True, help='target δ')
  parser.add_argument('--accountant', choices=accounting.ACCOUNTANTS,
                      default=default.get_config().privacy.accountant,
                      help='the default is the one training uses (config privacy.accountant)')
  parser.add_argument('--mechanism', choices=accounting.MECHANISMS, default='gaussian',
                      help='gaussian (L2 clip) or laplace (L1 clip; needs --accountant pld '
                      'when q < 1)')
  parser.add_argument('--schedule', choices=schedules.KINDS, default='constant')
  parser.add_argument('--schedule-param', type=_parse_param, action='extend', nargs='+',
                      default=[], metavar='KEY=VALUE',
                      help='schedule shape parameter, e.g. rate=0.99 or factor=0.5 every=100')
  parser.add_argument('--steps-per-round', type=int, default=1,
                      help='local steps per round (the schedule advances once per round)')
  parser.add_argument('--truncated-batch-size', type=int, default=None,
                      help='fixed padded batch size (truncated Poisson sampling)')
  parser.add_argument('--dataset-size', type=int, default=None,
                      help='silo record count (required with --truncated-batch-size)')
  parser.add_argument('--pld-discretization', type=float,
                      default=accounting.DEFAULT_PLD_DISCRETIZATION,
                      help='PLD discretisation of the reported ε (calibration itself uses the '
                      'coarse grid training uses, so both find the same σ)')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  return parser


def silo_plan(args: argparse.Namespace) -> calibration.SiloPlan:
  """The planned run the arguments describe, exactly as training would plan one silo."""
  if args.steps < 1:
    raise ValueError(f'--steps must be >= 1, got {args.steps}')
  if args.steps_per_round < 1 or args.steps % args.steps_per_round:
    raise ValueError(f'--steps-per-round={args.steps_per_round} must be >= 1 and divide '
                     f'--steps={args.steps}')
  rounds = args.steps // args.steps_per_round
  params = schedules.validate_params(args.schedule, dict(args.schedule_param), rounds)
  accounting.check_sampling_rate(args.sampling_rate, '--sampling-rate')
  truncated = args.truncated_batch_size
  if (truncated is None) != (args.dataset_size is None):
    raise ValueError('--truncated-batch-size and --dataset-size go together')
  return calibration.SiloPlan(
      sampling_rate=float(args.sampling_rate), rounds=tuple(range(rounds)),
      steps_per_round=args.steps_per_round, schedule=args.schedule,
      schedule_params=tuple(sorted(params.items())),
      accountant=accounting.check_accountant(args.accountant), mechanism=args.mechanism,
      truncated_batch_size=truncated, dataset_size=args.dataset_size,
      quantize=args.schedule != 'constant')


def account(args: argparse.Namespace) -> dict[str, Any]:
  """Computes the report for parsed arguments (raises ValueError on invalid values)."""
  plan = silo_plan(args)
  delta = accounting.check_delta(args.delta)
  if args.target_epsilon is not None:
    target = accounting.check_target_epsilon(args.target_epsilon, '--target-epsilon')
    scale = calibration.calibrate(plan, target, delta)
  else:
    scale = accounting.check_noise_multiplier(args.noise_multiplier, '--noise-multiplier')
  runs = plan.runs(scale)
  ledger = accounting.Ledger(plan.accountant, pld_discretization=args.pld_discretization)
  ledger.extend(runs)
  epsilon = ledger.epsilon(delta)
  sigmas = [plan.sigma(scale, r) for r in plan.rounds]  # what the device adds
  report: dict[str, Any] = {
      'epsilon': epsilon,
      'delta': delta,
      'noise_multiplier': scale,
      'sampling_rate': float(args.sampling_rate),
      'steps': args.steps,
      'accountant': plan.accountant,
      'mechanism': args.mechanism,
      'neighboring_relation': 'add_or_remove_one',
      'unit': 'record (per silo)',
      'schedule': args.schedule,
  }
  if args.target_epsilon is not None:
    report['target_epsilon'] = float(args.target_epsilon)
  if args.schedule != 'constant':
    report.update(schedule_params=dict(plan.schedule_params),
                  steps_per_round=args.steps_per_round, min_noise_multiplier=min(sigmas),
                  max_noise_multiplier=max(sigmas),
                  noise_grid=calibration.NOISE_GRID[plan.accountant])
  if args.truncated_batch_size is not None:
    report.update(truncated_batch_size=args.truncated_batch_size, dataset_size=args.dataset_size)
  if plan.accountant == 'pld':
    report['pld_discretization'] = args.pld_discretization
  return report


def _readable(report: dict[str, Any]) -> str:
  eps = report['epsilon']
  eps_text = 'inf' if math.isinf(eps) else f'{eps:.6g}'
  sched = '' if report['schedule'] == 'constant' else (
      f" {report['schedule']} schedule {report['schedule_params']},"
      f" σ in [{report['min_noise_multiplier']:.6g}, {report['max_noise_multiplier']:.6g}],")
  target = ('' if 'target_epsilon' not in report
            else f" (smallest σ scale for ε ≤ {report['target_epsilon']:g})")
  return (f"ε = {eps_text} at δ = {report['delta']:g} [{report['accountant']}, record-level, "
          f"add/remove-one]: {report['mechanism']} noise multiplier "
          f"{report['noise_multiplier']:.6g}{target},{sched} Poisson q = "
          f"{report['sampling_rate']:g}, {report['steps']} steps")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of ``adpfl account``; returns the exit status."""
  parser = build_parser()
  args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
  try:
    report = account(args)
  except ValueError as err:
    print(f'{parser.prog}: error: {err}', file=sys.stderr)
    return 2
  # Strict JSON: ε = ∞ (no noise) is written as null.
  print(jsonio.dumps(report) if args.json else _readable(report))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
