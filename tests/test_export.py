"""--mode=export: the jax.export artefact (and SavedModel) reloads and computes what the live model computes."""

import json
import os

import jax
import numpy as np
import pytest

from tests.conftest import tiny_unet_config
from tests.helpers import best_checkpoint_logits_fn


@pytest.fixture(scope='module')
def exported(shapes_data_dir, tmp_path_factory):
  """A tiny UNet trained for a few steps and exported through cli.run('export', ...): (config, workdir, dir)."""
  from jaxseg import cli, train  # pylint: disable=g-import-not-at-top
  config = tiny_unet_config(shapes_data_dir)
  workdir = str(tmp_path_factory.mktemp('export_wd'))
  train.train_and_evaluate(config, workdir)
  cli.run('export', config, workdir)
  return config, workdir, os.path.join(workdir, 'export')


@pytest.fixture(scope='module')
def live(exported):
  """The live model's logits function (restored from the same best checkpoint)."""
  config, workdir, _ = exported
  return best_checkpoint_logits_fn(config, workdir)


def images_of(*shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_export_writes_the_artefact_and_its_description(exported):
  config, _, directory = exported
  assert sorted(os.listdir(directory)) == ['model.jax_exported', 'model.json', 'saved_model']
  meta = json.load(open(os.path.join(directory, 'model.json')))
  assert meta['class_names'] == ['background', 'disc', 'square', 'triangle']
  assert meta['num_classes'] == 4 and len(meta['palette']) == 4
  assert meta['input']['dtype'] == 'uint8' and meta['input']['shape'] == ['batch', 'height', 'width', 3]
  # The UNet pads to 2**depth internally; H and W are symbolic multiples of it (or fully symbolic).
  assert meta['input']['size_multiple'] in (1, 2 ** config.model.depth)
  assert 'cpu' in meta['platforms']
  assert meta['checkpoint_step'] == config.num_train_steps


def test_jax_export_round_trip_matches_the_live_model(exported, live):
  """Deserialised with jax.export alone: same logits and masks, for several batch sizes and image sizes."""
  _, _, directory = exported
  with open(os.path.join(directory, 'model.jax_exported'), 'rb') as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  m = json.load(open(os.path.join(directory, 'model.json')))['input']['size_multiple']
  for shape in [(2, 64, 96, 3), (3, 9 * max(m, 4), 13 * max(m, 4), 3)]:
    images = images_of(*shape)
    out = exp.call(images)
    expected = live(images)
    assert out['logits'].shape == expected.shape and out['mask'].shape == shape[:3]
    np.testing.assert_allclose(np.asarray(out['logits']), expected, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out['mask']), np.argmax(expected, -1))


def test_loader_takes_any_size(exported, live):
  from jaxseg import export  # pylint: disable=g-import-not-at-top
  _, _, directory = exported
  model = export.load(directory)
  image = images_of(50, 70, 3, seed=1)
  out = model(image)
  assert out['mask'].shape == (50, 70) and out['logits'].shape == (50, 70, 4)
  m = model.size_multiple
  padded = np.zeros((1, -(-50 // m) * m, -(-70 // m) * m, 3), np.uint8)
  padded[0, :50, :70] = image
  np.testing.assert_allclose(out['logits'], live(padded)[0, :50, :70], atol=1e-4)


def test_saved_model_matches_the_live_model(exported, live):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _, _, directory = exported
  loaded = tf.saved_model.load(os.path.join(directory, 'saved_model'))
  images = images_of(2, 32, 64, 3, seed=2)
  out = loaded.signatures['serving_default'](images=tf.constant(images))
  np.testing.assert_allclose(out['logits'].numpy(), live(images), atol=1e-4)


def test_saved_model_checks_the_image_size(exported):
  """The SavedModel refuses sizes its symbolic shape does not take (serialised at a StableHLO version the installed
  TensorFlow reads, it keeps jax's shape checks)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _, _, directory = exported
  m = json.load(open(os.path.join(directory, 'model.json')))['input']['size_multiple']
  serve = tf.saved_model.load(os.path.join(directory, 'saved_model')).signatures['serving_default']
  if m > 1:
    with pytest.raises(tf.errors.InvalidArgumentError):
      serve(images=tf.constant(images_of(1, m + 1, 2 * m, 3)))
  with pytest.raises(tf.errors.InvalidArgumentError):
    serve(images=tf.constant(images_of(0, 2 * m, 2 * m, 3)))
