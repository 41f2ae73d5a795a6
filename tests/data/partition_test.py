"""Tests for adpfl_jax.data.partition."""

import numpy as np
import pytest

from adpfl_jax.data import partition


def _assert_exact_cover(parts, n):
  flat = np.concatenate(parts)
  np.testing.assert_array_equal(np.sort(flat), np.arange(n))


def _assert_groups_not_split(parts, groups):
  owner = {}
  for k, p in enumerate(parts):
    for g in set(np.asarray(groups)[p].tolist()):
      assert owner.setdefault(g, k) == k, f'group {g} is in clients {owner[g]} and {k}'


def test_iid_sizes_balanced_and_cover():
  parts = partition.iid(103, num_clients=5, seed=3)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1
  assert sum(sizes) == 103
  _assert_exact_cover(parts, 103)
  again = partition.iid(103, num_clients=5, seed=3)
  for a, b in zip(parts, again):
    np.testing.assert_array_equal(a, b)


def test_iid_grouped_keeps_groups_together():
  groups = np.repeat(np.arange(30), [1, 2, 3] * 10)  # 60 examples in 30 groups
  parts = partition.iid(len(groups), num_clients=4, seed=0, groups=groups)
  _assert_exact_cover(parts, len(groups))
  _assert_groups_not_split(parts, groups)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 3  # at most the largest group size


def test_dirichlet_reproducible_from_seed_and_seed_dependent():
  labels = np.repeat(['nv', 'mel', 'bcc'], [60, 30, 10])
  a = partition.dirichlet(labels, num_clients=4, alpha=0.5, seed=7)
  b = partition.dirichlet(labels, num_clients=4, alpha=0.5, seed=7)
  c = partition.dirichlet(labels, num_clients=4, alpha=0.5, seed=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(len(x) != len(y) or np.any(x != y) for x, y in zip(a, c))
  _assert_exact_cover(a, 100)
  _assert_exact_cover(c, 100)


def test_dirichlet_alpha_controls_label_skew():
  labels = np.repeat([0, 1], 500)

  def mean_majority_fraction(parts):
    fracs = [np.bincount(labels[p], minlength=2).max() / len(p) for p in parts]
    weights = [len(p) for p in parts]
    return np.average(fracs, weights=weights)

  near_iid = partition.dirichlet(labels, 4, alpha=1e4, seed=0)
  skewed = partition.dirichlet(labels, 4, alpha=0.01, seed=0)
  # Huge alpha: every client mirrors the global 50/50 mix.
  for p in near_iid:
    assert abs(labels[p].mean() - 0.5) < 0.1
  assert mean_majority_fraction(skewed) > 0.9


def test_dirichlet_min_size_groups_and_quantity_skew():
  groups = np.arange(90) // 3
  labels = np.arange(90) % 7  # labels differ inside groups: majority label per group
  parts = partition.dirichlet(labels, 3, alpha=0.3, seed=1, min_size=9, groups=groups)
  assert min(len(p) for p in parts) >= 9
  _assert_exact_cover(parts, 90)
  _assert_groups_not_split(parts, groups)
  q = partition.dirichlet(np.arange(50), 5, alpha=1.0, seed=2, skew='quantity')
  _assert_exact_cover(q, 50)


def test_dirichlet_errors_are_clear():
  with pytest.raises(ValueError, match='alpha'):
    partition.dirichlet([0, 1, 0], 2, alpha=0.0, seed=0)
  with pytest.raises(ValueError, match='3 examples into 5'):
    partition.dirichlet([0, 1, 0], 5, alpha=1.0, seed=0)
  with pytest.raises(ValueError, match='min_size'):
    partition.dirichlet([0, 1, 0, 1], 2, alpha=1.0, seed=0, min_size=3)
  with pytest.raises(ValueError, match="'label' or 'quantity'"):
    partition.dirichlet([0, 1], 2, alpha=1.0, seed=0, skew='feature')


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_grouped_split_no_group_on_both_sides(seed):
  rng = np.random.default_rng(seed)
  groups = np.array([f'HAM_{g:07d}' for g in rng.integers(0, 40, size=120)])
  train, test = partition.grouped_train_test_split(groups, 0.25, seed=seed)
  assert not set(groups[train]) & set(groups[test])
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(120))
  largest = max(np.unique(groups, return_counts=True)[1])
  assert abs(len(test) - 0.25 * 120) <= largest


def test_grouped_split_edge_cases():
  train, test = partition.grouped_train_test_split(['a', 'a', 'b'], 0.0, seed=0)
  assert len(test) == 0 and len(train) == 3
  train, test = partition.grouped_train_test_split(['a', 'a'], 0.5, seed=0)
  assert len(train) == 2 and len(test) == 0  # one group cannot be split
  # Two groups with 0 < f < 1: both sides are non-empty even when f is tiny.
  train, test = partition.grouped_train_test_split(['a'] * 9 + ['b'], 0.01, seed=0)
  assert len(train) > 0 and len(test) > 0
  with pytest.raises(ValueError, match='test_fraction'):
    partition.grouped_train_test_split(['a'], 1.5, seed=0)


def test_natural_assigns_straddling_group_to_majority_site():
  sites = ['rosendahl', 'vidir_modern', 'vidir_modern', 'rosendahl', 'vienna_dias']
  groups = ['L1', 'L1', 'L1', 'L2', 'L3']
  parts = partition.natural(sites, groups=groups)
  assert list(parts) == ['rosendahl', 'vidir_modern', 'vienna_dias']
  np.testing.assert_array_equal(parts['vidir_modern'], [0, 1, 2])
  np.testing.assert_array_equal(parts['rosendahl'], [3])
  np.testing.assert_array_equal(parts['vienna_dias'], [4])
  plain = partition.natural(sites)
  np.testing.assert_array_equal(plain['rosendahl'], [0, 3])
  with pytest.raises(ValueError, match='site'):
    partition.natural(['a', None])


def test_partition_summary_counts_match_brute_force():
  labels = np.array(['nv', 'mel', 'nv', 'bcc', 'nv', 'mel'])
  groups = np.array(['a', 'a', 'b', 'c', 'd', 'd'])
  train = [np.array([0, 1, 2]), np.array([4, 5])]
  test = [np.array([3]), np.array([], dtype=np.int64)]
  s = partition.partition_summary(['c0', 'c1'], train, test, labels=labels, groups=groups,
                                  meta={'partition': 'test'})
  assert s['num_clients'] == 2
  assert s['total'] == {'train': 5, 'test': 1}
  assert s['clients'][0]['train_labels'] == {'nv': 2, 'mel': 1}
  assert s['clients'][0]['test_labels'] == {'bcc': 1}
  assert s['clients'][0]['train_groups'] == 2
  assert s['clients'][1]['train_groups'] == 1
  assert s['partition'] == 'test'
  text = partition.format_summary(s)
  assert 'c0' in text and 'c1' in text and 'TOTAL' in text and 'partition=test' in text


def test_subsample_groups_keeps_whole_groups_up_to_the_limit():
  groups = np.array(['a', 'a', 'b', 'c', 'c', 'c', 'd', 'e', 'e'])
  for seed in range(5):
    keep = partition.subsample_groups(groups, 5, seed)
    assert len(keep) <= 5 and np.all(np.diff(keep) > 0)
    for g in set(groups[keep].tolist()):  # Every example of a kept group is kept.
      assert set(np.flatnonzero(groups == g)) <= set(keep.tolist())
    np.testing.assert_array_equal(keep, partition.subsample_groups(groups, 5, seed))
  assert len(partition.subsample_groups(groups, 100, 0)) == len(groups)
  assert len(partition.subsample_groups(np.array(['a', 'a']), 1, 0)) == 0


def test_one_per_group_keeps_the_smallest_key_first_on_ties():
  groups = np.array(['p1', 'p1', 'p2', 'p2', 'p3', 'p1'])
  keys = ['102', '101', '200', '200', '300', '100']
  np.testing.assert_array_equal(partition.one_per_group(np.arange(6), groups, keys), [2, 4, 5])
  np.testing.assert_array_equal(partition.one_per_group(np.array([0, 1, 3]), groups, keys),
                                [1, 3])
