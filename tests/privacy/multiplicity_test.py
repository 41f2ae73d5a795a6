"""Augmentation multiplicity: sensitivity stays C, views stay aligned, k = 1 is the plain path."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from adpfl_jax.federated import client as client_lib
from adpfl_jax.privacy import clipping
from adpfl_jax.privacy import multiplicity
from adpfl_jax.privacy.controller import ClientDP


def _model():
  params = {'w': jax.random.normal(jax.random.key(1), (3, 2)), 'b': jnp.zeros((2,))}

  def loss_fn(p, x, y):  # a per-pixel 2-class classifier on (H, W, 3) images, labels (H, W)
    logits = x @ p['w'] + p['b']
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))

  x = jax.random.uniform(jax.random.key(2), (6, 8, 8, 3))
  y = (x[..., 0] > 0.5).astype(jnp.int32)
  return params, loss_fn, x, y


def _rows(grads):
  return jax.vmap(lambda g: ravel_pytree(g)[0])(grads)


def test_views_keep_image_and_label_aligned():
  _, _, x, y = _model()
  xs, ys = multiplicity.augment_views(jax.random.key(3), x[0], y[0], 16, shift=2, flip=True)
  # The label is a pixelwise function of the image (zero padding maps to background 0), so any
  # misalignment between the two shows up as a mismatch.
  np.testing.assert_array_equal(np.asarray(ys), np.asarray(xs[..., 0] > 0.5).astype(np.int32))
  assert len({np.asarray(v).tobytes() for v in xs}) > 1  # the views differ


def test_clipped_averaged_gradient_has_sensitivity_c():
  params, loss_fn, x, y = _model()
  key, clip, mask = jax.random.key(4), jnp.float32(0.05), jnp.ones((6,))
  _, grads = multiplicity.averaged_per_example_grads(loss_fn, params, x, y, key, 4)
  summed, stats = clipping.clip_and_sum(grads, mask, clip)
  assert float(jnp.max(stats.norms)) > clip  # clipping is active
  factor, _ = clipping.clip_factors(stats.norms, clip, mask)
  clipped = _rows(grads) * factor[:, None]
  assert float(jnp.max(jnp.linalg.norm(clipped, axis=1))) <= clip * (1 + 1e-5)
  full = ravel_pytree(summed)[0]
  for i in range(6):  # remove example i: the clipped sum moves by at most C
    without, _ = clipping.clip_and_sum(grads, mask.at[i].set(0.0), clip)
    assert float(jnp.linalg.norm(full - ravel_pytree(without)[0])) <= clip * (1 + 1e-5)
  # Row i depends on example i only: changing example 5 leaves the other rows unchanged.
  x2 = x.at[5].set(1.0 - x[5])
  _, grads2 = multiplicity.averaged_per_example_grads(loss_fn, params, x2, y, key, 4)
  np.testing.assert_array_equal(np.asarray(_rows(grads)[:5]), np.asarray(_rows(grads2)[:5]))


def test_identity_views_reproduce_plain_per_example_grads():
  params, loss_fn, x, y = _model()
  losses, grads = multiplicity.averaged_per_example_grads(
      loss_fn, params, x, y, jax.random.key(0), 3, shift=0, flip=False)
  want_l, want_g = clipping.per_example_grads(loss_fn, params, x, y)
  np.testing.assert_allclose(losses, want_l, rtol=1e-6)
  np.testing.assert_allclose(_rows(grads), _rows(want_g), rtol=1e-5, atol=1e-7)


def test_multiplicity_one_is_the_plain_path_bit_for_bit():
  params, loss_fn, x, y = _model()
  dp = ClientDP(clip=jnp.float32(0.05), noise_grad=jnp.float32(1.0), aux_std=jnp.zeros((1,)),
                grid=jnp.zeros((1,)), expected_batch=jnp.float32(3.0), lr=jnp.float32(0.1),
                sparsity_mask=jnp.ones((8,)))
  xb, yb = x.reshape(2, 3, 8, 8, 3), y.reshape(2, 3, 8, 8)
  mask = jnp.ones((2, 3))
  plain = client_lib.ClientConfig(loss_fn=loss_fn)
  k1 = client_lib.ClientConfig(loss_fn=loss_fn, augment_multiplicity=1, augment_shift=3)
  k2 = client_lib.ClientConfig(loss_fn=loss_fn, augment_multiplicity=2)
  run = lambda cfg: ravel_pytree(client_lib.client_update(cfg, params, xb, yb, mask, dp,
                                                          jax.random.key(5))[0])[0]
  np.testing.assert_array_equal(np.asarray(run(plain)), np.asarray(run(k1)))
  assert not np.array_equal(np.asarray(run(plain)), np.asarray(run(k2)))
