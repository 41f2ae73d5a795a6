"""Weak scaling over processes: P× the clients on P processes vs 1× the clients on 1 process.

  python benchmarks/scaling.py [--processes 2] [--clients 2] [--rounds 6] [--json]

Trains the same small DP-FL federation (the quickstart model on 16×16 phantom images) twice with
``adpfl train``: ``--clients`` silos (all taking part every round) in one process, then
``--processes`` × ``--clients`` silos in ``--processes`` local processes that form one
``jax.distributed`` cluster (gloo CPU collectives on CPU). Every process gets
``--devices_per_process`` host devices and the ``sharded`` backend splits the clients over the
global mesh, so with ideal scaling both runs take the same time per round. ``seconds_per_round``
is ``metrics.jsonl``'s (rounds after the first, which compiles). ``efficiency`` = seconds per
round of the 1-process run ÷ that of the P-process run (ideal 1.0). With ``--json`` the last line
is one JSON object (its top-level ``processes``, ``clients``, ``seconds_per_round`` are the
P-process run's).

On a machine with fewer free cores than processes × devices the processes share cores, and the
efficiency measures that contention, not the framework: report the core count with the number.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def overrides(clients: int, rounds: int, extra) -> list[str]:
  keys = {'data.num_clients': clients, 'fed.clients_per_round': clients, 'fed.rounds': rounds,
          'data.examples_per_client': 48, 'data.test_examples_per_client': 4,
          'data.image_size': 16, 'model.features': 4, 'fed.local_steps': 2,
          'privacy.batch_size': 8, 'privacy.accountant': 'rdp', 'eval.every_rounds': rounds,
          'checkpoint.every_rounds': 0, 'log.progress': False, 'fed.backend': 'sharded'}
  return [f'--config.{k}={v}' for k, v in keys.items()] + [f'--config.{e}' for e in extra]


def train(workdir: str, processes: int, clients: int, args) -> dict:
  """Runs ``adpfl train`` on ``processes`` local processes; returns the run's timing."""
  cmd = [sys.executable, '-m', 'adpfl_jax', 'train', '--config=quickstart',
         f'--workdir={workdir}', *overrides(clients, args.rounds, args.set)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices_per_process}')
  port = free_port()
  procs = []
  t0 = time.time()
  for i in range(processes):
    flags = [] if processes == 1 else [f'--coordinator_address=localhost:{port}',
                                       f'--num_processes={processes}', f'--process_id={i}']
    procs.append(subprocess.Popen(cmd + flags, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  try:
    outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise SystemExit(f'scaling.py: the {processes}-process run exceeded --timeout={args.timeout}')
  for p, out in zip(procs, outs):
    if p.returncode:
      raise SystemExit(f'scaling.py: a {processes}-process run failed:\n{out[-2000:]}')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    row = [json.loads(line) for line in f if line.strip()][-1]
  return {'processes': processes, 'clients': clients,
          'devices': processes * args.devices_per_process,
          'seconds_per_round': row['seconds_per_round'], 'wall_seconds': time.time() - t0}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--processes', type=int, default=2)
  ap.add_argument('--clients', type=int, default=2, help='clients per process')
  ap.add_argument('--devices_per_process', type=int, default=1)
  ap.add_argument('--rounds', type=int, default=6, help='rounds per run (the first compiles)')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help='config override for both runs (repeatable)')
  ap.add_argument('--timeout', type=float, default=600, help='seconds per run')
  ap.add_argument('--workdir', default=None)
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args(argv)
  for name in ('processes', 'clients', 'devices_per_process'):
    if getattr(args, name) < 1:
      ap.error(f'--{name}={getattr(args, name)} must be >= 1')
  if args.rounds < 2:
    ap.error(f'--rounds={args.rounds} must be >= 2 (the first round compiles)')
  base = args.workdir or tempfile.mkdtemp(prefix='scaling_')
  one = train(os.path.join(base, 'p1'), 1, args.clients, args)
  print(f"1 process, {one['clients']} clients: {one['seconds_per_round']:.3f} s/round", flush=True)
  many = train(os.path.join(base, f'p{args.processes}'), args.processes,
               args.processes * args.clients, args)
  eff = one['seconds_per_round'] / many['seconds_per_round']
  print(f"{args.processes} processes, {many['clients']} clients: "
        f"{many['seconds_per_round']:.3f} s/round; weak-scaling efficiency {eff:.2f} "
        f'(ideal 1.0; {os.cpu_count()} cores on this machine)', flush=True)
  out = {'processes': args.processes, 'clients': many['clients'],
         'seconds_per_round': many['seconds_per_round'], 'efficiency': eff,
         'baseline': one, 'cpu_count': os.cpu_count(),
         'devices_per_process': args.devices_per_process}
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
