"""Tests for jaxseg.data.pipeline: which examples each process reads and yields, at which step.

Expected batches are computed here from the folder's own image files and the
documented order (position k of the stream is example
default_rng([seed, k // n]).permutation(n)[k % n] of the data source), never
by running the pipeline another way.
"""

import itertools

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from jaxseg.data import augment
from jaxseg.data import copy_paste
from jaxseg.data import datasets
from jaxseg.data import folder
from jaxseg.data import pipeline

NUM_TRAIN, NUM_VAL = 10, 7
H, W = 12, 16
NUM_CLASSES = 3
SEED = 3


@pytest.fixture(scope='module')
def folder_dataset(tmp_path_factory):
  """A prepared folder dataset; returns (builder, spec, {split: [(image, mask)] in the data source's order})."""
  base = tmp_path_factory.mktemp('pipeline')
  arrays = {}
  for split_dir, count in (('train', NUM_TRAIN), ('val', NUM_VAL)):
    (base / 'ds' / split_dir / 'images').mkdir(parents=True)
    (base / 'ds' / split_dir / 'masks').mkdir(parents=True)
    for i in range(count):
      rng = np.random.default_rng([len(split_dir), i])
      image = rng.integers(0, 256, size=(H, W, 3)).astype(np.uint8)
      mask = rng.integers(0, NUM_CLASSES, size=(H, W)).astype(np.uint8)
      mask[0, 0] = 255
      Image.fromarray(image).save(base / 'ds' / split_dir / 'images' / f'{i}.png')
      Image.fromarray(mask).save(base / 'ds' / split_dir / 'masks' / f'{i}.png')
      arrays[f'{split_dir}/images/{i}.png'] = (image, mask)
  builder = folder.prepare_folder_dataset(str(base / 'ds'), num_classes=NUM_CLASSES, data_dir=str(base / 'tfds'))
  config = default.get_config()
  config.dataset.name = 'folder'
  config.dataset.num_classes = NUM_CLASSES
  spec = datasets.resolve_spec(config.dataset)
  # tfds shuffles examples when it writes them: index i of a split is the file named in its i-th record.
  examples = {split: [arrays[ex['file_name'].decode()] for ex in builder.as_data_source(split)]
              for split in ('train', 'validation')}
  return builder, spec, examples


def _input(augmenting: bool):
  config = default.get_config().input
  if augmenting:
    config.crop_size = (8, 8)
    config.scale_range = (0.75, 1.5)
    config.hflip = True
    config.photometric = True
  else:  # Every example arrives as it is stored.
    config.crop_size = (H, W)
    config.scale_range = (1.0, 1.0)
    config.hflip = False
    config.photometric = False
  return config


def _train_batches(builder, spec, input_config, *, steps, global_batch, start_step=0, process_index=0,
                   process_count=1):
  ds = pipeline.train_dataset(builder, spec, input_config, global_batch=global_batch, seed=SEED,
                              start_step=start_step, process_index=process_index, process_count=process_count)
  return list(itertools.islice(pipeline.as_numpy(ds), steps))


def _example_at(k: int, n: int) -> int:
  """The documented training order: the example index at stream position k."""
  return int(np.random.default_rng([SEED, k // n]).permutation(n)[k % n])


def _counting(builder, monkeypatch) -> list:
  """Makes `builder`'s data sources log every index read into the returned list."""
  reads = []
  as_data_source = builder.as_data_source

  class Counting:

    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, index):
      reads.append(int(index))
      return self.source[index]

  monkeypatch.setattr(builder, 'as_data_source', lambda *args, **kwargs: Counting(as_data_source(*args, **kwargs)))
  return reads


def test_training_order_is_a_seeded_permutation_per_epoch(folder_dataset):
  builder, spec, examples = folder_dataset
  images = [image for image, _ in examples['train']]
  batches = _train_batches(builder, spec, _input(augmenting=False), steps=6, global_batch=4)  # 2.4 epochs.
  delivered = []
  for batch in batches:
    assert batch['image'].shape == (4, H, W, 3) and batch['label'].shape == (4, H, W)
    for image, label in zip(batch['image'], batch['label']):
      [index] = [i for i, stored in enumerate(images) if np.array_equal(stored, image)]
      np.testing.assert_array_equal(label, examples['train'][index][1])
      delivered.append(index)
  assert delivered == [_example_at(k, NUM_TRAIN) for k in range(24)]
  # Every epoch holds every example exactly once, in an order of its own.
  epochs = [delivered[e * NUM_TRAIN:(e + 1) * NUM_TRAIN] for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM_TRAIN))
  assert epochs[0] != epochs[1]


def test_two_processes_yield_the_global_batches_of_one(folder_dataset):
  """Interleaved, the batches of processes 0 and 1 are the 1-process batches, past an epoch's end too.

  The 1-process batches are checked against augmenting the example at each
  position k with seed (seed, k), so augmentation depends on k alone.
  """
  builder, spec, examples = folder_dataset
  input_config = _input(augmenting=True)
  steps, global_batch = 6, 4
  one = _train_batches(builder, spec, input_config, steps=steps, global_batch=global_batch)
  two = [_train_batches(builder, spec, input_config, steps=steps, global_batch=global_batch, process_index=p,
                        process_count=2) for p in range(2)]
  for step in range(steps):
    for key in ('image', 'label'):
      assert two[0][step][key].shape[0] == two[1][step][key].shape[0] == global_batch // 2
      interleaved = np.stack([two[j % 2][step][key][j // 2] for j in range(global_batch)])
      np.testing.assert_array_equal(interleaved, one[step][key])
    for j in range(global_batch):
      k = step * global_batch + j
      image, mask = examples['train'][_example_at(k, NUM_TRAIN)]
      want_image, want_label = augment.train_augment(
          tf.constant(image, tf.float32), tf.constant(mask, tf.int32), tf.constant([SEED, k], tf.int64),
          crop_size=input_config.crop_size, scale_range=input_config.scale_range, hflip=True, photometric=True)
      np.testing.assert_array_equal(one[step]['image'][j], tf.cast(tf.round(want_image), tf.uint8).numpy())
      np.testing.assert_array_equal(one[step]['label'][j], want_label.numpy())


def _pasting(input_config):
  input_config.copy_paste_prob = 1.0
  input_config.copy_paste_scale_range = (0.5, 2.0)
  return input_config


@pytest.mark.parametrize('process_index,process_count,pasting', [(0, 1, False), (1, 2, False), (1, 2, True)])
def test_resuming_continues_the_unbroken_run(folder_dataset, process_index, process_count, pasting):
  builder, spec, _ = folder_dataset
  kwargs = dict(global_batch=4, process_index=process_index, process_count=process_count)
  make_input = (lambda: _pasting(_input(augmenting=True))) if pasting else (lambda: _input(augmenting=True))
  unbroken = _train_batches(builder, spec, make_input(), steps=6, **kwargs)
  resumed = _train_batches(builder, spec, make_input(), steps=3, start_step=3, **kwargs)
  for want, got in zip(unbroken[3:], resumed):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(got[key], want[key])


def test_copy_paste_pastes_each_positions_donor_before_augmenting(folder_dataset):
  """With copy-paste on and no other augmentation, position k's example is the documented donor's objects
  pasted onto the documented example (donor_index, the Generator of (seed, k)), by the numpy core."""
  builder, spec, examples = folder_dataset
  input_config = _input(augmenting=False)
  input_config.copy_paste_prob = 1.0
  input_config.copy_paste_scale_range = (1.0, 1.0)
  batches = _train_batches(builder, spec, input_config, steps=3, global_batch=4)
  changed = 0
  for step, batch in enumerate(batches):
    for j in range(4):
      k = step * 4 + j
      index = _example_at(k, NUM_TRAIN)
      [donor] = copy_paste.donor_index(SEED, np.array([k]), NUM_TRAIN, exclude=np.array([index]))
      assert donor != index
      image, mask = examples['train'][index]
      donor_image, donor_mask = examples['train'][donor]
      label = np.where(mask == 255, 255, mask).astype(np.int32)
      want_image, want_label = copy_paste.paste_objects(
          image, label, donor_image, donor_mask.astype(np.int32),
          np.random.default_rng([SEED, k, copy_paste.PASTE_SALT]), object_classes=(1, 2), ignore_label=255,
          scale_range=(1.0, 1.0), object_prob=0.5)
      np.testing.assert_array_equal(batch['image'][j], want_image)
      np.testing.assert_array_equal(batch['label'][j], want_label)
      changed += not np.array_equal(want_label, label)
  assert changed >= 6  # Pastes happened (random masks: every donor has objects).


def test_each_process_reads_only_its_share_of_training(shapes_data_dir, monkeypatch):
  """Over some steps a process reads the records at its own positions, in order, and no others.

  The pipeline reads ahead (READ_BATCH records a call, a few batches
  prefetched), so it may have read a little more than the steps taken, but
  always the next records of its own share, and far from the whole split.
  """
  config = default.get_config()
  config.dataset.data_dir = shapes_data_dir
  config.input.crop_size = (32, 32)
  steps, global_batch, process_count = 3, 8, 2
  local_batch = global_batch // process_count
  read_ahead = (pipeline.PREFETCH + 2) * local_batch + (pipeline.PARALLEL_CALLS + 2) * pipeline.READ_BATCH
  for process_index in range(process_count):
    spec, builder = datasets.open_dataset(config.dataset)
    reads = _counting(builder, monkeypatch)
    n = pipeline.split_size(builder, spec.train_split)
    _train_batches(builder, spec, config.input, steps=steps, global_batch=global_batch,
                   process_index=process_index, process_count=process_count)
    assert steps * local_batch <= len(reads) <= steps * local_batch + read_ahead < n // 10, len(reads)
    mine = range(process_index, n, process_count)[:len(reads)]
    assert sorted(reads) == sorted(_example_at(k, n) for k in mine)


def test_process_share_splits_like_tfds_even_splits(folder_dataset):
  builder, _, _ = folder_dataset
  shares = [pipeline.process_share(NUM_VAL, p, 3) for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(shares), np.arange(NUM_VAL))
  assert [len(s) for s in shares] == [3, 2, 2]
  subsplits = tfds.even_splits('validation', n=3, drop_remainder=False)
  assert [len(s) for s in shares] == [builder.info.splits[s].num_examples for s in subsplits]
  assert [len(pipeline.process_share(1, p, 2)) for p in range(2)] == [1, 0]


def test_eval_shares_make_up_the_split(folder_dataset, monkeypatch):
  """Each process reads exactly its contiguous share; together they yield the split once, then padding."""
  builder, spec, examples = folder_dataset
  input_config = default.get_config().input
  input_config.eval_size = (H, W + 4)
  reads = _counting(builder, monkeypatch)
  images, labels = [], []
  for process_index in range(2):
    reads.clear()
    eval_data = pipeline.eval_dataset(builder, spec, input_config, global_batch=4, process_index=process_index,
                                      process_count=2)
    num_batches = eval_data.num_batches
    batches = list(pipeline.as_numpy(eval_data.batches))
    assert num_batches == len(batches) == 2  # ceil(ceil(7 / 2) / 2): both processes run 2 batches.
    share = pipeline.process_share(NUM_VAL, process_index, 2)
    assert reads == share.tolist()
    batch_images = np.concatenate([b['image'] for b in batches])
    batch_labels = np.concatenate([b['label'] for b in batches])
    assert batch_images.shape == (4, H, W + 4, 3) and batch_labels.shape == (4, H, W + 4)
    assert np.all(batch_labels[len(share):] == spec.ignore_label)  # Padding counts nowhere.
    images.extend(batch_images[:len(share)])
    labels.extend(batch_labels[:len(share)])
  for (image, mask), got_image, got_label in zip(examples['validation'], images, labels, strict=True):
    np.testing.assert_array_equal(got_image[:, :W], image)
    np.testing.assert_array_equal(got_label[:, :W], mask)
    assert np.all(got_label[:, W:] == spec.ignore_label)


def test_split_statistics_count_sizes_and_class_pixels(folder_dataset):
  builder, spec, examples = folder_dataset
  train = examples['train']
  # All of the split, and a sample of 3: evenly spaced, so the first, the middle and the last example.
  for max_examples, chosen in ((None, list(range(len(train)))), (3, [0, (len(train) - 1) // 2, len(train) - 1])):
    masks = [train[i][1] for i in chosen]
    counts = sum(np.bincount(m[m != spec.ignore_label], minlength=NUM_CLASSES) for m in masks)
    present = sum(np.where(np.bincount(m[m != spec.ignore_label], minlength=NUM_CLASSES) > 0,
                           np.sum(m != spec.ignore_label), 0) for m in masks)
    got = pipeline.split_statistics(builder, spec, spec.train_split, max_examples=max_examples)
    assert got.num_examples == len(chosen) and got.split_examples == len(train)
    np.testing.assert_array_equal(got.sizes, [m.shape for m in masks])
    np.testing.assert_array_equal(got.class_pixels, counts)
    np.testing.assert_array_equal(got.present_pixels, present)
