"""tf.data input pipelines: tfds examples -> device-shaped batches of uint8 images and labels.

Batches are dicts of numpy arrays shaped for pmap:
  'image': uint8 [local_devices, per_device_batch, H, W, 3]
  'label': uint8 [local_devices, per_device_batch, H, W] (ignore_label where nothing counts)
Normalisation happens on the device (uint8 moves a quarter of the bytes).

Training order is a pure function of (seed, step), independent of the number
of processes: one global stream of shuffled epochs is cut into global batches,
and element k of the stream goes to process k % process_count. Resuming at
step s rebuilds the stream from example s * global_batch, so an interrupted
run continues exactly where it was.
"""

import math
import os
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxseg.data import augment
from jaxseg.data.datasets import DatasetSpec

# Explicit tf.data parallelism (autotuning is off, see _options): map functions on
# every core, and a few batches ready ahead of the train step.
PARALLEL_CALLS = max(1, os.cpu_count() or 1)
PREFETCH = 4


def _skip_decoding(spec: DatasetSpec) -> dict:
  return {spec.image_key: tfds.decode.SkipDecoding(), spec.label_key: tfds.decode.SkipDecoding()}


def decode_example(example: dict, spec: DatasetSpec) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded tfds example -> (image uint8 [H, W, 3], label int32 [H, W]) in jaxseg's class indices."""
  image = tf.io.decode_image(example[spec.image_key], channels=3, expand_animations=False)
  # Masks hold indices in their first channel (some catalog masks repeat it over 3 channels).
  raw = tf.cast(tf.io.decode_image(example[spec.label_key], expand_animations=False)[..., 0], tf.int32)
  return image, map_labels(raw, spec)


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
  # sleep, up to a minute, which held every finished run open for ~45 s.
  # Parallelism is set explicitly below instead (PARALLEL_CALLS, PREFETCH).
  options.autotune.enabled = False
  return options


def _raw_split(builder, spec: DatasetSpec, split: str, cache: bool) -> tf.data.Dataset:
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=_skip_decoding(spec),
                          read_config=tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1))
  ds = ds.map(lambda ex: {spec.image_key: ex[spec.image_key], spec.label_key: ex[spec.label_key]})
  return ds.cache() if cache else ds


def _to_device_shape(batch: dict, local_devices: int) -> dict:
  """[B, ...] -> [local_devices, B / local_devices, ...] for the arrays the devices take ('image', 'label')."""
  shape = lambda x: tf.reshape(x, tf.concat([[local_devices, -1], tf.shape(x)[1:]], axis=0))
  return {k: shape(v) if k in ('image', 'label') else v for k, v in batch.items()}


def train_dataset(builder, spec: DatasetSpec, input_config, *, global_batch: int, local_devices: int, seed: int,
                  start_step: int, process_index: int, process_count: int, cache: bool = True,
                  shuffle_buffer: int = 10_000) -> tf.data.Dataset:
  """Endless, augmented training batches for this process, starting at global step `start_step`."""
  num_examples = builder.info.splits[spec.train_split].num_examples
  raw = _raw_split(builder, spec, spec.train_split, cache)
  buffer = min(num_examples, shuffle_buffer)
  start = start_step * global_batch
  first_epoch, offset = divmod(start, num_examples)

  def epoch(e):
    # A fixed permutation per epoch: the same on every process and every restart.
    return raw.shuffle(buffer, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  ds = ds.skip(offset).enumerate(start=start)
  ds = ds.shard(process_count, process_index)
  crop_size = tuple(input_config.crop_size)

  def preprocess(index, example):
    image, label = decode_example(example, spec)
    image, label = augment.train_augment(
        tf.cast(image, tf.float32), label, tf.stack([tf.cast(seed, tf.int64), index]),
        crop_size=crop_size, scale_range=tuple(input_config.scale_range), hflip=input_config.hflip,
        photometric=input_config.photometric, ignore_label=spec.ignore_label)
    return tf.cast(tf.round(image), tf.uint8), tf.cast(label, tf.uint8)

  ds = ds.map(preprocess, num_parallel_calls=PARALLEL_CALLS, deterministic=True)
  ds = ds.batch(global_batch // process_count, drop_remainder=True)
  ds = ds.map(lambda i, l: _to_device_shape({'image': i, 'label': l}, local_devices))
  return ds.prefetch(PREFETCH).with_options(_options())


def eval_dataset(builder, spec: DatasetSpec, input_config, *, global_batch: int, local_devices: int,
                 process_index: int, process_count: int, cache: bool = True) -> tuple[tf.data.Dataset, int]:
  """This process's share of the evaluation split, padded so all processes run the same number of batches.

  Padding examples have every label pixel set to ignore_label, so they count
  nowhere; each real pixel is in exactly one process's share. Batches hold,
  besides the device-shaped 'image' and 'label' (see `fit_for_eval`), two
  host-side fields per example: 'full_image' and 'full_label', the PNG bytes
  of an example larger than input.eval_size (empty for the others), which the
  evaluation segments at its own size.

  Returns:
    (dataset, number of batches it yields).
  """
  subsplits = tfds.even_splits(spec.eval_split, n=process_count, drop_remainder=False)
  counts = [builder.info.splits[s].num_examples for s in subsplits]
  local_batch = global_batch // process_count
  num_batches = max(1, math.ceil(max(counts) / local_batch))
  eval_size = tuple(input_config.eval_size)

  def preprocess(example):
    image, label = decode_example(example, spec)
    return fit_for_eval(image, label, eval_size, spec.ignore_label)

  ds = _raw_split(builder, spec, subsplits[process_index], cache=False)
  ds = ds.map(preprocess, num_parallel_calls=PARALLEL_CALLS, deterministic=True)
  if cache:
    ds = ds.cache()
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(eval_size + (3,), tf.uint8),
      'label': tf.fill(eval_size, tf.constant(spec.ignore_label, tf.uint8)),
      'full_image': tf.constant(b''), 'full_label': tf.constant(b'')}).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch).batch(local_batch, drop_remainder=True)
  ds = ds.map(lambda batch: _to_device_shape(batch, local_devices))
  return ds.prefetch(PREFETCH).with_options(_options()), num_batches


def fit_for_eval(image: tf.Tensor, label: tf.Tensor, size: tuple[int, int], ignore_label: int) -> dict:
  """One evaluation example in a fixed `size` frame for the devices, or set aside whole.

  An image that fits is padded (image 0, label ignore_label) to `size`: the
  pmapped evaluation scores it exactly. A larger one is not shrunk (that would
  score a shrunken label, at another scale than training saw): its frame is
  empty (label all ignore_label) and the image and label travel as PNG bytes
  in 'full_image'/'full_label', for the evaluation to segment at full
  resolution as --mode=predict does (config.inference; by default a sliding
  window of the training crop) and score at the label's own size.
  """
  hw = tf.shape(image)[:2]
  too_big = tf.logical_or(hw[0] > size[0], hw[1] > size[1])

  def set_aside():
    frame_image = tf.zeros(size + (3,), tf.uint8)
    frame_label = tf.fill(size, tf.constant(ignore_label, tf.int32))
    return (frame_image, frame_label, tf.io.encode_png(image),
            tf.io.encode_png(tf.cast(label, tf.uint8)[..., None]))

  def pad():
    padded, padded_label = augment.pad_to_size(tf.cast(image, tf.float32), label, size, ignore_label=ignore_label)
    return tf.cast(padded, tf.uint8), tf.cast(padded_label, tf.int32), tf.constant(b''), tf.constant(b'')

  frame_image, frame_label, full_image, full_label = tf.cond(too_big, set_aside, pad)
  return {'image': tf.ensure_shape(frame_image, size + (3,)),
          'label': tf.cast(tf.ensure_shape(frame_label, size), tf.uint8),
          'full_image': full_image, 'full_label': full_label}


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


def class_pixel_counts(builder, spec: DatasetSpec, max_examples: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Pixel statistics of the training split for median-frequency class weights.

  Returns:
    (counts [K]: pixels of each class,
     present [K]: valid pixels of the images in which each class appears).
  """
  ds = _raw_split(builder, spec, spec.train_split, cache=False)
  if max_examples:
    ds = ds.take(max_examples)
  k = spec.num_classes

  def stats(example):
    labels = tf.reshape(decode_example(example, spec)[1], [-1])
    counts = tf.math.bincount(labels, minlength=256, maxlength=256, dtype=tf.int64)[:k]
    valid = tf.reduce_sum(counts)
    return counts, tf.where(counts > 0, valid, tf.zeros_like(counts))

  ds = ds.map(stats, num_parallel_calls=PARALLEL_CALLS)
  zeros = tf.zeros([k], tf.int64)
  counts, present = ds.reduce((zeros, zeros), lambda acc, x: (acc[0] + x[0], acc[1] + x[1]))
  return counts.numpy(), present.numpy()
