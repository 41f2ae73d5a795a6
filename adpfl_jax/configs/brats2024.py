r"""BraTS 2024 adult glioma MRI: DP-FL with a 3D U-Net over natural sites, (ε = 8, δ = 1e-5)/patient.

  adpfl train --config=experiments/brats2024.py --config.data.dir=/data/brats2024 --workdir=runs/b
  adpfl data make-phantoms --task brats2024 --out /tmp/brats --cases 1200
  adpfl train --config=experiments/brats2024.py:smoke --config.data.dir=/tmp/brats --workdir=/tmp/b
  adpfl data prepare --task brats2024 --data-dir /data/brats2024 --out /data/prep \
      --config experiments/brats2024.py   # then --config.data.dir=/data/prep: no NIfTI decoding

`config.data.dir` is the BraTS 2024 GLI release (docs/datasets.md §3): the release folders
(`training_data1_v2/`, `training_data_additional/`) of `BraTS-GLI-PPPPP-TTT/` cases with
`-t1n/-t1c/-t2w/-t2f/-seg.nii.gz`, and the metadata sheet whose `Site` column (`site_column`) gives
the natural clients (with `--config.data.num_clients=K` only the K largest sites are kept).
Inputs are the 4 modalities (channels last), labels 0–4 (NETC, SNFH, ET, RC), evaluated on the
regions WT, TC, ET, NETC, SNFH, RC (`adpfl_jax/metrics/regions.py`). Every case is cropped to the
brain, resampled to `target_spacing`, z-scored per modality inside the brain and cropped/padded
to `volume_shape` (`adpfl_jax/data/federated.py`). Patients with several time points are split as
a whole, and training keeps the earliest time point of each, so DP-SGD protects one patient
(`privacy.unit='patient'`).

With an empty `config.data.dir` the run uses BraTS-2024-like phantoms written once in the real
layout into `~/.cache/adpfl_jax/phantoms/` (`$ADPFL_CACHE_DIR` overrides; see
`phantoms.cached`).

`:smoke`: 1200 phantom time points (3 sites of ~200 training patients, the `make-phantoms` default
32 × 48 × 40 at 1 mm), 8 × 16 × 16 volumes at 2 mm, features 8, depth 2, 20 rounds × 6 local steps
at a DP batch of 24, ε = 8 as in the full run: about five minutes on 2 CPU cores. Every region
rises; TC and ET appear after ~8 rounds, NETC (the smallest: ~0.7% of the
phantom brain, vs SNFH ~11%, RC ~2%, ET ~1.4%) after ~12.
"""

from adpfl_jax.configs import common
from adpfl_jax.configs import default


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  c = default.get_config()
  c.data.name = 'brats2024'
  c.data.volume_shape = (48, 64, 48)  # (z, y, x) voxels of every example
  c.data.target_spacing = (3.0, 3.0, 3.0)  # mm, (z, y, x); () keeps the native spacing
  c.data.site_column = 'Site'  # metadata column of the natural clients
  # Phantoms used when data.dir is empty (written once into the cache, see common.medical_task).
  c.data.phantom_cases = 300
  c.data.phantom_shape = (96, 128, 112)

  common.medical_task(c, model='unet3d', unit='patient', batch_size=8, eval_batch_size=8)
  # Per-example gradients of the sampled volumes only, one at a time: the padded Poisson batch
  # holds about twice the expected batch in slots (benchmarks/step3d.py).
  c.privacy.microbatch_size = 1

  if args.smoke:
    c.privacy.microbatch_size = 0  # tiny crops: all padded slots at once is faster
    # ~200 patients per site keep the DP noise low enough for every region to rise within the
    # smoke budget at ε = 8; NETC (~0.7% of the phantom brain) needs ~12 of the 20 rounds.
    c.data.phantom_cases = 1200  # time points; ~690 patients, the earliest one trains
    c.data.phantom_shape = (32, 48, 40)  # the default of `adpfl data make-phantoms`
    c.data.volume_shape = (8, 16, 16)
    c.data.target_spacing = (2.0, 2.0, 2.0)
    c.data.test_fraction = 0.1
    c.model.features = 8
    c.model.depth = 2
    c.loss.ce_weight = 0.3
    c.fed.rounds = 20
    c.fed.local_steps = 6
    c.fed.client_lr = 0.3
    c.privacy.batch_size = 24
    c.privacy.max_batch_sigmas = 2.0  # padded batch ~34 (truncation is accounted)
    c.eval.every_rounds = 2
    c.eval.batch_size = 32
  c.lock()
  return c
