"""ONNX export (jaxseg/onnx_export.py): every registered architecture, small, run by onnxruntime against the
Predictor (jaxseg's own inference) on the same images: logits to 1e-4 relative, masks equal wherever the top two
logits are more than 1e-3 apart; at two image sizes where the sides are dynamic."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest

from jaxseg import export, inference, models, onnx_export
from jaxseg.models.encoders import convnext, mit, registry, vit
from jaxseg.settings import InferenceOptions
from tests import test_dinov2, test_segformer

K = 5
RTOL = 1e-4
TINY_CONVNEXT, TINY_MIT, TINY_VIT = 'onnx_test_convnext', 'onnx_test_mit', 'onnx_test_vit'

# name -> (model name, config.model fields, size multiple the export should keep dynamic (None: fixed sides),
#          the two image sizes checked (H, W)).
ARCHITECTURES = {
    'unet': ('unet', {'base_width': 8, 'depth': 3}, 8, [(40, 56), (64, 32)]),
    'fcn32s': ('fcn', {'variant': 'fcn32s', 'width_multiplier': 0.125, 'fc_width': 32}, 32, [(64, 96), (96, 64)]),
    'fcn16s': ('fcn', {'variant': 'fcn16s', 'width_multiplier': 0.125, 'fc_width': 32}, 32, [(64, 96), (96, 64)]),
    'fcn8s': ('fcn', {'variant': 'fcn8s', 'width_multiplier': 0.125, 'fc_width': 32}, 32, [(64, 96), (96, 64)]),
    'unet_resnet18': ('unet', {'encoder': 'resnet18'}, 32, [(64, 96), (96, 64)]),
    'fcn_vgg16': ('fcn_vgg16', {'variant': 'fcn8s'}, 32, [(64, 96), (96, 64)]),  # 134M parameters: a 537 MB file.
    'deeplabv3plus': ('deeplabv3plus', {'encoder': 'resnet18'}, 16, [(48, 64), (80, 48)]),
    'fpn': ('fpn', {'encoder': 'resnet18'}, 32, [(64, 96), (96, 64)]),
    'upernet': ('upernet', {'encoder': TINY_CONVNEXT, 'channels': 16}, 1, [(50, 70), (64, 45)]),
    'segformer': ('segformer', {'encoder': TINY_MIT}, 32, [(64, 96), (96, 64)]),
    'dpt': ('dpt', {'encoder': TINY_VIT, 'neck_hidden_sizes': (8, 16, 16, 16), 'fusion_hidden_size': 16}, None,
            [(56, 70)]),
    'linear': ('linear', {'encoder': TINY_VIT}, None, [(56, 70)]),
}


@pytest.fixture(autouse=True, scope='module')
def _test_encoders():
  """Tiny ConvNeXt, MiT and ViT for this module only."""
  before = dict(registry.ENCODERS)
  registry.ENCODERS[TINY_CONVNEXT] = convnext.spec((1, 1, 1, 1), (8, 16, 32, 64))
  registry.ENCODERS[TINY_MIT] = mit.spec(**test_segformer.TINY, decoder=16)
  registry.ENCODERS[TINY_VIT] = vit.spec(**test_dinov2.TINY)
  yield
  registry.ENCODERS.clear()
  registry.ENCODERS.update(before)


def random_variables(model, size, seed=0):
  """Initialised variables, every leaf moved by noise so that biases, BatchNorm statistics and zero-initialised
  layers (FCN's skip scores) all matter; variances stay positive."""
  x = jnp.zeros((1, *size, 3), jnp.uint8)
  variables = model.init(jax.random.PRNGKey(seed), models.normalize_images(x, jnp.float32), train=False)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    leaf = np.asarray(leaf)
    noise = rng.normal(0, 0.05, leaf.shape).astype(leaf.dtype)
    out.append(np.abs(leaf + noise) + 0.5 if 'var' in jax.tree_util.keystr(path) else leaf + noise)
  return jax.tree_util.tree_unflatten(treedef, out)


def predictor_logits(model, variables, images):
  """jaxseg's Predictor, whole images: float32 logits [N, H, W, K]."""
  options = InferenceOptions(mode='whole', size_multiple=1, batch_size=len(images), whole_max_size=(4096, 4096))
  predictor = inference.Predictor.create(model, variables, K, options, devices=jax.local_devices()[:1])
  return np.stack(list(predictor.iter_scores(list(images))))


def assert_onnx_matches(logits, mask, expected, what):
  err = np.abs(logits - expected).max() / np.abs(expected).max()
  assert err < RTOL, f'{what}: relative error {err:.2e}'
  top2 = np.sort(expected, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-3
  assert clear.mean() > 0.9, what
  np.testing.assert_array_equal(mask[clear], np.argmax(expected, -1)[clear], err_msg=what)


# The README's test command runs the UNet (and the tests below); CI runs every other architecture with the slow set
# (each takes 3-50 s here: converting and compiling ResNets, VGG16, transformer blocks and symbolic resizes).
SLOW = ('deeplabv3plus', 'dpt', 'fcn16s', 'fcn32s', 'fcn8s', 'fcn_vgg16', 'fpn', 'linear', 'segformer',
        'unet_resnet18', 'upernet')


@pytest.mark.parametrize('arch', [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a
                                  for a in sorted(ARCHITECTURES)])
def test_onnxruntime_matches_the_predictor(arch, tmp_path):
  name, fields, multiple, sizes = ARCHITECTURES[arch]
  model = models.create_model(name, fields, num_classes=K)
  variables = random_variables(model, sizes[0])
  fn = export.serving_function(model, variables, jnp.float32)
  meta = onnx_export.write(fn, str(tmp_path), channels=3, num_classes=K, multiples=export.size_multiples(model), fixed_size=sizes[0],
                           name=name)
  if multiple is None:
    assert meta['input']['fixed_size'] == list(sizes[0]) and meta['input']['shape'] == ['batch', *sizes[0], 3]
  else:
    assert meta['input']['size_multiple'] == multiple and meta['input']['shape'] == ['batch', 'height', 'width', 3]
  assert meta['checked_relative_error'] < RTOL
  session = onnxruntime.InferenceSession(str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider'])
  assert [(i.name, i.type) for i in session.get_inputs()] == [('images', 'tensor(uint8)')]
  assert [o.name for o in session.get_outputs()] == ['logits', 'mask']
  for i, (h, w) in enumerate(sizes):
    images = np.random.default_rng(10 + i).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    logits, mask = session.run(['logits', 'mask'], {'images': images})
    assert logits.shape == (2, h, w, K) and mask.shape == (2, h, w) and mask.dtype == np.int32
    assert_onnx_matches(logits, mask, predictor_logits(model, variables, images), f'{arch} at {h}x{w}')


def test_a_side_that_is_not_a_multiple_is_refused_by_onnxruntime(tmp_path):
  """The front Reshape takes multiples of the size multiple only; model.json says so."""
  name, fields, _, sizes = ARCHITECTURES['unet']
  model = models.create_model(name, fields, num_classes=K)
  fn = export.serving_function(model, random_variables(model, sizes[0]), jnp.float32)
  onnx_export.write(fn, str(tmp_path), channels=3, num_classes=K, multiples=[8], fixed_size=sizes[0])
  session = onnxruntime.InferenceSession(str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider'])
  with pytest.raises(Exception, match='Reshape'):
    session.run(None, {'images': np.zeros((1, 36, 40, 3), np.uint8)})


def test_grayscale_input_and_its_contract(tmp_path):
  model = models.create_model('unet', {'base_width': 8, 'depth': 2}, num_classes=K)
  x = jnp.zeros((1, 16, 16, 1), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  stats = ((127.5,), (64.0,))  # 0-255 units.
  fn = export.serving_function(model, variables, jnp.float32, stats)
  meta = onnx_export.write(fn, str(tmp_path), channels=1, num_classes=K, multiples=[1, 4], fixed_size=(16, 16))
  assert meta['input']['channels'] == 1
  session = onnxruntime.InferenceSession(str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider'])
  images = np.random.default_rng(0).integers(0, 256, (3, 12, 20, 1), dtype=np.uint8)
  # By hand: the normalisation the export holds, then the module.
  want = model.apply(variables, (images.astype(np.float32) - 127.5) / 64.0, train=False)
  np.testing.assert_allclose(session.run(['logits'], {'images': images})[0], np.asarray(want), rtol=0, atol=1e-4)


def test_missing_converter_is_named_with_the_install_command(monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_jax2onnx(name, *args, **kwargs):
    if name == 'jax2onnx':
      raise ImportError("No module named 'jax2onnx'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_jax2onnx)
  with pytest.raises(onnx_export.OnnxUnavailable, match='pip install --no-deps jax2onnx=='):
    onnx_export.to_onnx(lambda x: x, channels=3, num_classes=K, multiples=[1], fixed_size=(8, 8))


@pytest.mark.parametrize('value, message', [
    ('jax,tflite', 'comma-separated list of jax, saved_model, onnx'), ('onnx,onnx', 'each at most once'),
    ('', 'comma-separated list'), (' , ', 'comma-separated list')])
def test_bad_export_formats_are_config_errors(value, message):
  from configs import unet  # pylint: disable=g-import-not-at-top
  from jaxseg import settings  # pylint: disable=g-import-not-at-top
  from jaxseg.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = unet.get_config()
  with config.unlocked():
    config.export.formats = value
  with pytest.raises(ConfigError, match=message):
    settings.from_config(config)
  config = unet.get_config()
  with config.unlocked():
    config.export.saved_model = False
  with pytest.raises(ConfigError, match='replaced by config.export.formats'):
    settings.from_config(config)


@pytest.mark.slow
def test_a_second_conversion_in_the_process_keeps_dynamic_sides():
  """jax2onnx 0.17.1 keeps a module-wide flag in its gather lowering; without onnx_export's reset the second
  conversion of a model with constant-index gathers (SegFormer's) fell back to fixed sides."""
  name, fields, _, sizes = ARCHITECTURES['segformer']
  model = models.create_model(name, fields, num_classes=K)
  fn = export.serving_function(model, random_variables(model, sizes[0]), jnp.float32)
  rules = [onnx_export.to_onnx(fn, channels=3, num_classes=K, multiples=[32], fixed_size=sizes[0])[1]
           for _ in range(2)]
  assert rules == [{'size_multiple': 32}] * 2


@pytest.mark.slow
def test_benchmark_smoke_run_reports_both_runtimes(tmp_path):
  """benchmarks/bench_onnx.py --smoke (a harness check, not a timing): both rows, the check's error, the JSON."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.helpers import ROOT  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'onnx.json'
  subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_onnx.py'), '--smoke',
                  '--configs=configs/unet.py', f'--json={out}'], cwd=ROOT, check=True, capture_output=True,
                 timeout=600)
  import json  # pylint: disable=g-import-not-at-top
  row, = json.loads(out.read_text())['rows']
  assert row['model'] == 'unet' and row['onnx_size_rule']['size_multiple'] == 8
  assert row['checked_relative_error'] < 1e-4
  assert row['jaxseg']['img_per_s'] > 0 and row['onnxruntime']['img_per_s'] > 0
