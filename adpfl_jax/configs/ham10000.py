r"""HAM10000 skin-lesion segmentation: DP-FL with a 2D U-Net over natural sites, (ε = 8, δ = 1e-5).

  adpfl train --config=experiments/ham10000.py --config.data.dir=/data/ham10000 --workdir=runs/ham
  adpfl data make-phantoms --task ham10000 --out /tmp/ham --cases 600
  adpfl train --config=experiments/ham10000.py:smoke --config.data.dir=/tmp/ham --workdir=/tmp/h
  adpfl data prepare --task ham10000 --data-dir /data/ham10000 --out /data/prep \
      --config experiments/ham10000.py   # then --config.data.dir=/data/prep: no JPEG decoding

`config.data.dir` is the HAM10000 release (docs/datasets.md §1): `HAM10000_images_part_{1,2}/`, the
Tschandl lesion masks `HAM10000_segmentations_lesion_tschandl/` and `HAM10000_metadata(.csv)`.
Natural clients are the acquisition sources of the metadata `dataset` column (with
`--config.data.num_clients=K` only the K largest are kept); 'iid' and 'dirichlet' (over the
diagnosis) partitions take `num_clients`. Images are resized to `image_size` and normalised with
fixed public constants (`adpfl_jax/data/federated.py`). Every split keeps whole lesions, and
training keeps one image per lesion (`one_image_per_lesion`), so image-level DP-SGD protects one
lesion (`privacy.unit='lesion'`).

With an empty `config.data.dir` the run uses HAM10000-like phantoms written once in the real
layout into `~/.cache/adpfl_jax/phantoms/` (`$ADPFL_CACHE_DIR` overrides; see
`phantoms.cached`).

`:smoke`: 600 phantom images (3 sites), 32 × 32 inputs, features 4, depth 2, 12 rounds: a couple
of minutes on 2 CPU cores; ε = 8 as in the full run.
"""

from adpfl_jax.configs import common
from adpfl_jax.configs import default


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  c = default.get_config()
  c.data.name = 'ham10000'
  c.data.image_size = 64  # int or (height, width)
  c.data.one_image_per_lesion = True  # training: one image per lesion (lesion-level DP)
  # Phantoms used when data.dir is empty (written once into the cache, see common.medical_task).
  c.data.phantom_cases = 1200
  c.data.phantom_shape = (96, 128)

  common.medical_task(c, model='unet2d', unit='lesion', batch_size=32, eval_batch_size=64)

  if args.smoke:
    c.data.phantom_cases = 600
    c.data.image_size = 32
    c.model.features = 4
    c.model.depth = 2
    c.fed.rounds = 12
    c.fed.local_steps = 2
    c.eval.every_rounds = 1
    c.privacy.batch_size = 16
  c.lock()
  return c
