"""U-Net shapes, GroupNorm only, 2D and 3D, fast vs plain convolutions."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from adpfl_jax import losses
from adpfl_jax import models
from adpfl_jax.ops import conv


def _cfg(name, **kw):
  c = ml_collections.ConfigDict(dict(name=name, features=4, depth=2, upsample='transpose',
                                     groups=2, fast_conv=True))
  c.update(kw)
  return c


@pytest.mark.parametrize('name,shape,classes', [('unet2d', (16, 16, 3), 1),
                                                ('unet2d', (16, 8, 1), 3),
                                                ('unet3d', (8, 8, 8, 4), 5)])
def test_output_shape_and_no_batchnorm(name, shape, classes):
  spec = models.get_model(_cfg(name), shape, classes)
  params = spec.init(jax.random.key(0))
  out = spec.apply(params, jnp.zeros(shape))
  assert out.shape == shape[:-1] + (classes,)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ['/'.join(str(k) for k in path) for path, _ in flat]
  assert any('GroupNorm' in n for n in names)
  assert not any('BatchNorm' in n for n in names)
  # Example-wise: a batch gives the same as examples one by one (no cross-example layer).
  xb = jax.random.normal(jax.random.key(1), (2,) + shape)
  np.testing.assert_allclose(spec.apply(params, xb)[1], spec.apply(params, xb[1]), atol=1e-5)


def test_fast_and_plain_convs_give_same_gradients():
  shape = (8, 8, 3)
  fast = models.get_model(_cfg('unet2d', depth=1), shape, 1)
  plain = models.get_model(_cfg('unet2d', depth=1, fast_conv=False), shape, 1)
  params = fast.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), shape)
  y = (x[..., 0] > 0).astype(jnp.int32)
  g = [ravel_pytree(jax.grad(lambda p, s=s: losses.segmentation_loss(s.apply(p, x), y))(params))[0]
       for s in (fast, plain)]
  np.testing.assert_allclose(g[0], g[1], rtol=1e-4, atol=1e-6)


def test_3d_per_example_gradients_agree_across_conv_impls():
  # vmap(grad) as DP-SGD takes it: the depth-folded convolutions and looped kernel gradients
  # (impl 'fold', the 3D default) against lax's own convolutions.
  shape = (8, 8, 4, 1)
  fast = models.get_model(_cfg('unet3d', depth=1), shape, 3)
  plain = models.get_model(_cfg('unet3d', depth=1, fast_conv=False), shape, 3)
  params = fast.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2,) + shape)
  y = jax.random.randint(jax.random.key(2), (2,) + shape[:-1], 0, 3)

  def per_example_grads(spec, impl):
    with conv.use_impl(impl):
      loss = lambda p, xi, yi: losses.segmentation_loss(spec.apply(p, xi), yi)
      grads = jax.jit(jax.vmap(jax.grad(loss), (None, 0, 0)))(params, x, y)
    return jax.vmap(lambda g: ravel_pytree(g)[0])(grads)

  np.testing.assert_allclose(per_example_grads(fast, 'fold'), per_example_grads(plain, 'auto'),
                             rtol=1e-4, atol=1e-6)


def test_depth_must_divide_spatial_shape():
  spec = models.get_model(_cfg('unet2d', depth=2), (6, 8, 3), 1)
  with pytest.raises(ValueError, match='depth'):
    spec.init(jax.random.key(0))


def test_unknown_model_named():
  with pytest.raises(ValueError, match='resnet'):
    models.get_model(_cfg('resnet'), (8, 8, 3), 1)


def test_loss_binary_and_multiclass_and_regions():
  labels = jnp.array([[0, 1], [2, 3]])
  perfect = jax.nn.one_hot(labels, 4) * 50.0
  assert float(losses.segmentation_loss(perfect, labels)) < 1e-3
  wrong = jax.nn.one_hot((labels + 1) % 4, 4) * 50.0
  assert float(losses.segmentation_loss(wrong, labels)) > 1.0
  regions = [(1, 2, 3), (2, 3), (2,)]
  assert float(losses.segmentation_loss(perfect, labels, regions=regions)) < 1e-3
  bin_logits = jnp.where(labels > 0, 20.0, -20.0)[..., None]
  assert float(losses.segmentation_loss(bin_logits, (labels > 0).astype(jnp.int32))) < 1e-3
