"""Tests for the tfds catalog presets (jaxseg/data/catalog.py) on small local copies of the datasets.

Nothing is downloaded: tests/tfds_fixtures.py writes what `tfds build` would leave in a data dir.
"""

import logging
import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from configs import fcn_scene_parse150
from configs import unet_oxford_pet
from jaxseg.data import catalog
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg.errors import ConfigError
from tests.tfds_fixtures import FEATURE_KEYS, SPLIT_SIZES, write_catalog_dataset

RECIPES = {'oxford_iiit_pet': unet_oxford_pet, 'scene_parse150': fcn_scene_parse150}
CROP = (32, 32)
EVAL = (48, 48)

# The 150 classes of the ADE20K scene-parsing benchmark (ADEChallengeData2016 objectInfo150), in the official
# order: the reference the 100 instance categories of the scene_parse150 preset are checked against.
ADE20K_CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair',
    'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion',
    'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper',
    'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table', 'pillow',
    'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind', 'coffee table', 'toilet', 'flower',
    'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair',
    'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier',
    'awning', 'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel', 'pole',
    'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship',
    'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel',
    'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket',
    'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen',
    'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)


@pytest.fixture(scope='module')
def catalog_dir(tmp_path_factory):
  """A data dir where both catalog datasets are prepared as ArrayRecord."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for name in RECIPES:
    write_catalog_dataset(data_dir, name, 'array_record')
  return data_dir


def _small_recipe(name: str, data_dir: str) -> ml_collections.ConfigDict:
  config = RECIPES[name].get_config()
  config.dataset.data_dir = data_dir
  config.input.crop_size = CROP
  config.input.eval_size = EVAL
  return config


def _allowed(spec):
  return set(range(spec.num_classes)) | {spec.ignore_label}


@pytest.mark.parametrize('name,num_classes,label_key', [
    ('oxford_iiit_pet', 3, 'segmentation_mask'),
    ('scene_parse150', 100, 'annotation'),
])
def test_recipe_resolves_preset(name, num_classes, label_key):
  config = RECIPES[name].get_config()
  assert config.dataset.name == name
  spec = datasets.resolve_spec(config.dataset)
  assert spec.num_classes == num_classes
  assert len(spec.class_names) == num_classes and len(set(spec.class_names)) == num_classes
  assert (spec.image_key, spec.label_key) == ('image', label_key)
  assert (spec.train_split, spec.eval_split) == ('train', 'test')
  assert spec.ignore_label == 255 and spec.label_offset == -1


def test_presets_match_installed_tfds_features():
  """The preset keys and splits are those the installed tfds builders define."""
  for name in RECIPES:
    spec = datasets.resolve_spec(RECIPES[name].get_config().dataset)
    assert (spec.image_key, spec.label_key) == FEATURE_KEYS[name]
    features = tfds.builder(name, data_dir='/nonexistent').info.features
    assert isinstance(features[spec.image_key], tfds.features.Image)
    assert isinstance(features[spec.label_key], tfds.features.Image)
  assert tfds.builder('oxford_iiit_pet', data_dir='/nonexistent').info.features['segmentation_mask'].shape == (
      None, None, 1)


def test_class_name_lists():
  assert catalog.OXFORD_IIIT_PET_CLASS_NAMES == ('pet', 'background', 'border')
  assert len(ADE20K_CLASS_NAMES) == len(set(ADE20K_CLASS_NAMES)) == 150  # The reference is whole.
  # The 100 instance categories are ADE20K classes, in the same relative order.
  ade_index = [ADE20K_CLASS_NAMES.index(c) for c in catalog.SCENE_PARSE150_CLASS_NAMES]
  assert len(ade_index) == 100 and ade_index == sorted(ade_index)


@pytest.mark.parametrize('name,raw,expected', [
    ('oxford_iiit_pet', [0, 1, 2, 3, 255], [255, 0, 1, 2, 255]),
    ('scene_parse150', [0, 1, 2, 50, 100, 255], [255, 0, 1, 49, 99, 255]),
])
def test_map_labels(name, raw, expected):
  spec = datasets.resolve_spec(RECIPES[name].get_config().dataset)
  got = pipeline.map_labels(tf.constant([raw], tf.int32), spec)
  np.testing.assert_array_equal(got.numpy(), [expected])


def test_decode_example_reads_category_channel():
  """scene_parse150 masks are RGB (red = category, green = instance): only red decides the class."""
  spec = datasets.resolve_spec(RECIPES['scene_parse150'].get_config().dataset)
  mask = np.array([[[0, 7, 0], [1, 9, 0], [100, 200, 0]]], np.uint8)
  example = {'image': tf.io.encode_jpeg(np.zeros((1, 3, 3), np.uint8)),
             'annotation': tf.io.encode_png(mask)}
  image, label = pipeline.decode_example(example, spec)
  assert image.shape == (1, 3, 3)
  np.testing.assert_array_equal(label.numpy(), [[255, 0, 99]])

  spec = datasets.resolve_spec(RECIPES['oxford_iiit_pet'].get_config().dataset)
  trimap = np.array([[[1], [2], [3]]], np.uint8)
  example = {'image': tf.io.encode_jpeg(np.zeros((1, 3, 3), np.uint8)),
             'segmentation_mask': tf.io.encode_png(trimap)}
  np.testing.assert_array_equal(pipeline.decode_example(example, spec)[1].numpy(), [[0, 1, 2]])


@pytest.mark.parametrize('name', list(RECIPES))
def test_open_dataset_and_batches(name, catalog_dir):
  config = _small_recipe(name, catalog_dir)
  spec, builder = datasets.open_dataset(config.dataset)
  assert spec.name == name and builder.name == name
  assert builder.info.splits[spec.train_split].num_examples == SPLIT_SIZES['train']

  train = pipeline.train_dataset(builder, spec, config.input, global_batch=2, seed=0, start_step=0,
                                 process_index=0, process_count=1)
  seen = set()
  for batch in pipeline.as_numpy(train.take(4)):  # 8 examples: wraps past the 5-example epoch.
    assert batch['image'].shape == (2,) + CROP + (3,) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (2,) + CROP and batch['label'].dtype == np.uint8
    seen |= set(np.unique(batch['label']).tolist())
  assert seen <= _allowed(spec), sorted(seen - _allowed(spec))
  assert {0, 1}.issubset(seen)  # Mapped classes arrive (raw 1 -> 0, raw 2 -> 1).

  evaluation = pipeline.eval_dataset(builder, spec, config.input, global_batch=2, process_index=0,
                                     process_count=1, cache=False)
  num_batches = evaluation.num_batches
  assert num_batches == math.ceil(SPLIT_SIZES['test'] / 2)
  batches = list(pipeline.as_numpy(evaluation.batches))
  assert len(batches) == num_batches
  for batch in batches:
    assert batch['image'].shape == (2,) + EVAL + (3,) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (2,) + EVAL and batch['label'].dtype == np.uint8
  labels = np.concatenate([b['label'] for b in batches])
  assert set(np.unique(labels).tolist()) <= _allowed(spec)
  # The padding example (the 4th of 2 batches x 2) counts nowhere.
  assert np.all(labels[SPLIT_SIZES['test']:] == spec.ignore_label)
  # The last class arrives: oxford_iiit_pet's raw 3 (border) -> 2, scene_parse150's category 100 (flag) -> 99.
  assert (labels[:SPLIT_SIZES['test']] == spec.num_classes - 1).any()


def test_tfrecord_catalog_dataset_is_converted(tmp_path, caplog):
  """A catalog dataset prepared as TFRecord (a plain `tfds build`) is converted in place and read by index."""
  examples = write_catalog_dataset(str(tmp_path), 'oxford_iiit_pet', 'tfrecord')
  config = _small_recipe('oxford_iiit_pet', str(tmp_path))
  with caplog.at_level(logging.INFO, logger='jaxseg.data.datasets'):
    spec, builder = datasets.open_dataset(config.dataset)
  assert 'Converting tfds dataset oxford_iiit_pet' in caplog.text
  indices = tf.data.Dataset.range(SPLIT_SIZES['test'])
  converted = list(tfds.as_numpy(pipeline.records(builder, spec, 'test', indices)))
  # The same bytes as the TFRecord file holds, which stays in place.
  [path] = (tmp_path / 'oxford_iiit_pet').glob('*/oxford_iiit_pet-test.tfrecord-*')
  keys = {k: tf.io.FixedLenFeature([], tf.string) for k in FEATURE_KEYS['oxford_iiit_pet']}
  stored = list(tfds.as_numpy(tf.data.TFRecordDataset(str(path)).map(lambda r: tf.io.parse_single_example(r, keys))))
  assert len(converted) == len(stored) == SPLIT_SIZES['test']
  for new, old, (image, mask) in zip(converted, stored, examples['test']):
    assert new['image'] == old['image'] and new['segmentation_mask'] == old['segmentation_mask']
    np.testing.assert_array_equal(tf.io.decode_png(new['segmentation_mask']).numpy(), mask)
    assert tf.io.decode_image(new['image']).shape == image.shape


def test_generic_tfds_name_without_preset(catalog_dir, monkeypatch):
  """A tfds name with no preset opens with the catalog opener when the config names classes and keys."""
  monkeypatch.delitem(datasets.PRESETS, 'oxford_iiit_pet')
  config = default.get_config()
  config.dataset.name = 'oxford_iiit_pet'
  config.dataset.data_dir = catalog_dir
  with pytest.raises(ConfigError, match='num_classes must be set'):
    datasets.resolve_spec(config.dataset)
  config.dataset.num_classes = 3
  config.dataset.label_offset = -1
  with pytest.raises(ConfigError, match="eval_split='validation' is not a split"):
    datasets.open_dataset(config.dataset)  # Generic default split; this dataset has 'test'.
  config.dataset.eval_split = 'test'
  spec, builder = datasets.open_dataset(config.dataset)
  assert spec.open_builder is datasets._open_catalog  # pylint: disable=protected-access
  assert spec.class_names == ('class_0', 'class_1', 'class_2')
  assert (spec.image_key, spec.label_key) == ('image', 'segmentation_mask')
  config.input.crop_size = CROP
  batch = next(pipeline.as_numpy(pipeline.train_dataset(
      builder, spec, config.input, global_batch=2, seed=0, start_step=0, process_index=0, process_count=1)))
  assert set(np.unique(batch['label']).tolist()) <= _allowed(spec)

  config.dataset.label_key = 'no_such_feature'
  with pytest.raises(ConfigError, match="label_key='no_such_feature'"):
    datasets.open_dataset(config.dataset)


def test_unknown_dataset_name(tmp_path):
  config = default.get_config()
  config.dataset.name = 'no_such_dataset_jaxseg'
  config.dataset.num_classes = 2
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(ConfigError, match='no_such_dataset_jaxseg'):
    datasets.open_dataset(config.dataset)
  config.dataset.num_classes = None
  with pytest.raises(ConfigError, match='no_such_dataset_jaxseg'):
    datasets.open_dataset(config.dataset)
