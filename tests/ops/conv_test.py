"""Tests for adpfl_jax.ops.conv: forward and gradients against jax.lax / flax.linen."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from adpfl_jax.ops import conv

RTOL, ATOL = 1e-4, 1e-5
DN2 = ('NHWC', 'HWIO', 'NHWC')
DN3 = ('NDHWC', 'DHWIO', 'NDHWC')
DN1 = ('NHC', 'HIO', 'NHC')


def _normal(rng: np.random.Generator, shape, dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(rng.normal(size=shape), dtype)


def _value_and_grads(conv_fn, x, w, cotangent, **kwargs):
  """Forward output and d/d(x, w) of sum(conv(x, w) * cotangent)."""

  def loss(x, w):
    return jnp.sum(conv_fn(x, w, **kwargs) * cotangent)

  return conv_fn(x, w, **kwargs), jax.grad(loss, (0, 1))(x, w)


def _assert_tree_close(actual, expected, rtol=RTOL, atol=ATOL):
  jax.tree_util.tree_map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
    actual,
    expected,
  )


def _check_against_lax(x_shape, w_shape, seed=0, impl=None, **kwargs):
  rng = np.random.default_rng(seed)
  x, w = _normal(rng, x_shape), _normal(rng, w_shape)
  out_shape = jax.eval_shape(lambda x, w: lax.conv_general_dilated(x, w, **kwargs), x, w).shape
  cotangent = _normal(rng, out_shape)
  ours = functools.partial(conv.conv_general_dilated, impl=impl)
  # One compilation for both implementations keeps the test fast.
  (y_ref, grads_ref), (y, grads) = jax.jit(
    lambda x, w, ct: [
      _value_and_grads(f, x, w, ct, **kwargs) for f in (lax.conv_general_dilated, ours)
    ]
  )(x, w, cotangent)
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
  _assert_tree_close(y, y_ref)
  _assert_tree_close(grads, grads_ref)


# (x_shape, w_shape, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
CASES = {
  # 2D, flax layouts.
  '1x1': ((2, 5, 4, 3), (1, 1, 3, 4), (1, 1), 'VALID', None, None, DN2),
  '1x1_padded': ((2, 5, 4, 3), (1, 1, 3, 4), (1, 1), ((1, 0), (0, 2)), None, None, DN2),
  '1x1_stride2': ((2, 5, 4, 3), (1, 1, 3, 4), (2, 2), 'SAME', None, None, DN2),
  '3x3_same': ((2, 6, 5, 3), (3, 3, 3, 4), (1, 1), 'SAME', None, None, DN2),
  '3x3_valid': ((2, 6, 5, 3), (3, 3, 3, 4), (1, 1), 'VALID', None, None, DN2),
  '2x2_stride2_valid': ((2, 6, 4, 3), (2, 2, 3, 4), (2, 2), 'VALID', None, None, DN2),
  '2x2_stride2_valid_odd': ((2, 7, 5, 3), (2, 2, 3, 4), (2, 2), 'VALID', None, None, DN2),
  '2x2_stride2_same_odd': ((2, 7, 5, 3), (2, 2, 3, 4), (2, 2), 'SAME', None, None, DN2),
  '3x3_stride2_same_odd': ((2, 7, 5, 3), (3, 3, 3, 4), (2, 2), 'SAME', None, None, DN2),
  '3x3_stride2_same_even': ((2, 6, 8, 3), (3, 3, 3, 4), (2, 2), 'SAME', None, None, DN2),
  '3x3_stride2_valid_drops_rows': ((2, 6, 7, 3), (3, 3, 3, 4), (2, 2), 'VALID', None, None, DN2),
  '3x3_stride3_valid': ((2, 8, 7, 3), (3, 3, 3, 4), (3, 3), 'VALID', None, None, DN2),
  '3x3_asym_pad': ((2, 6, 5, 3), (3, 3, 3, 4), (1, 1), ((2, 0), (0, 1)), None, None, DN2),
  '3x3_stride21_asym_pad': ((2, 7, 6, 3), (3, 3, 3, 4), (2, 1), ((1, 2), (0, 1)), None, None, DN2),
  '3x2_kernel': ((2, 6, 5, 3), (3, 2, 3, 4), (1, 2), 'SAME', None, None, DN2),
  'negative_pad': ((2, 7, 6, 3), (3, 3, 3, 4), (1, 2), ((-1, 2), (1, -2)), None, None, DN2),
  'transposed_3x3': ((2, 4, 5, 3), (3, 3, 3, 4), (1, 1), ((2, 2), (1, 2)), (2, 2), None, DN2),
  'transposed_3x3_tight': ((2, 4, 5, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (0, 0)), (2, 2), None, DN2),
  'transposed_2x2': ((2, 4, 3, 3), (2, 2, 3, 4), (1, 1), ((1, 1), (1, 1)), (2, 2), None, DN2),
  'transposed_4x4_stride': (
    (2, 4, 3, 3),
    (4, 4, 3, 4),
    (2, 1),
    ((3, 2), (2, 3)),
    (2, 3),
    None,
    DN2,
  ),
  'atrous_same': ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), 'SAME', None, (2, 2), DN2),
  'atrous_stride2_valid': ((2, 9, 8, 3), (3, 3, 3, 4), (2, 2), 'VALID', None, (2, 1), DN2),
  'atrous_transposed': ((2, 4, 4, 3), (3, 2, 3, 4), (2, 1), ((3, 1), (2, 0)), (2, 2), (2, 2), DN2),
  # 3D, flax layouts.
  '3d_1x1': ((2, 4, 3, 5, 3), (1, 1, 1, 3, 2), (1, 1, 1), 'SAME', None, None, DN3),
  '3d_3x3_same': ((2, 4, 3, 5, 3), (3, 3, 3, 3, 2), (1, 1, 1), 'SAME', None, None, DN3),
  '3d_3x3_stride2_odd': ((2, 5, 3, 4, 3), (3, 3, 3, 3, 2), (2, 2, 2), 'SAME', None, None, DN3),
  '3d_2x2_stride2': ((2, 4, 4, 5, 3), (2, 2, 2, 3, 2), (2, 2, 2), 'VALID', None, None, DN3),
  '3d_transposed_2x2': (
    (2, 3, 2, 3, 3),
    (2, 2, 2, 3, 2),
    (1, 1, 1),
    ((1, 1),) * 3,
    (2, 2, 2),
    None,
    DN3,
  ),
  '3d_transposed_3x3': (
    (2, 3, 2, 3, 3),
    (3, 3, 3, 3, 2),
    (1, 1, 1),
    ((2, 1),) * 3,
    (2, 2, 2),
    None,
    DN3,
  ),
  '3d_atrous': ((2, 5, 5, 4, 3), (3, 3, 2, 3, 2), (1, 2, 1), 'SAME', None, (2, 1, 2), DN3),
  '3d_asym_pad': (
    (2, 4, 5, 4, 3),
    (3, 3, 3, 3, 2),
    (1, 1, 2),
    ((0, 2), (1, 0), (2, 1)),
    None,
    None,
    DN3,
  ),
  '3d_odd_valid': ((2, 5, 7, 3, 3), (3, 3, 2, 3, 4), (1, 1, 1), 'VALID', None, None, DN3),
  '3d_1x1_stride2': ((2, 5, 4, 3, 3), (1, 1, 1, 3, 2), (2, 2, 2), 'VALID', None, None, DN3),
  '3d_depth_stride_only': ((2, 7, 4, 5, 2), (3, 3, 3, 2, 3), (2, 1, 1), 'SAME', None, None, DN3),
  '3d_stride2_valid_drops_rows': (
    (2, 6, 7, 5, 2),
    (3, 3, 3, 2, 3),
    (2, 2, 2),
    'VALID',
    None,
    None,
    DN3,
  ),
  '3d_transposed_stride2_odd': (
    (2, 3, 4, 2, 3),
    (3, 3, 3, 3, 2),
    (1, 1, 1),
    ((1, 2), (2, 1), (1, 1)),
    (2, 2, 2),
    None,
    DN3,
  ),
  '3d_atrous_depth_strided': (
    (2, 9, 5, 4, 2),
    (3, 2, 2, 2, 3),
    (2, 1, 1),
    ((2, 1), (1, 0), (0, 1)),
    None,
    (3, 1, 2),
    DN3,
  ),
  '3d_negative_pad': (
    (2, 6, 5, 4, 2),
    (3, 3, 3, 2, 3),
    (1, 2, 1),
    ((-1, 2), (1, -1), (0, 0)),
    None,
    None,
    DN3,
  ),
  '3d_wide_out': ((2, 4, 3, 5, 2), (3, 3, 3, 2, 5), (1, 1, 1), 'SAME', None, None, DN3),
  # 1D.
  '1d_3_stride2': ((2, 9, 3), (3, 3, 4), (2,), 'SAME', None, None, DN1),
  '1d_transposed': ((2, 5, 3), (3, 3, 4), (1,), ((2, 1),), (2,), None, DN1),
  # Other layouts: the lax default (NCHW/OIHW) and a mixed 3D layout.
  'nchw_default_dn': ((2, 3, 7, 6), (4, 3, 3, 3), (2, 1), 'SAME', None, None, None),
  'mixed_3d_layout': (
    (2, 3, 5, 4, 6),
    (2, 3, 3, 3, 2),
    (2, 1, 1),
    ((1, 0), (0, 1), (1, 1)),
    None,
    (1, 1, 2),
    ('NCDHW', 'OIDHW', 'NDHWC'),
  ),
}


@pytest.mark.parametrize('impl', ['native', 'fold'])
@pytest.mark.parametrize('name', sorted(CASES))
def test_forward_and_grads_match_lax(name, impl):
  x_shape, w_shape, strides, padding, lhs_dil, rhs_dil, dn = CASES[name]
  _check_against_lax(
    x_shape,
    w_shape,
    impl=impl,
    window_strides=strides,
    padding=padding,
    lhs_dilation=lhs_dil,
    rhs_dilation=rhs_dil,
    dimension_numbers=dn,
  )


def _numpy_conv(x, w, strides, padding, lhs_dilation, rhs_dilation):
  """Brute-force channels-last convolution in NumPy (negative padding crops)."""
  n = x.ndim - 2
  dilated = [(size - 1) * a + 1 for size, a in zip(x.shape[1:-1], lhs_dilation)]
  xd = np.zeros((x.shape[0], *dilated, x.shape[-1]), np.float64)
  xd[(slice(None),) + tuple(slice(None, None, a) for a in lhs_dilation)] = x
  xd = np.pad(xd, [(0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in padding] + [(0, 0)])
  crop = tuple(
    slice(max(-lo, 0), xd.shape[i + 1] - max(-hi, 0)) for i, (lo, hi) in enumerate(padding)
  )
  xd = xd[(slice(None),) + crop]
  k_eff = [(k - 1) * d + 1 for k, d in zip(w.shape[:n], rhs_dilation)]
  wd = np.zeros((*k_eff, *w.shape[n:]), np.float64)
  wd[tuple(slice(None, None, d) for d in rhs_dilation)] = w
  out_sizes = [(size - k) // s + 1 for size, k, s in zip(xd.shape[1:-1], k_eff, strides)]
  y = np.zeros((x.shape[0], *out_sizes, w.shape[-1]))
  for pos in np.ndindex(*out_sizes):
    window = xd[
      (slice(None),) + tuple(slice(p * s, p * s + k) for p, s, k in zip(pos, strides, k_eff))
    ]
    y[(slice(None),) + pos] = np.tensordot(window, wd, axes=n + 1)
  return y


@pytest.mark.parametrize(
  'x_shape, w_shape, strides, padding',
  [
    # Low padding beyond the kernel extent: autodiff of the lax op pads its input-gradient conv
    # negatively, which XLA:CPU (jax 0.10.2) evaluates wrongly.
    ((2, 4, 5, 2), (2, 2, 2, 3), (1, 2), ((3, 0), (0, 3))),
    # Negative padding with stride == kernel: even the forward lax op is wrong on XLA:CPU.
    ((2, 6, 7, 2), (3, 3, 2, 3), (3, 3), ((-1, 2), (-1, 2))),
    ((2, 7, 6, 2), (3, 3, 2, 3), (1, 2), ((-1, 2), (1, -2))),
  ],
)
def test_unusual_padding_matches_numpy_oracle(x_shape, w_shape, strides, padding):
  # lax is not a trustworthy oracle here, so compare with a NumPy brute force; the gradients
  # of this linear map come from its Jacobian, built column by column from one-hot inputs.
  rng = np.random.default_rng(1)
  x, w = _normal(rng, x_shape), _normal(rng, w_shape)
  kwargs = dict(window_strides=strides, padding=padding, dimension_numbers=DN2)
  ones = (1,) * (len(x_shape) - 2)
  reference = lambda x, w: _numpy_conv(np.asarray(x), np.asarray(w), strides, padding, ones, ones)
  y_ref = reference(x, w)
  cotangent = _normal(rng, y_ref.shape)
  y, (dx, dw) = jax.jit(
    lambda x, w, ct: _value_and_grads(conv.conv_general_dilated, x, w, ct, **kwargs)
  )(x, w, cotangent)
  _assert_tree_close(y, y_ref)
  ct = np.asarray(cotangent, np.float64).reshape(-1)
  eye_x, eye_w = np.eye(x.size).reshape(-1, *x.shape), np.eye(w.size).reshape(-1, *w.shape)
  dx_ref = np.array([ct @ reference(e, w).reshape(-1) for e in eye_x]).reshape(x.shape)
  dw_ref = np.array([ct @ reference(x, e).reshape(-1) for e in eye_w]).reshape(w.shape)
  _assert_tree_close((dx, dw), (dx_ref, dw_ref))


def test_numpy_oracle_agrees_with_lax_on_ordinary_cases():
  # Validates the brute-force oracle itself (strides, dilations, asymmetric padding).
  rng = np.random.default_rng(8)
  x, w = _normal(rng, (2, 5, 4, 3)), _normal(rng, (3, 2, 3, 2))
  args = ((2, 1), ((1, 2), (2, 0)), (2, 1), (1, 2))
  expected = lax.conv_general_dilated(x, w, *args, dimension_numbers=DN2)
  _assert_tree_close(_numpy_conv(np.asarray(x), np.asarray(w), *args), expected)


def test_feature_groups_fall_back_to_lax():
  _check_against_lax(
    (2, 6, 5, 4),
    (3, 3, 2, 6),
    window_strides=(2, 1),
    padding='SAME',
    dimension_numbers=DN2,
    feature_group_count=2,
  )


def test_precision_and_preferred_element_type():
  rng = np.random.default_rng(2)
  x, w = _normal(rng, (2, 6, 5, 3), jnp.bfloat16), _normal(rng, (3, 3, 3, 4), jnp.bfloat16)
  kwargs = dict(
    window_strides=(2, 2),
    padding='SAME',
    dimension_numbers=DN2,
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )
  cotangent = _normal(rng, lax.conv_general_dilated(x, w, **kwargs).shape)
  (y_ref, grads_ref), (y, grads) = jax.jit(
    lambda x, w, ct: [
      _value_and_grads(f, x, w, ct, **kwargs)
      for f in (lax.conv_general_dilated, conv.conv_general_dilated)
    ]
  )(x, w, cotangent)
  assert y.dtype == jnp.float32
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
  _assert_tree_close(y, y_ref)
  _assert_tree_close(
    [g.astype(jnp.float32) for g in grads], [g.astype(jnp.float32) for g in grads_ref], 2e-2, 5e-2
  )


def test_errors_are_clear():
  x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ValueError, match='string padding'):
    conv.conv_general_dilated(x, w, (1, 1), 'SAME', lhs_dilation=(2, 2), dimension_numbers=DN2)
  with pytest.raises(ValueError, match='window_strides'):
    conv.conv_general_dilated(x, w, (1,), 'SAME', dimension_numbers=DN2)
  with pytest.raises(ValueError, match='same rank'):
    conv.conv_general_dilated(x, w[0], (1, 1), 'SAME')


def _tiny_net(conv_fn, params, x):
  """Stride-2 conv -> tanh -> stride-2 transposed conv (lhs_dilation) -> 1x1 conv, NHWC."""
  h = conv_fn(x, params['w1'], (2, 2), 'SAME', dimension_numbers=DN2)
  h = jnp.tanh(h)
  h = conv_fn(h, params['w2'], (1, 1), ((2, 1), (2, 1)), lhs_dilation=(2, 2), dimension_numbers=DN2)
  h = jnp.tanh(h)
  return conv_fn(h, params['w3'], (1, 1), 'VALID', dimension_numbers=DN2)


def _tiny_setup(seed=3, batch=3):
  rng = np.random.default_rng(seed)
  params = {
    'w1': _normal(rng, (3, 3, 2, 4)) * 0.5,
    'w2': _normal(rng, (3, 3, 4, 3)) * 0.5,
    'w3': _normal(rng, (1, 1, 3, 1)),
  }
  x = _normal(rng, (batch, 5, 6, 2))
  return params, x


def _per_example_loss(conv_fn):
  def loss(params, x):
    return jnp.sum(jnp.sin(_tiny_net(conv_fn, params, x[None])))

  return loss


def test_per_example_grads_under_vmap():
  params, x = _tiny_setup()

  def per_example(conv_fn):
    return jax.jit(jax.vmap(jax.grad(_per_example_loss(conv_fn)), in_axes=(None, 0)))

  grads = per_example(conv.conv_general_dilated)(params, x)
  grads_ref = per_example(lax.conv_general_dilated)(params, x)
  assert grads['w1'].shape == (x.shape[0],) + params['w1'].shape
  _assert_tree_close(grads, grads_ref)
  # The per-example grads are the grads of each example alone.
  single_grad = jax.jit(jax.grad(_per_example_loss(conv.conv_general_dilated)))
  for i in range(x.shape[0]):
    single = single_grad(params, x[i])
    _assert_tree_close(jax.tree_util.tree_map(lambda g: g[i], grads), single)


def test_vmap_over_params_and_inputs():
  # e.g. one model per client: both operands batched.
  params, x = _tiny_setup(batch=2)
  stacked = jax.tree_util.tree_map(lambda p: jnp.stack([p, 2.0 * p]), params)

  def grads_fn(conv_fn):
    return jax.jit(jax.vmap(jax.grad(_per_example_loss(conv_fn))))

  _assert_tree_close(
    grads_fn(conv.conv_general_dilated)(stacked, x), grads_fn(lax.conv_general_dilated)(stacked, x)
  )


def test_jit_reuse_and_eager_agree():
  params, x = _tiny_setup(seed=4)
  loss = _per_example_loss(conv.conv_general_dilated)
  jitted = jax.jit(jax.value_and_grad(loss))
  first = jitted(params, x[0])
  second = jitted(params, x[0])  # cached executable
  eager = jax.value_and_grad(loss)(params, x[0])
  reference = jax.value_and_grad(_per_example_loss(lax.conv_general_dilated))(params, x[0])
  _assert_tree_close(first, second, 0, 0)
  _assert_tree_close(first, eager)
  _assert_tree_close(first, reference)


def test_grads_inside_scan_match():
  params, x = _tiny_setup(seed=5, batch=3)

  def train(conv_fn):
    loss = _per_example_loss(conv_fn)

    def step(p, xi):
      g = jax.grad(loss)(p, xi)
      return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), g['w1']

    return jax.jit(lambda p, xs: jax.lax.scan(step, p, xs))

  _assert_tree_close(
    train(conv.conv_general_dilated)(params, x), train(lax.conv_general_dilated)(params, x)
  )


def test_second_order_via_jvp_of_grad():
  # Hessian-vector products (forward-over-reverse) also work through the custom VJP.
  params, x = _tiny_setup(seed=6)
  tangent = jax.tree_util.tree_map(jnp.ones_like, params)

  def hvp(conv_fn):
    grad_fn = jax.grad(_per_example_loss(conv_fn))
    return jax.jvp(lambda p: grad_fn(p, x[0]), (params,), (tangent,))[1]

  _assert_tree_close(hvp(conv.conv_general_dilated), hvp(lax.conv_general_dilated), 1e-3, 1e-4)


# ---------------------------------------------------------------------------------------------
# 3D: the depth-folded convolution and the per-example kernel gradient, as a DP-SGD step runs them.


class _Net3D(nn.Module):
  """3x3x3 SAME conv -> stride-2 VALID conv on odd sizes -> 3x3x3 stride-2 transposed conv -> 1x1x1.

  The transposed conv is ``conv.ConvTranspose`` (an lhs-dilated conv); ``impl=None`` selects
  flax's own modules (``lax.conv_general_dilated`` and ``lax.conv_transpose``, plain autodiff).
  """

  impl: str | None

  @nn.compact
  def __call__(self, x):
    if self.impl is None:
      conv_cls, convt_cls = nn.Conv, nn.ConvTranspose
    else:
      conv_fn = functools.partial(conv.conv_general_dilated, impl=self.impl)
      conv_cls = functools.partial(nn.Conv, conv_general_dilated=conv_fn)
      convt_cls = conv.ConvTranspose
    h = jnp.tanh(conv_cls(3, (3, 3, 3), padding='SAME')(x))
    h = jnp.tanh(conv_cls(4, (3, 2, 3), strides=2, padding='VALID')(h))
    h = jnp.tanh(convt_cls(2, (3, 3, 3), strides=(2, 2, 2), padding='SAME')(h))
    return conv_cls(1, (1, 1, 1))(h)


def _net3d_setup(seed=9, batch=3, shape=(5, 7, 6, 2)):
  rng = np.random.default_rng(seed)
  x = _normal(rng, (batch,) + shape)
  params = _Net3D(None).init(jax.random.key(seed), x[:1])
  return params, x


def _net3d_loss(impl):
  def loss(params, x):
    with conv.use_impl(impl or 'auto'):
      return jnp.sum(jnp.sin(_Net3D(impl).apply(params, x[None])))

  return loss


@pytest.mark.parametrize('impl', ['native', 'fold'])
def test_3d_per_example_grads_under_vmap_inside_scan(impl):
  # The client's local steps: lax.scan over steps, vmap(grad) over the examples of each step.
  params, x = _net3d_setup()
  xs = jnp.stack([x, x[::-1] * 0.5])

  def train(impl):
    grad_fn = jax.vmap(jax.grad(_net3d_loss(impl)), in_axes=(None, 0))

    def step(p, x_step):
      g = grad_fn(p, x_step)
      p = jax.tree_util.tree_map(lambda a, b: a - 0.1 * b.sum(0), p, g)
      return p, g

    return jax.jit(lambda p, xs: lax.scan(step, p, xs))(params, xs)

  _assert_tree_close(train(impl), train(None))


def test_3d_nested_vmap_over_clients_and_examples():
  # The vmap backend: one model per client, per-example gradients inside.
  params, x = _net3d_setup(batch=2)
  stacked = jax.tree_util.tree_map(lambda p: jnp.stack([p, -0.5 * p]), params)
  xs = jnp.stack([x, x[::-1]])

  def grads(impl):
    per_example = jax.vmap(jax.grad(_net3d_loss(impl)), in_axes=(None, 0))
    return jax.jit(jax.vmap(per_example))(stacked, xs)

  _assert_tree_close(grads('fold'), grads(None))


def test_3d_higher_order_derivatives_match():
  # Forward-over-reverse (Hessian-vector products) and reverse-over-reverse through the
  # depth-folded convolution and the looped kernel gradient.
  params, x = _net3d_setup(seed=10, batch=2)
  tangent = jax.tree_util.tree_map(jnp.ones_like, params)

  def hvp(impl):
    grad_fn = jax.vmap(jax.grad(_net3d_loss(impl)), in_axes=(None, 0))
    return jax.jit(lambda p, t: jax.jvp(lambda p: grad_fn(p, x), (p,), (t,))[1])(params, tangent)

  def grad_of_grad_norm(impl):
    grad_fn = jax.grad(_net3d_loss(impl))
    sq = lambda p: sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grad_fn(p, x[0])))
    return jax.jit(jax.grad(sq))(params)

  _assert_tree_close(hvp('fold'), hvp(None), 1e-3, 1e-4)
  _assert_tree_close(grad_of_grad_norm('fold'), grad_of_grad_norm(None), 1e-3, 1e-4)


def _conv_eqns(jaxpr):
  """Every ``conv_general_dilated`` equation of a jaxpr, sub-jaxprs (scan, map, custom) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _conv_eqns(sub)
  return found


def test_fold_emits_only_ungrouped_2d_convolutions():
  # What makes the 3D DP step fast on XLA:CPU: no 3D convolution (XLA:CPU runs them several times
  # slower than 2D ones) and no grouped convolution (what vmap makes of a per-example
  # weight-gradient convolution).
  params, x = _net3d_setup()

  def convs(impl):
    per_example = jax.vmap(jax.grad(_net3d_loss(impl)), in_axes=(None, 0))
    return _conv_eqns(jax.make_jaxpr(per_example)(params, x).jaxpr)

  folded = convs('fold')
  assert folded and all(e.invars[0].aval.ndim == 4 for e in folded)
  assert all(e.params['feature_group_count'] == 1 for e in folded)
  native = convs('native')
  assert any(e.invars[0].aval.ndim == 5 for e in native)
  assert any(e.params['feature_group_count'] > 1 for e in native)


def test_3d_low_precision_accumulates_partial_sums_in_float32():
  rng = np.random.default_rng(11)
  x, w = _normal(rng, (2, 6, 5, 4, 3), jnp.bfloat16), _normal(rng, (3, 3, 3, 3, 4), jnp.bfloat16)
  args = ((1, 1, 1), 'SAME')
  ref = lax.conv_general_dilated(
    x, w, *args, dimension_numbers=DN3, preferred_element_type=jnp.float32
  )
  for kwargs in (dict(), dict(preferred_element_type=jnp.float32)):
    y = conv.conv_general_dilated(x, w, *args, dimension_numbers=DN3, impl='fold', **kwargs)
    assert y.dtype == kwargs.get('preferred_element_type', jnp.bfloat16)
    _assert_tree_close(y.astype(jnp.float32), ref, 2e-2, 5e-2)


def test_impl_selection():
  x, w = jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 2, 2))

  def ndims(**kwargs):
    f = lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1, 1), 'SAME', dimension_numbers=DN3, **kwargs
    )
    return {e.invars[0].aval.ndim for e in _conv_eqns(jax.make_jaxpr(f)(x, w).jaxpr)}

  assert ndims() == {4}  # 'auto': 3D convolutions are folded
  assert ndims(impl='native') == {5}
  with conv.use_impl('native'):
    assert ndims() == {5}
    with conv.use_impl('fold'):
      assert ndims() == {4}
    assert ndims() == {5}
    assert ndims(impl='auto') == {4}  # an explicit impl wins over the context
  assert ndims() == {4}
  with pytest.raises(ValueError, match='impl'):
    conv.conv_general_dilated(x, w, (1, 1, 1), 'SAME', dimension_numbers=DN3, impl='eigen')
  with pytest.raises(ValueError, match='impl'):
    with conv.use_impl('eigen'):
      pass


# ---------------------------------------------------------------------------------------------
# Flax modules.


def _module_check(ours, ref, x_shape, seed=7):
  rng = np.random.default_rng(seed)
  x = _normal(rng, x_shape)
  key = jax.random.key(seed)
  shapes = jax.eval_shape(ref.init, key, x)
  # Same parameter names, shapes and dtypes as the flax module.
  assert jax.eval_shape(ours.init, key, x) == shapes
  # Random parameters (non-zero bias, so its gradient and broadcasting are exercised too).
  params = jax.tree_util.tree_map(lambda s: _normal(rng, s.shape, s.dtype), shapes)
  cotangent = _normal(rng, jax.eval_shape(ref.apply, params, x).shape)

  @jax.jit
  def run(params, x, cotangent):
    results = []
    for module in (ref, ours):
      loss = lambda p, x, m=module: jnp.sum(m.apply(p, x) * cotangent)
      results.append((module.apply(params, x), jax.grad(loss, (0, 1))(params, x)))
    return results

  outputs_ref, outputs_ours = run(params, x, cotangent)
  _assert_tree_close(outputs_ours, outputs_ref)


@pytest.mark.parametrize(
  'kwargs, x_shape',
  [
    (dict(features=4, kernel_size=(3, 3), strides=2), (2, 7, 6, 3)),
    (dict(features=4, kernel_size=(2, 2), strides=2, padding='VALID'), (2, 6, 6, 3)),
    (dict(features=4, kernel_size=(1, 1), use_bias=False), (2, 4, 5, 3)),
    (dict(features=4, kernel_size=(3, 3), padding='CIRCULAR'), (2, 5, 4, 3)),
    (dict(features=4, kernel_size=(3,), strides=2), (2, 7, 3)),
    (
      dict(features=4, kernel_size=(3, 3), kernel_dilation=2, padding=((1, 2), (2, 0))),
      (2, 7, 6, 3),
    ),
    (
      dict(features=4, kernel_size=(3, 3), input_dilation=2, padding=((1, 1), (2, 1))),
      (2, 4, 3, 3),
    ),
    (dict(features=2, kernel_size=(3, 3, 3), strides=(2, 1, 2)), (2, 5, 4, 3, 3)),
  ],
)
def test_conv_module_matches_flax(kwargs, x_shape):
  _module_check(conv.Conv(**kwargs), nn.Conv(**kwargs), x_shape)


@pytest.mark.parametrize(
  'kwargs, x_shape',
  [
    (dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding='SAME'), (2, 4, 3, 3)),
    (dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding='VALID'), (2, 4, 3, 3)),
    (dict(features=4, kernel_size=(2, 2), strides=(2, 2), padding='VALID'), (2, 4, 3, 3)),
    (dict(features=4, kernel_size=(4, 3), strides=(2, 3), padding='SAME'), (2, 3, 3, 3)),
    (
      dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding='VALID', transpose_kernel=True),
      (2, 4, 3, 3),
    ),
    (
      dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding='SAME', kernel_dilation=(2, 1)),
      (2, 4, 3, 3),
    ),
    (dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((1, 2), (0, 1))), (2, 4, 3, 3)),
    (
      dict(
        features=4, kernel_size=(3, 3), strides=(2, 2), padding='CIRCULAR', transpose_kernel=True
      ),
      (2, 4, 3, 3),
    ),
    (dict(features=2, kernel_size=(2, 2, 2), strides=(2, 2, 2), padding='VALID'), (2, 3, 2, 3, 3)),
    (dict(features=2, kernel_size=(3, 3, 3), strides=(2, 2, 2), padding='SAME'), (2, 3, 2, 3, 3)),
    (dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding='CIRCULAR'), (2, 4, 3, 3)),
    (dict(features=3, kernel_size=(2, 2), strides=(2, 2)), (2, 2, 3, 3, 3)),
    (dict(features=3, kernel_size=(3,), strides=(2,), padding='VALID'), (2, 5, 3)),
    (dict(features=3, kernel_size=(3, 3), strides=(2, 2), use_bias=False), (4, 3, 3)),
  ],
)
def test_conv_transpose_module_matches_flax(kwargs, x_shape):
  _module_check(conv.ConvTranspose(**kwargs), nn.ConvTranspose(**kwargs), x_shape)


def test_conv_transpose_padding_matches_output_sizes():
  # Output sizes documented for lax.conv_transpose: SAME -> n * s, VALID -> n * s + max(k - s, 0).
  for k in range(1, 6):
    for s in range(1, 4):
      for n in range(1, 5):
        for padding, expected in (('SAME', n * s), ('VALID', n * s + max(k - s, 0))):
          lo, hi = conv.conv_transpose_padding(k, s, padding)
          assert (n - 1) * s + 1 + lo + hi - k + 1 == expected, (k, s, n, padding)
  with pytest.raises(ValueError, match='CIRCULAR'):
    conv.conv_transpose_padding(3, 2, 'CIRCULAR')
