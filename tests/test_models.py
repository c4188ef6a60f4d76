"""Model shapes, paper parameter counts, and the fast layers against their textbook forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import models
from jaxseg.models import layers
from jaxseg.models.fcn import FCN
from jaxseg.models.unet import UNet
from jaxseg.errors import ConfigError


def param_count(model, size=64):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))


def test_unet_paper_parameter_count():
  # Base width 64, 4 down-steps, BatchNorm, transposed-conv up-sampling, 3 -> 2 channels.
  assert param_count(UNet(num_classes=2, base_width=64, depth=4, norm='batch', upsample='transpose')) == 31_037_698


def fcn8s_vgg16_layer_counts_by_hand(k):
  """FCN-8s on VGG16 with K classes, layer by layer as the paper's net (and jaxseg's) is built.

  Convs are kernel h x w x in x out + bias; the two 2x up-samplings (upscore2, upscore_pool4) are 4x4
  transposed convs K -> K without bias; the final x8 up-sampling is a fixed bilinear resize (no parameters).
  """
  conv = lambda kh, kw, cin, cout, bias=True: kh * kw * cin * cout + (cout if bias else 0)
  vgg16 = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  names = ['conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
           'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3']
  counts = {name: conv(3, 3, cin, cout) for name, (cin, cout) in zip(names, vgg16)}
  counts['fc6'] = conv(7, 7, 512, 4096)
  counts['fc7'] = conv(1, 1, 4096, 4096)
  counts['score_fr'] = conv(1, 1, 4096, k)
  counts['upscore2'] = conv(4, 4, k, k, bias=False)
  counts['score_pool4'] = conv(1, 1, 512, k)
  counts['upscore_pool4'] = conv(4, 4, k, k, bias=False)
  counts['score_pool3'] = conv(1, 1, 256, k)
  return counts


def test_fcn8s_vgg16_parameter_count_by_hand():
  """134,376,863 for 21 classes (PASCAL VOC): 14,714,688 in VGG16's convs, 102,764,544 in fc6, 16,781,312 in fc7."""
  expected = fcn8s_vgg16_layer_counts_by_hand(21)
  assert sum(expected[n] for n in expected if n.startswith('conv')) == 14_714_688
  assert expected['fc6'] == 7 * 7 * 512 * 4096 + 4096 == 102_764_544
  assert sum(expected.values()) == 134_376_863
  variables = jax.eval_shape(lambda: FCN(num_classes=21, variant='fcn8s').init(jax.random.key(0),
                                                                                 jnp.zeros((1, 64, 64, 3))))
  got = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layer))
         for name, layer in variables['params'].items()}
  assert got == expected  # Hence 134,376,863 in all.


@pytest.mark.parametrize('variant', ['fcn32s', 'fcn16s', 'fcn8s'])
def test_fcn_variants_output_shape(variant):
  model = FCN(num_classes=5, variant=variant, width_multiplier=0.125, fc_width=16, fc6_kernel=3)
  x = jnp.ones((2, 70, 45, 3))
  variables = model.init(jax.random.key(0), x)
  out = model.apply(variables, x)
  assert out.shape == (2, 70, 45, 5)


@pytest.mark.parametrize('norm,upsample', [('batch', 'transpose'), ('group', 'bilinear'), ('none', 'transpose')])
def test_unet_any_input_size(norm, upsample):
  model = UNet(num_classes=3, base_width=8, depth=3, norm=norm, upsample=upsample)
  x = jnp.ones((2, 37, 50, 3))
  variables = model.init(jax.random.key(0), x)
  out, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out.shape == (2, 37, 50, 3)


def test_fcn8s_skip_layers_start_at_zero_so_it_begins_as_fcn32s():
  kw = dict(num_classes=4, width_multiplier=0.125, fc_width=16, fc6_kernel=3, dropout_rate=0.0)
  x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  v8 = FCN(variant='fcn8s', **kw).init(jax.random.key(0), x)
  out8 = FCN(variant='fcn8s', **kw).apply(v8, x)
  # Bilinear-initialised 2x up-samplings of the stride-32 scores, then x8, equal a x32 up-sampling
  # only approximately, but the skip scores contribute exactly zero at init.
  assert float(jnp.abs(v8['params']['score_pool4']['kernel']).max()) == 0.0
  assert out8.shape == (1, 64, 64, 4)


def test_max_pool_by_reshape_matches_flax_max_pool():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  np.testing.assert_allclose(layers.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
  g1 = jax.grad(lambda v: jnp.sum(layers.max_pool_2x2(v) ** 2))(x)
  g2 = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), (2, 2)) ** 2))(x)
  np.testing.assert_allclose(g1, g2, rtol=1e-6)


def test_upconv2x2_matches_conv_transpose():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  ref = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding='VALID')
  variables = ref.init(jax.random.key(1), x)
  fast = layers.UpConv2x2(4)
  # Same parameter layout: the reference's weights drop straight in.
  out_ref = ref.apply(variables, x)
  out_fast = fast.apply(variables, x)
  assert out_fast.shape == (2, 10, 14, 4)
  np.testing.assert_allclose(out_fast, out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape,kernel', [((4, 4), 7), ((1, 1), 7), ((2, 3), 7), ((6, 6), 7), ((3, 3), 4),
                                          ((5, 2), 5)])
def test_patch_matmul_conv_matches_nn_conv_same(shape, kernel):
  """Same parameters (names, shapes, initial values) and the same outputs and gradients as nn.Conv 'SAME',
  for odd and even kernels larger than the map, including taps that only see padding."""
  x = jax.random.normal(jax.random.key(0), (2,) + shape + (3,))
  ref = nn.Conv(4, (kernel, kernel), padding='SAME')
  fast = layers.PatchMatmulConv(4, (kernel, kernel))
  variables = ref.init(jax.random.key(1), x)
  same_init = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, fast.init(jax.random.key(1), x))
  assert all(jax.tree.leaves(same_init))
  loss = lambda m: lambda v, a: jnp.sum(m.apply(v, a) ** 2)
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(fast.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
    g_fast = jax.grad(loss(fast), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fcn_uses_the_matrix_product_fc6_only_on_maps_smaller_than_its_kernel():
  kw = dict(num_classes=3, width_multiplier=0.125, fc_width=8, fc6_kernel=3, dropout_rate=0.0)
  model = FCN(variant='fcn32s', **kw)
  for size, expect_matmul in ((64, True), (96, False)):  # pool5 maps 2x2 and 3x3 for a 3x3 fc6
    x = jnp.ones((1, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))  # Shapes suffice to trace the program.
    jaxpr = str(jax.make_jaxpr(lambda v, a: model.apply(v, a))(variables, x))
    convs_with_3x3_fc6 = jaxpr.count('conv_general_dilated')
    # The backbone has 13 convolutions (fc7 and score_fr, 1x1, are matrix products: layers.Conv); fc6 adds one
    # unless it is a matmul.
    assert convs_with_3x3_fc6 == (13 if expect_matmul else 14), (size, convs_with_3x3_fc6)


def test_bilinear_kernel_upsamples_a_constant_to_a_constant_inside():
  k = layers.bilinear_kernel_init(None, (4, 4, 2, 2))
  up = nn.ConvTranspose(2, (4, 4), strides=(2, 2), padding='SAME', use_bias=False)
  out = up.apply({'params': {'kernel': k}}, jnp.ones((1, 6, 6, 2)))
  np.testing.assert_allclose(out[0, 2:-2, 2:-2], 1.0, rtol=1e-6)


def test_registry_rejects_unknown_model_and_unknown_fields():
  with pytest.raises(ConfigError, match='resnet'):
    models.create_model('resnet', {}, num_classes=2)
  with pytest.raises(ConfigError, match='variant'):
    models.create_model('unet', {'variant': 'fcn8s'}, num_classes=2)


def padded_and_output_shapes(model, x):
  """(the input shape the model's first convolution sees, the logits' shape): shapes only, nothing computed.

  Every model pads its input at the bottom/right and then convolves it first, so the first nn.Conv's input is the
  padded image.
  """
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == '__call__' and not seen:
      seen.append(tuple(args[0].shape))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    out, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))
  return seen[0], tuple(out.shape)


# (model name, fields, size_multiple by hand, input H x W, padded H x W by hand: each side rounded up to the multiple).
SIZE_MULTIPLE_CASES = [
    ('unet', {'base_width': 4, 'depth': 2}, 2 ** 2, (38, 22), (40, 24)),
    ('unet', {'base_width': 4, 'depth': 3}, 2 ** 3, (37, 21), (40, 24)),
    ('unet', {'base_width': 4, 'depth': 3}, 2 ** 3, (40, 24), (40, 24)),  # A multiple of 8, not of 16 or 32.
    ('unet', {'encoder': 'resnet18'}, 32, (50, 70), (64, 96)),
    ('fcn', {'width_multiplier': 0.125, 'fc_width': 16, 'fc6_kernel': 3}, 32, (70, 45), (96, 64)),
    ('fcn_vgg16', {'variant': 'fcn32s'}, 32, (53, 71), (64, 96)),
    ('deeplabv3plus', {'encoder': 'resnet18', 'output_stride': 16}, 16, (40, 56), (48, 64)),
    ('deeplabv3plus', {'encoder': 'resnet18', 'output_stride': 8}, 8, (40, 56), (40, 56)),  # Not of 16 or 32.
]


@pytest.mark.parametrize('name,fields,multiple,size,padded', SIZE_MULTIPLE_CASES,
                         ids=[f'{c[0]}-{c[2]}-{c[3][0]}x{c[3][1]}' for c in SIZE_MULTIPLE_CASES])
def test_size_multiple_is_what_the_model_pads_to(name, fields, multiple, size, padded):
  """UNet 2**depth, UNet on an encoder 32, FCN and FCN-VGG16 32 (pool5), DeepLabV3+ its output_stride: the input
  is zero-padded to that multiple (no further) and the logits cropped back to the input's size."""
  model = models.create_model(name, fields, num_classes=3)
  assert model.size_multiple == multiple
  first_conv_input, logits = padded_and_output_shapes(model, jnp.zeros((2,) + size + (3,)))
  assert first_conv_input == (2,) + padded + (3,)
  assert logits == (2,) + size + (3,)


def _attention_by_hand(q, k, v):
  """softmax(q k^T / sqrt(d)) v per head, in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhts,bshd->bthd', weights, v)


def test_attention_picks_cudnn_only_where_it_applies_and_falls_back(monkeypatch):
  monkeypatch.delenv(layers.ATTENTION_ENV, raising=False)
  assert layers.attention_implementation(jnp.bfloat16, 64) is None  # Not a GPU here.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert layers.attention_implementation(jnp.bfloat16, 64) == 'cudnn'
  assert layers.attention_implementation(jnp.float16, 128) == 'cudnn'
  assert layers.attention_implementation(jnp.float32, 64) is None  # The kernel takes half precision only.
  assert layers.attention_implementation(jnp.bfloat16, 12) is None  # Head dims: multiples of 8 up to 128.
  assert layers.attention_implementation(jnp.bfloat16, 256) is None
  # Chosen, but this machine has no cuDNN: jax refuses while tracing, and XLA's formulation gives the numbers.
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((2, 5, 2, 8), (2, 3, 2, 8), (2, 3, 2, 8)))
  got = layers.dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  np.testing.assert_allclose(np.asarray(got, np.float32), _attention_by_hand(q, k, v), atol=0.05)
  got = layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  np.testing.assert_allclose(np.asarray(got), _attention_by_hand(q, k, v), rtol=1e-5, atol=1e-6)
  monkeypatch.setenv(layers.ATTENTION_ENV, 'xla')
  assert layers.attention_implementation(jnp.bfloat16, 64) is None
  monkeypatch.setenv(layers.ATTENTION_ENV, 'flash')
  with pytest.raises(ValueError, match='JAXSEG_ATTENTION'):
    layers.attention_implementation(jnp.bfloat16, 64)


def _resize_by_hand(x, size):
  """torch's bilinear resize (align_corners=False) written from its formula, in float64 numpy, one axis at a time:
  source (dst + 0.5) * in / out - 0.5, clamped below at 0; taps floor and floor + 1 (clamped to the last)."""
  x = np.asarray(x, np.float64)
  for axis, out in ((1, size[0]), (2, size[1])):
    n = x.shape[axis]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = (src - i0).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    x = np.take(x, i0, axis=axis) * (1 - lam) + np.take(x, i1, axis=axis) * lam
  return x


@pytest.mark.parametrize('shape,size', [((2, 1, 5, 3), (4, 40)),  # x4 and x8 by slices, edges included.
                                        ((1, 37, 37, 2), (74, 111)),  # x2 by slices, x3 by jax.image.resize.
                                        ((1, 9, 12, 2), (5, 7))])  # Shrinking: jax.image.resize.
def test_resize_bilinear_is_torchs_formula(shape, size):
  """Power-of-two enlargements go by two-tap slices, other sizes through jax.image.resize: both are torch's."""
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = np.asarray(layers.resize_bilinear(jnp.asarray(x), size))
  np.testing.assert_allclose(got, _resize_by_hand(x, size), rtol=0, atol=1e-5)
  grad = jax.grad(lambda v: (layers.resize_bilinear(v, size) ** 2).sum())(jnp.asarray(x))
  assert grad.shape == x.shape and np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize('kernel,dtype', [(3, jnp.float32), (7, jnp.float32), (3, jnp.bfloat16)])
def test_depthwise_conv_is_the_grouped_convolution(kernel, dtype):
  """Shifted copies times per-channel weights == nn.Conv(C, (k, k), feature_group_count=C), same parameters."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 11, 6)), jnp.float32)
  layer = layers.DepthwiseConv(6, kernel, dtype=dtype)
  variables = layer.init(jax.random.key(0), x)
  variables = {'params': {'kernel': variables['params']['kernel'], 'bias': jnp.linspace(-1, 1, 6)}}
  conv = nn.Conv(6, (kernel, kernel), padding=((kernel // 2,) * 2,) * 2, feature_group_count=6, dtype=dtype)
  assert jax.tree.map(jnp.shape, conv.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
  got, want = layer.apply(variables, x), conv.apply(variables, x)
  assert got.dtype == want.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=1e-5 if dtype == jnp.float32 else 0.1)
