"""Prepared tfds datasets written by the tests, as `tfds build` would leave them in a data dir (nothing downloaded).

`write_catalog_dataset` writes a catalog dataset (dataset_info.json with the real feature spec from the installed
tfds builder code, small splits, records holding an encoded image and mask with the values the real dataset holds;
tfds's random mock data would put arbitrary 0..255 values in the masks). The other features of the real records
are left out: the pipeline parses only these two. `write_dataset_without_preset` writes a dataset that has no
builder code at all (a community or in-house dataset), which tfds reads from its files.
"""

import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

# The image and mask features of each catalog dataset in the installed tfds (test_catalog checks them).
FEATURE_KEYS = {'oxford_iiit_pet': ('image', 'segmentation_mask'), 'scene_parse150': ('image', 'annotation')}
SPLIT_SIZES = {'train': 5, 'test': 3}


def fake_mask(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A mask as the real dataset stores it."""
  if name == 'oxford_iiit_pet':
    return rng.integers(1, 4, size=(h, w, 1)).astype(np.uint8)  # Trimap: 1, 2, 3.
  # scene_parse150: red = category id 0..100 (0 = not one of the 100 objects), green = instance id.
  red = rng.choice(np.array([0, 1, 2, 50, 99, 100]), size=(h, w))
  green = rng.integers(0, 30, size=(h, w))
  return np.stack([red, green, np.zeros_like(red)], axis=-1).astype(np.uint8)


def _write_split(out_dir: str, name: str, split: str, file_format, features, examples: list) -> tfds.core.SplitInfo:
  template = tfds.core.naming.ShardedFileTemplate(data_dir=out_dir, dataset_name=name, split=split,
                                                  filetype_suffix=file_format.file_suffix)
  file_adapters.ADAPTER_FOR_FORMAT[file_format].write_examples(
      template.sharded_filepath(shard_index=0, num_shards=1),
      enumerate(features.serialize_example(e) for e in examples))
  return tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0, filename_template=template)


def write_catalog_dataset(data_dir: str, name: str, file_format: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
  """Writes NAME, prepared in FILE_FORMAT, into DATA_DIR; returns each split's (image, mask) arrays in record order."""
  builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  keys = FEATURE_KEYS[name]
  features = tfds.features.FeaturesDict({k: builder.info.features[k] for k in keys})
  os.makedirs(builder.data_dir, exist_ok=True)
  examples, split_infos = {}, []
  for split, n in SPLIT_SIZES.items():
    rng = np.random.default_rng(len(split) * 1000 + n)
    # Some images larger than the eval size (set aside whole), some smaller than the crop (padded).
    sizes = rng.integers(20, 72, size=(n, 2))
    examples[split] = [(rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8), fake_mask(name, rng, h, w))
                       for h, w in sizes]
    split_infos.append(_write_split(builder.data_path, name, split, builder.info.file_format, features,
                                    [dict(zip(keys, ex)) for ex in examples[split]]))
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(builder.data_dir)
  return examples


def write_dataset_without_preset(data_dir: str, name: str, num_classes: int = 3) -> None:
  """NAME/1.0.0 with `image` and `segmentation_mask` features, train and validation splits, masks 0..K-1, as
  ArrayRecord, and no builder code: tfds.builder(NAME, data_dir=...) reads it from its files."""
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(None, None, 3)),
                                         'segmentation_mask': tfds.features.Image(shape=(None, None, 1))})
  out = os.path.join(data_dir, name, '1.0.0')
  os.makedirs(out)
  rng = np.random.default_rng(1)
  split_infos = []
  for split, n in (('train', 6), ('validation', 3)):
    examples = [{'image': rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
                 'segmentation_mask': rng.integers(0, num_classes, (40, 56, 1), dtype=np.uint8)} for _ in range(n)]
    split_infos.append(_write_split(out, name, split, file_adapters.FileFormat.ARRAY_RECORD, features, examples))
  tfds.folder_dataset.write_metadata(data_dir=out, features=features, split_infos=split_infos, filename_template=None,
                                     check_data=False)
