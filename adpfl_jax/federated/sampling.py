"""Host-side sampling plans: which clients take part, and which examples each local step uses.

Everything is a pure function of ``(seed, round, client)`` via NumPy ``SeedSequence`` entropy, so a
run replays exactly and can be resumed from any round. The plan is data-independent: it depends on
the public, configured client sizes only. Which clients take part is public (the guarantee is per
record inside a silo); which *examples* a step uses is secret randomness of the DP mechanism, so
Poisson batches are drawn from the run's ``entropy`` = ``(seed, identity)``, where ``identity``
(``configs.identity.run_identity``) hashes the whole training config: two runs that differ in
anything (e.g. sweep trials of one seed at several ε) never share their batches.

Poisson sampling inside a client is realised as fixed-size padded index arrays plus masks (static
shapes for jit). The array holds ``max_batch`` slots, chosen by the privacy plan
(``privacy/plan.py``, ``max_batch_size``: ``ceil(m + k·sd)`` where ``m = q·n`` is the expected
batch and ``sd = sqrt(n·q·(1-q))``). If a Poisson draw is larger than
``max_batch`` (probability about 3e-5 per step for k = 4), a uniformly random subset of
``max_batch`` of the drawn examples is kept: this is *truncated* Poisson sampling, and the ledger
accounts it as such (``TruncatedSubsampledGaussianDpEvent``, arXiv 2508.15089) whenever truncation
is possible for the client or its add-one neighbour (``max_batch <= n``), so the reported ε stays
an upper bound. With ``max_batch_sigmas=inf`` the array holds n + 1 slots and nothing is ever
truncated.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_PARTICIPATION = 0x5A11
_EXAMPLES = 0xE4A3


def participation(seed: int, rounds: int, num_clients: int, clients_per_round: int) -> np.ndarray:
  """(rounds, K) bool: which clients take part in each round (public, a function of the seed)."""
  out = np.zeros((rounds, num_clients), bool)
  for r in range(rounds):
    out[r, participating_clients(seed, r, num_clients, clients_per_round)] = True
  return out


def participating_clients(seed: int, round_: int, num_clients: int,
                          clients_per_round: int) -> np.ndarray:
  """Sorted ids of the clients sampled (uniformly, without replacement) in ``round_``."""
  if not 1 <= clients_per_round <= num_clients:
    raise ValueError(f'fed.clients_per_round={clients_per_round} must be in [1, {num_clients}]')
  if clients_per_round == num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, round_, _PARTICIPATION])
  return np.sort(rng.choice(num_clients, clients_per_round, replace=False)).astype(np.int32)


class BatchPlan(NamedTuple):
  """Example indices and masks of one client's local steps in one round."""

  indices: np.ndarray  # (steps, max_batch) int32, 0 in padded slots
  mask: np.ndarray  # (steps, max_batch) float32
  truncated: int  # how many steps were truncated


def poisson_plan(entropy, round_: int, client: int, n: int, q: float, steps: int,
                 max_batch: int) -> BatchPlan:
  """Poisson-samples ``steps`` batches (rate ``q``) from ``n`` examples into ``max_batch`` slots.

  ``entropy``: the run's secret sampling entropy, an int or a tuple of ints (``(seed, identity)``).
  """
  rng = np.random.default_rng([*_words(entropy), round_, client, _EXAMPLES])
  indices = np.zeros((steps, max_batch), np.int32)
  mask = np.zeros((steps, max_batch), np.float32)
  truncated = 0
  for s in range(steps):
    chosen = np.flatnonzero(rng.random(n) < q)
    if chosen.size > max_batch:
      chosen = np.sort(rng.choice(chosen, max_batch, replace=False))
      truncated += 1
    indices[s, :chosen.size] = chosen
    mask[s, :chosen.size] = 1.0
  return BatchPlan(indices, mask, truncated)


def _words(entropy) -> list[int]:
  return [int(e) for e in entropy] if isinstance(entropy, (tuple, list)) else [int(entropy)]


def round_plan(entropy, round_: int, clients: np.ndarray, sizes: np.ndarray,
               rates: np.ndarray, steps: int, max_batch: int):
  """Stacked plans for the participating ``clients``: indices/masks of shape (M, steps, B)."""
  plans = [poisson_plan(entropy, round_, int(c), int(sizes[c]), float(rates[c]), steps, max_batch)
           for c in clients]
  return (np.stack([p.indices for p in plans]), np.stack([p.mask for p in plans]),
          sum(p.truncated for p in plans))


_FAULTS = 0xFA17


def client_ids(value) -> list[int]:
  """Client ids from a comma-separated string (``faults.nan_clients``) or a sequence."""
  if isinstance(value, str):
    return [int(v) for v in value.replace(' ', '').split(',') if v]
  return [int(v) for v in value]


class FaultPlan(NamedTuple):
  """Injected faults of one round (a pure function of (seed, round), like the sampling plan)."""

  active: np.ndarray  # (M, steps) float32: 1 for local steps the client runs
  poison: np.ndarray  # (M,) float32: 1 for clients that send a non-finite update
  dropped: np.ndarray  # (M,) bool: clients that dropped out (no update, nothing spent)


def fault_plan(seed: int, round_: int, clients: np.ndarray, steps: int, *, dropout: float = 0.0,
               straggler_fraction: float = 0.0, straggler_min_steps: int = 1,
               nan_clients=()) -> FaultPlan:
  """Dropout (no update), stragglers (fewer local steps) and poisoned (NaN) clients."""
  m = len(clients)
  rng = np.random.default_rng([seed, round_, _FAULTS])
  dropped = rng.random(m) < dropout
  straggle = rng.random(m) < straggler_fraction
  ran = np.where(straggle, rng.integers(straggler_min_steps, steps + 1, size=m), steps)
  ran = np.where(dropped, 0, ran)
  active = (np.arange(steps)[None, :] < ran[:, None]).astype(np.float32)
  poison = np.isin(clients, np.asarray(list(nan_clients), np.int64)).astype(np.float32)
  poison = np.where(dropped, 0.0, poison).astype(np.float32)
  return FaultPlan(active=active, poison=poison, dropped=dropped)
