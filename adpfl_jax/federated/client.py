"""One client's local training: K steps of DP-SGD on its own data, written for one client.

Backends (``federated/backends.py``) map this function over clients. Inside a client, each local
step is: per-example gradients (``vmap(grad)``), clip to C, masked sum, one noise draw over the
raveled parameter vector, division by the *expected* batch size ``q·n`` (public), then the client
optimizer (SGD with optional momentum, restarted every round). Adaptive clipping's count query
(Andrew et al. 2021) runs on the same sample: Σ(1[‖g_i‖ ≤ C] − ½) + N(0, σ_b²), normalised by the
expected batch. Only noised quantities leave the client; the raw training loss is returned as a
diagnostic that never steers training and is written out only on request (``log.raw_train_loss``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from adpfl_jax.privacy import clipping
from adpfl_jax.privacy import noise as noise_lib
from adpfl_jax.privacy.controller import ClientDP

PyTree = Any


class ClientConfig(NamedTuple):
  """Static (compile-time) choices for the client update.

  ``aux`` names the auxiliary DP counts released with every step, on the same sample as the
  gradient: 'unclipped' (1[‖g_i‖ ≤ C], adaptive clipping), 'cdf' (1[‖g_i‖ ≤ c_j] for every grid
  value c_j, private percentile) and 'loss' (min(ℓ_i, loss_cap) / loss_cap, the data-driven noise
  schedule). Each per-example value lies in [0, 1]; the centred sum Σ(v_i − ½) has L2 sensitivity
  √Q/2 for Q values, and gets Gaussian noise of std ``aux_std`` per coordinate. Its multiplier
  2·aux_std/√Q is folded into the total z by the controller.
  """

  loss_fn: Callable[..., jax.Array]  # loss_fn(params, x, y) for ONE example
  private: bool = True
  mechanism: str = 'gaussian'
  momentum: float = 0.0
  sparsify: bool = False
  aux: tuple = ()
  loss_cap: float = 2.0
  audit: bool = False  # add the planned gradient canaries (``privacy/audit.py``)
  canary_scale: float = 1.0  # canary gradient norm where no clip applies (non-private runs)
  # Per-example gradients ``example_chunk`` at a time over the sampled slots only (0: all padded
  # slots at once); the same released function, cheaper on padding and lighter on memory.
  example_chunk: int = 0


def client_update(cfg: ClientConfig, params: PyTree, xb: jax.Array, yb: jax.Array,
                  mask: jax.Array, dp: ClientDP, key: jax.Array, active: jax.Array | None = None):
  """Runs the local steps of one client.

  Args:
    cfg: static configuration.
    params: global parameters at the start of the round.
    xb: (steps, B, *example_shape) inputs of the sampled examples (padding slots arbitrary).
    yb: (steps, B, *label_shape) labels.
    mask: (steps, B) 1 for sampled examples, 0 for padding.
    dp: this client's privacy parameters.
    key: this client's PRNG key for this round.
    active: (steps,) 1 for steps the client runs, 0 for steps it skips (a straggler returning
      early, or a dropped client): a skipped step changes nothing and releases nothing.

  Returns:
    (delta = local params − global params, report dict of privatized statistics + diagnostics).
  """
  norm = noise_lib.clip_norm_kind(cfg.mechanism)
  steps = mask.shape[0]
  tx = optax.trace(decay=cfg.momentum) if cfg.momentum else optax.identity()
  flat0, unravel = ravel_pytree(params)
  # C = ∞ with z = 0 must not give ∞·0 = NaN.
  noise_scale = jnp.where(dp.noise_grad > 0, dp.noise_grad * dp.clip, 0.0)
  canary_scale = jnp.where(jnp.isfinite(dp.clip), dp.clip, cfg.canary_scale)

  def step(carry, inputs):
    p_in, opt_in = carry
    p, opt_state = carry
    x, y, m, k, on, canaries = inputs
    k_noise, k_count = jax.random.split(k)
    if cfg.example_chunk:
      losses, summed, stats = clipping.clip_and_sum_chunked(
          cfg.loss_fn, p, x, y, m, dp.clip, norm, cfg.example_chunk)
    else:
      losses, grads = clipping.per_example_grads(cfg.loss_fn, p, x, y)
      summed, stats = clipping.clip_and_sum(grads, m, dp.clip, norm)
    flat, _ = ravel_pytree(summed)
    realised = jnp.sum(stats.valid)
    if cfg.audit:
      # Each sampled canary is a record whose clipped gradient is C on its own coordinate,
      # added before the noise like every record's (privacy/audit.py).
      flat = flat.at[dp.canary_index].add(canaries * canary_scale)
    if cfg.sparsify:
      # A public mask (public randomness, or already-released information), applied to the
      # clipped sum: masking cannot increase its norm, so the sensitivity stays C.
      flat = flat * dp.sparsity_mask
    if cfg.private:
      noise = noise_lib.sample_noise(k_noise, flat.shape, noise_scale, cfg.mechanism)
      if cfg.sparsify:
        noise = noise * dp.sparsity_mask
      flat = (flat + noise) / dp.expected_batch
    else:
      flat = flat / jnp.maximum(realised, 1.0)
    aux = _aux_release(cfg, dp, stats, losses, k_count, realised)
    g = unravel(flat)
    updates, opt_state = tx.update(g, opt_state, p)
    p = jax.tree_util.tree_map(lambda a, u: a - dp.lr * u, p, updates)
    loss = jnp.sum(jnp.where(stats.valid > 0, losses, 0.0)) / jnp.maximum(realised, 1.0)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(on > 0, a, b), new, old)
    return keep((p, opt_state), (p_in, opt_in)), (aux, loss * on, on)

  keys = jax.random.split(key, steps)
  if active is None:
    active = jnp.ones((steps,), jnp.float32)
  canaries = dp.canary_mask if cfg.audit else jnp.zeros((steps,), jnp.float32)
  (p_final, _), (auxs, losses, ran) = jax.lax.scan(
      step, (params, tx.init(params)), (xb, yb, mask, keys, active, canaries))
  n_ran = jnp.maximum(jnp.sum(ran), 1.0)
  flat_final, _ = ravel_pytree(p_final)
  delta = unravel(flat_final - flat0)
  report = {
      # Privatized (noised) statistics: may steer the controller.
      'aux': jnp.sum(auxs * ran[:, None], axis=0) / n_ran,
      # The raw (un-noised) training loss: a diagnostic that never steers training and is only
      # written out when ``log.raw_train_loss`` asks for it (it is not covered by ε).
      'train_loss': jnp.sum(losses) / n_ran,
  }
  return delta, report


def _aux_release(cfg: ClientConfig, dp: ClientDP, stats, losses, key, realised):
  """Noisy means of the auxiliary per-example values (see ``ClientConfig``), clipped to [0, 1].

  With ``private=False`` the exact means over the realised batch are returned instead.
  """
  cols = []
  for name in cfg.aux:
    if name == 'unclipped':
      cols.append(stats.unclipped[:, None])
    elif name == 'cdf':
      cols.append((stats.norms[:, None] <= dp.grid[None, :]).astype(jnp.float32))
    elif name == 'loss':
      safe = jnp.where(jnp.isfinite(losses), losses, cfg.loss_cap)
      cols.append((jnp.clip(safe, 0.0, cfg.loss_cap) / cfg.loss_cap)[:, None])
    else:
      raise ValueError(f'unknown auxiliary query {name!r}')
  if not cols:
    return jnp.zeros((1,), jnp.float32)  # a placeholder: zero-size arrays break lax.map
  values = jnp.concatenate(cols, axis=1) * stats.valid[:, None]
  if not cfg.private:
    return jnp.sum(values, 0) / jnp.maximum(realised, 1.0)
  centred = jnp.sum(values - 0.5 * stats.valid[:, None], 0)
  noisy = centred + dp.aux_std * jax.random.normal(key, centred.shape, jnp.float32)
  return jnp.clip(0.5 + noisy / dp.expected_batch, 0.0, 1.0)
