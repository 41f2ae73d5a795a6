"""Per-example gradients, clipping, padding and the C = ∞ / σ = 0 limit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from adpfl_jax import losses
from adpfl_jax.federated import client as client_lib
from adpfl_jax.models import unet
from adpfl_jax.privacy import clipping
from adpfl_jax.privacy import controller as controller_lib


@pytest.fixture(scope='module')
def tiny():
  spec = unet.ModelSpec(unet.UNet(features=4, depth=1, groups=2), (8, 8, 3))
  params = spec.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (5, 8, 8, 3))
  y = (x[..., 0] > 0.3).astype(jnp.uint8)
  loss_fn = lambda p, xi, yi: losses.segmentation_loss(spec.apply(p, xi), yi)
  return spec, params, x, y, loss_fn


def _flat(tree):
  return ravel_pytree(tree)[0]


def test_per_example_grads_equal_naive_loop(tiny):
  _, params, x, y, loss_fn = tiny
  vals, grads = clipping.per_example_grads(loss_fn, params, x, y)
  for i in range(len(x)):
    v, g = jax.value_and_grad(loss_fn)(params, x[i], y[i])
    np.testing.assert_allclose(vals[i], v, rtol=1e-5, atol=1e-6)
    gi = jax.tree_util.tree_map(lambda a: a[i], grads)
    np.testing.assert_allclose(_flat(gi), _flat(g), rtol=1e-4, atol=1e-6)


def test_sum_clipped_known_values():
  # Gradients 1, -2, -5 clipped at 2.5 sum to 1 - 2 - 2.5 = -3.5.
  g = {'w': jnp.array([[1.0], [-2.0], [-5.0]])}
  s, st = clipping.clip_and_sum(g, jnp.ones(3), jnp.float32(2.5))
  np.testing.assert_allclose(s['w'], [-3.5], rtol=1e-6)
  np.testing.assert_array_equal(st.unclipped, [1, 1, 0])


@pytest.mark.parametrize('clip', [0.0, 0.3, 1.0, 7.0, np.inf])
@pytest.mark.parametrize('norm', ['l2', 'l1'])
def test_every_clipped_norm_bounded_and_nan_safe(clip, norm):
  rng = np.random.default_rng(0)
  g = {'a': rng.normal(size=(6, 4, 3)).astype(np.float32) * 10,
       'b': rng.normal(size=(6, 5)).astype(np.float32)}
  g['a'][1] = np.nan  # a non-finite example
  g['b'][2] = np.inf
  g['a'][3] = 0.0  # zero-norm example
  g['b'][3] = 0.0
  g = jax.tree_util.tree_map(jnp.asarray, g)
  norms = clipping.per_example_norms(g, norm)
  factor, valid = clipping.clip_factors(norms, jnp.float32(clip), jnp.ones(6))
  clipped = jax.tree_util.tree_map(
      lambda l: jnp.where(valid.reshape((-1,) + (1,) * (l.ndim - 1)),
                          l * factor.reshape((-1,) + (1,) * (l.ndim - 1)), 0), g)
  after = np.asarray(clipping.per_example_norms(clipped, norm))
  assert np.all(np.isfinite(after))
  assert np.all(after <= clip * (1 + 1e-5) + 1e-6)
  s, _ = clipping.clip_and_sum(g, jnp.ones(6), jnp.float32(clip), norm)
  assert np.all(np.isfinite(_flat(s)))
  assert after[1] == 0 and after[2] == 0  # non-finite examples are dropped


def test_add_remove_one_changes_sum_by_at_most_c(tiny):
  _, params, x, y, loss_fn = tiny
  _, grads = clipping.per_example_grads(loss_fn, params, x, y)
  clip = jnp.float32(0.05)
  full, _ = clipping.clip_and_sum(grads, jnp.ones(5), clip)
  for i in range(5):
    mask = jnp.ones(5).at[i].set(0.0)  # remove example i
    part, _ = clipping.clip_and_sum(grads, mask, clip)
    assert float(jnp.linalg.norm(_flat(full) - _flat(part))) <= 0.05 * (1 + 1e-5)


def test_padded_examples_change_nothing(tiny):
  _, params, x, y, loss_fn = tiny
  _, grads = clipping.per_example_grads(loss_fn, params, x, y)
  s3, st3 = clipping.clip_and_sum(jax.tree_util.tree_map(lambda a: a[:3], grads), jnp.ones(3),
                                  jnp.float32(0.1))
  garbage = jax.tree_util.tree_map(lambda a: a.at[3:].set(jnp.nan), grads)
  s5, st5 = clipping.clip_and_sum(garbage, jnp.array([1., 1, 1, 0, 0]), jnp.float32(0.1))
  np.testing.assert_array_equal(_flat(s3), _flat(s5))
  assert float(jnp.sum(st5.valid)) == 3


def _dp(clip, z, m, lr=0.1):
  return controller_lib.ClientDP(
      clip=jnp.float32(clip), noise_grad=jnp.float32(z), aux_std=jnp.float32(0.0),
      grid=jnp.ones(1), expected_batch=jnp.float32(m),
      lr=jnp.float32(lr), sparsity_mask=jnp.float32(1.0))


def test_no_clip_no_noise_equals_plain_sgd_step(tiny):
  _, params, x, y, loss_fn = tiny
  cfg = client_lib.ClientConfig(loss_fn=loss_fn, private=True)
  delta, _ = client_lib.client_update(cfg, params, x[None], y[None], jnp.ones((1, 5)),
                                      _dp(np.inf, 0.0, 5.0), jax.random.key(0))
  mean_loss = lambda p: jnp.mean(jax.vmap(loss_fn, (None, 0, 0))(p, x, y))
  g = jax.grad(mean_loss)(params)
  tx = optax.sgd(0.1)
  upd, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(_flat(delta), _flat(upd), rtol=1e-4, atol=1e-7)


def test_noise_std_is_sigma_times_c(tiny):
  """With zero gradients (all padding) the update is pure noise: lr · z · C / m per coordinate."""
  _, params, x, y, loss_fn = tiny
  cfg = client_lib.ClientConfig(loss_fn=loss_fn, private=True)
  z, clip, m, lr = 1.7, 0.6, 4.0, 1.0
  delta, _ = client_lib.client_update(cfg, params, x[None], y[None], jnp.zeros((1, 5)),
                                      _dp(clip, z, m, lr), jax.random.key(3))
  noise = np.asarray(_flat(delta)) * m / (lr * z * clip)  # should be N(0, 1)
  from scipy import stats
  assert stats.kstest(noise, 'norm').pvalue > 1e-3
  assert stats.kstest(noise * 1.5, 'norm').pvalue < 1e-6  # noise 2/3 as large is rejected
  assert stats.kstest(noise / 1.5, 'norm').pvalue < 1e-6  # noise 3/2 as large is rejected


@pytest.mark.parametrize('chunk,realised', [(1, 5), (3, 4), (2, 0), (8, 5)])
def test_chunked_clip_and_sum_equals_the_vmapped_one(tiny, chunk, realised):
  # fed.example_chunk: per-example gradients a chunk at a time over the sampled prefix only must
  # release the same clipped sum, norms and indicators (sensitivity C, accounting unchanged).
  _, params, x, y, loss_fn = tiny
  x = x.at[4].set(jnp.nan)  # a non-finite slot: dropped alike on both paths when it is sampled
  mask = (jnp.arange(5) < realised).astype(jnp.float32)
  clip = jnp.float32(0.05)
  vals, grads = clipping.per_example_grads(loss_fn, params, x, y)
  ref_sum, ref = clipping.clip_and_sum(grads, mask, clip)
  losses_c, summed, st = clipping.clip_and_sum_chunked(loss_fn, params, x, y, mask, clip,
                                                       chunk=chunk)
  np.testing.assert_allclose(_flat(summed), _flat(ref_sum), rtol=1e-5, atol=1e-6)
  for got, want in zip(st, ref):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  valid = np.asarray(ref.valid) > 0
  np.testing.assert_allclose(np.asarray(losses_c)[valid], np.asarray(vals)[valid], rtol=1e-5)
  assert np.all(np.asarray(st.norms) >= 0) and np.sum(st.valid) == min(realised, 4)
  # Every clipped per-example contribution has norm <= C, so the sum's norm is <= realised·C.
  assert float(jnp.linalg.norm(_flat(summed))) <= realised * float(clip) * (1 + 1e-5)
