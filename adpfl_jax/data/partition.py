"""Client partitions and grouped train/test splits (host-side NumPy).

Every function here works on plain index arrays, so the same code partitions
HAM10000 images, KiTS23 cases or BraTS subjects. Randomness comes only from the
`seed` argument (`np.random.default_rng`), so a partition is a pure function of
its inputs.

Grouping: medical data sets hold several examples per patient or lesion (e.g.
HAM10000 `lesion_id`). Pass `groups` to make a whole group the unit that is
assigned to a client or to a split, so no group is ever on two sides;
`subsample_groups` keeps whole groups and `one_per_group` keeps one example of
each (the privacy unit, docs/datasets.md §1.2, §3.1).

Example:

  >>> import numpy as np
  >>> parts = iid(10, num_clients=3, seed=0)
  >>> sorted(len(p) for p in parts)
  [3, 3, 4]
  >>> train, test = grouped_train_test_split(['a', 'a', 'b', 'c'], 0.25, seed=0)
  >>> len(train) + len(test)
  4
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

#: Partition methods (`config.data.partition`).
PARTITIONS = ('natural', 'iid', 'dirichlet')

_MAX_DIRICHLET_TRIES = 1000


def _as_1d(values: Sequence[Any] | np.ndarray, name: str) -> np.ndarray:
  """Returns `values` as a 1-D array; raises a clear error otherwise."""
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise ValueError(f'`{name}` must be 1-D, got shape {arr.shape}.')
  return arr


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns (uniques, codes) with uniques in sorted order (deterministic)."""
  if values.dtype == object:
    # np.unique on object arrays needs comparable items: compare as str.
    keys = np.array([str(v) for v in values])
    uniques, first, codes = np.unique(keys, return_index=True, return_inverse=True)
    return values[first], codes.reshape(-1)
  uniques, codes = np.unique(values, return_inverse=True)
  return uniques, codes.reshape(-1)


def _group_units(
    n: int, groups: Sequence[Hashable] | np.ndarray | None
) -> list[np.ndarray]:
  """Splits range(n) into units: one per group (or one per example)."""
  if groups is None:
    return [np.array([i]) for i in range(n)]
  g = _as_1d(groups, 'groups')
  if len(g) != n:
    raise ValueError(f'`groups` has length {len(g)} but there are {n} examples.')
  _, codes = _factorize(g)
  order = np.argsort(codes, kind='stable')
  bounds = np.flatnonzero(np.diff(codes[order])) + 1
  return list(np.split(order, bounds))


def _check_num_clients(num_clients: int | None, num_units: int, what: str) -> int:
  if num_clients is None or int(num_clients) < 1:
    raise ValueError(f'`num_clients` must be a positive integer, got {num_clients!r}.')
  num_clients = int(num_clients)
  if num_clients > num_units:
    raise ValueError(
        f'Cannot split {num_units} {what} into {num_clients} non-empty clients.'
    )
  return num_clients


def natural(
    sites: Sequence[str | None] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Partitions examples by their natural site (e.g. acquisition source).

  Args:
    sites: site name of every example. `None` or empty entries are an error.
    groups: optional group id per example (e.g. `lesion_id`). A group found at
      several sites goes wholly to the site holding most of its examples (ties:
      the alphabetically first site), as docs/datasets.md §1.3 recommends.

  Returns:
    `{site: sorted example indices}`, ordered by site name.
  """
  s = _as_1d(sites, 'sites')
  missing = [i for i, v in enumerate(s) if v is None or str(v).strip() == '']
  if missing:
    raise ValueError(
        f'natural partition needs a site for every example; {len(missing)} example(s) have '
        f'none (first index {missing[0]}). Use an iid or dirichlet partition instead.'
    )
  site_of = np.array([str(v) for v in s])
  if groups is not None:
    for unit in _group_units(len(s), groups):
      names, counts = np.unique(site_of[unit], return_counts=True)
      if len(names) > 1:
        site_of[unit] = names[np.argmax(counts)]  # argmax picks the first of ties.
  return {
      name: np.flatnonzero(site_of == name) for name in sorted(set(site_of.tolist()))
  }


def iid(
    n: int,
    num_clients: int,
    seed: int,
    groups: Sequence[Hashable] | np.ndarray | None = None,
) -> list[np.ndarray]:
  """Uniform random partition into `num_clients` clients of (almost) equal size.

  Without groups, client sizes differ by at most one. With groups, whole groups
  are dealt in random order, each to the currently smallest client, so sizes
  differ by at most the largest group size.

  Args:
    n: number of examples.
    num_clients: number of clients.
    seed: seed for `np.random.default_rng`.
    groups: optional group id per example; a group is never split.

  Returns:
    A list of `num_clients` sorted index arrays covering range(n) exactly once.
  """
  units = _group_units(int(n), groups)
  what = 'examples' if groups is None else 'groups'
  num_clients = _check_num_clients(num_clients, len(units), what)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(units))
  if groups is None:
    return [np.sort(chunk) for chunk in np.array_split(order, num_clients)]
  buckets: list[list[int]] = [[] for _ in range(num_clients)]
  sizes = np.zeros(num_clients, dtype=np.int64)
  for u in order:
    k = int(np.argmin(sizes))
    buckets[k].extend(units[u].tolist())
    sizes[k] += len(units[u])
  return [np.sort(np.array(b, dtype=np.int64)) for b in buckets]


def dirichlet(
    labels: Sequence[Hashable] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    *,
    groups: Sequence[Hashable] | np.ndarray | None = None,
    skew: str = 'label',
) -> list[np.ndarray]:
  """Non-IID partition with Dirichlet(alpha) proportions.

  `skew='label'`: for every class c, draw p_c ~ Dir(alpha * 1_K) and deal the
  (shuffled) units of class c to the K clients in proportions p_c (label and
  quantity skew; Hsu et al. 2019). `skew='quantity'`: ignore labels and draw one
  p ~ Dir(alpha * 1_K) for all units (quantity skew only). Small alpha means more
  skew; alpha -> inf tends to IID. The draw is repeated (up to 1000 times) until
  every client holds at least `min_size` examples.

  Args:
    labels: label of every example (any hashable, e.g. HAM10000 `dx`).
    num_clients: number of clients K.
    alpha: Dirichlet concentration, > 0.
    seed: seed for `np.random.default_rng`; the result is a pure function of it.
    min_size: minimum number of examples per client.
    groups: optional group id per example. A group is dealt as one unit whose
      label is its most frequent label.
    skew: 'label' or 'quantity'.

  Returns:
    A list of `num_clients` sorted index arrays covering all examples once.
  """
  y = _as_1d(labels, 'labels')
  if not alpha > 0:
    raise ValueError(f'Dirichlet `alpha` must be > 0, got {alpha!r}.')
  if skew not in ('label', 'quantity'):
    raise ValueError(f"`skew` must be 'label' or 'quantity', got {skew!r}.")
  units = _group_units(len(y), groups)
  what = 'examples' if groups is None else 'groups'
  num_clients = _check_num_clients(num_clients, len(units), what)
  if min_size * num_clients > len(y):
    raise ValueError(
        f'min_size={min_size} per client is impossible: {len(y)} examples for '
        f'{num_clients} clients.'
    )
  unit_sizes = np.array([len(u) for u in units])
  if skew == 'quantity':
    unit_labels = np.zeros(len(units), dtype=np.int64)
  else:
    _, codes = _factorize(y)
    unit_labels = np.array([np.bincount(codes[u]).argmax() for u in units])
  classes = np.unique(unit_labels)
  rng = np.random.default_rng(seed)
  for _ in range(_MAX_DIRICHLET_TRIES):
    assignment = np.empty(len(units), dtype=np.int64)
    for c in classes:
      members = rng.permutation(np.flatnonzero(unit_labels == c))
      p = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = np.round(np.cumsum(p)[:-1] * len(members)).astype(np.int64)
      for k, chunk in enumerate(np.split(members, cuts)):
        assignment[chunk] = k
    sizes = np.bincount(assignment, weights=unit_sizes, minlength=num_clients)
    if sizes.min() >= min_size:
      return [
          np.sort(np.concatenate([units[u] for u in np.flatnonzero(assignment == k)]))
          for k in range(num_clients)
      ]
  raise ValueError(
      f'Could not draw a Dirichlet(alpha={alpha}) partition into {num_clients} clients with '
      f'at least {min_size} examples each in {_MAX_DIRICHLET_TRIES} tries; raise alpha, '
      'lower min_size or use fewer clients.'
  )


def grouped_train_test_split(
    groups: Sequence[Hashable] | np.ndarray,
    test_fraction: float,
    seed: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
  """Random train/test split in which no group is on both sides.

  Groups are shuffled and the prefix whose example count is closest to
  `test_fraction * n` becomes the test set. If 0 < test_fraction < 1 and there
  are at least two groups, both sides get at least one group.

  Args:
    groups: group id per example (e.g. `lesion_id`); use the example index for
      ungrouped data.
    test_fraction: target fraction of examples in the test split, in [0, 1].
    seed: seed (or sequence of ints, e.g. `[seed, client]`) for
      `np.random.default_rng`.

  Returns:
    `(train_indices, test_indices)`, each sorted.
  """
  if not 0.0 <= test_fraction <= 1.0:
    raise ValueError(f'`test_fraction` must be in [0, 1], got {test_fraction!r}.')
  g = _as_1d(groups, 'groups')
  units = _group_units(len(g), g)
  if not units:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(units))
  cum = np.concatenate([[0], np.cumsum([len(units[u]) for u in order])])
  target = test_fraction * len(g)
  lo, hi = 0, len(units)
  if 0.0 < test_fraction < 1.0 and len(units) >= 2:
    lo, hi = 1, len(units) - 1
  num_test_units = lo + int(np.argmin(np.abs(cum[lo:hi + 1] - target)))
  test_units, train_units = order[:num_test_units], order[num_test_units:]

  def gather(sel: np.ndarray) -> np.ndarray:
    if len(sel) == 0:
      return np.zeros(0, np.int64)
    return np.sort(np.concatenate([units[u] for u in sel]))

  return gather(train_units), gather(test_units)


def subsample_groups(groups: Sequence[Hashable] | np.ndarray, max_items: int,
                     seed: int) -> np.ndarray:
  """A seeded random subset of whole groups holding at most `max_items` examples.

  Groups are visited in a random order (`default_rng([seed, 7])` over the sorted
  group ids); a group is kept when it still fits, until exactly `max_items`
  examples are kept or every group was visited.

  Returns:
    The kept example indices, sorted.
  """
  g = _as_1d(groups, 'groups').tolist()
  uniq = sorted(set(g))
  order = np.random.default_rng([seed, 7]).permutation(len(uniq))
  members: dict[Hashable, list[int]] = {}
  for i, group in enumerate(g):
    members.setdefault(group, []).append(i)
  keep: list[int] = []
  for u in order:
    m = members[uniq[u]]
    if len(keep) + len(m) <= max_items:
      keep.extend(m)
    if len(keep) == max_items:
      break
  return np.array(sorted(keep), np.int64)


def one_per_group(indices: np.ndarray, groups: Sequence[Hashable] | np.ndarray,
                  keys: Sequence[Any]) -> np.ndarray:
  """Of each group among `indices`, the example with the smallest key (the first on ties).

  Args:
    indices: example indices.
    groups: group id of every example (indexed by `indices`).
    keys: sort key of every example, e.g. the BraTS time point or the HAM10000 image_id.

  Returns:
    The kept indices, sorted.
  """
  best: dict[Hashable, int] = {}
  for i in np.asarray(indices, np.int64).tolist():
    g = groups[i]
    if g not in best or keys[i] < keys[best[g]]:
      best[g] = i
  return np.array(sorted(best.values()), np.int64)


def _counts(values: np.ndarray | None, idx: np.ndarray) -> dict[str, int]:
  if values is None or len(idx) == 0:
    return {}
  names, counts = np.unique(np.array([str(v) for v in values[idx]]), return_counts=True)
  return {str(k): int(c) for k, c in zip(names, counts)}


def partition_summary(
    client_names: Sequence[str],
    train_indices: Sequence[np.ndarray],
    test_indices: Sequence[np.ndarray],
    labels: Sequence[Hashable] | np.ndarray | None = None,
    groups: Sequence[Hashable] | np.ndarray | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Counts per client and per split (JSON-serialisable).

  Args:
    client_names: one name per client.
    train_indices: per-client train example indices (into `labels`/`groups`).
    test_indices: per-client test example indices.
    labels: optional label per example; adds per-split label counts.
    groups: optional group id per example; adds per-split group counts.
    meta: extra entries copied into the summary (partition method, seed, ...).

  Returns:
    `{'num_clients', 'total': {'train', 'test'}, 'clients': [{'name', 'train',
    'test', 'train_groups', 'test_groups', 'train_labels', 'test_labels'}], ...meta}`.
  """
  if not len(client_names) == len(train_indices) == len(test_indices):
    raise ValueError(
        f'Got {len(client_names)} client names, {len(train_indices)} train and '
        f'{len(test_indices)} test index arrays; they must match.'
    )
  y = None if labels is None else _as_1d(labels, 'labels')
  g = None if groups is None else _as_1d(groups, 'groups')
  clients = []
  for name, tr, te in zip(client_names, train_indices, test_indices):
    tr, te = np.asarray(tr, np.int64), np.asarray(te, np.int64)
    entry: dict[str, Any] = {'name': str(name), 'train': int(len(tr)), 'test': int(len(te))}
    if g is not None:
      entry['train_groups'] = int(len(set(g[tr].tolist())))
      entry['test_groups'] = int(len(set(g[te].tolist())))
    if y is not None:
      entry['train_labels'] = _counts(y, tr)
      entry['test_labels'] = _counts(y, te)
    clients.append(entry)
  summary: dict[str, Any] = dict(meta or {})
  summary['num_clients'] = len(clients)
  summary['total'] = {
      'train': sum(c['train'] for c in clients),
      'test': sum(c['test'] for c in clients),
  }
  summary['clients'] = clients
  return summary


def format_summary(summary: Mapping[str, Any]) -> str:
  """Renders `partition_summary(...)` as a fixed-width text table."""
  clients = summary.get('clients', [])
  labels = sorted({
      k for c in clients for split in ('train_labels', 'test_labels')
      for k in c.get(split, {})
  })
  header = ['client', 'train', 'test']
  if clients and 'train_groups' in clients[0]:
    header += ['train_grp', 'test_grp']
  header += labels
  rows = []
  for c in clients:
    row = [c['name'], str(c['train']), str(c['test'])]
    if 'train_groups' in c:
      row += [str(c['train_groups']), str(c['test_groups'])]
    row += [
        str(c.get('train_labels', {}).get(k, 0) + c.get('test_labels', {}).get(k, 0))
        for k in labels
    ]
    rows.append(row)
  total = summary.get('total', {})
  total_row = ['TOTAL', str(total.get('train', 0)), str(total.get('test', 0))]
  total_row += [''] * (len(header) - len(total_row))
  rows.append(total_row)
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def fmt(r: list[str]) -> str:
    return '  '.join(
        v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))
    )

  meta = {k: v for k, v in summary.items() if k not in ('clients', 'total', 'num_clients')}
  lines = []
  if meta:
    lines.append(', '.join(f'{k}={v}' for k, v in meta.items()))
  lines.append(fmt(header))
  lines.append('  '.join('-' * w for w in widths))
  lines.extend(fmt(r) for r in rows)
  if labels:
    lines.append('(label columns count train + test)')
  return '\n'.join(lines)
