"""Dataset registry: `config.dataset` -> a resolved DatasetSpec and a prepared tfds builder.

Every dataset reaches the pipeline as a tfds builder whose examples hold an
encoded image and an encoded mask, stored as ArrayRecord: the pipeline reads
examples by index (each process only its share), which TFRecord files cannot
do. Data jaxseg prepares is written as ArrayRecord; a tfds dataset already
prepared as TFRecord (by a plain `tfds build`) is converted once, in place
(`as_array_record`).

A preset gives a dataset's defaults (which features, how mask values map to
classes, class names): `PRESETS` holds the embedded shapes, user folders and
the tfds catalog presets of `jaxseg.data.catalog`. Any field set in
`config.dataset` overrides them, and a tfds name with no preset works when the
config names its features and classes.
"""

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core.utils import py_utils

from jaxseg import image_io
from jaxseg.data import catalog
from jaxseg.errors import ConfigError, DataError

_log = logging.getLogger(__name__)

# The file format the pipeline reads (random access by example index).
ARRAY_RECORD = file_adapters.FileFormat.ARRAY_RECORD


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset as the pipeline sees it. Mask value v becomes class v + label_offset."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  ignore_label: int
  image_key: str
  label_key: str
  label_offset: int
  ignore_values: tuple[int, ...]  # Raw mask values that become ignore_label.
  train_split: str
  eval_split: str
  image_channels: int = 3  # Bands of the decoded images (config.model.in_channels): 1, 3 or 4.
  # config.task='multilabel': K overlapping classes, labels [H, W, K] of 0 / 1 / ignore_label (else [H, W] indices).
  multilabel: bool = False
  # Builds the prepared builder; set by the preset (catalog datasets use tfds.builder).
  open_builder: Callable[['DatasetSpec', Any], tfds.core.DatasetBuilder] = dataclasses.field(repr=False,
                                                                                             compare=False,
                                                                                             default=None)


def segmentation_features(size: Optional[int] = None, channels: int = 3) -> tfds.features.FeaturesDict:
  """The features of the datasets jaxseg writes itself: PNG image [H, W, channels], PNG mask [H, W, 1], file name.

  `size`: a fixed height and width, or None for any. `channels`: 1 (grayscale),
  3 (RGB) or 4 (a 4-band PNG; the 4th band is data, not transparency).
  A multi-label dataset stores its K masks side by side in the one mask image,
  [H, K * W, 1] (`tile_masks`): one lossless PNG per example, as for one mask.
  """
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(size, size, channels), encoding_format='png'),
      'segmentation_mask': tfds.features.Image(shape=(size, size, 1), encoding_format='png'),
      'file_name': tfds.features.Text(),
  })


def tile_masks(masks: np.ndarray) -> np.ndarray:
  """Multi-label masks [H, W, K] -> the stored [H, K * W, 1]: class k's mask at columns k * W .. (k + 1) * W."""
  h, w, k = masks.shape
  return np.ascontiguousarray(np.transpose(masks, (0, 2, 1))).reshape(h, k * w, 1)


def _data_dir(dataset_config) -> Optional[str]:
  return dataset_config.get('data_dir') or os.environ.get('TFDS_DATA_DIR') or None


def _open_catalog(spec: DatasetSpec, dataset_config) -> tfds.core.DatasetBuilder:
  """A tfds catalog dataset: prepared already, or downloaded and prepared now (needs the network)."""
  data_dir = _data_dir(dataset_config)
  try:
    tfds.builder(spec.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(f'config.dataset.name={spec.name!r} is neither a jaxseg preset ({sorted(PRESETS)}) '
                      f'nor a tfds dataset: {e}') from None
  # A builder made after process 0 prepared the data sees it prepared.
  return prepare_once(lambda: _prepare_catalog(spec, tfds.builder(spec.name, data_dir=data_dir)))


def _prepare_catalog(spec: DatasetSpec, builder) -> tfds.core.DatasetBuilder:
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(file_format=ARRAY_RECORD)
    except Exception as e:  # Network, manual-download and disk errors all land here.
      raise DataError(f'tfds dataset {spec.name!r} is not prepared in {builder.data_dir} and preparing it failed: '
                      f'{type(e).__name__}: {e}\nPrepare it first, e.g. `tfds build {spec.name} '
                      f'--data_dir=DIR --file_format=array_record` (see README: Datasets).') from e
  return as_array_record(builder)


def as_array_record(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """`builder`, prepared, set to read its ArrayRecord files.

  Data prepared in another format (TFRecord, by a plain `tfds build`) is
  converted once, in place: ArrayRecord shards holding the same records in
  the same order are written next to the existing ones, and
  dataset_info.json lists them as an alternative format, so later runs find
  them and other tfds readers still read the original files. This does what
  tfds's `convert_format` does, without the Apache Beam that it imports.
  """
  info = builder.info
  if ARRAY_RECORD.value not in (info.file_format.value, *info.as_proto.alternative_file_formats):
    _log.info('Converting tfds dataset %s in %s from %s to ArrayRecord, once (the pipeline reads examples by index)',
              builder.name, builder.data_dir, info.file_format.value)
    reader = file_adapters.ADAPTER_FOR_FORMAT[info.file_format]
    writer = file_adapters.ADAPTER_FOR_FORMAT[ARRAY_RECORD]
    for split in info.splits.values():
      template = split.filename_template.replace(filetype_suffix=ARRAY_RECORD.file_suffix)
      for shard, path in enumerate(split.filepaths):
        out = template.sharded_filepath(shard_index=shard, num_shards=split.num_shards)
        # Written under a temporary name and renamed when complete: a crash leaves no partial shard behind.
        with py_utils.incomplete_file(out) as tmp:
          writer.write_examples(tmp, enumerate(reader.make_tf_data(path).as_numpy_iterator()))
    info.add_alternative_file_format(ARRAY_RECORD)
    info.write_to_directory(builder.data_dir)
  if info.file_format != ARRAY_RECORD:
    # tfds restores a dataset_info.json's alternative formats into the info's proto only, where
    # `as_data_source` does not look: point this builder at the ArrayRecord files itself.
    info.set_file_format(ARRAY_RECORD, override=True, override_if_initialized=True)
  return builder


def prepare_once(prepare: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
  """Runs `prepare` on process 0 first, then on the others (which find it prepared).

  Several processes writing one dataset into shared storage would race.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return prepare()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  builder = prepare() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('jaxseg: dataset prepared')
  return builder if builder is not None else prepare()


def _open_shapes(spec: DatasetSpec, dataset_config) -> tfds.core.DatasetBuilder:
  from jaxseg.data import shapes  # pylint: disable=g-import-not-at-top  # Registers the builder.
  del shapes

  def prepare():
    builder = tfds.builder('jaxseg_shapes', data_dir=_data_dir(dataset_config))
    if not builder.is_prepared():
      builder.download_and_prepare(file_format=ARRAY_RECORD)
    return builder

  return prepare_once(prepare)


def _open_folder(spec: DatasetSpec, dataset_config) -> tfds.core.DatasetBuilder:
  from jaxseg.data import folder  # pylint: disable=g-import-not-at-top
  if not dataset_config.get('path'):
    raise ConfigError("config.dataset.name='folder' needs config.dataset.path=DIR "
                      '(DIR holds train/images, train/masks, val/images, val/masks)')
  data_dir = _data_dir(dataset_config) or os.path.expanduser('~/tensorflow_datasets')
  return prepare_once(lambda: folder.prepare_folder_dataset(
      dataset_config['path'], num_classes=spec.num_classes, data_dir=data_dir, ignore_label=spec.ignore_label,
      channels=spec.image_channels, class_names=spec.class_names if spec.multilabel else None))


# Defaults per dataset; every key but open_builder may be overridden by the config field of the same name.
PRESETS: dict[str, dict[str, Any]] = {
    'jaxseg_shapes': dict(
        num_classes=4, class_names=('background', 'disc', 'square', 'triangle'),
        image_key='image', label_key='segmentation_mask', label_offset=0, ignore_values=(),
        train_split='train', eval_split='validation', open_builder=_open_shapes),
    'folder': dict(
        num_classes=None, class_names=None,
        image_key='image', label_key='segmentation_mask', label_offset=0, ignore_values=(),
        train_split='train', eval_split='validation', open_builder=_open_folder),
    **catalog.PRESETS,
}


def check_labels(num_classes, ignore_label, multilabel: bool = False) -> None:
  """ConfigError unless num_classes >= 2 (>= 1 multi-label) and ignore_label lies in [num_classes, 255] ([2, 255]
  multi-label): labels travel as uint8, and an ignore label that is a class index (or 0 / 1 of a multi-label mask)
  would silently drop a class."""
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  low = 1 if multilabel else 2
  if not is_int(num_classes) or not low <= num_classes <= 255:
    hint = ('one per overlapping class' if multilabel else
            'a binary task has 2: background and foreground')
    raise ConfigError(f'config.dataset.num_classes must be an integer in [{low}, 255] ({hint}), got {num_classes!r}')
  lowest = 2 if multilabel else num_classes
  if not is_int(ignore_label) or not lowest <= ignore_label <= 255:
    why = ('multi-label masks hold 0 and 1' if multilabel else
           'labels travel as uint8; below num_classes it would collide with a class index')
    raise ConfigError(f'config.dataset.ignore_label must be an integer in [{lowest}, 255] ({why}), got '
                      f'{ignore_label!r}')


# Presets whose data can be multi-label (config.task='multilabel'): a folder in the multi-label layout.
MULTILABEL_PRESETS = ('folder',)


def resolve_spec(dataset_config, task: str = 'multiclass') -> DatasetSpec:
  """Merges the preset named by `dataset_config.name` with the fields set in the config, and checks them.

  `task` is config.task: 'multilabel' needs a dataset that holds one mask per class (MULTILABEL_PRESETS).
  """
  name = dataset_config['name']
  multilabel = task == 'multilabel'
  if multilabel and name not in MULTILABEL_PRESETS:
    raise ConfigError(f"config.task='multilabel' needs a multi-label dataset: config.dataset.name='folder' in the "
                      f"multi-label layout (README: Multi-label folders); {name!r} holds one class per pixel")
  preset = dict(num_classes=None, class_names=None, image_key='image', label_key='segmentation_mask',
                label_offset=0, ignore_values=(), train_split='train', eval_split='validation',
                open_builder=_open_catalog)
  preset.update(PRESETS.get(name, {}))
  for key in ('num_classes', 'class_names', 'image_key', 'label_key', 'label_offset', 'ignore_values',
              'train_split', 'eval_split'):
    value = dataset_config.get(key)
    if value is not None:
      preset[key] = value
  num_classes = preset['num_classes']
  if num_classes is None:
    raise ConfigError(f'config.dataset.num_classes must be set for dataset {name!r}')
  if multilabel and (preset['label_offset'] or preset['ignore_values']):
    raise ConfigError("config.dataset.label_offset and ignore_values map class-index masks; config.task='multilabel' "
                      'masks hold 0, 1 and ignore_label only')
  ignore_label = dataset_config.get('ignore_label', 255)
  check_labels(num_classes, ignore_label, multilabel)
  class_names = preset['class_names']
  if class_names is None:
    if multilabel:
      raise ConfigError("config.task='multilabel' needs config.dataset.class_names: each names a mask folder "
                        '(train/masks/<name>/, val/masks/<name>/)')
    class_names = tuple(f'class_{i}' for i in range(num_classes))
  if len(class_names) != num_classes:
    raise ConfigError(f'config.dataset.class_names has {len(class_names)} names but num_classes is {num_classes}')
  return DatasetSpec(name=name, num_classes=num_classes, class_names=tuple(class_names), ignore_label=ignore_label,
                     image_key=preset['image_key'], label_key=preset['label_key'],
                     label_offset=int(preset['label_offset']), ignore_values=tuple(preset['ignore_values']),
                     train_split=preset['train_split'], eval_split=preset['eval_split'],
                     open_builder=preset['open_builder'], multilabel=multilabel)


# Datasets whose images are stored with whatever channel count the config asks for (prepared for it).
PREPARED_PER_CHANNELS = ('folder',)


def check_channels(name: str, channels: int) -> None:
  """ConfigError unless dataset `name` can give images of `channels` bands (config.model.in_channels).

  Image files carry 1, 3 or 4 bands. A folder is prepared with the count
  asked for; the other presets (the embedded shapes, the catalog) store RGB,
  so they need 3. A tfds dataset without a preset is checked against its
  image feature in `open_dataset`.
  """
  try:
    image_io.check_channels(channels, 'config.model.in_channels')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if channels != 3 and name in PRESETS and name not in PREPARED_PER_CHANNELS:
    raise ConfigError(f'config.model.in_channels={channels}: dataset {name!r} holds RGB images (3 channels); '
                      f"other counts need your own images (config.dataset.name='folder', README: Your own folders)")


def open_dataset(dataset_config, *, in_channels: int = 3,
                 task: str = 'multiclass') -> tuple[DatasetSpec, tfds.core.DatasetBuilder]:
  """Resolves the spec and returns it with its prepared builder, checking the splits exist and are not empty.

  `in_channels` (config.model.in_channels) is the images' band count: a folder
  is prepared with it; for 1 or 4, another dataset's image feature must have it.
  """
  spec = dataclasses.replace(resolve_spec(dataset_config, task), image_channels=in_channels)
  check_channels(spec.name, in_channels)
  builder = spec.open_builder(spec, dataset_config)
  features = builder.info.features
  for key, field in ((spec.image_key, 'image_key'), (spec.label_key, 'label_key')):
    if key not in features:
      raise ConfigError(f'config.dataset.{field}={key!r} is not a feature of {spec.name!r}; it has {list(features)}')
  stored = getattr(features[spec.image_key], 'shape', (None,))[-1]
  # 3 reads any stored image as RGB (grayscale repeated, alpha dropped); 1 and 4 must be stored with that count.
  if in_channels != 3 and stored is not None and stored != in_channels:
    raise ConfigError(f'config.model.in_channels={in_channels} but the images of {spec.name!r} '
                      f'({builder.data_dir}) have {stored} channel(s)')
  for split, field in ((spec.train_split, 'train_split'), (spec.eval_split, 'eval_split')):
    try:
      n = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ConfigError(f'config.dataset.{field}={split!r} is not a split of {spec.name!r}: {e}') from None
    if n == 0:
      raise DataError(f'split {split!r} of dataset {spec.name!r} ({builder.data_dir}) is empty')
  return spec, builder
