"""TFDS builder `ham10000_seg`: HAM10000 / ISIC 2018 Task 1 as resized array_record files.

The builder reads a manually downloaded release (any layout `ham10000.scan`
accepts) and writes one 'train' split holding every image, resized exactly as the
pipeline decodes it (`ham10000.load_example_uint8`); partitioning into clients and
train/test happens later, from the `site` and `lesion_id` features.

It works without TensorFlow: images are PNG-encoded with Pillow before they
reach TFDS, masks are stored as zlib-compressed uint8 tensors, and the files are
written as `array_record` and read back with `builder.as_data_source()`. Like
`tfds_3d`, the builder is a `ShardBasedBuilder`: examples are streamed shard by
shard (`IMAGES_PER_SHARD` in memory at most) in `scan` order, and `metadata.json`
lists each example's `image_id`, `lesion_id`, `site`, `dx` and `layout` in that
order, so training (`--config.data.dir=<out_dir>`, docs/datasets.md §8.2) finds
(`find`) and indexes (`records`) the prepared images without decoding them.

Example:

  >>> path = prepare('/data/HAM10000', '/data/tfds', image_size=(128, 128))  # doctest: +SKIP
  >>> train = load_data_source('/data/tfds', image_size=(128, 128))  # doctest: +SKIP
  >>> train[0]['image'].shape, train[0]['mask'].shape  # doctest: +SKIP
  ((128, 128, 3), (128, 128))
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from adpfl_jax.data import ham10000

PathLike = str | os.PathLike

#: Examples per array_record shard (the shard being written is held in memory).
IMAGES_PER_SHARD = 256

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download HAM10000 from Harvard Dataverse (doi:10.7910/DVN/DBW86T): unzip
HAM10000_images_part_1.zip, HAM10000_images_part_2.zip and
HAM10000_segmentations_lesion_tschandl.zip, and save HAM10000_metadata.tab
(or its original CSV) into one folder, the `manual_dir`:

  manual_dir/HAM10000_metadata[.csv|.tab]
  manual_dir/HAM10000_images_part_1/ISIC_*.jpg
  manual_dir/HAM10000_images_part_2/ISIC_*.jpg
  manual_dir/HAM10000_segmentations_lesion_tschandl/[HAM10000_segmentations_lesion_tschandl/]
      ISIC_*_segmentation.png

The ISIC 2018 Task 1 layout (ISIC2018_Task1-2_Training_Input/ and
ISIC2018_Task1_Training_GroundTruth/, plus Validation/Test) is accepted too.
"""


@dataclasses.dataclass
class Ham10000SegConfig(tfds.core.BuilderConfig):
  """Builder config: the fixed (height, width) every example is resized to."""

  image_size: tuple[int, int] = (128, 128)


def config_for(image_size: int | Sequence[int]) -> Ham10000SegConfig:
  """Returns the builder config for a size (a predefined one when it exists)."""
  hw = _hw(image_size)
  name = f'{hw[0]}x{hw[1]}'
  for config in Ham10000Seg.BUILDER_CONFIGS:
    if config.name == name:
      return config
  return Ham10000SegConfig(name=name, image_size=hw,
                           description=f'Images resized to {hw[0]}x{hw[1]} (HxW).')


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(image_size, int):
    return (image_size, image_size)
  hw = tuple(int(s) for s in image_size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f'image_size must be an int or (height, width), got {image_size!r}.')
  return hw  # type: ignore[return-value]


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


class Ham10000Seg(tfds.core.ShardBasedBuilder):
  """HAM10000 lesion segmentation (Tschandl masks), resized to a fixed size."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Streamed shard by shard in image_id order; image index in metadata.json '
               '(training reads prepared folders).',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      Ham10000SegConfig(name='128x128', image_size=(128, 128),
                        description='Images resized to 128x128 (HxW).'),
      Ham10000SegConfig(name='256x256', image_size=(256, 256),
                        description='Images resized to 256x256 (HxW).'),
      Ham10000SegConfig(name='450x600', image_size=(450, 600),
                        description='Native HAM10000 size, 450x600 (HxW).'),
  ]
  DEFAULT_CONFIG_NAME = '128x128'

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(h, w, 3), dtype=np.uint8,
                                         encoding_format='png'),
            'mask': tfds.features.Tensor(shape=(h, w), dtype=np.uint8,
                                         encoding=tfds.features.Encoding.ZLIB),
            'image_id': tfds.features.Text(),
            'lesion_id': tfds.features.Text(),
            'site': tfds.features.Text(),
            'dx': tfds.features.Text(),
        }),
        supervised_keys=('image', 'mask'),
        metadata=tfds.core.MetadataDict(task=self.name, config={'image_size': [h, w]}),
        homepage='https://doi.org/10.7910/DVN/DBW86T',
        citation=(
            '@article{tschandl2018ham10000, title={The HAM10000 dataset, a large collection '
            'of multi-source dermatoscopic images of common pigmented skin lesions}, '
            'author={Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald}, '
            'journal={Scientific Data}, volume={5}, pages={180161}, year={2018}}'
        ),
    )

  def _shard_iterators_per_split(
      self, dl_manager: tfds.download.DownloadManager
  ) -> Mapping[str, list[Callable[[], Iterator[tuple[str, dict[str, Any]]]]]]:
    records = ham10000.scan(pathlib.Path(dl_manager.manual_dir))
    # Written to metadata.json after the split: the examples are stored in this order.
    self.info.metadata['records'] = {'train': [
        {'image_id': r.image_id, 'lesion_id': r.lesion_id, 'site': r.site, 'dx': r.dx,
         'layout': r.layout} for r in records]}
    n = IMAGES_PER_SHARD
    return {'train': [functools.partial(self._generate_shard, records[i:i + n])
                      for i in range(0, len(records), n)]}

  def _generate_shard(self, records: Sequence[ham10000.Record]
                      ) -> Iterator[tuple[str, dict[str, Any]]]:
    size = self.builder_config.image_size
    for record in records:
      image, mask = ham10000.load_example_uint8(record, size)
      yield record.image_id, {
          'image': _png(image),
          'mask': mask,
          'image_id': record.image_id,
          'lesion_id': record.lesion_id,
          'site': record.site or '',
          'dx': record.dx or '',
      }


def _hide_gpus_from_tensorflow() -> None:
  """TF (if installed) must not grab accelerator memory that JAX needs."""
  if 'tensorflow' in sys.modules or importlib.util.find_spec('tensorflow') is not None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')


def builder(out_dir: PathLike, image_size: int | Sequence[int]) -> Ham10000Seg:
  """Returns the builder whose files live under `out_dir` for this size."""
  return Ham10000Seg(config=config_for(image_size), data_dir=os.fspath(out_dir),
                     file_format='array_record')


def prepare(
    data_dir: PathLike,
    out_dir: PathLike,
    image_size: int | Sequence[int],
    overwrite: bool = False,
) -> pathlib.Path:
  """Builds `ham10000_seg/<H>x<W>` as array_record files from a release folder.

  Args:
    data_dir: the manually downloaded release (see MANUAL_DOWNLOAD_INSTRUCTIONS).
    out_dir: the TFDS data_dir to write into.
    image_size: (height, width) or int.
    overwrite: rebuild even when the prepared files already exist.

  Returns:
    The prepared dataset folder (`out_dir/ham10000_seg/<H>x<W>/<version>`).
  """
  _hide_gpus_from_tensorflow()
  ham10000.detect_layout(data_dir)  # Fail early with a clear message.
  b = builder(out_dir, image_size)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(data_dir), download_mode=mode,
      ),
  )  # file_format='array_record' is set on the builder (see `builder`).
  return pathlib.Path(os.fspath(b.data_dir))


def load_data_source(out_dir: PathLike, image_size: int | Sequence[int], split: str = 'train'):
  """Random-access view (`builder.as_data_source()[split]`) of a prepared dataset."""
  return builder(out_dir, image_size).as_data_source(split=split)


def find(root: PathLike, image_size: int | Sequence[int]) -> pathlib.Path | None:
  """The prepared `ham10000_seg` folder of this image size in `root`, or None if none.

  `root` may be the `out_dir` given to `prepare` or its `ham10000_seg/` folder.

  Raises:
    ValueError: `root` holds `ham10000_seg` but not at this size, or only in another version
      (names the sizes / versions found).
  """
  root = pathlib.Path(root)
  base = root if root.name == Ham10000Seg.name else root / Ham10000Seg.name
  if not base.is_dir():
    return None
  size = config_for(image_size).name
  version = str(Ham10000Seg.VERSION)
  if (base / size / version / 'dataset_info.json').is_file():
    return base / size / version
  found = sorted(str(p.relative_to(base)) for p in base.glob('*/*/dataset_info.json'))
  raise ValueError(f'{base} holds {[f[:f.rindex("/")] for f in found]} (size/version), '
                   f'not {size}/{version}: set config.data.image_size to a prepared size, or '
                   f'prepare {size} with `adpfl data prepare --task ham10000 --image-size '
                   f'{size.replace("x", ",")}`.')


def records(path: PathLike) -> list[dict[str, Any]]:
  """The records of a prepared folder's examples (`load`'s index order), from metadata.json."""
  return json.loads((pathlib.Path(path) / 'metadata.json').read_text())['records']['train']


def load(path: PathLike):
  """Random-access view of the 'train' split of a prepared folder (as returned by `find`)."""
  return tfds.builder_from_directory(os.fspath(path)).as_data_source(split='train')
