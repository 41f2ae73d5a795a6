r"""KiTS23 kidney-tumour CT: DP-FL with a 3D U-Net over natural sites, (ε = 8, δ = 1e-5)/patient.

  adpfl train --config=experiments/kits23.py --config.data.dir=/data/kits23 --workdir=runs/kits
  adpfl data make-phantoms --task kits23 --out /tmp/kits --cases 489
  adpfl train --config=experiments/kits23.py:smoke --config.data.dir=/tmp/kits --workdir=/tmp/k
  adpfl data prepare --task kits23 --data-dir /data/kits23 --out /data/prep \
      --config experiments/kits23.py   # then --config.data.dir=/data/prep: no NIfTI decoding

`config.data.dir` is the KiTS23 repository (or its `dataset/` folder, docs/datasets.md §2.1).
Natural clients come from a `case,site_id` CSV (FLamby's `anony_sites.csv`, cases 0–299: pass it as
`--config.data.site_csv=...` or put it in the data folder; with `--config.data.num_clients=K` only
the K largest sites are kept) or, without one, from the contrast phase by case number (arterial
0–499, nephrogenic 500–588). Every case is resampled to `target_spacing`, clipped to the KiTS19
HU window [−79, 304] and z-scored with public nnU-Net constants, and cropped/padded to
`volume_shape` around the kidneys (`adpfl_jax/data/federated.py`). One case is one patient, and
DP-SGD protects one case (`privacy.unit='patient'`).

With an empty `config.data.dir` the run uses KiTS23-like phantoms written once in the real layout
into `~/.cache/adpfl_jax/phantoms/` (`$ADPFL_CACHE_DIR` overrides; see `phantoms.cached`).
Phantom anatomy is drawn in normalised coordinates, so the physical size of the phantom abdomen
varies with each site's voxel spacing; the full (non-smoke) run writes larger phantoms so that
the real-data preprocessing (3.2 mm in-plane) still sees kidneys a few voxels wide.

`:smoke`: 489 phantom cases (3 sites, the `make-phantoms` default 32 × 48 × 48), 8 × 8 × 16 crops at
(3, 1.5, 1.5) mm, features 8, depth 2, 24 rounds × 6 local steps at a DP batch of 24: about three
minutes on 2 CPU cores, with ε = 8 as in the full run (each region's Dice rises; the tumour appears
after about 15 rounds).
"""

from adpfl_jax.configs import common
from adpfl_jax.configs import default


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  c = default.get_config()
  c.data.name = 'kits23'
  c.data.volume_shape = (32, 64, 64)  # (z, y, x) voxels of every example
  c.data.target_spacing = (5.0, 3.2, 3.2)  # mm, (z, y, x); () keeps the native spacing
  c.data.site_csv = ''  # `case,site_id` CSV; '' = <dir>/anony_sites.csv if present, else phase
  # Phantoms used when data.dir is empty (written once into the cache, see common.medical_task).
  c.data.phantom_cases = 60
  c.data.phantom_shape = (48, 160, 160)

  common.medical_task(c, model='unet3d', unit='patient', batch_size=4, eval_batch_size=8)
  # Per-example gradients of the sampled volumes only, one at a time: the padded Poisson batch
  # holds ~11 slots for 4 expected examples (benchmarks/step3d.py).
  c.privacy.microbatch_size = 1

  if args.smoke:
    c.privacy.microbatch_size = 0  # tiny crops: all padded slots at once is faster
    # Tuned so that every region (kidney_and_mass, mass, tumor) rises under DP at ε = 8: the
    # tumour is ~2% of the voxels of the crop, and learning it under DP noise needs about 100
    # local steps with ~150 patients per site (fewer patients or a smaller batch: more noise).
    c.data.phantom_cases = 489  # every KiTS23 training case number (3 sites of ~160 patients)
    c.data.phantom_shape = (32, 48, 48)  # the default of `adpfl data make-phantoms`
    c.data.volume_shape = (8, 8, 16)  # both kidneys and the tumour, cropped around the kidneys
    c.data.target_spacing = (3.0, 1.5, 1.5)
    c.data.test_fraction = 0.1
    c.model.features = 8
    c.model.depth = 2
    c.loss.ce_weight = 0.3
    c.fed.rounds = 24
    c.fed.local_steps = 6
    c.fed.client_lr = 0.3
    c.privacy.batch_size = 24
    c.privacy.max_batch_sigmas = 2.0  # padded batch 33 (truncation is accounted)
    c.eval.every_rounds = 2
    c.eval.batch_size = 32
  c.lock()
  return c
