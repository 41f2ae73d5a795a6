"""One client's local training: K steps of DP-SGD on its own data, written for one client.

Backends (``federated/backends.py``) map this function over clients. Inside a client, each local
step is: per-example gradients (``vmap(grad)``), clip to C, masked sum, one noise draw over the
raveled parameter vector, division by the *expected* batch size ``q·n`` (public), then the client
optimizer (SGD with optional momentum, restarted every round). Adaptive clipping's count query
(Andrew et al. 2021) runs on the same sample: Σ(1[‖g_i‖ ≤ C] − ½) + N(0, σ_b²), normalised by the
expected batch. Only noised quantities leave the client; the diagnostic training loss is returned
for logging and is never fed back into training.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from adpfl_jax.privacy import clipping
from adpfl_jax.privacy import noise as noise_lib

PyTree = Any


class ClientDP(NamedTuple):
  """Per-client privacy parameters of one round (arrays; a leading client axis when stacked)."""

  clip: jax.Array  # clip norm C (L2 for Gaussian, L1 for Laplace)
  noise_grad: jax.Array  # noise multiplier applied to the gradient sum (z_Δ; total z if no count)
  count_std: jax.Array  # σ_b of the unclipped-count query (0 ⇒ no count query noise)
  grid: jax.Array  # clip grid for the private percentile histogram (may be empty-sized)
  grid_std: jax.Array  # noise std of each histogram count
  expected_batch: jax.Array  # q·n, public
  lr: jax.Array  # client learning rate
  sparsity_mask: jax.Array  # flat 0/1 mask over parameters (public randomness or public info)


class ClientConfig(NamedTuple):
  """Static (compile-time) choices for the client update."""

  loss_fn: Callable[..., jax.Array]  # loss_fn(params, x, y) for ONE example
  private: bool = True
  mechanism: str = 'gaussian'
  momentum: float = 0.0
  sparsify: bool = False
  histogram: bool = False  # private percentile estimation over ``grid``


def client_update(cfg: ClientConfig, params: PyTree, xb: jax.Array, yb: jax.Array,
                  mask: jax.Array, dp: ClientDP, key: jax.Array):
  """Runs the local steps of one client.

  Args:
    cfg: static configuration.
    params: global parameters at the start of the round.
    xb: (steps, B, *example_shape) inputs of the sampled examples (padding slots arbitrary).
    yb: (steps, B, *label_shape) labels.
    mask: (steps, B) 1 for sampled examples, 0 for padding.
    dp: this client's privacy parameters.
    key: this client's PRNG key for this round.

  Returns:
    (delta = local params − global params, report dict of privatized statistics + diagnostics).
  """
  norm = noise_lib.clip_norm_kind(cfg.mechanism)
  steps = mask.shape[0]
  tx = optax.trace(decay=cfg.momentum) if cfg.momentum else optax.identity()
  flat0, unravel = ravel_pytree(params)
  # C = ∞ with z = 0 must not give ∞·0 = NaN.
  noise_scale = jnp.where(dp.noise_grad > 0, dp.noise_grad * dp.clip, 0.0)

  def step(carry, inputs):
    p, opt_state = carry
    x, y, m, k = inputs
    k_noise, k_count, k_hist = jax.random.split(k, 3)
    losses, grads = clipping.per_example_grads(cfg.loss_fn, p, x, y)
    summed, stats = clipping.clip_and_sum(grads, m, dp.clip, norm)
    flat, _ = ravel_pytree(summed)
    realised = jnp.sum(stats.valid)
    if cfg.private:
      if cfg.sparsify:
        flat = flat * dp.sparsity_mask
      noise = noise_lib.sample_noise(k_noise, flat.shape, noise_scale, cfg.mechanism)
      if cfg.sparsify:
        noise = noise * dp.sparsity_mask
      flat = (flat + noise) / dp.expected_batch
      count = jnp.sum(stats.unclipped - 0.5 * stats.valid)
      count = count + dp.count_std * jax.random.normal(k_count, (), jnp.float32)
      unclipped_frac = jnp.clip(0.5 + count / dp.expected_batch, 0.0, 1.0)
    else:
      flat = flat / jnp.maximum(realised, 1.0)
      unclipped_frac = jnp.sum(stats.unclipped) / jnp.maximum(realised, 1.0)
    if cfg.histogram:
      # Noisy CDF of per-example norms on the grid: counts of norms ≤ c_j, centred (−½ each), so
      # one example moves the vector by at most √G/2 in L2. Charged via the total z (see
      # privacy/controller.py).
      below = (stats.norms[:, None] <= dp.grid[None, :]).astype(jnp.float32) - 0.5
      hist = jnp.sum(below * stats.valid[:, None], 0)
      hist = hist + dp.grid_std * jax.random.normal(k_hist, hist.shape, jnp.float32)
      cdf = jnp.clip(0.5 + hist / dp.expected_batch, 0.0, 1.0)
    else:
      cdf = jnp.zeros_like(dp.grid)
    g = unravel(flat)
    updates, opt_state = tx.update(g, opt_state, p)
    p = jax.tree_util.tree_map(lambda a, u: a - dp.lr * u, p, updates)
    loss = jnp.sum(jnp.where(stats.valid > 0, losses, 0.0)) / jnp.maximum(realised, 1.0)
    return (p, opt_state), (unclipped_frac, cdf, loss, realised)

  keys = jax.random.split(key, steps)
  (p_final, _), (fracs, cdfs, losses, realised) = jax.lax.scan(
      step, (params, tx.init(params)), (xb, yb, mask, keys))
  flat_final, _ = ravel_pytree(p_final)
  delta = unravel(flat_final - flat0)
  report = {
      # Privatized (noised) statistics: may steer the controller.
      'unclipped_fraction': jnp.mean(fracs),
      'norm_cdf': jnp.mean(cdfs, axis=0),
      # Diagnostics: logged only, never fed back into training.
      'train_loss': jnp.mean(losses),
      'examples': jnp.sum(realised),
  }
  return delta, report
