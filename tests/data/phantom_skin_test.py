"""Tests for adpfl_jax.data.phantom_skin (the built-in synthetic dermoscopy federation)."""

import numpy as np
import pytest
from scipy import ndimage

from adpfl_jax.data import phantom_skin

_SMALL = dict(num_clients=3, examples_per_client=[5, 3, 4], test_examples_per_client=2,
              image_size=16)


def _fed(**overrides):
  return phantom_skin.make_federation(**{**_SMALL, **overrides})


def _assert_same(a, b):
  for key in ('train_x', 'train_y', 'test_x', 'test_y'):
    assert len(a[key]) == len(b[key])
    for u, v in zip(a[key], b[key]):
      np.testing.assert_array_equal(u, v)


def _fit_logistic_regression(features, labels, iters=20):
  """Newton / IRLS fit of p(y=1|x) = sigmoid(w·[x, 1]) (independent NumPy oracle)."""
  design = np.concatenate([features, np.ones((len(features), 1))], axis=1).astype(np.float64)
  w = np.zeros(design.shape[1])
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-design @ w))
    grad = design.T @ (p - labels)
    hess = (design * (p * (1 - p))[:, None]).T @ design + 1e-6 * np.eye(len(w))
    w -= np.linalg.solve(hess, grad)
  return w


def _dice(pred, truth):
  return 2.0 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum())


def test_same_seed_identical_different_seed_different():
  _assert_same(_fed(seed=3), _fed(seed=3))
  a, b = _fed(seed=3), _fed(seed=4)
  for k in range(3):
    assert not np.array_equal(a['train_x'][k], b['train_x'][k])
    assert not np.array_equal(a['train_y'][k], b['train_y'][k])


def test_client_data_independent_of_other_clients_and_train_size():
  small = phantom_skin.make_federation(num_clients=2, examples_per_client=[5, 3],
                                       test_examples_per_client=2, image_size=16, seed=1)
  big = phantom_skin.make_federation(num_clients=4, examples_per_client=[5, 3, 7, 1],
                                     test_examples_per_client=2, image_size=16, seed=1)
  for key in ('train_x', 'train_y', 'test_x', 'test_y'):
    for k in range(2):
      np.testing.assert_array_equal(small[key][k], big[key][k])
  # The test split does not move when the training split grows.
  grown = phantom_skin.make_federation(num_clients=2, examples_per_client=[9, 3],
                                       test_examples_per_client=2, image_size=16, seed=1)
  np.testing.assert_array_equal(grown['test_x'][0], small['test_x'][0])
  np.testing.assert_array_equal(grown['train_x'][1], small['train_x'][1])


def test_shapes_dtypes_and_value_ranges():
  fed = _fed(seed=0)
  assert fed['client_names'] == ['site_0', 'site_1', 'site_2']
  assert [p['site'] for p in fed['site_params']] == [0, 1, 2]
  mean = np.asarray(phantom_skin.PIXEL_MEAN, np.float32)
  std = np.asarray(phantom_skin.PIXEL_STD, np.float32)
  for split, sizes in (('train', [5, 3, 4]), ('test', [2, 2, 2])):
    for k, n in enumerate(sizes):
      x, y = fed[f'{split}_x'][k], fed[f'{split}_y'][k]
      assert x.shape == (n, 16, 16, 3) and x.dtype == np.float32
      assert y.shape == (n, 16, 16) and y.dtype == np.uint8
      assert np.all(np.isfinite(x))
      assert set(np.unique(y)) <= {0, 1}
      # Normalised with the fixed constants from RGB in [0, 1].
      rgb = x * std + mean
      assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
      np.testing.assert_allclose(phantom_skin.to_rgb(x), np.clip(rgb, 0, 1), atol=1e-6)


def test_normalisation_roughly_zero_mean_unit_scale_and_not_per_site():
  fed = phantom_skin.make_federation(num_clients=4, examples_per_client=16,
                                     test_examples_per_client=0, image_size=16, seed=0)
  pooled = np.concatenate(fed['train_x']).reshape(-1, 3)
  assert np.all(np.abs(pooled.mean(axis=0)) < 0.5)
  assert np.all((pooled.std(axis=0) > 0.5) & (pooled.std(axis=0) < 2.0))
  # Per-site statistics are not standardised away (fixed constants, not data statistics).
  site_means = np.stack([x.reshape(-1, 3).mean(axis=0) for x in fed['train_x']])
  assert np.ptp(site_means, axis=0).max() > 0.5


def test_masks_are_single_visible_lesions_of_sane_size():
  fed = phantom_skin.make_federation(num_clients=4, examples_per_client=24,
                                     test_examples_per_client=0, image_size=32, seed=2)
  for x, y in zip(fed['train_x'], fed['train_y']):
    fractions = y.mean(axis=(1, 2))
    assert 0.08 <= fractions.mean() <= 0.45
    assert np.all((fractions > 0.02) & (fractions < 0.9))
    lum = phantom_skin.to_rgb(x).mean(axis=-1)
    for image, mask in zip(lum, y.astype(bool)):
      assert ndimage.label(mask)[1] == 1  # A star-convex blob is one connected region.
      # The lesion is clearly darker than the surrounding skin (visible to a human).
      assert image[mask].mean() < 0.9 * image[~mask].mean()


def test_sites_differ_in_colour_and_lesion_size():
  fed = phantom_skin.make_federation(num_clients=4, examples_per_client=48,
                                     test_examples_per_client=0, image_size=16, seed=0)
  rgb = [phantom_skin.to_rgb(x) for x in fed['train_x']]
  skin_means = np.stack([r[y == 0].mean(axis=0) for r, y in zip(rgb, fed['train_y'])])
  for i in range(4):
    for j in range(i + 1, 4):
      assert np.abs(skin_means[i] - skin_means[j]).max() > 0.03, (i, j, skin_means)
  sizes = [y.mean() for y in fed['train_y']]
  assert sizes == sorted(sizes)  # Site 0 has the smallest lesions, site 3 the largest.
  assert sizes[3] > 2 * sizes[0]
  params = fed['site_params']
  assert len({p['blur_sigma'] for p in params}) == 4
  assert len({p['colour_gain'] for p in params}) == 4


def test_zero_heterogeneity_makes_sites_identically_distributed():
  params = [phantom_skin.site_params(k, seed=5, heterogeneity=0.0) for k in range(6)]
  strip = lambda p: {k: v for k, v in p.items() if k not in ('site', 'source_like')}
  for p in params[1:]:
    assert strip(p) == strip(params[0])
  fed = phantom_skin.make_federation(num_clients=4, examples_per_client=48,
                                     test_examples_per_client=0, image_size=16, seed=0,
                                     heterogeneity=0.0)
  sizes = np.array([y.mean() for y in fed['train_y']])
  assert np.ptp(sizes) < 0.08


def test_extra_sites_are_drawn_from_seed():
  fed = phantom_skin.make_federation(num_clients=6, examples_per_client=2,
                                     test_examples_per_client=1, image_size=8, seed=0)
  assert fed['client_names'][-1] == 'site_5'
  assert phantom_skin.site_params(5, seed=0) == fed['site_params'][5]
  assert phantom_skin.site_params(5, seed=0) != phantom_skin.site_params(5, seed=1)
  assert phantom_skin.site_params(1, seed=0) == phantom_skin.site_params(1, seed=1)


def test_unequal_and_empty_client_sizes():
  fed = phantom_skin.make_federation(num_clients=3, examples_per_client=(7, 0, 2),
                                     test_examples_per_client=0, image_size=8)
  assert [x.shape[0] for x in fed['train_x']] == [7, 0, 2]
  assert [y.shape for y in fed['train_y']] == [(7, 8, 8), (0, 8, 8), (2, 8, 8)]
  assert all(x.shape == (0, 8, 8, 3) for x in fed['test_x'])


def test_hair_is_not_part_of_the_mask():
  nominal = phantom_skin.site_params(1)
  seq = np.random.SeedSequence(7)
  x_bald, y_bald = phantom_skin.render_site({**nominal, 'hair_rate': 0.0}, 6, 32, seq)
  x_hairy, y_hairy = phantom_skin.render_site({**nominal, 'hair_rate': 6.0}, 6, 32, seq)
  np.testing.assert_array_equal(y_bald, y_hairy)
  assert (x_hairy.mean(axis=-1) < x_bald.mean(axis=-1) - 0.1).mean() > 0.01  # Dark strokes.


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_clients=0), 'num_clients'),
    (dict(num_clients=2.0), 'num_clients'),
    (dict(image_size=7), 'image_size'),
    (dict(examples_per_client=-1), 'examples_per_client'),
    (dict(num_clients=2, examples_per_client=[3, -2]), r'examples_per_client\[1\]'),
    (dict(num_clients=2, examples_per_client=[3, 2, 1]), 'examples_per_client'),
    (dict(test_examples_per_client=-3), 'test_examples_per_client'),
    (dict(seed=-1), 'seed'),
    (dict(heterogeneity=-0.5), 'heterogeneity'),
    (dict(heterogeneity=float('nan')), 'heterogeneity'),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    phantom_skin.make_federation(**kwargs)


def test_not_solvable_by_a_per_pixel_colour_classifier():
  """Per-site logistic regression on RGB: related to colour, but not colour-thresholdable."""
  fed = phantom_skin.make_federation(num_clients=4, examples_per_client=64,
                                     test_examples_per_client=32, image_size=32, seed=0)
  dices = []
  for k in range(4):
    w = _fit_logistic_regression(fed['train_x'][k].reshape(-1, 3),
                                 fed['train_y'][k].reshape(-1).astype(np.float64))
    test = fed['test_x'][k].reshape(-1, 3)
    pred = test @ w[:3] + w[3] > 0
    dices.append(_dice(pred, fed['test_y'][k].reshape(-1).astype(bool)))
  assert min(dices) < 0.88, dices
  assert min(dices) > 0.3, dices
