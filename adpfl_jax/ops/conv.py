"""Convolutions whose VJP is written with forward convolutions only.

On XLA:CPU the "backward" convolutions that autodiff emits for
``lax.conv_general_dilated`` (the input-gradient conv with a transposed kernel spec and the
weight-gradient conv with batch and feature axes swapped in its dimension numbers) run several
times slower inside a while loop (``lax.scan``, ``lax.fori_loop``, ``lax.map``) than at top level,
while forward convolutions in the canonical ``NHWC``/``HWIO`` layout do not. A DP-SGD step inside
a scanned federated round therefore pays 8-10x for its backward pass.

:func:`conv_general_dilated` is a drop-in replacement for ``jax.lax.conv_general_dilated`` with a
``jax.custom_vjp`` whose backward pass consists of explicit transposes plus two canonical-layout
*forward* convolutions:

* ``dlhs``: the output cotangent, dilated by the forward ``window_strides`` (``lhs_dilation``),
  convolved with the spatially flipped, in/out-swapped kernel; the forward ``lhs_dilation`` becomes
  the ``window_strides``.
* ``drhs``: the input with batch and feature axes swapped, convolved with the output cotangent used
  as a kernel (also batch/feature swapped); forward ``window_strides`` become ``rhs_dilation`` and
  forward ``rhs_dilation`` becomes ``window_strides``.

Convolutions whose windows do not overlap (1x1 kernels, stride == kernel size, and transposed
convs with kernel size == stride, e.g. the 2x2 stride-2 up-sampling of a U-Net) skip the
convolution altogether: they are computed as a reshape plus one ``dot_general`` (plain autodiff),
which is fast in loops too and avoids the ``stride**ndim`` multiplications by inserted zeros that an
``lhs_dilation`` conv performs.

Negative paddings that these formulas produce (when the forward conv dropped trailing input rows
because of the output-size floor, or when the forward padding exceeds the kernel extent) are turned
into crops of the operand, so every emitted convolution has non-negative padding.

Implementations (``impl`` argument, or :func:`use_impl` around the tracing of a model):

* ``'native'``: every convolution above is one ``lax.conv_general_dilated``.
* ``'fold'``: built for the 3D U-Net's DP-SGD step, where ``'native'`` hits two XLA:CPU (jaxlib
  0.10.2) weaknesses. (1) XLA:CPU runs 3D convolutions with Eigen's cuboid convolution, 5-17x
  slower than the same convolutions folded into 2D ones (Eigen's spatial convolution, or YNNPACK,
  which XLA:CPU picks for 2D convolutions with >= 24 channels on a side): 1-13 GFLOP/s against
  8-78 for the U-Net's layers (1-32 channels, batch of 11 examples, 2-core Xeon). (2) Under
  ``vmap`` (per-example gradients) both operands of the weight-gradient convolution carry the
  batch axis, and JAX's batching rule makes it a grouped convolution (``feature_group_count`` =
  batch), which XLA:CPU runs at 2-8 GFLOP/s. So ``'fold'`` computes every 3D convolution, forward and input gradient, as
  one 2D convolution over the depth slices folded into the batch, the depth taps of the kernel
  stacked as output channels (:func:`_depth_folded_conv`); and the kernel gradient, in any rank,
  as ``dot_general``s over shifted windows of the flattened input (:func:`_grad_rhs_dots`), run
  one example at a time by ``lax.map`` when ``vmap``-ed (:func:`_grad_rhs_looped`).
* ``'auto'`` (default): ``'fold'`` for 3 spatial dims, ``'native'`` otherwise.

``benchmarks/step3d.py`` measures the full-size 3D DP step with each. Two costs of ``'fold'``:
the folded forward writes the ``kd`` stacked taps (``kd`` times the output) before summing them,
and the kernel gradient copies shifted windows (``k_last`` stacked copies of one operand and one
window of the other per remaining tap, per example): the XLA temporary buffers of the full-size
3D DP step (11 examples) grow from 1.19 to 1.72 GiB. And XLA's cost analysis counts a while-loop
body once, so it under-counts the FLOPs of a ``vmap``-ed ``'fold'`` kernel gradient: count FLOPs
on a lowering with ``impl='native'``.

Flax helpers: :class:`Conv` is ``flax.linen.Conv`` wired to this convolution (same parameters),
and :class:`ConvTranspose` re-implements ``flax.linen.ConvTranspose`` (which calls
``lax.conv_transpose`` with no injection point) on top of it, with the same parameter layout.

.. warning::
  ``feature_group_count > 1`` or ``batch_group_count > 1`` falls back to the plain
  ``lax.conv_general_dilated`` (autodiff's backward convolutions, slow inside loops on CPU).
  Batching by ``jax.vmap`` is fine: it is applied to the forward convolutions of the custom VJP.

Example:

  >>> import jax, jax.numpy as jnp
  >>> from adpfl_jax.ops import conv
  >>> x = jnp.ones((2, 8, 8, 3)); w = jnp.ones((3, 3, 3, 4))
  >>> y = conv.conv_general_dilated(x, w, (2, 2), 'SAME',
  ...                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  >>> y.shape
  (2, 4, 4, 4)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import linear as flax_linear
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike, PromoteDtypeFn
from jax import lax

__all__ = [
  'IMPLS',
  'Conv',
  'ConvTranspose',
  'conv_general_dilated',
  'conv_transpose_padding',
  'use_impl',
]


@dataclasses.dataclass(frozen=True)
class _ConvSpec:
  """Static parameters of a canonical-layout (N, *spatial, C) x (*k, I, O) convolution."""

  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  precision: Any
  preferred_element_type: Any
  impl: str = 'native'


def _canonical_dn(num_spatial: int) -> lax.ConvDimensionNumbers:
  """Dimension numbers of (N, *spatial, C), (*spatial, I, O) -> (N, *spatial, C)."""
  spatial = tuple(range(1, num_spatial + 1))
  return lax.ConvDimensionNumbers(
    lhs_spec=(0, num_spatial + 1) + spatial,
    rhs_spec=(num_spatial + 1, num_spatial) + tuple(range(num_spatial)),
    out_spec=(0, num_spatial + 1) + spatial,
  )


def _plain_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int],
  rhs_dilation: Sequence[int],
  precision: Any,
  preferred_element_type: Any = None,
  impl: str = 'native',
) -> jax.Array:
  """A forward convolution in the canonical channels-last layout.

  ``impl='fold'`` computes a 3D convolution with 2D convolutions (:func:`_depth_folded_conv`);
  otherwise this is one ``lax.conv_general_dilated``.
  """
  if impl == 'fold' and lhs.ndim == 5 and lhs.size and rhs.size:
    return _depth_folded_conv(
      lhs,
      rhs,
      tuple(window_strides),
      tuple(padding),
      tuple(lhs_dilation),
      tuple(rhs_dilation),
      precision,
      preferred_element_type,
    )
  return lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides=tuple(window_strides),
    padding=tuple(padding),
    lhs_dilation=tuple(lhs_dilation),
    rhs_dilation=tuple(rhs_dilation),
    dimension_numbers=_canonical_dn(lhs.ndim - 2),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


def _dilated(size: int, dilation: int) -> int:
  """Length of a 1D array of ``size`` elements after inserting ``dilation - 1`` zeros between."""
  return 0 if size == 0 else (size - 1) * dilation + 1


def _depth_folded_conv(
  x: jax.Array,
  w: jax.Array,
  window_strides: tuple[int, ...],
  padding: tuple[tuple[int, int], ...],
  lhs_dilation: tuple[int, ...],
  rhs_dilation: tuple[int, ...],
  precision: Any,
  preferred_element_type: Any,
) -> jax.Array:
  """A canonical 3D convolution computed with 2D convolutions over depth slices.

  XLA:CPU runs 2D convolutions several times faster per FLOP than 3D ones of the same channel
  counts. The depth axis is padded (and dilated, for ``lhs_dilation``) explicitly and folded into
  the batch; the (H, W) part of the window, with its strides, padding and dilations, goes to a 2D
  convolution. With depth stride 1 the ``kd`` depth taps of the kernel become ``kd * O`` output
  channels of one 2D convolution over every depth slice, and output slice ``t`` sums the channels
  of tap ``j`` at slice ``t + j * dilation``. With a depth stride, each tap convolves only the
  slices it reads and the ``kd`` results are summed. Partial sums of low-precision inputs are
  accumulated in float32.
  """
  kd, out_ch = w.shape[0], w.shape[-1]
  sd, dd, ad = window_strides[0], rhs_dilation[0], lhs_dilation[0]
  lo, hi = padding[0]
  depth = _dilated(x.shape[1], ad) + lo + hi
  out_depth = (depth - _dilated(kd, dd)) // sd + 1
  if out_depth <= 0:
    return _plain_conv(
      x, w, window_strides, padding, lhs_dilation, rhs_dilation, precision, preferred_element_type
    )
  if lo or hi or ad > 1:
    pads = [(0, 0, 0), (lo, hi, ad - 1)] + [(0, 0, 0)] * (x.ndim - 2)
    x = lax.pad(x, jnp.zeros((), x.dtype), pads)
  out_type = x.dtype if preferred_element_type is None else preferred_element_type
  acc_type = preferred_element_type
  if acc_type is None and jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    acc_type = jnp.float32
  args_2d = (
    window_strides[1:],
    padding[1:],
    lhs_dilation[1:],
    rhs_dilation[1:],
    precision,
    acc_type,
  )
  batch, plane = x.shape[0], x.shape[2:]
  if sd == 1:
    w_2d = jnp.moveaxis(w, 0, -2).reshape(w.shape[1:-1] + (kd * out_ch,))  # (kh, kw, I, kd*O)
    z = _plain_conv(x.reshape((batch * depth,) + plane), w_2d, *args_2d)
    z = z.reshape((batch, depth) + z.shape[1:-1] + (kd, out_ch))
    taps = [z[:, j * dd : j * dd + out_depth, :, :, j] for j in range(kd)]
  else:
    taps = []
    for j in range(kd):
      x_j = x[:, j * dd : j * dd + sd * (out_depth - 1) + 1 : sd]
      z = _plain_conv(x_j.reshape((batch * out_depth,) + plane), w[j], *args_2d)
      taps.append(z.reshape((batch, out_depth) + z.shape[1:]))
  return sum(taps[1:], taps[0]).astype(out_type)


def _nonnegative_padding(size: int, dilation: int, lo: int, hi: int) -> tuple[int, int, int, int]:
  """Rewrites possibly negative padding of a dilated axis as a crop plus non-negative padding.

  The axis holds ``size`` elements, dilated by ``dilation`` and then padded by ``(lo, hi)``
  (negative values remove entries of the dilated axis). Returns ``(start, stop, lo', hi')`` such
  that dilating ``x[start:stop]`` and padding it by ``(lo', hi') >= 0`` gives the same sequence.
  ``stop <= start`` means no element of the array survives.
  """
  start, stop = 0, size
  if lo < 0:
    drop = math.ceil(-lo / dilation)
    start, lo = drop, drop * dilation + lo
  if hi < 0:
    drop = math.ceil(-hi / dilation)
    stop, hi = size - drop, drop * dilation + hi
  return start, stop, lo, hi


def _crop_for_padding(
  x: jax.Array, dilation: Sequence[int], padding: Sequence[tuple[int, int]]
) -> tuple[jax.Array | None, list[tuple[int, int]]]:
  """Crops spatial axes 1..n of ``x`` so that ``padding`` becomes non-negative.

  Returns ``(None, [])`` when a spatial axis is cropped away entirely.
  """
  starts, stops, pads = [0] * x.ndim, list(x.shape), []
  for axis, (dil, (lo, hi)) in enumerate(zip(dilation, padding), start=1):
    start, stop, lo, hi = _nonnegative_padding(x.shape[axis], dil, lo, hi)
    if stop <= start:
      return None, []
    starts[axis], stops[axis] = start, stop
    pads.append((lo, hi))
  if starts != [0] * x.ndim or stops != list(x.shape):
    x = lax.slice(x, starts, stops)
  return x, pads


def _forward(spec: _ConvSpec, x: jax.Array, w: jax.Array) -> jax.Array:
  """The forward conv, with negative padding applied as a crop of ``x``.

  XLA:CPU (jax 0.10.2) returns garbage for some convolutions with negative padding, e.g. a
  3x3 stride-3 conv padded by (-1, 2), so no emitted convolution gets a negative pad.
  """
  x_c, pads = _crop_for_padding(x, spec.lhs_dilation, spec.padding)
  args = (spec.window_strides, spec.padding, spec.lhs_dilation, spec.rhs_dilation)
  if x_c is None:  # every window lies in the padding
    out = jax.eval_shape(
      lambda x, w: _plain_conv(x, w, *args, spec.precision, spec.preferred_element_type), x, w
    )
    return jnp.zeros(out.shape, out.dtype)
  return _plain_conv(
    x_c,
    w,
    spec.window_strides,
    pads,
    spec.lhs_dilation,
    spec.rhs_dilation,
    spec.precision,
    spec.preferred_element_type,
    spec.impl,
  )


def _grad_lhs(spec: _ConvSpec, dy: jax.Array, w: jax.Array, x_aval: jax.ShapeDtypeStruct):
  """Input cotangent: dy (dilated by the strides) conv flipped, in/out-swapped kernel."""
  n = dy.ndim - 2
  in_sizes, k_sizes, out_sizes = x_aval.shape[1:-1], w.shape[:n], dy.shape[1:-1]
  pads = []
  for i in range(n):
    s, a, d = spec.window_strides[i], spec.lhs_dilation[i], spec.rhs_dilation[i]
    k_eff = _dilated(k_sizes[i], d)
    lo = k_eff - 1 - spec.padding[i][0]
    hi = _dilated(in_sizes[i], a) + k_eff - 1 - _dilated(out_sizes[i], s) - lo
    pads.append((lo, hi))
  dy_c, pads = _crop_for_padding(dy, spec.window_strides, pads)
  if dy_c is None or dy.size == 0 or w.size == 0:
    return jnp.zeros(x_aval.shape, x_aval.dtype)
  w_t = jnp.swapaxes(jnp.flip(w, axis=tuple(range(n))), n, n + 1).astype(dy.dtype)
  dx = _plain_conv(
    dy_c,
    w_t,
    spec.lhs_dilation,
    pads,
    spec.window_strides,
    spec.rhs_dilation,
    spec.precision,
    impl=spec.impl,
  )
  assert dx.shape == x_aval.shape, (dx.shape, x_aval.shape)
  return dx.astype(x_aval.dtype)


def _grad_rhs_input_padding(
  spec: _ConvSpec, dy: jax.Array, x: jax.Array, w_aval: jax.ShapeDtypeStruct
) -> tuple[jax.Array | None, list[tuple[int, int]]]:
  """Crops ``x`` and returns the padding of its dilated copy ``X`` that the kernel cotangent reads.

  Tap ``k`` of the kernel cotangent is ``sum_{n, t} X[n, k * d + t * s] dy[n, t]`` (``d``: kernel
  dilation, ``s``: stride), over an ``X`` of exactly ``(k - 1) * d + (t - 1) * s + 1`` entries per
  spatial axis.
  """
  n = dy.ndim - 2
  in_sizes, k_sizes, out_sizes = x.shape[1:-1], w_aval.shape[:n], dy.shape[1:-1]
  pads = []
  for i in range(n):
    s, a, d = spec.window_strides[i], spec.lhs_dilation[i], spec.rhs_dilation[i]
    lo = spec.padding[i][0]
    hi = _dilated(k_sizes[i], d) + _dilated(out_sizes[i], s) - _dilated(in_sizes[i], a) - lo - 1
    pads.append((lo, hi))
  return _crop_for_padding(x, spec.lhs_dilation, pads)


def _grad_rhs(spec: _ConvSpec, dy: jax.Array, x: jax.Array, w_aval: jax.ShapeDtypeStruct):
  """Kernel cotangent: x (batch<->feature) conv dy used as kernel (batch<->feature)."""
  n = dy.ndim - 2
  x_c, pads = _grad_rhs_input_padding(spec, dy, x, w_aval)
  if x_c is None or dy.size == 0 or x.size == 0:
    return jnp.zeros(w_aval.shape, w_aval.dtype)
  spatial = tuple(range(1, n + 1))
  x_t = jnp.transpose(x_c, (n + 1,) + spatial + (0,)).astype(dy.dtype)  # (C, *S, N)
  dy_t = jnp.transpose(dy, spatial + (0, n + 1))  # (*S_out, N, O) used as (*k, I, O)
  dw = _plain_conv(
    x_t, dy_t, spec.rhs_dilation, pads, spec.lhs_dilation, spec.window_strides, spec.precision
  )  # (C, *k, O)
  dw = jnp.transpose(dw, spatial + (0, n + 1))
  assert dw.shape == w_aval.shape, (dw.shape, w_aval.shape)
  return dw.astype(w_aval.dtype)


def _grad_rhs_dots(spec: _ConvSpec, dy: jax.Array, x: jax.Array, w_aval: jax.ShapeDtypeStruct):
  """Kernel cotangent from ``dot_general``s over shifted windows, without a convolution.

  Under ``vmap`` (per-example gradients) both operands of the weight-gradient convolution of
  :func:`_grad_rhs` carry the batch axis, and JAX turns it into a grouped convolution
  (``feature_group_count`` = batch) that XLA:CPU runs several times slower than an ungrouped one;
  a ``dot_general`` simply gains a batch dimension. Tap ``k`` of the kernel cotangent contracts
  the window of the dilated, padded input ``X`` that it reads with ``dy``, over batch and space.

  With unit strides, that window is a contiguous run of the flattened ``X``: ``dy`` is
  zero-padded to ``X``'s grid and flattened the same way, and ``dw[k] = sum_q X[q + off(k)] dy[q]``
  (zeros of ``dy`` cancel the entries that wrap around a row). The taps along the last spatial
  axis are stacked as channels of whichever operand has fewer channels, so each ``dot_general``
  serves ``k_last`` taps (XLA:CPU runs these skinny matmuls at a fraction of its matmul speed, and
  wider ones faster). With strides, each tap is one strided slice of ``X``.
  """
  n = dy.ndim - 2
  x_c, pads = _grad_rhs_input_padding(spec, dy, x, w_aval)
  if x_c is None or dy.size == 0 or x.size == 0:
    return jnp.zeros(w_aval.shape, w_aval.dtype)
  k_sizes, out_sizes = w_aval.shape[:n], dy.shape[1:-1]
  zero = jnp.zeros((), dy.dtype)
  config = [(0, 0, 0)] + [(lo, hi, a - 1) for (lo, hi), a in zip(pads, spec.lhs_dilation)]
  x_p = lax.pad(x_c.astype(dy.dtype), zero, config + [(0, 0, 0)])
  in_ch, out_ch = x_p.shape[-1], dy.shape[-1]

  def contract(a, b, axes):
    return lax.dot_general(a, b, ((axes, axes), ((), ())), precision=spec.precision)

  if any(s != 1 for s in spec.window_strides):
    dws = []
    for tap in np.ndindex(*k_sizes):
      start = [0] + [k * d for k, d in zip(tap, spec.rhs_dilation)]
      limit = [b + (t - 1) * s + 1 for b, t, s in zip(start[1:], out_sizes, spec.window_strides)]
      window = lax.slice(
        x_p, start + [0], [x_p.shape[0]] + limit + [in_ch], [1, *spec.window_strides, 1]
      )
      dws.append(contract(window, dy, tuple(range(n + 1))))
    return jnp.stack(dws).reshape(w_aval.shape).astype(w_aval.dtype)

  grid = x_p.shape[1:-1]
  row = [math.prod(grid[i + 1 :]) for i in range(n)]
  outer = [
    sum(k * d * r for k, d, r in zip(tap, spec.rhs_dilation, row))
    for tap in np.ndindex(*k_sizes[:-1])
  ]
  inner = [k * spec.rhs_dilation[-1] for k in range(k_sizes[-1])]
  x_f = x_p.reshape(-1, in_ch)
  length = x_f.shape[0] - max(outer) - max(inner)  # dy's (zero-padded) flat extent that counts
  embed = [(0, 0, 0)] + [(0, g - t, 0) for g, t in zip(grid, out_sizes)] + [(0, 0, 0)]
  dy_f = lax.pad(dy, zero, embed).reshape(-1, out_ch)[:length]
  if out_ch <= in_ch:
    # dw[o + i] = sum_u X[u + o] dy[u - i]: dy stacked over the inner offsets i.
    dy_s = jnp.concatenate(
      [lax.pad(dy_f, zero, [(i, max(inner) - i, 0), (0, 0, 0)]) for i in inner], axis=-1
    )
    dws = [contract(x_f[o : o + dy_s.shape[0]], dy_s, (0,)) for o in outer]  # (I, k_last * O)
    dw = jnp.stack(dws).reshape(len(outer), in_ch, len(inner), out_ch).swapaxes(1, 2)
  else:
    # dw[o + i] = sum_q X[q + o + i] dy[q]: X stacked over the inner offsets i.
    span = length + max(outer)
    x_s = jnp.concatenate([x_f[i : i + span] for i in inner], axis=-1)
    dws = [contract(x_s[o : o + length], dy_f, (0,)) for o in outer]  # (k_last * I, O)
    dw = jnp.stack(dws)
  return dw.reshape(w_aval.shape).astype(w_aval.dtype)


def _grad_rhs_looped(spec: _ConvSpec, dy: jax.Array, x: jax.Array, w_aval: jax.ShapeDtypeStruct):
  """:func:`_grad_rhs_dots`, run one example at a time (``lax.map``) when ``vmap``-ed.

  Batched, every shifted window of :func:`_grad_rhs_dots` is a strided copy of all examples and
  its ``dot_general`` a batched matmul; one example at a time, the windows are contiguous
  copies that stay in cache, which measures 1.2-1.5x faster for the 3D U-Net's per-example
  kernel gradients. Nested ``vmap``s nest the loops. ``custom_vmap`` has no reverse-mode rule,
  so a ``custom_jvp`` gives derivatives of this bilinear map through the batched
  :func:`_grad_rhs_dots` (only higher-order derivatives of the convolution use them).
  """

  def direct(dy, x):
    return _grad_rhs_dots(spec, dy, x, w_aval)

  @jax.custom_batching.custom_vmap
  def looped(dy, x):
    return direct(dy, x)

  @looped.def_vmap
  def _loop(axis_size, in_batched, dy, x):
    del axis_size
    operands = (dy, x)

    def one(batched_values):
      it = iter(batched_values)
      return looped(*[next(it) if b else v for v, b in zip(operands, in_batched)])

    batched = tuple(v for v, b in zip(operands, in_batched) if b)
    if not batched:
      return one(()), False
    return lax.map(one, batched), True

  @jax.custom_jvp
  def grad_rhs(dy, x):
    return looped(dy, x)

  @functools.partial(grad_rhs.defjvp, symbolic_zeros=True)
  def _bilinear_jvp(primals, tangents):
    dy, x = primals
    dy_dot, x_dot = tangents
    out = looped(dy, x)
    terms = []
    if not isinstance(dy_dot, jax.custom_derivatives.SymbolicZero):
      terms.append(direct(dy_dot, x))
    if not isinstance(x_dot, jax.custom_derivatives.SymbolicZero):
      terms.append(direct(dy, x_dot))
    return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)

  return grad_rhs(dy, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_canonical(spec: _ConvSpec, x: jax.Array, w: jax.Array) -> jax.Array:
  return _forward(spec, x, w)


def _conv_canonical_fwd(spec: _ConvSpec, x: jax.Array, w: jax.Array):
  return _forward(spec, x, w), (x, w)


def _conv_canonical_bwd(spec: _ConvSpec, residuals, dy: jax.Array):
  x, w = residuals
  x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
  w_aval = jax.ShapeDtypeStruct(w.shape, w.dtype)
  grad_rhs = _grad_rhs_looped if spec.impl == 'fold' else _grad_rhs
  return _grad_lhs(spec, dy, w, x_aval), grad_rhs(spec, dy, x, w_aval)


_conv_canonical.defvjp(_conv_canonical_fwd, _conv_canonical_bwd)


def _patchify_matmul(spec: _ConvSpec, x: jax.Array, w: jax.Array) -> jax.Array | None:
  """Non-overlapping strided conv (stride == kernel size) as a reshape plus one matmul."""
  n = x.ndim - 2
  k_sizes = w.shape[:n]
  pads, out_sizes = [(0, 0, 0)], []
  for size, k, (lo, hi) in zip(x.shape[1:-1], k_sizes, spec.padding):
    out = (size + lo + hi - k) // k + 1
    if out <= 0:
      return None
    out_sizes.append(out)
    pads.append((lo, out * k - size - lo, 0))
  pads.append((0, 0, 0))
  if any(lo != 0 or hi != 0 for lo, hi, _ in pads):
    x = lax.pad(x, jnp.zeros((), x.dtype), pads)
  blocks = [d for o, k in zip(out_sizes, k_sizes) for d in (o, k)]
  x = x.reshape((x.shape[0], *blocks, x.shape[-1]))
  contract = tuple(range(2, 2 * n + 1, 2)) + (2 * n + 1,)
  return lax.dot_general(
    x,
    w,
    ((contract, tuple(range(n + 1))), ((), ())),
    precision=spec.precision,
    preferred_element_type=spec.preferred_element_type,
  )


def _upsample_matmul(spec: _ConvSpec, x: jax.Array, w: jax.Array) -> jax.Array:
  """Transposed conv with kernel size == stride (no overlap) as one matmul plus a reshape."""
  n = x.ndim - 2
  k_sizes, in_sizes = w.shape[:n], x.shape[1:-1]
  # Output position i * k + r sees only input i, through kernel tap k - 1 - r.
  w_flipped = jnp.flip(w, axis=tuple(range(n)))
  y = lax.dot_general(
    x,
    w_flipped,
    (((n + 1,), (n,)), ((), ())),
    precision=spec.precision,
    preferred_element_type=spec.preferred_element_type,
  )  # (N, *in_sizes, *k_sizes, O)
  perm = (0,) + tuple(d for i in range(n) for d in (1 + i, 1 + n + i)) + (2 * n + 1,)
  y = jnp.transpose(y, perm)
  out = tuple(size * k for size, k in zip(in_sizes, k_sizes))
  return y.reshape((x.shape[0], *out, w.shape[-1]))


def _conv_or_matmul(spec: _ConvSpec, x: jax.Array, w: jax.Array) -> jax.Array:
  """Canonical-layout conv; non-overlapping windows (1x1, stride == kernel) become matmuls.

  A convolution whose windows do not overlap is a reshape plus a ``dot_general``; autodiff of
  that is fast inside loops too, and it skips the zeros that ``lhs_dilation`` inserts (a factor
  ``stride**ndim`` of wasted work in a stride-2 transposed conv). Everything else goes through the
  custom-VJP convolution.
  """
  n = x.ndim - 2
  if x.size and w.size and all(d == 1 for d in spec.rhs_dilation):
    k_sizes = w.shape[:n]
    if all(
      s == 1 and a == k and p == (k - 1, k - 1)
      for s, a, k, p in zip(spec.window_strides, spec.lhs_dilation, k_sizes, spec.padding)
    ):
      return _upsample_matmul(spec, x, w)
    if all(a == 1 and s == k for s, a, k in zip(spec.window_strides, spec.lhs_dilation, k_sizes)):
      y = _patchify_matmul(spec, x, w)
      if y is not None:
        return y
  return _conv_canonical(spec, x, w)


IMPLS = ('auto', 'native', 'fold')
_default_impl: contextvars.ContextVar[str] = contextvars.ContextVar('conv_impl', default='auto')


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
  """Within the block, :func:`conv_general_dilated` calls without ``impl`` use ``impl``.

  It acts when a function is traced (e.g. on the first call of a ``jax.jit``-ed function), so
  the flax modules and models built on this module can be switched without new arguments::

    with conv.use_impl('native'):
      step = jax.jit(train_step).lower(params, batch).compile()
  """
  if impl not in IMPLS:
    raise ValueError(f'use_impl: impl={impl!r} is not one of {IMPLS}.')
  token = _default_impl.set(impl)
  try:
    yield
  finally:
    _default_impl.reset(token)


def _int_tuple(name: str, value: Sequence[int] | None, n: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  value = tuple(int(v) for v in value)
  if len(value) != n or any(v < 1 for v in value):
    raise ValueError(f'conv_general_dilated: {name}={value} must be {n} positive integers.')
  return value


def _hashable_precision(precision: PrecisionLike) -> Any:
  if isinstance(precision, list):
    return tuple(precision)
  return precision


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: PrecisionLike = None,
  preferred_element_type: Any = None,
  *,
  impl: str | None = None,
) -> jax.Array:
  """Drop-in ``jax.lax.conv_general_dilated`` whose VJP uses only forward convolutions.

  Same arguments and forward result as ``jax.lax.conv_general_dilated`` (any number of spatial
  dims, strides, string or explicit padding, lhs/rhs dilation, any ``dimension_numbers``). The
  operands are transposed to the channels-last ``(N, *spatial, C)`` / ``(*spatial, I, O)``
  layout (a no-op for flax's ``NHWC``/``HWIO`` layouts), and the gradient w.r.t. both operands is
  computed by two forward convolutions in that layout, which XLA:CPU runs fast inside loops.

  Args:
    lhs: input, rank ``n + 2``.
    rhs: kernel, rank ``n + 2``.
    window_strides: ``n`` strides.
    padding: ``'SAME'``, ``'VALID'`` or ``n`` ``(low, high)`` pairs (negative values allowed).
    lhs_dilation: ``n`` input dilations (transposed convolution), or ``None``.
    rhs_dilation: ``n`` kernel dilations (atrous convolution), or ``None``.
    dimension_numbers: as for ``lax.conv_general_dilated`` (``None`` means ``NCHW``/``OIHW``).
    feature_group_count: grouped convolution; values ``> 1`` use the plain lax op.
    batch_group_count: values ``> 1`` use the plain lax op.
    precision: passed to every convolution, forward and backward.
    preferred_element_type: accumulation/result dtype of the forward conv; the backward convs
      accumulate in the cotangent's dtype and cast to the operand dtypes.
    impl: ``'native'``, ``'fold'`` or ``'auto'`` (see the module docstring); ``None`` means the
      default of the innermost :func:`use_impl` block, ``'auto'`` outside any.

  Returns:
    The convolution, laid out as ``dimension_numbers`` says.

  Raises:
    ValueError: on rank mismatch, bad stride/dilation tuples, string padding together with
      ``lhs_dilation != 1`` (as ``lax.conv_general_dilated``), or an unknown ``impl``.
  """
  impl = _default_impl.get() if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f'conv_general_dilated: impl={impl!r} is not one of {IMPLS}.')
  if feature_group_count != 1 or batch_group_count != 1:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  if lhs.ndim != rhs.ndim or lhs.ndim < 2:
    raise ValueError(
      'conv_general_dilated: lhs and rhs must have the same rank >= 2, got shapes '
      f'{lhs.shape} and {rhs.shape}.'
    )
  n = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  window_strides = _int_tuple('window_strides', window_strides, n)
  lhs_dilation = _int_tuple('lhs_dilation', lhs_dilation, n)
  rhs_dilation = _int_tuple('rhs_dilation', rhs_dilation, n)
  lhs_perm = (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],)
  rhs_perm = tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0])
  out_perm = (dn.out_spec[0],) + tuple(dn.out_spec[2:]) + (dn.out_spec[1],)
  if isinstance(padding, str):
    if any(a != 1 for a in lhs_dilation):
      raise ValueError(
        f'conv_general_dilated: string padding {padding!r} is not defined with lhs_dilation='
        f'{lhs_dilation}; pass explicit (low, high) pairs (see conv_transpose_padding).'
      )
    in_sizes = [lhs.shape[i] for i in lhs_perm[1:-1]]
    k_eff = [_dilated(rhs.shape[i], d) for i, d in zip(rhs_perm[:-2], rhs_dilation)]
    padding = lax.padtype_to_pads(in_sizes, k_eff, window_strides, padding)
  try:
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f'conv_general_dilated: padding={padding!r} must be a string or (low, high) pairs.'
    ) from e
  if len(padding) != n:
    raise ValueError(f'conv_general_dilated: padding={padding} must have {n} (low, high) pairs.')
  spec = _ConvSpec(
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    precision=_hashable_precision(precision),
    preferred_element_type=preferred_element_type,
    impl=('fold' if n == 3 else 'native') if impl == 'auto' else impl,
  )
  identity = tuple(range(lhs.ndim))
  x = lhs if lhs_perm == identity else jnp.transpose(lhs, lhs_perm)
  w = rhs if rhs_perm == identity else jnp.transpose(rhs, rhs_perm)
  y = _conv_or_matmul(spec, x, w)
  if out_perm != identity:
    y = jnp.transpose(y, tuple(int(i) for i in np.argsort(out_perm)))
  return y


def conv_transpose_padding(kernel_size: int, stride: int, padding: str) -> tuple[int, int]:
  """Padding of the lhs-dilated conv that ``lax.conv_transpose`` runs for ``'SAME'``/``'VALID'``.

  Args:
    kernel_size: effective (already dilated) kernel extent along one axis.
    stride: transposed-convolution stride (the lhs dilation) along that axis.
    padding: ``'SAME'`` (output ``size * stride``) or ``'VALID'`` (output
      ``size * stride + max(kernel_size - stride, 0)``).

  Returns:
    ``(low, high)`` padding for that axis.
  """
  if padding == 'SAME':
    total = kernel_size + stride - 2
    low = kernel_size - 1 if stride > kernel_size - 1 else math.ceil(total / 2)
  elif padding == 'VALID':
    total = kernel_size + stride - 2 + max(kernel_size - stride, 0)
    low = kernel_size - 1
  else:
    raise ValueError(f"conv_transpose_padding: padding={padding!r} is not 'SAME' or 'VALID'.")
  return low, total - low


def _conv_factory():
  """Zero-argument factory for ``flax.linen.Conv.conv_general_dilated_cls``."""
  return conv_general_dilated


class Conv(nn.Conv):
  """``flax.linen.Conv`` computed with :func:`conv_general_dilated` (same params and outputs).

  Override ``conv_general_dilated_cls`` with ``None`` to get the plain lax convolution back.
  """

  conv_general_dilated_cls: Any = _conv_factory


class ConvTranspose(nn.Module):
  """``flax.linen.ConvTranspose`` computed with :func:`conv_general_dilated`.

  Same attributes, parameter names/shapes (``kernel``: ``(*kernel_size, in, features)``, or
  ``(*kernel_size, features, in)`` with ``transpose_kernel``; ``bias``: ``(features,)``) and
  outputs as ``flax.linen.ConvTranspose`` (padding ``'SAME'``, ``'VALID'``, ``'CIRCULAR'`` or
  explicit pairs, which like flax are the paddings of the lhs-dilated conv). Inputs are
  channels-last, ``(*batch_dims, *spatial, in)``.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: Sequence[int] | None = None
  padding: PaddingLike = 'SAME'
  kernel_dilation: Sequence[int] | None = None
  use_bias: bool = True
  mask: jax.Array | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = flax_linear.default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  transpose_kernel: bool = False
  promote_dtype: PromoteDtypeFn = flax_linear.promote_dtype
  preferred_element_type: Dtype | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the transposed convolution to channels-last ``inputs``."""
    if isinstance(self.kernel_size, int):
      kernel_size = (self.kernel_size,)
    else:
      kernel_size = tuple(self.kernel_size)
    n = len(kernel_size)

    def broadcast(value: int | Sequence[int] | None) -> tuple[int, ...]:
      if value is None:
        return (1,) * n
      if isinstance(value, int):
        return (value,) * n
      return tuple(value)

    num_batch_dims = inputs.ndim - (n + 1)
    if num_batch_dims < 0:
      raise ValueError(
        f'ConvTranspose: inputs of shape {inputs.shape} need {n} spatial dims and a feature dim.'
      )
    batch_shape = inputs.shape[:num_batch_dims]
    if num_batch_dims != 1:
      inputs = jnp.reshape(inputs, (-1,) + inputs.shape[num_batch_dims:])
    strides = broadcast(self.strides)
    kernel_dilation = broadcast(self.kernel_dilation)

    in_features = inputs.shape[-1]
    if self.transpose_kernel:
      kernel_shape = kernel_size + (self.features, in_features)
    else:
      kernel_shape = kernel_size + (in_features, self.features)
    if self.mask is not None and self.mask.shape != kernel_shape:
      raise ValueError(
        f'ConvTranspose: mask shape {self.mask.shape} != kernel shape {kernel_shape}.'
      )
    kernel = self.param('kernel', self.kernel_init, kernel_shape, self.param_dtype)
    if self.mask is not None:
      kernel *= self.mask
    bias = None
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)

    padding_lax = flax_linear.canonicalize_padding(self.padding, n)
    if padding_lax == 'CIRCULAR':
      padding_lax = 'VALID'
    if isinstance(padding_lax, str):
      k_eff = [_dilated(k, d) for k, d in zip(kernel_size, kernel_dilation)]
      pads = [conv_transpose_padding(k, s, padding_lax) for k, s in zip(k_eff, strides)]
    else:
      pads = [tuple(p) for p in padding_lax]
    if self.transpose_kernel:
      kernel = jnp.swapaxes(jnp.flip(kernel, axis=tuple(range(n))), n, n + 1)
    dn = _canonical_dn(n)
    y = conv_general_dilated(
      inputs,
      kernel,
      (1,) * n,
      pads,
      lhs_dilation=strides,
      rhs_dilation=kernel_dilation,
      dimension_numbers=dn,
      precision=self.precision,
      preferred_element_type=self.preferred_element_type,
    )

    if self.padding == 'CIRCULAR':
      # Fold the output periodically onto a period of `input size * stride` per axis, with the
      # same alignment convention as flax.linen.ConvTranspose.
      periods = [size * s for size, s in zip(inputs.shape[1:-1], strides)]
      diffs = [-(y_dim - p) % (2 * p) for y_dim, p in zip(y.shape[1:-1], periods)]
      if self.transpose_kernel:
        total_pad = [(d // 2, (d + 1) // 2) for d in diffs]
      else:
        total_pad = [((d + 1) // 2, d // 2) for d in diffs]
      y = jnp.pad(y, [(0, 0)] + total_pad + [(0, 0)])
      for axis in range(1, y.ndim - 1):
        y = y.reshape(y.shape[:axis] + (-1, periods[axis - 1]) + y.shape[axis + 1 :])
        y = y.sum(axis=axis)

    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if num_batch_dims != 1:
      y = jnp.reshape(y, batch_shape + y.shape[1:])
    return y
