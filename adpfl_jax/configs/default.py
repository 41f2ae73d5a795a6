"""Default configuration: every key the trainer reads, with its meaning.

Experiments start from ``get_config()`` and change what they need; the result is locked, so a
typo in ``--config.privacy.nosie=...`` fails and names the key.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'phantom_skin'  # phantom_skin | ham10000 | kits23 | brats2024
  c.data.dir = ''  # real data directory (readers for the real releases)
  c.data.num_clients = 4
  c.data.examples_per_client = 256
  c.data.test_examples_per_client = 64
  c.data.image_size = 32
  c.data.heterogeneity = 1.0
  c.data.seed_offset = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = 'unet2d'
  c.model.features = 8
  c.model.depth = 2
  c.model.upsample = 'transpose'  # transpose | nearest
  c.model.groups = 4
  c.model.fast_conv = True  # custom-VJP convolutions (fast inside rolled loops on CPU)

  c.loss = ml_collections.ConfigDict()
  c.loss.dice_weight = 1.0
  c.loss.ce_weight = 1.0

  c.fed = ml_collections.ConfigDict()
  c.fed.rounds = 60
  c.fed.clients_per_round = 4
  c.fed.local_steps = 4
  c.fed.backend = 'auto'  # auto | vmap | map | sharded | loop
  c.fed.chunk_size = 1  # map/sharded: clients vmapped inside one chunk
  c.fed.num_devices = 0  # sharded: 0 = all visible devices
  # Per-example gradients this many at a time, over the sampled slots of the padded Poisson batch
  # only (0 = every padded slot at once, vmapped). Same update; cost follows the realised batch
  # and memory holds `example_chunk` per-example gradients (3D configs set 1).
  c.fed.example_chunk = 0
  c.fed.client_lr = 0.1
  c.fed.client_momentum = 0.9
  c.fed.client_lr_schedule = 'constant'
  c.fed.client_lr_schedule_params = ml_collections.ConfigDict(dict(
      rate=0.99, factor=0.5, every=10, start=1.0, end=0.1, rounds=0))
  c.fed.server_optimizer = 'fedavg'  # fedavg | fedavgm | fedadam
  c.fed.server_lr = 1.0
  c.fed.server_momentum = 0.9

  c.privacy = ml_collections.ConfigDict()
  c.privacy.mode = 'dp'  # dp (record-level DP-SGD in every silo) | none (NP-FL)
  c.privacy.unit = 'example'  # the privacy unit, printed next to every ε
  c.privacy.mechanism = 'gaussian'  # gaussian (L2 clip) | laplace (L1 clip)
  c.privacy.clip_mode = 'fixed'  # fixed | quantile | percentile
  c.privacy.clip_norm = 1.0  # C (fixed) or C_0 (adaptive)
  c.privacy.clip_min = 1e-3
  c.privacy.clip_max = 1e3
  # Adaptive clipping: client lr × (C₀/C)^power, so a shrinking C does not also shrink the step
  # (a public function of the already-privatized C: post-processing, no privacy cost).
  c.privacy.clip_lr_power = 0.0
  c.privacy.calibrate = True  # noise from target_epsilon and the planned run
  c.privacy.noise_multiplier = 1.0  # total z, used when calibrate=False
  c.privacy.target_epsilon = 8.0
  c.privacy.delta = 1e-5
  c.privacy.accountant = 'pld'  # pld | rdp
  c.privacy.batch_size = 32  # expected Poisson batch q·n_k per local step
  c.privacy.max_batch_sigmas = 4.0  # padded batch = ceil(m + k·sd); inf = never truncate
  c.privacy.noise_schedule = 'constant'
  # Shape parameters of every schedule; only those of the chosen kind are used
  # (exponential: rate; step: factor, every; linear/cosine: start, end, rounds; 0 = fed.rounds).
  c.privacy.noise_schedule_params = ml_collections.ConfigDict(dict(
      rate=0.99, factor=0.8, every=10, start=1.5, end=0.75, rounds=0))
  c.privacy.stop_at_budget = True

  c.privacy.quantile = ml_collections.ConfigDict()
  c.privacy.quantile.target = 0.5  # γ, target unclipped fraction
  c.privacy.quantile.lr = 0.2  # η
  c.privacy.quantile.count_std_fraction = 0.05  # σ_b = fraction · expected batch

  c.privacy.percentile = ml_collections.ConfigDict()
  c.privacy.percentile.percentile = 50.0
  c.privacy.percentile.grid_min = 0.01
  c.privacy.percentile.grid_max = 100.0
  c.privacy.percentile.grid_size = 32
  c.privacy.percentile.count_std_fraction = 0.05
  c.privacy.percentile.smoothing = 0.5

  # Data-driven noise (lower σ when the privatized loss plateaus), under an RDP filter.
  c.privacy.adaptive_noise = ml_collections.ConfigDict()
  c.privacy.adaptive_noise.enabled = False
  c.privacy.adaptive_noise.factor = 0.8  # σ ← factor·σ on a plateau
  c.privacy.adaptive_noise.min_factor = 0.5  # never below min_factor × the planned σ
  c.privacy.adaptive_noise.patience = 3  # rounds without improvement
  c.privacy.adaptive_noise.threshold = 0.01  # relative improvement that counts
  c.privacy.adaptive_noise.count_std_fraction = 0.05
  c.privacy.adaptive_noise.loss_cap = 2.0  # per-example loss clipped to [0, loss_cap]

  c.privacy.sparsity = ml_collections.ConfigDict()
  c.privacy.sparsity.mode = 'none'  # none | random (public randomness) | topk_prev (last global update)
  c.privacy.sparsity.fraction = 0.5  # fraction of coordinates kept

  # Empirical privacy audit (privacy/audit.py): one-run audit with gradient canaries per silo;
  # writes audit.json and an ε lower bound next to the accounted ε in summary.json.
  c.privacy.audit = ml_collections.ConfigDict()
  c.privacy.audit.enabled = False
  c.privacy.audit.canaries = 1000  # per silo, each included with probability 1/2
  c.privacy.audit.significance = 0.05  # lower bound at 95% confidence

  c.eval = ml_collections.ConfigDict()
  c.eval.every_rounds = 10
  c.eval.batch_size = 64
  c.eval.surface_metrics = True  # HD95 / NSD per region at the end (host, challenge scorers)
  c.eval.tensorboard = True  # TensorBoard event files next to metrics.jsonl

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_rounds = 10  # 0 = no checkpoints; also saved at the end and on SIGINT/SIGTERM
  c.checkpoint.keep = 3
  c.checkpoint.force = False  # resume even if the workdir's config differs

  # Fault injection (simulation): a pure function of (seed, round), like client sampling.
  c.faults = ml_collections.ConfigDict()
  c.faults.dropout = 0.0  # fraction of sampled clients that send nothing in a round
  c.faults.straggler_fraction = 0.0  # fraction that run fewer local steps
  c.faults.straggler_min_steps = 1
  c.faults.nan_clients = ''  # comma-separated client ids whose update is non-finite every round

  c.log = ml_collections.ConfigDict()
  c.log.progress = True
  # Write the raw training loss of DP runs to metrics.jsonl/TensorBoard. It is computed from the
  # silos' data without noise, so it is NOT covered by ε (summary.json lists it then under
  # unprivatized_outputs). Non-private runs always write it.
  c.log.raw_train_loss = False
  return c
