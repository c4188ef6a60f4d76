"""config.model.in_channels = 1 (grayscale) and 4 (e.g. RGB + near-infrared) from the files to the export.

References: the pixels the test wrote (numpy), PIL's documented luminance formula computed in numpy, the
pipeline's documented order (numpy's default_rng permutation over the records tfds wrote), and the bare Flax
module applied to the checkpoint's raw arrays as orbax reads them (no jaxseg restore, no Predictor).
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_unet_config
from tests.helpers import load_checkpoint

NUM_CLASSES = 2
SIZE = 32  # Images are crop-sized: with no flip and no rescale, a training crop is the whole file.
MEAN4, STD4 = (120.0, 110.0, 100.0, 128.0), (60.0, 55.0, 50.0, 64.0)


def _rgba_example(rng):
  """RGB noise and a 4th band whose bright half-plane (random side) is class 1: only band 4 tells the label."""
  rgb = rng.integers(0, 256, size=(SIZE, SIZE, 3)).astype(np.uint8)
  split = int(rng.integers(8, SIZE - 8))
  band4 = np.full((SIZE, SIZE), 30, np.uint8)
  band4[:, split:] = 220
  band4 = np.clip(band4.astype(np.int64) + rng.integers(-20, 21, size=(SIZE, SIZE)), 0, 255).astype(np.uint8)
  mask = (band4 > 127).astype(np.uint8)
  return np.dstack([rgb, band4]), mask


def make_folder(root, make, counts=(('train', 8), ('val', 4))):
  """Writes DIR/{train,val}/{images,masks}; returns {relative image path: (pixels as written, mask)}."""
  arrays = {}
  for split_dir, count in counts:
    for sub in ('images', 'masks'):
      os.makedirs(os.path.join(root, split_dir, sub), exist_ok=True)
    for i in range(count):
      image, mask = make(np.random.default_rng([len(split_dir), i]))
      Image.fromarray(image).save(os.path.join(root, split_dir, 'images', f'{i}.png'))
      Image.fromarray(mask).save(os.path.join(root, split_dir, 'masks', f'{i}.png'))
      arrays[f'{split_dir}/images/{i}.png'] = (image, mask)
  return arrays


def folder_config(data_dir, path, in_channels, **overrides):
  fields = {'dataset.name': 'folder', 'dataset.path': str(path), 'dataset.num_classes': NUM_CLASSES,
            'model.in_channels': in_channels, 'input.hflip': False, 'input.eval_size': (SIZE, SIZE)}
  if in_channels == 4:
    fields.update({'model.input_mean': MEAN4, 'model.input_std': STD4})
  elif in_channels == 1:
    fields.update({'model.input_mean': (127.0,), 'model.input_std': (64.0,)})
  fields.update(overrides)
  return tiny_unet_config(str(data_dir), **fields)


def first_batches(settings, spec, builder, steps):
  """The first `steps` training batches (one process) and what the documented order says they hold."""
  from jaxseg.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = pipeline.train_dataset(builder, spec, settings.input, global_batch=settings.batch_size, seed=settings.seed,
                              start_step=0, process_index=0, process_count=1)
  batches = [b for _, b in zip(range(steps), pipeline.as_numpy(ds))]
  # Record i of the split is the file named in it (tfds shuffles when writing); epoch 0 is this permutation.
  names = [ex['file_name'].decode() for ex in builder.as_data_source(spec.train_split)]
  order = np.random.default_rng([settings.seed, 0]).permutation(len(names))
  return batches, [names[j] for j in order]


@pytest.fixture(scope='module')
def rgba_folder(tmp_path_factory):
  base = tmp_path_factory.mktemp('channels')
  return base, make_folder(str(base / 'ds'), _rgba_example)


@pytest.fixture(scope='module')
def trained4(rgba_folder):
  """A tiny UNet on the 4-band folder: 3 train steps (make_train_step), checkpointed as best; (config, workdir)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxseg import checkpoint, sharding, startup, state as state_lib, train  # pylint: disable=g-import-not-at-top
  from jaxseg import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  base, arrays = rgba_folder
  config = folder_config(base / 'tfds', base / 'ds', 4)
  settings = settings_lib.from_config(config)
  spec, builder = datasets.open_dataset(settings.dataset, in_channels=4)
  batches, files = first_batches(settings, spec, builder, 3)
  mesh = sharding.make_mesh()
  setup = state_lib.build(settings, spec.num_classes, mesh)
  step_fn = train.make_train_step(settings, spec, setup, None)
  state = setup.init_state()
  before = jax.device_get(state.params)
  losses = []
  for batch in batches:
    state, metrics = step_fn(state, sharding.global_batch(batch, mesh))
    losses.append(float(jax.device_get(metrics['loss'])))
  workdir = str(base / 'wd')
  os.makedirs(workdir)
  startup.write_config(workdir, config, settings)  # What training writes: Segmenter, predict and export read it.
  ckpts = checkpoint.Checkpoints(workdir)
  ckpts.save(3, state, {'mean_iou': 0.5})
  ckpts.close()
  return config, workdir, dict(batches=batches, files=files, arrays=arrays, losses=losses, before=before)


def reference_logits(config, workdir, images):
  """uint8 [N, H, W, C] -> logits of the checkpoint: raw orbax arrays, numpy normalisation, bare Flax module."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg import settings, state as state_lib  # pylint: disable=g-import-not-at-top
  raw, _ = load_checkpoint(workdir)
  variables = {'params': raw['params'], 'batch_stats': raw['batch_stats']}
  model = state_lib.build_model(settings.from_config(config), NUM_CLASSES)
  x = (np.asarray(images, np.float32) - np.float32(config.model.input_mean)) / np.float32(config.model.input_std)
  return np.asarray(model.apply(variables, jnp.asarray(x), train=False))


def test_four_band_batches_are_the_files_pixels_and_training_moves(trained4):
  _, _, t = trained4
  for step, batch in enumerate(t['batches']):
    assert batch['image'].shape == (8, SIZE, SIZE, 4) and batch['image'].dtype == np.uint8
    for i, name in enumerate(t['files'][step * 8:(step + 1) * 8]):
      image, mask = t['arrays'][name]
      np.testing.assert_array_equal(batch['image'][i], image)  # All four bands, alpha as data.
      np.testing.assert_array_equal(batch['label'][i], mask)
  assert all(np.isfinite(t['losses']))
  # The first convolution takes 4 bands, and training moved its weights.
  before = np.asarray(t['before']['enc0']['conv0']['kernel'])  # The UNet's first convolution (models/unet.py).
  after = np.asarray(load_checkpoint(trained4[1])[0]['params']['enc0']['conv0']['kernel'])
  assert before.shape[2] == 4  # It takes the 4 bands.
  assert np.abs(after[:, :, 3] - before[:, :, 3]).max() > 1e-4  # 3 updates moved it, the 4th band's weights too.


def test_predict_segmenter_and_export_on_four_bands_match_the_bare_module(trained4, tmp_path):
  from jaxseg import export, predict  # pylint: disable=g-import-not-at-top
  from jaxseg.api import Segmenter  # pylint: disable=g-import-not-at-top
  config, workdir, t = trained4
  images = np.stack([t['arrays'][f'val/images/{i}.png'][0] for i in range(2)])
  want = reference_logits(config, workdir, images)
  # Segmenter on arrays and on files: its one-view scores are the logits.
  seg = Segmenter.from_workdir(workdir)
  assert seg.channels == 4
  np.testing.assert_allclose(seg.predictor.scores(images[0]), want[0], rtol=1e-4, atol=1e-4)
  files = [os.path.join(os.path.dirname(workdir), 'ds', 'val', 'images', f'{i}.png') for i in range(2)]
  for got, expected in zip(seg.predict(files), want):
    assert np.mean(got != expected.argmax(-1)) <= 1e-3
  assert seg.overlay(files[0]).shape == (SIZE, SIZE, 3)
  # --mode=predict reads the files with 4 bands; masks hold the class indices.
  out = predict.predict(config, workdir, os.path.dirname(files[0]), str(tmp_path / 'pred'))
  assert len(out['written']) == 4 and not out['skipped']
  for i in range(2):
    mask = np.asarray(Image.open(tmp_path / 'pred' / f'{i}.png'))
    assert np.mean(mask != want[i].argmax(-1)) <= 1e-3
    assert Image.open(tmp_path / 'pred' / f'{i}_overlay.png').mode == 'RGB'
  # The export takes [B, H, W, 4] and says so.
  directory = export.export_model(config, workdir, output_dir=str(tmp_path / 'export'))
  meta = json.load(open(os.path.join(directory, export.META_FILE), encoding='utf-8'))
  assert meta['input']['shape'][-1] == 4 and meta['input']['channels'] == 4
  assert meta['input']['layout'].startswith('NHWC, 4 bands')
  assert meta['normalization']['mean'] == list(MEAN4)
  np.testing.assert_allclose(export.load(directory)(images)['logits'], want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r'\[B, H, W, 4\]'):
    export.load(directory)(images[..., :3])


def test_grayscale_folder_reads_one_band(tmp_path):
  """in_channels=1: a grayscale file as it is, an RGB file as PIL's luminance (computed here in numpy)."""
  from jaxseg import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top

  def make(rng):
    mask = rng.integers(0, NUM_CLASSES, size=(SIZE, SIZE)).astype(np.uint8)
    if rng.integers(2):
      return rng.integers(0, 256, size=(SIZE, SIZE)).astype(np.uint8), mask
    return rng.integers(0, 256, size=(SIZE, SIZE, 3)).astype(np.uint8), mask

  arrays = make_folder(str(tmp_path / 'ds'), make, counts=(('train', 8), ('val', 2)))
  settings = settings_lib.from_config(folder_config(tmp_path / 'tfds', tmp_path / 'ds', 1))
  assert settings.model.input_stats == ((127.0,), (64.0,))
  spec, builder = datasets.open_dataset(settings.dataset, in_channels=1)
  assert builder.info.features['image'].shape[-1] == 1
  (batch,), files = first_batches(settings, spec, builder, 1)
  assert batch['image'].shape == (8, SIZE, SIZE, 1)
  kinds = set()
  for i, name in enumerate(files[:8]):
    image, mask = arrays[name]
    if image.ndim == 2:
      np.testing.assert_array_equal(batch['image'][i, ..., 0], image)
      kinds.add('gray')
    else:  # ITU-R 601-2 luma, as PIL documents for convert('L'), in 16-bit fixed point.
      r, g, b = (image[..., c].astype(np.int64) for c in range(3))
      luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
      assert np.max(np.abs(batch['image'][i, ..., 0].astype(np.int64) - luma)) <= 1
      kinds.add('rgb')
    np.testing.assert_array_equal(batch['label'][i], mask)
  assert kinds == {'gray', 'rgb'}


def test_band_counts_that_cannot_be_carried_are_errors_naming_file_and_field(rgba_folder, tmp_path):
  from jaxseg import image_io, settings  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets, folder  # pylint: disable=g-import-not-at-top
  from jaxseg.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top
  base, arrays = rgba_folder
  # An RGB file where 4 bands are asked for.
  rgb_dir = tmp_path / 'rgb'
  make_folder(str(rgb_dir), lambda rng: (rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8),
                                         np.zeros((8, 8), np.uint8)), counts=(('train', 1), ('val', 1)))
  with pytest.raises(DataError, match=r'train/images/0.png has mode RGB \(3 band\(s\): RGB\) but '
                                      r'config.model.in_channels=4 needs 4 bands'):
    folder.validate_folder(str(rgb_dir), num_classes=NUM_CLASSES, channels=4)
  # An RGBA file where 3 are asked for: alpha dropped, as before.
  rgba, _ = arrays['train/images/0.png']
  path = str(base / 'ds' / 'train' / 'images' / '0.png')
  np.testing.assert_array_equal(image_io.read_image(path, 3), rgba[..., :3])
  np.testing.assert_array_equal(image_io.read_image(path, 4), rgba)
  # 2 or 5 channels: no image file carries them.
  for channels in (2, 5):
    config = folder_config(tmp_path / 'tfds', base / 'ds', channels, **{'model.input_mean': (1.0,) * channels,
                                                                       'model.input_std': (1.0,) * channels})
    message = rf'config.model.in_channels must be one of \(1, 3, 4\).*got {channels}'
    with pytest.raises(ConfigError, match=message):
      settings.from_config(config)
    with pytest.raises(ConfigError, match=message):
      folder.prepare_folder_dataset(str(base / 'ds'), num_classes=NUM_CLASSES, data_dir=str(tmp_path / 'tfds'),
                                    channels=channels)
  # The embedded dataset is RGB.
  config = tiny_unet_config(str(tmp_path / 'tfds'), **{'model.in_channels': 4, 'model.input_mean': MEAN4,
                                                       'model.input_std': STD4})
  with pytest.raises(ConfigError, match="in_channels=4: dataset 'jaxseg_shapes' holds RGB images"):
    settings.from_config(config)
  with pytest.raises(ConfigError, match="in_channels=4: dataset 'jaxseg_shapes' holds RGB images"):
    datasets.open_dataset(config.dataset, in_channels=4)
  # Arrays given to the Segmenter / Predictor must have the model's bands.
  with pytest.raises(ValueError, match=r'\[H, W, 4\] for a model of 4'):
    image_io.to_uint8(np.zeros((4, 4, 3), np.uint8), 4)


def test_a_folder_prepared_for_three_channels_is_not_reused_for_four(rgba_folder, trained4):
  from jaxseg.data import datasets, folder  # pylint: disable=g-import-not-at-top
  base, arrays = rgba_folder
  config, _, _ = trained4
  assert folder.folder_fingerprint(str(base / 'ds'), NUM_CLASSES, 255, 4) != folder.folder_fingerprint(
      str(base / 'ds'), NUM_CLASSES, 255, 3)
  _, three = datasets.open_dataset(config.dataset, in_channels=3)
  _, four = datasets.open_dataset(config.dataset, in_channels=4)  # Prepared by the trained4 fixture.
  assert three.data_path != four.data_path
  assert (three.info.features['image'].shape[-1], four.info.features['image'].shape[-1]) == (3, 4)
  for ex in three.as_data_source('train'):
    np.testing.assert_array_equal(ex['image'], arrays[ex['file_name'].decode()][0][..., :3])


@pytest.mark.parametrize('channels', [1, 4])
def test_augmentation_moves_every_band_and_jitters_only_brightness_and_contrast(channels):
  """train_augment on 1 or 4 bands against test_augment's numpy reference (saturation and hue skipped)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jaxseg.data import augment  # pylint: disable=g-import-not-at-top
  from tests.test_augment import np_augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(channels)
  image = rng.uniform(0, 255, size=(40, 48, channels)).astype(np.float32)
  label = rng.integers(0, 5, size=(40, 48)).astype(np.int32)
  kwargs = dict(crop_size=(32, 32), scale_range=(0.75, 1.5), photometric=True, brightness=64.0)
  jittered = 0
  for i in range(6):
    got_image, got_label = augment.train_augment(tf.constant(image), tf.constant(label),
                                                 tf.constant([2, i], tf.int64), **kwargs)
    want_image, want_label, info = np_augment(image, label, [2, i], **kwargs)
    assert got_image.shape == (32, 32, channels)
    np.testing.assert_array_equal(got_label.numpy(), want_label)
    np.testing.assert_allclose(got_image.numpy(), want_image, atol=1e-3)
    jittered += int(info['coins'][1] < 0.5 or info['coins'][3] < 0.5)
  assert jittered >= 2  # Brightness or contrast was drawn for some seeds.


def test_a_grayscale_predictor_takes_2d_arrays_and_rescales_bands_alone(tmp_path):
  """A 1-channel model: Predictor on [H, W] arrays against the bare module; TTA rescaling of 4 bands keeps RGB's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg import inference, settings as settings_lib, state as state_lib  # pylint: disable=g-import-not-at-top
  settings = settings_lib.from_config(folder_config(tmp_path, tmp_path, 1))
  model = state_lib.build_model(settings, NUM_CLASSES)
  variables = model.init(jax.random.key(3), jnp.zeros((1, SIZE, SIZE, 1)), train=False)
  predictor = inference.Predictor.create(model, variables, NUM_CLASSES, settings.inference_options(),
                                         input_stats=((127.0,), (64.0,)))
  assert predictor.channels == 1
  image = np.random.default_rng(0).integers(0, 256, size=(SIZE, SIZE)).astype(np.uint8)
  want = model.apply(variables, jnp.asarray((image[None, ..., None] - np.float32(127)) / np.float32(64)), train=False)
  np.testing.assert_allclose(predictor.scores(image), np.asarray(want)[0], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='for a model of 1 input channel'):
    predictor.scores(np.zeros((SIZE, SIZE, 3), np.uint8))  # Colour arrays are not guessed into luminance.
  # A scaled TTA view of 4 bands: R, G, B as PIL resizes an RGB image (no alpha premultiplication), band 4 as L.
  rgba, _ = _rgba_example(np.random.default_rng(1))
  scaled = inference.resize_image(rgba, 0.75)
  np.testing.assert_array_equal(scaled[..., :3], np.asarray(Image.fromarray(rgba[..., :3]).resize((24, 24),
                                                                                                    Image.BILINEAR)))
  np.testing.assert_array_equal(scaled[..., 3], np.asarray(Image.fromarray(rgba[..., 3]).resize((24, 24),
                                                                                              Image.BILINEAR)))
