"""The decoders on any encoder: FPN against segmentation_models_pytorch 0.6, UPerNet against transformers.

References, random weights, eval mode:
* FPN-ResNet34: tests/torch_reference.py's FPN, plain torch.nn written from smp 0.6's FPNDecoder / FPN
  (segmentation_models_pytorch itself needs torchvision, whose wheels need another torch than CI's);
* UPerNet-ConvNeXt-T: transformers' UperNetForSemanticSegmentation (checked with 5.25.0), built from a config
  object (nothing downloaded), its whole state dict written to a .safetensors file in its own layout and read
  with models.load_weights, as a user reads openmmlab/upernet-convnext-tiny.
Every parameter the initialisers leave constant (norm weights and biases, layer scales, BatchNorm statistics) is
randomised, the inputs are 70x90 (not a multiple of 32), and logits are compared to 1e-4 relative.
"""

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import models
from jaxseg.errors import ConfigError, WeightsError
from jaxseg.models import encoders
from jaxseg.models.decoders.fpn import FPNDecoder
from jaxseg.models.encoders import base, convnext, registry
from jaxseg.models.segmentation_model import SegmentationModel
from tests.helpers import save_state_dict
from tests.test_convnext import randomize_ as randomize_hf_, transformers_module  # noqa: F401  (fixture 'hf')
from tests.test_deeplab import torch_deeplab_to_flax as smp_to_flax
from tests.test_encoders import assert_close_relative, param_count, random_images

H, W = 70, 90
UPERNET_PARAMS = 60_242_636  # UperNetForSemanticSegmentation, ConvNeXt-T, 150 classes, auxiliary head.
FPN_R34_PARAMS = 23_155_393  # smp.FPN('resnet34', classes=1).


# ---- FPN against smp. ----


def test_fpn_resnet34_parameter_count_and_logits_are_smps(ref):
  """smp's FPN on ResNet-34 at 70x90: smp needs sides divisible by 32, so its input is the zero-padded 96x96 one
  and its logits are cropped back, which is what jaxseg's FPN does inside."""
  import torch  # pylint: disable=g-import-not-at-top
  torch_model = ref.randomize_(ref.FPN('resnet34', classes=4), seed=7)
  assert sum(p.numel() for p in ref.FPN('resnet34', classes=1).parameters()) == FPN_R34_PARAMS
  assert param_count(models.create_model('fpn', {'encoder': 'resnet34'}, num_classes=1)) == FPN_R34_PARAMS
  model = models.create_model('fpn', {'encoder': 'resnet34'}, num_classes=4)
  assert model.size_multiple == 32
  variables = smp_to_flax(torch_model, 'resnet34')
  del variables['batch_stats']['decoder']  # FPN's decoder has GroupNorm only.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)
  x, x_nchw = random_images(8, h=H, w=W)
  padded = np.pad(x_nchw, ((0, 0), (0, 0), (0, 96 - H), (0, 96 - W)))
  with torch.no_grad():
    want = torch_model(torch.from_numpy(padded)).numpy().transpose(0, 2, 3, 1)[:, :H, :W]
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert_close_relative(got, want, 'FPN-ResNet34 logits')


# ---- UPerNet against transformers. ----


def hf_upernet(hf, num_labels=150, **convnext):
  backbone = hf.ConvNextConfig(out_features=['stage1', 'stage2', 'stage3', 'stage4'],
                               hidden_sizes=list(convnext.get('dims', (96, 192, 384, 768))),
                               depths=list(convnext.get('depths', (3, 3, 9, 3))))
  return hf.UperNetForSemanticSegmentation(hf.UperNetConfig(backbone_config=backbone, num_labels=num_labels))


def test_upernet_convnext_tiny_whole_file_loads_and_gives_transformers_logits(hf, tmp_path):
  """The issue's model: parameter count, then a whole transformers file through models.load_weights, and the
  main and auxiliary logits at 70x90."""
  import torch  # pylint: disable=g-import-not-at-top
  torch_model = randomize_hf_(hf_upernet(hf), seed=3)
  assert sum(p.numel() for p in torch_model.parameters()) == UPERNET_PARAMS
  model = models.create_model('upernet', {'encoder': 'convnext_tiny', 'auxiliary_head': True}, num_classes=150)
  assert param_count(model) == UPERNET_PARAMS and model.size_multiple == 1
  path = save_state_dict({k: v.contiguous() for k, v in torch_model.state_dict().items()},
                         tmp_path / 'upernet-convnext-tiny.safetensors')
  x, x_nchw = random_images(9, n=1, h=H, w=W)
  fresh = jax.jit(model.init)(jax.random.key(0), x)
  variables = models.load_weights(model, fresh, path)
  with torch.no_grad():
    out = torch_model(torch.from_numpy(x_nchw), output_hidden_states=False)
    features = torch_model.backbone.forward_with_filtered_kwargs(torch.from_numpy(x_nchw)).feature_maps
    aux = torch.nn.functional.interpolate(torch_model.auxiliary_head(features), size=(H, W), mode='bilinear',
                                          align_corners=False)
  got, sown = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=[models.AUXILIARY]))(variables, x)
  assert_close_relative(got, out.logits.numpy().transpose(0, 2, 3, 1), 'UPerNet-ConvNeXt-T logits')
  assert_close_relative(sown[models.AUXILIARY]['logits'][0], aux.numpy().transpose(0, 2, 3, 1),
                        'UPerNet-ConvNeXt-T auxiliary logits')


def test_a_whole_file_for_other_classes_starts_all_but_the_classifiers(hf, tmp_path, caplog):
  """ADE20K's 150-class file into a 3-class model: all but the two classifiers load, with a warning; a key of
  another shape elsewhere, or a file without the encoder, is a WeightsError naming the file and the key."""
  torch_model = randomize_hf_(hf_upernet(hf, num_labels=150, depths=(1, 1, 1, 1)), seed=4)
  sd = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
  path = save_state_dict(sd, tmp_path / 'ade.safetensors')
  tiny = convnext.spec((1, 1, 1, 1), (96, 192, 384, 768))
  registry.ENCODERS['test_convnext_t1'] = tiny
  try:
    model = models.create_model('upernet', {'encoder': 'test_convnext_t1', 'auxiliary_head': True}, num_classes=3)
    fresh = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with caplog.at_level(logging.WARNING):
      loaded = models.load_weights(model, fresh, path)
    assert 'another number of classes' in caplog.text and 'decode_head.classifier.weight' in caplog.text
    np.testing.assert_array_equal(loaded['params']['segmentation_head']['kernel'],
                                  fresh['params']['segmentation_head']['kernel'])
    np.testing.assert_array_equal(loaded['params']['decoder']['fpn_bottleneck']['conv']['kernel'],
                                  sd['decode_head.fpn_bottleneck.conv.weight'].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded['batch_stats']['auxiliary_head']['convs_0']['batch_norm']['var'],
                                  sd['auxiliary_head.convs.0.batch_norm.running_var'].numpy())
    np.testing.assert_array_equal(loaded['params']['encoder']['stages_0']['blocks_0']['gamma'],
                                  sd['backbone.encoder.stages.0.layers.0.layer_scale_parameter'].numpy())
    bad = dict(sd, **{'decode_head.bottleneck.conv.weight': sd['decode_head.bottleneck.conv.weight'][:, :10]})
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*'decode_head\.bottleneck\.conv\.weight' is "
                                           r'\[512, 10, 3, 3\] in the file, the model needs \[512, 2816, 3, 3\]'):
      models.load_weights(model, fresh, save_state_dict(bad, tmp_path / 'bad.safetensors'))
    no_backbone = {k: v for k, v in sd.items() if not k.startswith('backbone.')}
    with pytest.raises(WeightsError, match=r'no_backbone\.safetensors: no backbone\.\* keys'):
      models.load_weights(model, fresh, save_state_dict(no_backbone, tmp_path / 'no_backbone.safetensors'))
  finally:
    del registry.ENCODERS['test_convnext_t1']


# ---- Pairs: any decoder on any encoder that has its strides. ----


def test_pairs_build_or_name_the_missing_stride():
  x = jnp.zeros((1, 70, 90, 3))
  for name, fields, multiple in (('unet', {'encoder': 'convnext_tiny'}, 32), ('fpn', {'encoder': 'convnext_tiny'}, 32),
                                 ('upernet', {'encoder': 'resnet18'}, 1), ('fcn', {'encoder': 'resnet18'}, 32),
                                 ('fpn', {'encoder': 'vgg16_bn'}, 32)):
    model = models.create_model(name, fields, num_classes=5)
    assert model.size_multiple == multiple, name
    out = jax.eval_shape(lambda m=model: m.apply(m.init(jax.random.key(0), x), x, train=False))
    assert out.shape == (1, 70, 90, 5), (name, fields)
  with pytest.raises(ConfigError, match=r"deeplabv3plus needs output_stride 16, but encoder 'convnext_tiny' has "
                                        r'output_stride 32 only'):
    models.create_model('deeplabv3plus', {'encoder': 'convnext_tiny'}, num_classes=5)
  strides_8_to_32 = (base.FeatureMap(8, 64), base.FeatureMap(16, 128), base.FeatureMap(32, 256))
  with pytest.raises(ConfigError, match=r"decoder 'fpn' needs a stride-4 feature map, which encoder 'x' does not "
                                        r'give \(its maps are at strides \[8, 16, 32\]\)'):
    FPNDecoder.check('x', strides_8_to_32)
  with pytest.raises(ConfigError, match=r"config.model has fields \['variant'\] that model 'upernet' does not take"):
    models.create_model('upernet', {'encoder': 'convnext_tiny', 'variant': 'fcn8s'}, num_classes=5)
  with pytest.raises(ConfigError, match=r"config.model.encoder='convnext_huge' is not a known encoder"):
    models.create_model('fpn', {'encoder': 'convnext_huge'}, num_classes=5)


def test_unet_on_an_encoder_without_a_stride_2_map_goes_on_without_skips():
  """As smp does for such encoders: blocks 3 and 4 (to strides 2 and 1) concatenate no skip."""
  model = models.create_model('unet', {'encoder': 'convnext_tiny'}, num_classes=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']['decoder']
  # Input channels of each block's first conv: previous block (or the stride-32 map) + the skip's.
  assert [shapes[f'block{i}']['conv1']['kernel'].shape[2] for i in range(5)] == [768 + 384, 256 + 192, 128 + 96,
                                                                                  64, 32]


@pytest.mark.slow  # 59 s (UperNet-ConvNeXt's train step compiles): CI's slow leg runs it.
def test_the_auxiliary_loss_is_added_with_its_weight():
  """train_step's loss with the auxiliary head = CE(main) + 0.4 CE(auxiliary), both computed here with numpy."""
  from jaxseg import train  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  registry.ENCODERS['test_convnext_small_dims'] = convnext.spec((1, 1, 1, 1), (8, 16, 32, 64))
  try:
    model = SegmentationModel(num_classes=3, encoder_name='test_convnext_small_dims', decoder_name='upernet',
                              decoder_fields=(('channels', 8),), auxiliary_head=True)
    state = state_lib.create_train_state(model, optax.sgd(0.0), jax.random.key(0), (64, 64, 3))
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8),
             'label': rng.integers(0, 3, (2, 64, 64), dtype=np.uint8)}
    step = jax.jit(functools.partial(
        train.train_step, input_stats=(models.IMAGENET_MEAN, models.IMAGENET_STD), ignore_label=255,
        class_weights=None, dtype=jnp.float32, learning_rate_fn=lambda step: 0.0, dropout_seed=0,
        auxiliary_weight=model.auxiliary_loss_weight))
    _, metrics = step(state, batch)
    images = models.normalize_images(batch['image'], jnp.float32)
    logits, sown = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats', models.AUXILIARY]))(
        {'params': state.params, 'batch_stats': state.batch_stats}, images)
    labels = batch['label'].astype(int)

    def cross_entropy(z):
      z = np.asarray(z, np.float64)
      log_p = z - z.max(-1, keepdims=True)
      log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
      return -np.take_along_axis(log_p, labels[..., None], -1).mean()

    want = cross_entropy(logits) + 0.4 * cross_entropy(sown[models.AUXILIARY]['logits'][0])
    assert abs(float(metrics['loss']) - want) < 1e-5 * want
  finally:
    del registry.ENCODERS['test_convnext_small_dims']


def test_eval_mode_scores_a_whole_model_file_as_it_is(shapes_data_dir, tmp_path):
  """--mode=eval in a workdir without training, with config.model.weights: the file's model is scored as it is.

  The file (transformers' UperNet layout, written from jaxseg's tables) has a classifier of zero weights and a bias
  that makes class 1 win everywhere, so the expected scores follow from the labels alone (read with tfds here):
  pixel accuracy = IoU of class 1 = the fraction of labelled pixels of class 1.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxseg import cli  # pylint: disable=g-import-not-at-top
  from jaxseg.models.decoders.upernet import hf_key_table  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_unet_config  # pylint: disable=g-import-not-at-top
  registry.ENCODERS['test_convnext_eval'] = convnext.spec((1, 1, 1, 1), (8, 16, 32, 64))
  try:
    config = tiny_unet_config(shapes_data_dir)
    config.model = ml_collections.ConfigDict({'name': 'upernet', 'encoder': 'test_convnext_eval', 'channels': 16,
                                              'weights': str(tmp_path / 'model.safetensors'), 'in_channels': 3})
    num_classes = 4  # jaxseg_shapes: background and three shapes.
    model = models.create_model('upernet', {'encoder': 'test_convnext_eval', 'channels': 16},
                                num_classes=num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    rng = np.random.default_rng(0)
    tables = [('backbone.' + k, dataclasses.replace(e, path=('encoder',) + e.path))
              for k, e in encoders.key_table('test_convnext_eval', 'hf').items()]
    tables += list(hf_key_table(auxiliary_head=False).items())
    state_dict = {}
    for key, entry in tables:
      leaf = shapes[entry.collection]
      for k in entry.path:
        leaf = leaf[k]
      shape = base.torch_shape(entry.kind, leaf.shape)
      value = rng.normal(size=shape) if not key.endswith('running_var') else rng.uniform(0.5, 1.5, shape)
      state_dict[key] = value.astype(np.float32)
    state_dict['decode_head.classifier.weight'][:] = 0
    state_dict['decode_head.classifier.bias'][:] = [0, 10, 0, 0]
    safetensors.numpy.save_file(state_dict, config.model.weights)
    result = cli.evaluate_checkpoint(config, str(tmp_path / 'never_trained'))
  finally:
    del registry.ENCODERS['test_convnext_eval']
  source = tfds.builder('jaxseg_shapes', data_dir=shapes_data_dir).as_data_source(split='validation')
  labels = np.concatenate([np.asarray(source[i]['segmentation_mask']).ravel() for i in range(len(source))])
  want = np.mean(labels == 1)
  assert result['checkpoint_step'] == 0
  assert abs(result['pixel_accuracy'] - want) < 1e-6 and abs(result['per_class_iou'][1] - want) < 1e-6



@pytest.mark.slow
def test_the_readme_encoder_override_trains_unet_on_convnext_tiny(shapes_data_dir, tmp_path):
  """README: `--config.model.encoder=convnext_tiny` on configs/unet.py's command trains, evaluates and checkpoints
  (2 steps, small crops; slow: ConvNeXt-T's step compiles for ~1.5 minutes on 2 cores)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_flags  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'unet_convnext'
  flags = tiny_flags(num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2, batch_size=4,
                     eval_batch_size=4, **{'input.crop_size': (64, 64), 'input.eval_size': (64, 64)})
  subprocess.run([sys.executable, 'run.py', '--config=configs/unet.py', '--config.model.encoder=convnext_tiny',
                  f'--config.dataset.data_dir={shapes_data_dir}', f'--workdir={workdir}', *flags],
                 check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=900)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any(r.get('split') == 'eval' and 0 <= r['mean_iou'] <= 1 for r in records), records
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['encoder'] == 'convnext_tiny'
