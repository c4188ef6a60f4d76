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
  assert sorted(os.listdir(directory)) == ['model.jax_exported', 'model.json', 'model.onnx', 'saved_model']
  meta = json.load(open(os.path.join(directory, 'model.json')))
  assert meta['class_names'] == ['background', 'disc', 'square', 'triangle']
  assert meta['num_classes'] == 4 and len(meta['palette']) == 4
  assert meta['input']['dtype'] == 'uint8' and meta['input']['shape'] == ['batch', 'height', 'width', 3]
  # The UNet pads to 2**depth internally; H and W are symbolic multiples of it (or fully symbolic).
  assert meta['input']['size_multiple'] in (1, 2 ** config.model.depth)
  assert 'cpu' in meta['platforms']
  assert meta['onnx']['file'] == 'model.onnx' and meta['onnx']['input']['size_multiple'] == 2 ** config.model.depth
  assert meta['onnx']['checked_relative_error'] < 1e-4
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


def test_onnx_matches_the_live_model(exported, live):
  """model.onnx, run by onnxruntime alone: the live model's logits and masks at two sizes and batch sizes."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  config, _, directory = exported
  session = onnxruntime.InferenceSession(os.path.join(directory, 'model.onnx'), providers=['CPUExecutionProvider'])
  m = 2 ** config.model.depth
  for shape in [(2, 8 * m, 12 * m, 3), (1, 12 * m, 4 * m, 3)]:
    images = images_of(*shape, seed=3)
    logits, mask = session.run(['logits', 'mask'], {'images': images})
    expected = live(images)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_array_equal(mask, np.argmax(expected, -1))


@pytest.mark.slow
def test_a_model_without_symbolic_sides_exports_at_the_crop_size(tmp_path):
  """A ViT resizes its position embedding by a matrix computed on the host: jax.export falls back to the fixed
  crop size, and the loader pads smaller images to it and refuses larger ones."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg import export, models  # pylint: disable=g-import-not-at-top
  from jaxseg.models.encoders import registry, vit  # pylint: disable=g-import-not-at-top
  from tests import test_dinov2  # pylint: disable=g-import-not-at-top
  registry.ENCODERS['export_test_vit'] = vit.spec(**test_dinov2.TINY)
  try:
    model = models.create_model('linear', {'encoder': 'export_test_vit'}, num_classes=3)
    x = jnp.zeros((1, 42, 56, 3), jnp.uint8)
    variables = model.init(jax.random.PRNGKey(0), models.normalize_images(x, jnp.float32), train=False)
    fn = export.serving_function(model, variables, jnp.float32)
    exported, rule, _ = export.export_function(fn, export.size_multiples(model), platforms=('cpu',),
                                               fixed_size=(42, 56))
    assert rule == {'fixed_size': [42, 56]}
    (tmp_path / 'model.jax_exported').write_bytes(exported.serialize())
    contract = export._input_contract(3, rule, 'b, 42, 56, 3')  # pylint: disable=protected-access
    (tmp_path / 'model.json').write_text(json.dumps({'input': contract, 'class_names': ['a', 'b', 'c'],
                                                    'palette': [[0, 0, 0]] * 3}))
    loaded = export.load(str(tmp_path))
    image = images_of(30, 50, 3, seed=4)
    padded = np.zeros((1, 42, 56, 3), np.uint8)
    padded[0, :30, :50] = image
    want = np.asarray(jax.jit(fn)(padded)['logits'])[0, :30, :50]
    np.testing.assert_allclose(loaded(image)['logits'], want, atol=1e-5)
    with pytest.raises(ValueError, match='at most 42x56'):
      loaded(images_of(43, 56, 3))
  finally:
    del registry.ENCODERS['export_test_vit']
