"""tf.data input pipelines: tfds examples -> batches of uint8 images and labels for this process.

Batches are dicts of numpy arrays holding this process's examples:
  'image': uint8 [local_batch, H, W, C], C = spec.image_channels (config.model.in_channels: 1, 3 or 4)
  'label': uint8 [local_batch, H, W] (ignore_label where nothing counts); multi-label (spec.multilabel):
           uint8 [local_batch, H, W, K], 0 / 1 / ignore_label per class
with local_batch = global_batch / process_count. Normalisation happens on the
device (uint8 moves a quarter of the bytes).

Examples are read by index from the dataset's ArrayRecord files (`records`),
so each process reads, and holds, only its own share of a split.

Training order is a pure function of (seed, step), independent of the number
of processes: position k of one global stream of examples is example
perm_e[k % n] of the train split, where n is its size, e = k // n its epoch
and perm_e = numpy's default_rng([seed, e]).permutation(n). Step s takes
positions s * global_batch .. (s + 1) * global_batch - 1, and position k goes
to process k % process_count. Resuming at step s starts the stream at
position s * global_batch, so an interrupted run continues exactly where it
was. Augmentation (copy-paste's donor and draws included) is a pure function of
(seed, k) too.
"""

import dataclasses
import math
import os
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxseg.data import augment
from jaxseg.data import copy_paste
from jaxseg.data.datasets import ARRAY_RECORD, DatasetSpec

# Explicit tf.data parallelism (autotuning is off, see _options): map functions on
# every core, and a few batches ready ahead of the train step.
PARALLEL_CALLS = max(1, os.cpu_count() or 1)
PREFETCH = 4
# Records read from the data source per Python call: few calls, yet little read ahead (PARALLEL_CALLS calls in flight).
READ_BATCH = 8
# The functions jaxseg gives tf.data's map, filter and flat_map branch only on Python values (the config), never
# on tensors, so they are traced as written, without AutoGraph's slow rewriting of their source at every start.
no_autograph = tf.autograph.experimental.do_not_convert


def decode_example(example: dict, spec: DatasetSpec) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded tfds example -> (image uint8 [H, W, C], label int32 [H, W]) in jaxseg's class indices.

  C = spec.image_channels; the dataset stores images with that many (datasets.open_dataset checks it).
  Multi-label: label int32 [H, W, K] of 0 / 1 / ignore_label (`decode_label`).
  """
  image = tf.io.decode_image(example[spec.image_key], channels=spec.image_channels, expand_animations=False)
  return image, decode_label(example[spec.label_key], spec)


def decode_label(encoded: tf.Tensor, spec: DatasetSpec) -> tf.Tensor:
  """An encoded mask -> class indices int32 [H, W], or multi-label int32 [H, W, K] (stored tiled, see
  datasets.tile_masks)."""
  # Masks hold indices in their first channel (some catalog masks repeat it over 3 channels).
  raw = tf.cast(tf.io.decode_image(encoded, expand_animations=False)[..., 0], tf.int32)
  if not spec.multilabel:
    return map_labels(raw, spec)
  k = spec.num_classes
  h, kw = tf.shape(raw)[0], tf.shape(raw)[1]
  masks = tf.transpose(tf.reshape(raw, [h, k, kw // k]), [0, 2, 1])
  bad = tf.logical_and(masks > 1, tf.not_equal(masks, spec.ignore_label))
  check = tf.debugging.Assert(
      tf.logical_not(tf.reduce_any(bad)),
      [f'dataset {spec.name!r}: a multi-label mask holds a value other than 0, 1 and ignore_label='
       f'{spec.ignore_label}:', tf.boolean_mask(masks, bad)[:10]])
  with tf.control_dependencies([check]):
    return tf.ensure_shape(tf.identity(masks), [None, None, k])


def map_labels(raw: tf.Tensor, spec: DatasetSpec) -> tf.Tensor:
  """Raw mask values -> class indices: ignore_label and `ignore_values` become ignore_label, the rest get the offset."""
  ignore = tf.equal(raw, spec.ignore_label)
  for v in spec.ignore_values:
    ignore = tf.logical_or(ignore, tf.equal(raw, v))
  labels = tf.where(ignore, spec.ignore_label, raw + spec.label_offset)
  # A value outside [0, num_classes) would silently train on a class that does not exist.
  out_of_range = tf.logical_and(tf.logical_not(ignore),
                                tf.logical_or(labels < 0, labels >= spec.num_classes))
  check = tf.debugging.Assert(
      tf.logical_not(tf.reduce_any(out_of_range)),
      [f'dataset {spec.name!r}: a mask holds a value that is not a class in [0, {spec.num_classes}) after '
       f'label_offset={spec.label_offset} nor ignore_label={spec.ignore_label} / ignore_values='
       f'{spec.ignore_values}; offending mapped values:', tf.boolean_mask(labels, out_of_range)[:10]])
  with tf.control_dependencies([check]):
    return tf.identity(labels)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  # No autotuning thread: destroying an iterator waits for that thread's current
  # sleep, up to a minute, which would hold a finished run open. Parallelism is
  # set explicitly instead (PARALLEL_CALLS, PREFETCH).
  options.autotune.enabled = False
  return options


def split_size(builder, split: str) -> int:
  """Number of examples in `split` (any tfds split string, e.g. 'train[:90%]')."""
  return builder.info.splits[split].num_examples


def process_share(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
  """Indices of this process's contiguous share of range(num_examples), cut as tfds.even_splits does.

  The first num_examples % process_count processes get one example more
  (drop_remainder=False), so every example is in exactly one share.
  """
  per_process, extra = divmod(num_examples, process_count)
  start = process_index * per_process + min(process_index, extra)
  return np.arange(start, start + per_process + (process_index < extra), dtype=np.int64)


def records(builder, spec: DatasetSpec, split: str, indices: tf.data.Dataset) -> tf.data.Dataset:
  """The examples of `split` at `indices` (int64 scalars), in that order: {image_key, label_key: encoded bytes}.

  Only those records are read from the ArrayRecord files (random access),
  READ_BATCH per Python call to keep the Python (and GIL) time per example
  small; the data source shares one thread-safe reader per file, so parallel
  calls may read at once. Only the two features are parsed; `decode_example`
  decodes them.
  """
  source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
                                  file_format=ARRAY_RECORD)
  keys = (spec.image_key, spec.label_key)
  features = tfds.features.FeaturesDict({k: builder.info.features[k] for k in keys})
  decoders = {k: tfds.decode.SkipDecoding() for k in keys}

  @no_autograph
  def read(batch: tf.Tensor) -> tf.Tensor:
    serialized = tf.numpy_function(lambda i: np.array([source[j] for j in i], dtype=object), [batch], tf.string,
                                   stateful=False)
    return tf.ensure_shape(serialized, batch.shape)

  ds = indices.batch(READ_BATCH).map(read, num_parallel_calls=PARALLEL_CALLS, deterministic=True).unbatch()
  return ds.map(no_autograph(lambda serialized: features.deserialize_example(serialized, decoders=decoders)),
                num_parallel_calls=PARALLEL_CALLS, deterministic=True)


def _epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Permutation of range(num_examples) that orders one epoch: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_dataset(builder, spec: DatasetSpec, input_config, *, global_batch: int, seed: int, start_step: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
  """Endless, augmented training batches for this process, starting at global step `start_step`.

  Batch s holds this process's positions k of global step start_step + s
  (k % process_count == process_index, in order): [global_batch /
  process_count, ...]. Only those examples are read.
  """
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} does not split evenly over {process_count} processes')
  if seed < 0:
    raise ValueError(f'the data order needs a seed >= 0, got {seed}')
  num_examples = split_size(builder, spec.train_split)
  start = start_step * global_batch  # A multiple of process_count: this process's first position is start + index.
  crop_size = tuple(input_config.crop_size)

  pasting = input_config.copy_paste_prob > 0
  object_classes = input_config.copy_paste_object_classes or tuple(
      range(0 if spec.multilabel else 1, spec.num_classes))

  def epoch_indices(epoch):
    """[2, n]: the example indices at this process's positions in `epoch`, from `start` on, and their donors."""
    first = max(epoch * num_examples, start)
    positions = np.arange(first + (process_index - first) % process_count, (epoch + 1) * num_examples,
                          process_count)
    indices = _epoch_order(seed, int(epoch), num_examples)[positions - epoch * num_examples]
    donors = copy_paste.donor_index(seed, positions, num_examples, exclude=indices) if pasting else indices
    return np.stack([indices, donors])

  @no_autograph
  def epoch_stream(epoch):
    pairs = tf.numpy_function(epoch_indices, [epoch], tf.int64, stateful=False)
    return tf.data.Dataset.from_tensor_slices(tf.transpose(tf.ensure_shape(pairs, [2, None])))

  @no_autograph
  def preprocess(j, read):
    k = start + process_index + process_count * j  # The position of this process's j-th example.
    example_seed = tf.stack([tf.constant(seed, tf.int64), k])
    example, donor = read if pasting else (read, None)
    image, label = decode_example(example, spec)
    if pasting:
      donor_image, donor_label = decode_example(donor, spec)
      image, label = copy_paste.copy_paste(
          image, label, donor_image, donor_label, example_seed, object_classes=object_classes,
          ignore_label=spec.ignore_label, multilabel=spec.multilabel,
          scale_range=tuple(input_config.copy_paste_scale_range), object_prob=input_config.copy_paste_object_prob,
          prob=input_config.copy_paste_prob)
    image, label = augment.train_augment(
        tf.cast(image, tf.float32), label, example_seed,
        crop_size=crop_size, scale_range=tuple(input_config.scale_range), hflip=input_config.hflip,
        photometric=input_config.photometric, ignore_label=spec.ignore_label, multilabel=spec.multilabel,
        vflip=input_config.vflip, rot90=input_config.rot90, rotate_degrees=input_config.rotate_degrees,
        aspect_range=tuple(input_config.aspect_range), blur_prob=input_config.blur_prob,
        blur_sigma=tuple(input_config.blur_sigma), noise_std=input_config.noise_std,
        cutout_holes=input_config.cutout_holes, cutout_size=input_config.cutout_size)
    return {'image': tf.cast(tf.round(image), tf.uint8), 'label': tf.cast(label, tf.uint8)}

  pairs = tf.data.Dataset.range(start // num_examples, 2**62).flat_map(epoch_stream)
  ds = records(builder, spec, spec.train_split, pairs.map(lambda pair: pair[0]))
  if pasting:  # Each example's copy-paste donor, read alongside.
    ds = tf.data.Dataset.zip((ds, records(builder, spec, spec.train_split, pairs.map(lambda pair: pair[1]))))
  ds = ds.enumerate()
  ds = ds.map(preprocess, num_parallel_calls=PARALLEL_CALLS, deterministic=True)
  ds = ds.batch(global_batch // process_count, drop_remainder=True)
  return ds.prefetch(PREFETCH).with_options(_options())


@dataclasses.dataclass(frozen=True)
class EvalData:
  """This process's share of the evaluation split, as the evaluation consumes it.

  Attributes:
    batches: {'image': uint8 [local_batch, *eval_size, C], 'label': uint8 [local_batch, *eval_size]}, the
      same number on every process. An example that fits eval_size is padded into its frame (image 0, label
      ignore_label); a larger one leaves its frame blank (all ignore_label) and goes to `large` instead;
      padding examples at the end are blank too, so they count nowhere.
    large: the examples larger than eval_size, unbatched at their own size: {'image': uint8 [h, w, C],
      'label': uint8 [h, w]}. They are segmented at full resolution (as --mode=predict does) rather than
      shrunk, which would score a shrunken label at another scale than training saw.
    num_batches: how many batches `batches` yields.
  """
  batches: tf.data.Dataset
  large: tf.data.Dataset
  num_batches: int


def eval_dataset(builder, spec: DatasetSpec, input_config, *, global_batch: int, process_index: int,
                 process_count: int, cache: bool = True) -> EvalData:
  """This process's contiguous share of the evaluation split (`process_share`); only it is read.

  With `cache`, the decoded share is kept in memory after the first pass, so
  later evaluations, and the pass over `large` after `batches`, decode nothing.
  """
  num_examples = split_size(builder, spec.eval_split)
  local_batch = global_batch // process_count
  num_batches = max(1, math.ceil(math.ceil(num_examples / process_count) / local_batch))
  eval_size = tuple(input_config.eval_size)

  @no_autograph
  def decode(example):
    image, label = decode_example(example, spec)
    return {'image': image, 'label': tf.cast(label, tf.uint8)}

  share = tf.data.Dataset.from_tensor_slices(process_share(num_examples, process_index, process_count))
  decoded = records(builder, spec, spec.eval_split, share).map(decode, num_parallel_calls=PARALLEL_CALLS,
                                                                deterministic=True)
  if cache:
    decoded = decoded.cache()
  frame = no_autograph(lambda ex: frame_for_eval(ex['image'], ex['label'], eval_size, spec.ignore_label))
  frames = decoded.map(frame, num_parallel_calls=PARALLEL_CALLS, deterministic=True)
  label_size = eval_size + ((spec.num_classes,) if spec.multilabel else ())
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(eval_size + (spec.image_channels,), tf.uint8),
      'label': tf.fill(label_size, tf.constant(spec.ignore_label, tf.uint8))}).repeat()
  batches = frames.concatenate(padding).take(num_batches * local_batch).batch(local_batch, drop_remainder=True)
  large = decoded.filter(no_autograph(lambda ex: _larger_than(ex['image'], eval_size)))
  return EvalData(batches=batches.prefetch(PREFETCH).with_options(_options()),
                  large=large.with_options(_options()), num_batches=num_batches)


def _larger_than(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
  hw = tf.shape(image)[:2]
  return tf.logical_or(hw[0] > size[0], hw[1] > size[1])


def frame_for_eval(image: tf.Tensor, label: tf.Tensor, size: tuple[int, int], ignore_label: int) -> dict:
  """An example in a fixed `size` frame for the eval step: padded (image 0, label ignore_label) if it fits,
  blank (label all ignore_label) if it is larger (EvalData.large scores those). The image's channel count
  (static after decode_example) and a multi-label label's class count are kept."""
  channels = image.shape[-1]
  label_size = size + tuple(label.shape[2:])

  def blank():
    return tf.zeros(size + (channels,), tf.uint8), tf.fill(label_size, tf.constant(ignore_label, tf.int32))

  def pad():
    padded, padded_label = augment.pad_to_size(tf.cast(image, tf.float32), tf.cast(label, tf.int32), size,
                                               ignore_label=ignore_label, multilabel=label.shape.rank == 3)
    return tf.cast(padded, tf.uint8), tf.cast(padded_label, tf.int32)

  frame_image, frame_label = tf.cond(_larger_than(image, size), blank, pad)
  return {'image': tf.ensure_shape(frame_image, size + (channels,)),
          'label': tf.cast(tf.ensure_shape(frame_label, label_size), tf.uint8)}


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
  """Iterates a batched dataset as dicts of numpy arrays."""
  return iter(tfds.as_numpy(ds))


def hide_accelerators_from_tf() -> None:
  """tf.data runs on the CPU; keep TensorFlow from claiming GPU memory that JAX needs."""
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    pass  # Already initialised, or no such device type: nothing to hide.


@dataclasses.dataclass(frozen=True)
class SplitStatistics:
  """What a split holds, from its masks: image sizes and class pixel counts (the auto recipe and class weights).

  Attributes:
    num_examples: examples read (all of the split, or an evenly spaced sample of it).
    split_examples: examples in the split.
    sizes: int64 [num_examples, 2]: (height, width) of each example read.
    class_pixels: int64 [K]: labelled pixels of each class (multi-label: its positive pixels).
    present_pixels: int64 [K]: labelled pixels of the images in which each class appears (for median frequency).
  """
  num_examples: int
  split_examples: int
  sizes: np.ndarray
  class_pixels: np.ndarray
  present_pixels: np.ndarray


def split_statistics(builder, spec: DatasetSpec, split: str, max_examples: Optional[int] = None) -> SplitStatistics:
  """Reads the masks of `split` (or `max_examples` of them, evenly spaced) and counts sizes and class pixels."""
  total = split_size(builder, split)
  indices = np.arange(total, dtype=np.int64)
  if max_examples and total > max_examples:
    indices = np.unique(np.linspace(0, total - 1, max_examples).round().astype(np.int64))
  ds = records(builder, spec, split, tf.data.Dataset.from_tensor_slices(indices))
  k = spec.num_classes

  @no_autograph
  def stats(example):
    # Only the mask is decoded: the image has its size.
    labels = decode_label(example[spec.label_key], spec)
    if spec.multilabel:
      counts = tf.reduce_sum(tf.cast(tf.equal(labels, 1), tf.int64), axis=[0, 1])
      valid = tf.reduce_sum(tf.cast(tf.not_equal(labels, spec.ignore_label), tf.int64), axis=[0, 1])
    else:
      counts = tf.math.bincount(tf.reshape(labels, [-1]), minlength=256, maxlength=256, dtype=tf.int64)[:k]
      valid = tf.reduce_sum(counts)
    return tf.shape(labels, out_type=tf.int64)[:2], counts, tf.where(counts > 0, valid, tf.zeros_like(counts))

  sizes, counts, present = [], np.zeros(k, np.int64), np.zeros(k, np.int64)
  for size, c, p in ds.map(stats, num_parallel_calls=PARALLEL_CALLS).batch(256).as_numpy_iterator():
    sizes.append(size)
    counts += c.sum(0)
    present += p.sum(0)
  sizes = np.concatenate(sizes) if sizes else np.zeros((0, 2), np.int64)
  return SplitStatistics(len(indices), total, sizes, counts, present)
