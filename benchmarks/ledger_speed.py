"""Accounting speed: 1000 rounds of a per-round σ schedule, naive dp-accounting vs the Ledger.

The schedule decays linearly from 2.0 to 0.8 over the rounds and is rounded DOWN onto 50 levels
(a controller that picks σ from a fixed grid), q = 0.05, one step per round, δ = 1e-5.

* naive RDP: a fresh ``RdpAccountant`` composing one ``PoissonSampledDpEvent`` per round (the RDP
  vector of every round is recomputed, as in a per-round ``compose`` loop); ε read once at the end.
* ledger RDP: ``Ledger.record`` every round and ``Ledger.epsilon`` every round (online budget
  check), with cold caches.
* ledger PLD: ``Ledger.epsilon`` once at the end (distinct σ grouped), at the given
  discretisation, with cold caches.

Run: ``python benchmarks/ledger_speed.py [--rounds 1000] [--levels 50] [--skip-naive]``.
Timings are single-process CPU timings; use them for ratios.
"""

import argparse
import time

import dp_accounting as dpa
import numpy as np

from adpfl_jax.privacy import accounting


def _schedule(rounds: int, levels: int) -> list[float]:
  grid = np.linspace(0.8, 2.0, levels)
  exact = np.linspace(2.0, 0.8, rounds)
  return [accounting.quantize_noise(float(z), grid) for z in exact]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=1000)
  parser.add_argument('--levels', type=int, default=50)
  parser.add_argument('--sampling-rate', type=float, default=0.05)
  parser.add_argument('--delta', type=float, default=1e-5)
  parser.add_argument('--pld-discretization', type=float, default=1e-3)
  parser.add_argument('--skip-naive', action='store_true')
  args = parser.parse_args()
  q, delta = args.sampling_rate, args.delta
  sigmas = _schedule(args.rounds, args.levels)
  print(f'{args.rounds} rounds, {len(set(sigmas))} distinct σ, q = {q}, δ = {delta}')

  accounting.clear_caches()
  start = time.perf_counter()
  ledger = accounting.Ledger('rdp')
  for z in sigmas:
    ledger.record(accounting.StepSpec(q, z))
    eps_ledger = ledger.epsilon(delta)
  t_ledger = time.perf_counter() - start
  print(f'ledger RDP, record + ε every round: {t_ledger:8.3f} s  ε = {eps_ledger:.6f} '
        f'({len(ledger.runs)} runs; cold caches)')
  start = time.perf_counter()
  warm = accounting.Ledger('rdp')
  for z in sigmas:
    warm.record(accounting.StepSpec(q, z))
    warm.epsilon(delta)
  print(f'  same, warm caches (ε bookkeeping only): {time.perf_counter() - start:8.3f} s')
  accounting.clear_caches()
  start = time.perf_counter()
  once = accounting.Ledger('rdp')
  for z in sigmas:
    once.record(accounting.StepSpec(q, z))
  once.epsilon(delta)
  print(f'ledger RDP, record every round, ε once: {time.perf_counter() - start:8.3f} s '
        '(≈ one dp-accounting RDP vector per distinct σ)')

  accounting.clear_caches()
  start = time.perf_counter()
  pld = accounting.Ledger('pld', pld_discretization=args.pld_discretization)
  pld.extend(ledger.runs)
  eps_pld = pld.epsilon(delta)
  t_pld = time.perf_counter() - start
  print(f'ledger PLD ({args.pld_discretization:g}), ε once:       {t_pld:8.3f} s  '
        f'ε = {eps_pld:.6f}')

  if not args.skip_naive:
    start = time.perf_counter()
    naive = dpa.rdp.RdpAccountant()
    for z in sigmas:
      naive.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)))
    eps_naive = naive.get_epsilon(delta)
    t_naive = time.perf_counter() - start
    print(f'naive RDP, compose every round, ε once: {t_naive:8.3f} s  ε = {eps_naive:.6f}')
    print(f'|ε ledger − ε naive| = {abs(eps_ledger - eps_naive):.2e}; speed-up '
          f'{t_naive / t_ledger:.1f}x (the ledger also computed ε every round)')


if __name__ == '__main__':
  main()
