"""Per-example gradients, clipping and masked sums: the sensitivity-bearing part of DP-SGD.

Written for one example and mapped: ``per_example_grads`` vmaps ``jax.value_and_grad`` of a
one-example loss (the vmap is hard-wired here, never injected, so examples cannot mix).
``clip_and_sum`` scales every example's gradient to norm ≤ C (L2, or L1 for the Laplace
mechanism), zeroes padded and non-finite examples, and sums. The sum has sensitivity C under
add/remove-one: adding or removing one example changes it by that example's clipped gradient,
whose norm is ≤ C. Per-example norms and unclipped indicators are returned for the DP count query
of adaptive clipping and for diagnostics; they never leave the client un-privatized.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


def per_example_grads(loss_fn: Callable[..., jax.Array], params: PyTree, *batch):
  """Per-example ``(losses, grads)`` of ``loss_fn(params, *example)`` over the leading axis."""
  return jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None,) + (0,) * len(batch))(params, *batch)


def clipped_sum(grads_fn: Callable[..., tuple], params: PyTree, batch: tuple, mask: jax.Array,
                clip: jax.Array, norm: str = 'l2', microbatch: int = 0):
  """Per-example losses, the clipped sum of per-example gradients and its ``ClipStats``.

  ``grads_fn(params, *batch)`` returns per-example ``(losses, grads)`` over the leading axis of
  every array of ``batch``, row i a function of row i only (``per_example_grads``, or the
  augmentation-averaged gradients of ``privacy/multiplicity.py``).

  ``microbatch`` = 0 computes every slot at once and clips with ``clip_and_sum``. ``microbatch``
  > 0 computes ``microbatch`` slots at a time and only the chunks that hold a sampled example:
  a ``lax.while_loop`` stops after the chunk of the last sampled slot, and the padded Poisson
  batch keeps its sampled examples first (``federated.sampling``), so it runs
  ``ceil(Σmask / microbatch)`` chunks. The cost then follows the realised batch, not the padded one, and only one chunk's
  activations and gradients are alive at once. Each example is clipped exactly as in the one-shot
  path and padding contributes nothing on either path, so the release — and its sensitivity C —
  is the same function of the data; only the order of the float sum changes.
  """
  slots = mask.shape[0]
  if not microbatch:
    losses, grads = grads_fn(params, *batch)
    summed, stats = clip_and_sum(grads, mask, clip, norm)
    return losses, summed, stats
  size = min(int(microbatch), slots)
  chunks = -(-slots // size)
  pad = chunks * size - slots  # < size <= slots: filled with copies of the first slots, masked
  widen = lambda a: jnp.concatenate([a, a[:pad]]) if pad else a
  batch = tuple(widen(a) for a in batch)
  mask = jnp.concatenate([mask, jnp.zeros((pad,), mask.dtype)]) if pad else mask
  last = jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[0]), -1))  # -1: nothing sampled
  needed = (last + size) // size  # chunks up to and including the last sampled slot
  take = lambda a, i: lax.dynamic_slice_in_dim(a, i * size, size)

  def body(carry):
    i, total, losses, norms, unclipped, valid = carry
    chunk_losses, grads = grads_fn(params, *(take(a, i) for a in batch))
    part, stats = clip_and_sum(grads, take(mask, i), clip, norm)
    put = lambda a, v: lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), i * size, 0)
    total = jax.tree_util.tree_map(jnp.add, total, part)
    return (i + 1, total, put(losses, chunk_losses), put(norms, stats.norms),
            put(unclipped, stats.unclipped), put(valid, stats.valid))

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  floats = jnp.zeros((chunks * size,), jnp.float32)
  init = (jnp.int32(0), zeros, floats, floats, floats, floats)
  _, summed, losses, norms, unclipped, valid = lax.while_loop(lambda c: c[0] < needed, body, init)
  stats = ClipStats(norms=norms[:slots], unclipped=unclipped[:slots], valid=valid[:slots])
  return losses[:slots], summed, stats


def per_example_norms(grads: PyTree, norm: str = 'l2') -> jax.Array:
  """Global L2 (or L1) norm of each example's gradient; grads have a leading example axis."""
  leaves = jax.tree_util.tree_leaves(grads)
  if norm == 'l2':
    sq = sum(jnp.sum(jnp.square(l.reshape(l.shape[0], -1).astype(jnp.float32)), 1) for l in leaves)
    return jnp.sqrt(sq)
  if norm == 'l1':
    return sum(jnp.sum(jnp.abs(l.reshape(l.shape[0], -1).astype(jnp.float32)), 1) for l in leaves)
  raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")


class ClipStats(NamedTuple):
  """Per-example diagnostics. Private: only a noised function of these may leave a client."""

  norms: jax.Array  # pre-clipping norms (0 for padding)
  unclipped: jax.Array  # 1.0 where a real example had norm <= C
  valid: jax.Array  # 1.0 for real, finite examples


def clip_factors(norms: jax.Array, clip: jax.Array, mask: jax.Array):
  """Scale factors min(1, C/‖g‖), 0 for padding and non-finite norms; and the validity mask."""
  finite = jnp.isfinite(norms)
  valid = (mask > 0) & finite
  safe = jnp.where(finite, norms, 0.0)
  # ‖g‖ > C ⇒ C/‖g‖ < 1. Written with where so C = ∞, C = 0 and ‖g‖ = 0 are all exact.
  factor = jnp.where(safe > clip, clip / jnp.where(safe > 0, safe, 1.0), 1.0)
  factor = jnp.where(valid, factor, 0.0)
  return factor, valid


def clip_and_sum(grads: PyTree, mask: jax.Array, clip: jax.Array, norm: str = 'l2'):
  """Clips each example's gradient to norm ≤ ``clip`` and sums over examples.

  Args:
    grads: per-example gradients, every leaf with a leading example axis of size B.
    mask: (B,) 1 for real examples, 0 for padding. Padding contributes exactly zero.
    clip: scalar clip norm C (may be ``inf`` for no clipping, or 0).
    norm: 'l2' (Gaussian mechanism) or 'l1' (Laplace mechanism).

  Returns:
    (summed gradient pytree, ClipStats).
  """
  norms = per_example_norms(grads, norm)
  factor, valid = clip_factors(norms, clip, mask)

  def _sum(leaf):
    # where() rather than multiply: 0 * NaN would still be NaN.
    keep = valid.reshape((-1,) + (1,) * (leaf.ndim - 1))
    scaled = jnp.where(keep, leaf * factor.reshape(keep.shape).astype(leaf.dtype), 0)
    return jnp.sum(scaled, axis=0)

  summed = jax.tree_util.tree_map(_sum, grads)
  unclipped = jnp.where(valid & (norms <= clip), 1.0, 0.0)
  stats = ClipStats(norms=jnp.where(valid, norms, 0.0), unclipped=unclipped,
                    valid=valid.astype(jnp.float32))
  return summed, stats

