"""Users' own image folders as a prepared tfds dataset.

A folder dataset is a directory laid out as::

  DIR/train/images/*.{png,jpg,...}   DIR/train/masks/*.png
  DIR/val/images/*.{png,jpg,...}     DIR/val/masks/*.png

Images are the files with an extension of `jaxseg.image_io.IMAGE_EXTENSIONS`.
Each mask has the same file stem as its image and holds one class index per
pixel (`ignore_label`, 255 by default, marks pixels to ignore). The folder is
validated completely, then written once into a tfds dataset (ArrayRecord
files, read by index) under `data_dir` whose config name is a fingerprint of
the folder's contents, the label settings and the channel count, so an
unchanged folder is reused and a changed one is prepared again.

Images are stored with `channels` bands (config.model.in_channels), read by
`jaxseg.image_io.read_image`: 3 converts grayscale to RGB and drops alpha; 1
reads grayscale files as they are and converts colour ones to luminance
(PIL's 'L'); 4 needs files with 4 bands (RGBA png, 4-band tif), the 4th being
data, not transparency.

Multi-label (config.task='multilabel': classes overlap) keeps the images as
they are and gives each class a folder of masks::

  DIR/train/masks/<class name>/<stem>.png   (one per image, for every class)

each single-band, 0 where the class is absent, 1 where present (a 1-bit PNG
works), `ignore_label` where it is not known. The classes are
config.dataset.class_names, one folder each. Stored, an example's K masks lie
side by side in one PNG (datasets.tile_masks).

Typical use::

  builder = prepare_folder_dataset(DIR, num_classes=5, data_dir=TFDS_DIR)
  examples = builder.as_data_source(split='train')  # or 'validation'
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jaxseg.data import datasets
from jaxseg.data.datasets import ARRAY_RECORD
from jaxseg.image_io import IMAGE_EXTENSIONS, check_channels, read_image, read_mask
from jaxseg.errors import ConfigError
from jaxseg.errors import DataError

_log = logging.getLogger(__name__)

MASK_EXTENSION = '.png'

# tfds split name -> folder name on disk.
SPLIT_DIRS = {'train': 'train', 'validation': 'val'}


class Pair(NamedTuple):
  """One validated (image, mask) pair of a folder dataset."""

  image: str  # Absolute path of the image.
  mask: str  # Absolute path of the mask (multi-label: of the first class's).
  file_name: str  # Image path relative to the dataset folder, '/'-separated.
  class_masks: Tuple[str, ...] = ()  # Multi-label: the mask of each class, in class order.


# ---------------------------------------------------------------------------
# Folder checks and fingerprint.
# ---------------------------------------------------------------------------


def _check_params(num_classes: int, ignore_label: int, channels: int = 3,
                  class_names: Optional[Tuple[str, ...]] = None) -> None:
  """ConfigError for a channel count, num_classes or ignore_label a folder dataset cannot hold, or multi-label
  class names that cannot be folder names."""
  try:
    check_channels(channels, 'config.model.in_channels')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  datasets.check_labels(num_classes, ignore_label, multilabel=class_names is not None)
  if class_names is not None:
    if len(class_names) != num_classes:
      raise ConfigError(f'config.dataset.class_names has {len(class_names)} names but num_classes is {num_classes}')
    for name in class_names:
      if not isinstance(name, str) or not name or name in ('.', '..') or '/' in name or os.sep in name:
        raise ConfigError(f'config.dataset.class_names: {name!r} cannot name a mask folder (multi-label folders '
                          'keep each class in masks/<class name>/)')
    if len(set(class_names)) != len(class_names):
      raise ConfigError(f'config.dataset.class_names has a name twice: {class_names!r}')


def _check_layout(path: str) -> str:
  """Checks the folder and its four subfolders exist; returns its abspath."""
  root = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(root):
    what = 'is not a directory' if os.path.exists(root) else 'does not exist'
    raise DataError(f'Dataset folder {root} {what} (dataset.path).')
  for split_dir in SPLIT_DIRS.values():
    for sub in ('images', 'masks'):
      sub_path = os.path.join(root, split_dir, sub)
      if not os.path.isdir(sub_path):
        raise DataError(
            f'Dataset folder {root} is missing the required subfolder '
            f'{sub_path}; expected train/images, train/masks, val/images '
            'and val/masks.'
        )
  return root


def folder_fingerprint(
    path: str, num_classes: int, ignore_label: int, channels: int = 3,
    class_names: Optional[Tuple[str, ...]] = None,
) -> str:
  """Fingerprints a folder dataset's contents, label settings and channel count.

  The fingerprint is a sha1 over the sorted relative paths, sizes and
  modification times (ns) of all files under `train/` and `val/`, plus
  `num_classes`, `ignore_label` and the image channel count. It changes when
  any file is added, removed, resized or touched, which makes it a cheap
  cache key (no file is read); a folder prepared with one channel count is
  prepared again for another.

  Args:
    path: The dataset folder.
    num_classes: Number of classes.
    ignore_label: Mask value meaning "ignore".
    channels: Bands per stored image (config.model.in_channels).
    class_names: Multi-label: the classes (mask folders), in order; None for
      class-index masks.

  Returns:
    40 hex characters.

  Raises:
    DataError: The folder does not exist.
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(root):
    raise DataError(f'Dataset folder {root} does not exist (dataset.path).')
  entries = []
  for split_dir in sorted(SPLIT_DIRS.values()):
    top = os.path.join(root, split_dir)
    for dirpath, dirnames, filenames in os.walk(top):
      dirnames.sort()
      for name in filenames:
        full = os.path.join(dirpath, name)
        try:
          st = os.stat(full)
        except OSError:
          continue  # Dangling symlink; validation reports it if it matters.
        rel = os.path.relpath(full, root).replace(os.sep, '/')
        entries.append((rel, st.st_size, st.st_mtime_ns))
  h = hashlib.sha1()
  h.update(f'num_classes={int(num_classes)}\n'.encode())
  h.update(f'ignore_label={int(ignore_label)}\n'.encode())
  h.update(f'channels={int(channels)}\n'.encode())
  if class_names is not None:
    h.update(f'multilabel={list(class_names)!r}\n'.encode())
  for rel, size, mtime in sorted(entries):
    h.update(f'{rel}\0{size}\0{mtime}\n'.encode('utf-8', 'surrogateescape'))
  return h.hexdigest()


def _list_files(folder: str) -> List[str]:
  """Names of the regular, non-hidden files in `folder`, sorted."""
  return sorted(
      n
      for n in os.listdir(folder)
      if not n.startswith('.') and os.path.isfile(os.path.join(folder, n))
  )


def _images_by_stem(images_dir: str) -> Dict[str, str]:
  """The images of a split folder by file stem.

  Raises:
    DataError: No images, or two sharing a stem.
  """
  images: Dict[str, str] = {}
  skipped = []
  for name in _list_files(images_dir):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:
      skipped.append(name)
      continue
    if stem in images:
      raise DataError(
          f'Images {os.path.join(images_dir, images[stem])} and '
          f'{os.path.join(images_dir, name)} share the stem {stem!r}, so '
          'their mask would be ambiguous; rename one.'
      )
    images[stem] = name
  if skipped:
    _log.warning(
        'Ignoring %d file(s) in %s that are not images (%s): %s',
        len(skipped), images_dir, ', '.join(IMAGE_EXTENSIONS),
        ', '.join(skipped[:5]),
    )
  if not images:
    raise DataError(
        f'Split folder {images_dir} holds no images '
        f'({", ".join(IMAGE_EXTENSIONS)}); every split needs at least one '
        'image.'
    )
  return images


def _match_split(root: str, split_dir: str,
                 class_names: Optional[Tuple[str, ...]] = None) -> List[Tuple[str, ...]]:
  """Pairs images with masks by file stem for one split folder.

  Returns:
    Sorted (image path, mask path) tuples; multi-label (`class_names`):
    (image path, mask path of each class...).

  Raises:
    DataError: No images, duplicate stems, a missing class folder, or an
      image without a mask.
  """
  images_dir = os.path.join(root, split_dir, 'images')
  masks_dir = os.path.join(root, split_dir, 'masks')
  images = _images_by_stem(images_dir)
  found = sorted(n for n in os.listdir(masks_dir) if os.path.isdir(os.path.join(masks_dir, n)))
  if class_names is None:
    if found and not any(n.lower().endswith(MASK_EXTENSION) for n in _list_files(masks_dir)):
      raise DataError(
          f'{masks_dir} holds folders {found[:5]} and no mask files: a multi-label folder (a mask folder per '
          "class) needs config.task='multilabel' and config.dataset.class_names."
      )
    return _match_masks(images_dir, images, masks_dir)
  per_class = []
  for name in class_names:
    class_dir = os.path.join(masks_dir, name)
    if not os.path.isdir(class_dir):
      raise DataError(
          f'Multi-label folder: class {name!r} has no mask folder {class_dir}; '
          f'{masks_dir} holds {found or "no folders"} (one folder per class '
          'of config.dataset.class_names, each with a mask per image).'
      )
    per_class.append(_match_masks(images_dir, images, class_dir))
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    _log.warning('Ignoring mask folder(s) %s in %s: not in config.dataset.class_names %s', unknown, masks_dir,
                 list(class_names))
  return [(pairs[0][0],) + tuple(p[1] for p in pairs) for pairs in zip(*per_class)]


def _match_masks(images_dir: str, images: Dict[str, str], masks_dir: str) -> List[Tuple[str, str]]:
  """(image path, mask path) for every image, its mask the png of the same stem in `masks_dir`."""
  masks: Dict[str, str] = {}
  other_masks: Dict[str, str] = {}  # Same stem, not a png: a likely mistake.
  for name in _list_files(masks_dir):
    stem, ext = os.path.splitext(name)
    if ext.lower() == MASK_EXTENSION:
      masks[stem] = name
    else:
      other_masks[stem] = name

  pairs = []
  for stem, name in sorted(images.items()):
    image_path = os.path.join(images_dir, name)
    if stem not in masks:
      expected = os.path.join(masks_dir, stem + MASK_EXTENSION)
      hint = ''
      if stem in other_masks:
        hint = (
            f' Found {os.path.join(masks_dir, other_masks[stem])}, but masks '
            'must be png (lossless).'
        )
      raise DataError(
          f'Image {image_path} has no mask: expected {expected}.{hint}'
      )
    pairs.append((image_path, os.path.join(masks_dir, masks[stem])))

  orphans = sorted(set(masks) - set(images))
  if orphans:
    _log.warning(
        'Ignoring %d mask(s) in %s without an image of the same stem: %s',
        len(orphans), masks_dir,
        ', '.join(masks[s] for s in orphans[:5]),
    )
  return pairs


def _image_size(path: str, channels: int) -> Tuple[int, int]:
  """Reads an image as `channels` bands (catches corruption and band counts); returns (width, height)."""
  image = read_image(path, channels)
  return image.shape[1], image.shape[0]


def _check_pair(
    image_path: str,
    mask_path: str,
    num_classes: int,
    ignore_label: int,
    image_size: Optional[Tuple[int, int]] = None,
    mask: Optional[np.ndarray] = None,
    channels: int = 3,
    multilabel: bool = False,
) -> np.ndarray:
  """Checks one pair's bands, sizes and mask values; raises DataError if wrong. Returns the mask.

  `multilabel`: the mask is one class's, of 0, 1 and ignore_label.
  """
  if image_size is None:
    image_size = _image_size(image_path, channels)
  if mask is None:
    mask = read_mask(mask_path)
  w, h = image_size
  if mask.shape != (h, w):
    raise DataError(
        f'Image {image_path} is {w}x{h} (width x height) but its mask '
        f'{mask_path} is {mask.shape[1]}x{mask.shape[0]}; they must be the '
        'same size.'
    )
  values = np.unique(mask)
  if multilabel:
    bad = values[(values > 1) & (values != ignore_label)]
    if bad.size:
      hint = (f' A mask of 0 and 255 marks its class with 255: write 1 instead ({ignore_label} means ignore).'
              if 255 in bad.tolist() else '')
      raise DataError(
          f'Mask {mask_path} has values {bad[:10].tolist()}: a multi-label mask holds 0 (class absent), 1 '
          f'(present) and {ignore_label} (ignore) only.{hint}'
      )
    return mask
  bad = values[(values >= num_classes) & (values != ignore_label)]
  if bad.size:
    shown = bad[:10].tolist()
    more = f' (and {bad.size - 10} more)' if bad.size > 10 else ''
    raise DataError(
        f'Mask {mask_path} has values {shown}{more} that are >= '
        f'dataset.num_classes={num_classes}. Mask pixels must be class '
        f'indices 0..{num_classes - 1}, and {ignore_label} means ignore.'
    )
  return mask


def validate_folder(
    path: str, *, num_classes: int, ignore_label: int = 255, channels: int = 3,
    class_names: Optional[Tuple[str, ...]] = None,
) -> Dict[str, List[Pair]]:
  """Validates every (image, mask) pair of a folder dataset.

  Args:
    path: The dataset folder.
    num_classes: Number of classes; mask values must be below it.
    ignore_label: Mask value meaning "ignore" (allowed in masks).
    channels: Bands each image is read as (1, 3 or 4; see
      `jaxseg.image_io.read_image`); a file that cannot become that many is
      an error.
    class_names: Multi-label: the classes, each a folder of masks
      (masks/<name>/<stem>.png of 0, 1 and ignore_label); None: one mask of
      class indices per image.

  Returns:
    tfds split name ('train', 'validation') -> validated pairs.

  Raises:
    ConfigError: num_classes, ignore_label, channels or class_names is out of range.
    DataError: The folder or any file in it is bad; names the file.
  """
  _check_params(num_classes, ignore_label, channels, class_names)
  root = _check_layout(path)
  matched = {
      split: _match_split(root, split_dir, class_names)
      for split, split_dir in SPLIT_DIRS.items()
  }
  total = sum(len(p) for p in matched.values())
  result: Dict[str, List[Pair]] = {}
  multilabel = class_names is not None
  positives = np.zeros(num_classes, np.int64)  # Multi-label: each class's pixels marked 1 in training.
  ignored = np.zeros(num_classes, np.int64)
  with tqdm.tqdm(
      total=total, desc=f'Validating {root}', unit='pair', file=sys.stderr
  ) as bar:
    for split, pairs in matched.items():
      result[split] = []
      for image_path, *mask_paths in pairs:
        size = _image_size(image_path, channels)
        for k, mask_path in enumerate(mask_paths):
          mask = _check_pair(image_path, mask_path, num_classes, ignore_label, image_size=size,
                             channels=channels, multilabel=multilabel)
          if multilabel and split == 'train':
            positives[k] += np.count_nonzero(mask == 1)
            ignored[k] += np.count_nonzero(mask == ignore_label)
        rel = os.path.relpath(image_path, root).replace(os.sep, '/')
        result[split].append(Pair(image_path, mask_paths[0], rel, tuple(mask_paths) if multilabel else ()))
        bar.update(1)
  if multilabel:
    _check_class_presence(root, class_names, positives, ignored, ignore_label)
  return result


def _check_class_presence(root: str, class_names, positives: np.ndarray, ignored: np.ndarray,
                          ignore_label: int) -> None:
  """Multi-label: a class never marked 1 in training cannot be learnt; if its masks hold ignore_label, they
  were most likely written 0 / 255 (DataError), otherwise it is only absent (a warning)."""
  for name, pos, ign in zip(class_names, positives, ignored):
    if pos:
      continue
    train_dir = os.path.join(root, SPLIT_DIRS['train'], 'masks', name)
    if ign:
      raise DataError(
          f'Multi-label class {name!r}: no mask in {train_dir} marks a pixel 1, and {int(ign)} pixel(s) hold '
          f'{ignore_label} (ignore). Masks written as 0 / 255 must mark the class with 1; {ignore_label} means '
          'ignore.'
      )
    _log.warning('Multi-label class %r is absent from every training mask in %s: it cannot be learnt.',
                 name, train_dir)


# ---------------------------------------------------------------------------
# The tfds builder.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """Config of one folder dataset; `name` is the folder's fingerprint.

  Attributes:
    path: The dataset folder (absolute).
    num_classes: Number of classes.
    ignore_label: Mask value meaning "ignore".
    channels: Bands per stored image (config.model.in_channels).
    class_names: Multi-label: the classes, one mask folder each; None: one
      class-index mask per image.
  """

  path: str = ''
  num_classes: int = 0
  ignore_label: int = 255
  channels: int = 3
  class_names: Optional[Tuple[str, ...]] = None


class JaxsegFolder(tfds.core.GeneratorBasedBuilder):
  """A user's image/mask folder, prepared as tfds splits train/validation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # tfds 4.9.x's default `code_path` imports `importlib_resources`, which it
  # only declares as a dependency for Python < 3.9, so preparing a builder
  # defined outside tfds fails with ModuleNotFoundError. The path is only
  # used to look for a (nonexistent) checksums file next to this module.
  code_path = epath.Path(__file__)

  def __init__(self, *args, **kwargs):
    self._pairs: Optional[Dict[str, List[Pair]]] = None
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not via dataset_info_from_configs) so no metadata files
    # are looked up next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Images and class-index masks from a user folder '
            '(train/ -> train, val/ -> validation).'
        ),
        features=datasets.segmentation_features(
            channels=self._folder_config().channels
        ),
        supervised_keys=('image', 'segmentation_mask'),
    )

  def validate(self) -> Dict[str, List[Pair]]:
    """Validates the folder once per builder and returns its pairs."""
    if self._pairs is None:
      cfg = self._folder_config()
      self._pairs = validate_folder(
          cfg.path, num_classes=cfg.num_classes, ignore_label=cfg.ignore_label,
          channels=cfg.channels, class_names=cfg.class_names,
      )
    return self._pairs

  def _folder_config(self) -> FolderConfig:
    cfg = self.builder_config
    if not isinstance(cfg, FolderConfig) or not cfg.path:
      raise ValueError(
          'JaxsegFolder can only prepare data with a FolderConfig; use '
          'jaxseg.data.folder.prepare_folder_dataset.'
      )
    return cfg

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local; nothing is downloaded.
    pairs = self.validate()
    return {
        split: self._generate_examples(pairs[split]) for split in SPLIT_DIRS
    }

  def _generate_examples(self, pairs: List[Pair]) -> Iterator:
    cfg = self._folder_config()
    for pair in pairs:
      # Re-read instead of caching decoded arrays from validation, to keep
      # memory flat. Files may have changed since validation, so the cheap
      # checks run again on the decoded arrays.
      image = read_image(pair.image, cfg.channels)
      size = (image.shape[1], image.shape[0])
      masks = [
          _check_pair(pair.image, path, cfg.num_classes, cfg.ignore_label, image_size=size,
                      mask=read_mask(path), multilabel=cfg.class_names is not None)
          for path in (pair.class_masks or (pair.mask,))
      ]
      if cfg.class_names is not None:
        stored = datasets.tile_masks(np.stack(masks, axis=-1))
      else:
        stored = masks[0][..., None]
      yield pair.file_name, {
          'image': image,
          'segmentation_mask': stored,
          'file_name': pair.file_name,
      }


def _is_prepared(builder: JaxsegFolder) -> bool:
  # Checking the folder first avoids tfds's warning about a missing
  # dataset_info.json for every folder that is not prepared yet.
  return os.path.isdir(builder.data_path) and builder.is_prepared()


def _remove_empty_dirs(*dirs: str) -> None:
  for d in dirs:
    try:
      os.rmdir(d)  # Only succeeds when empty, so shared folders survive.
    except OSError:
      pass


def _clean_failed_prepare(builder: JaxsegFolder) -> None:
  """Removes whatever a failed preparation left for this fingerprint.

  tfds writes into `<config>/incomplete.<random suffix>_<version>/`, renames it on
  success and deletes it on failure; this also covers a failure of that
  clean-up, and removes the then-empty config and builder folders.
  """
  version_dir = os.fspath(builder.data_path)
  config_dir = os.path.dirname(version_dir)
  if os.path.isdir(config_dir):
    for name in os.listdir(config_dir):
      if name.startswith('incomplete.') or '.incomplete' in name:
        shutil.rmtree(os.path.join(config_dir, name), ignore_errors=True)
  if os.path.isdir(version_dir) and not builder.is_prepared():
    shutil.rmtree(version_dir, ignore_errors=True)
  _remove_empty_dirs(config_dir, os.path.dirname(config_dir))


def prepare_folder_dataset(
    path: str,
    *,
    num_classes: int,
    data_dir: str,
    ignore_label: int = 255,
    channels: int = 3,
    class_names: Optional[Tuple[str, ...]] = None,
) -> tfds.core.DatasetBuilder:
  """Validates a folder dataset and prepares it (once) as a tfds dataset.

  The prepared data lives under `data_dir/jaxseg_folder/<fingerprint>/1.0.0`.
  If that exists, it is reused without re-validating (the fingerprint covers
  every file's size and mtime). Otherwise every pair is validated first, and
  nothing is written under `data_dir` for this fingerprint unless all pass.

  Args:
    path: Folder with train/images, train/masks, val/images, val/masks.
    num_classes: Number of classes (2..255); mask values must be below it.
    data_dir: tfds data directory to write the prepared dataset to.
    ignore_label: Mask value meaning "ignore".
    channels: Bands per image (config.model.in_channels: 1, 3 or 4); part of
      the fingerprint, so a folder prepared with 3 is prepared again for 4.
    class_names: Multi-label: the classes, each a folder masks/<name>/ (see
      the module's docstring); None: class-index masks.

  Returns:
    The prepared builder; read it with `builder.as_data_source(split='train')`
    or `split='validation'`.

  Raises:
    ConfigError: num_classes, ignore_label or channels is out of range (a
      ValueError).
    DataError: The folder or a file in it is missing or malformed; the
      message names the file.
  """
  class_names = None if class_names is None else tuple(class_names)
  _check_params(num_classes, ignore_label, channels, class_names)
  root = _check_layout(path)
  config = FolderConfig(
      name=folder_fingerprint(root, num_classes, ignore_label, channels, class_names),
      description=f'Folder dataset {root} ({channels} channel(s))',
      path=root,
      num_classes=int(num_classes),
      ignore_label=int(ignore_label),
      channels=int(channels),
      class_names=class_names,
  )
  data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  builder = JaxsegFolder(config=config, data_dir=data_dir)
  if _is_prepared(builder):
    return builder

  builder.validate()  # Raises before anything is written.
  # tfds creates (empty) download folders although nothing is downloaded.
  download_dir = os.path.join(data_dir, 'downloads')
  try:
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
        file_format=ARRAY_RECORD,
    )
    if not _is_prepared(builder):  # Defensive: tfds returned without data.
      raise DataError(f'Preparing folder dataset {root} produced no dataset.')
  except BaseException:
    _clean_failed_prepare(builder)
    raise
  finally:
    _remove_empty_dirs(
        os.path.join(download_dir, 'extracted'),
        os.path.join(download_dir, 'manual'),
        download_dir,
    )
  return builder
