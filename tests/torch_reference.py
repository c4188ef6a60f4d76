"""Plain torch.nn references for jaxseg's encoders and UNet decoder, with the real libraries' parameter names.

torchvision cannot be imported next to the CPU build of torch that CI installs (its compiled extension), so
the tests use these instead: torchvision's ResNet (BasicBlock, Bottleneck, replace_stride_with_dilation)
and VGG (`features` Sequential with the same indices, avgpool, classifier), and smp 0.6's Unet decoder
(DecoderBlock of two Conv2dReLU, SegmentationHead), written from those libraries' code with the same module
names, so that their state dicts have torchvision's / smp's keys and shapes (tests/test_encoders.py pins
resnet18's and VGG's key lists, and smp's parameter counts).

Deviation, deliberate: torchvision's BasicBlock refuses dilation; here (as in jaxseg) a dilated stage's first
BasicBlock keeps the previous dilation in conv1 (the conv that held the stride) and uses the stage's in conv2.

Also jaxseg's own plain UNet and FCN in PyTorch (`jaxseg_peer`, `load_jaxseg_variables`) and jaxseg's train step
(`Trainer`): benchmarks/bench_train.py's PyTorch side; tests/test_benchmarks.py checks that given jaxseg's weights
they compute jaxseg's logits.
"""

import os

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def conv3x3(in_planes, out_planes, stride=1, dilation=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, bias=False,
                   dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, next_dilation=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride, dilation)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes, 1, dilation if next_dilation is None else next_dilation)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, next_dilation=None):
    del next_dilation  # One 3x3 conv: torchvision's rule as is.
    super().__init__()
    width = planes
    self.conv1 = conv1x1(inplanes, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = conv3x3(width, width, stride, dilation)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = conv1x1(width, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision.models.resnet.ResNet (groups 1, width 64), plus `features(x)`: the 5 maps at strides 2-32."""

  def __init__(self, block, layers, num_classes=1000, replace_stride_with_dilation=None):
    super().__init__()
    self.inplanes = 64
    self.dilation = 1
    replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
    downsample = None
    previous_dilation = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample, previous_dilation, next_dilation=self.dilation)]
    self.inplanes = planes * block.expansion
    for _ in range(1, blocks):
      layers.append(block(self.inplanes, planes, dilation=self.dilation))
    return nn.Sequential(*layers)

  def features(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    out = [x]
    x = self.maxpool(x)
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
      out.append(x)
    return out

  def forward(self, x):
    x = self.features(x)[-1]
    return self.fc(torch.flatten(self.avgpool(x), 1))


RESNETS = {
    'resnet18': (BasicBlock, [2, 2, 2, 2]),
    'resnet34': (BasicBlock, [3, 4, 6, 3]),
    'resnet50': (Bottleneck, [3, 4, 6, 3]),
    'resnet101': (Bottleneck, [3, 4, 23, 3]),
}
VGG16_CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']


class VGG(nn.Module):
  """torchvision.models.vgg.VGG with cfg 'D', plus `features_at_pools(x)`: the 5 max-pool outputs."""

  def __init__(self, batch_norm=False, num_classes=1000):
    super().__init__()
    layers, in_channels = [], 3
    for v in VGG16_CFG:
      if v == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
        layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [conv2d, nn.ReLU(inplace=True)]
        in_channels = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
        nn.Linear(4096, num_classes))

  def features_at_pools(self, x):
    out = []
    for layer in self.features:
      x = layer(x)
      if isinstance(layer, nn.MaxPool2d):
        out.append(x)
    return out

  def fc7(self, pool5):
    """classifier[0:5] (fc6, ReLU, dropout, fc7, ReLU) on a [N, 512, 7, 7] map (eval mode: no dropout)."""
    return self.classifier[:5](torch.flatten(pool5, 1))

  def forward(self, x):
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


def make_encoder(name, output_stride=32):
  """The reference torch model of jaxseg encoder `name` (a ResNet at output_stride, or a VGG)."""
  if name in RESNETS:
    block, layers = RESNETS[name]
    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[output_stride]
    return ResNet(block, layers, replace_stride_with_dilation=dilate)
  assert output_stride == 32
  return VGG(batch_norm={'vgg16': False, 'vgg16_bn': True}[name])


def encoder_features(model, x):
  return model.features(x) if isinstance(model, ResNet) else model.features_at_pools(x)


def to_timm_vgg(state_dict):
  """torchvision VGG keys -> timm's (its vgg.py _filter_fn): classifier.0/3 -> pre_logits.fc1/fc2 as convs."""
  out = {}
  for k, v in state_dict.items():
    k2 = k.replace('classifier.0', 'pre_logits.fc1').replace('classifier.3', 'pre_logits.fc2')
    k2 = k2.replace('classifier.6', 'head.fc')
    if k.startswith('classifier.0.weight'):
      v = v.reshape(-1, 512, 7, 7)
    if k.startswith('classifier.3.weight'):
      v = v.reshape(-1, 4096, 1, 1)
    out[k2] = v
  return out


def randomize_(model, seed):
  """Random weights from a fixed seed, and BatchNorm statistics/affines away from their 0/1 defaults."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.GroupNorm):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.in_features) ** 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
  return model.eval()


# ---- segmentation_models_pytorch 0.6's Unet (center off, BatchNorm), with its module names. ----


class Conv2dReLU(nn.Sequential):
  """smp.base.modules.Conv2dReLU with BatchNorm: conv (no bias), BN, ReLU -> keys '0.weight', '1.weight', ..."""

  def __init__(self, in_channels, out_channels, kernel_size=3):
    super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                     nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):

  def __init__(self, in_channels, skip_channels, out_channels):
    super().__init__()
    self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels)
    self.conv2 = Conv2dReLU(out_channels, out_channels)

  def forward(self, x, skip=None):
    x = F.interpolate(x, scale_factor=2, mode='nearest')
    if skip is not None:
      x = torch.cat([x, skip], dim=1)
    return self.conv2(self.conv1(x))


class UnetDecoder(nn.Module):

  def __init__(self, encoder_channels, decoder_channels=(256, 128, 64, 32, 16)):
    super().__init__()
    encoder_channels = encoder_channels[1:][::-1]  # Drop the stride-1 identity, coarsest first.
    in_channels = [encoder_channels[0]] + list(decoder_channels[:-1])
    skip_channels = list(encoder_channels[1:]) + [0]
    self.center = nn.Identity()
    self.blocks = nn.ModuleList([DecoderBlock(i, s, o) for i, s, o in zip(in_channels, skip_channels,
                                                                          decoder_channels)])

  def forward(self, *features):
    features = features[1:][::-1]
    x, skips = self.center(features[0]), features[1:]
    for i, block in enumerate(self.blocks):
      x = block(x, skips[i] if i < len(skips) else None)
    return x


class Unet(nn.Module):
  """smp.Unet(encoder_name, classes=K) for the ResNets: encoder (no fc), decoder, segmentation_head."""

  def __init__(self, encoder_name, classes):
    super().__init__()
    self.encoder = make_encoder(encoder_name)
    del self.encoder.fc  # smp's ResNetEncoder deletes fc (and avgpool, which has no parameters).
    del self.encoder.avgpool
    channels = (3, 64) + tuple(c * self.encoder.layer1[0].expansion for c in (64, 128, 256, 512))
    self.decoder = UnetDecoder(channels)
    self.segmentation_head = nn.Sequential(nn.Conv2d(16, classes, kernel_size=3, padding=1))

  def forward(self, x):
    features = [x] + self.encoder.features(x)
    return self.segmentation_head(self.decoder(*features))


# ---- segmentation_models_pytorch 0.6's FPN (merge 'add'), with its module names. ----


class Conv3x3GNReLU(nn.Module):

  def __init__(self, in_channels, out_channels, upsample=False):
    super().__init__()
    self.upsample = upsample
    self.block = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                               nn.GroupNorm(32, out_channels), nn.ReLU(inplace=True))

  def forward(self, x):
    x = self.block(x)
    return F.interpolate(x, scale_factor=2.0, mode='bilinear', align_corners=True) if self.upsample else x


class FPNBlock(nn.Module):

  def __init__(self, pyramid_channels, skip_channels):
    super().__init__()
    self.skip_conv = nn.Conv2d(skip_channels, pyramid_channels, kernel_size=1)

  def forward(self, x, skip):
    return F.interpolate(x, scale_factor=2.0, mode='nearest') + self.skip_conv(skip)


class SegmentationBlock(nn.Module):

  def __init__(self, in_channels, out_channels, n_upsamples=0):
    super().__init__()
    blocks = [Conv3x3GNReLU(in_channels, out_channels, upsample=bool(n_upsamples))]
    blocks += [Conv3x3GNReLU(out_channels, out_channels, upsample=True) for _ in range(1, n_upsamples)]
    self.block = nn.Sequential(*blocks)

  def forward(self, x):
    return self.block(x)


class FPNDecoder(nn.Module):

  def __init__(self, encoder_channels, pyramid_channels=256, segmentation_channels=128, dropout=0.2):
    super().__init__()
    c5, c4, c3, c2 = encoder_channels[::-1][:4]
    self.p5 = nn.Conv2d(c5, pyramid_channels, kernel_size=1)
    self.p4 = FPNBlock(pyramid_channels, c4)
    self.p3 = FPNBlock(pyramid_channels, c3)
    self.p2 = FPNBlock(pyramid_channels, c2)
    self.seg_blocks = nn.ModuleList([SegmentationBlock(pyramid_channels, segmentation_channels, n_upsamples=n)
                                     for n in (3, 2, 1, 0)])
    self.dropout = nn.Dropout2d(p=dropout)

  def forward(self, *features):
    c2, c3, c4, c5 = features[-4:]
    p5 = self.p5(c5)
    p4 = self.p4(p5, c4)
    p3 = self.p3(p4, c3)
    p2 = self.p2(p3, c2)
    pyramid = [block(p) for block, p in zip(self.seg_blocks, (p5, p4, p3, p2))]
    return self.dropout(torch.stack(pyramid).sum(dim=0))


class FPN(nn.Module):
  """smp.FPN(encoder_name, classes=K) for the ResNets: encoder (no fc), decoder, segmentation_head (1x1, x4)."""

  def __init__(self, encoder_name, classes):
    super().__init__()
    self.encoder = make_encoder(encoder_name)
    del self.encoder.fc
    del self.encoder.avgpool
    channels = (3, 64) + tuple(c * self.encoder.layer1[0].expansion for c in (64, 128, 256, 512))
    self.decoder = FPNDecoder(channels)
    self.segmentation_head = nn.Sequential(nn.Conv2d(128, classes, kernel_size=1),
                                           nn.UpsamplingBilinear2d(scale_factor=4))

  def forward(self, x):
    features = [x] + self.encoder.features(x)
    return self.segmentation_head(self.decoder(*features))


# ---- segmentation_models_pytorch 0.6's DeepLabV3Plus (separable ASPP and decoder), with its module names. ----


def smp_make_dilated_(encoder, output_stride):
  """smp's EncoderMixin.make_dilated for the ResNets: every conv of layer4 (and layer3 at 8) loses its stride
  and takes dilation stage_stride // output_stride (padding k//2 * dilation)."""
  stages = {16: encoder.layer3, 32: encoder.layer4}
  for stage_stride, stage in stages.items():
    if stage_stride <= output_stride:
      continue
    rate = stage_stride // output_stride
    for mod in stage.modules():
      if isinstance(mod, nn.Conv2d):
        mod.stride = (1, 1)
        mod.dilation = (rate, rate)
        kh, kw = mod.kernel_size
        mod.padding = ((kh // 2) * rate, (kw // 2) * rate)
  return encoder


class SeparableConv2d(nn.Sequential):

  def __init__(self, in_channels, out_channels, kernel_size, padding=0, dilation=1, bias=True):
    super().__init__(
        nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation, groups=in_channels,
                  bias=False),
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias))


class ASPPPooling(nn.Sequential):

  def __init__(self, in_channels, out_channels):
    super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                     nn.BatchNorm2d(out_channels), nn.ReLU())

  def forward(self, x):
    size = x.shape[-2:]
    for mod in self:
      x = mod(x)
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class ASPP(nn.Module):

  def __init__(self, in_channels, out_channels, atrous_rates, dropout=0.5):
    super().__init__()
    modules = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                             nn.ReLU())]
    for rate in atrous_rates:
      modules.append(nn.Sequential(
          SeparableConv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
          nn.BatchNorm2d(out_channels), nn.ReLU()))
    modules.append(ASPPPooling(in_channels, out_channels))
    self.convs = nn.ModuleList(modules)
    self.project = nn.Sequential(nn.Conv2d(5 * out_channels, out_channels, 1, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(dropout))

  def forward(self, x):
    return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabV3PlusDecoder(nn.Module):

  def __init__(self, encoder_channels, out_channels, atrous_rates, output_stride):
    super().__init__()
    self.aspp = nn.Sequential(ASPP(encoder_channels[-1], out_channels, atrous_rates),
                              SeparableConv2d(out_channels, out_channels, 3, padding=1, bias=False),
                              nn.BatchNorm2d(out_channels), nn.ReLU())
    self.up = nn.Upsample(mode='bilinear', scale_factor=4 if output_stride == 16 else 2, align_corners=True)
    self.block1 = nn.Sequential(nn.Conv2d(encoder_channels[2], 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
    self.block2 = nn.Sequential(SeparableConv2d(48 + out_channels, out_channels, 3, padding=1, bias=False),
                                nn.BatchNorm2d(out_channels), nn.ReLU())

  def forward(self, features):
    x = self.up(self.aspp(features[-1]))
    return self.block2(torch.cat([x, self.block1(features[2])], dim=1))


class DeepLabV3Plus(nn.Module):
  """smp.DeepLabV3Plus(encoder_name, classes=K, encoder_output_stride, decoder_atrous_rates) for the ResNets."""

  def __init__(self, encoder_name, classes, output_stride=16, atrous_rates=(12, 24, 36)):
    super().__init__()
    self.encoder = smp_make_dilated_(make_encoder(encoder_name), output_stride)
    del self.encoder.fc
    del self.encoder.avgpool
    channels = (3, 64) + tuple(c * self.encoder.layer1[0].expansion for c in (64, 128, 256, 512))
    self.decoder = DeepLabV3PlusDecoder(channels, 256, atrous_rates, output_stride)
    self.segmentation_head = nn.Sequential(nn.Conv2d(256, classes, kernel_size=1),
                                           nn.Upsample(mode='bilinear', scale_factor=4, align_corners=True))

  def forward(self, x):
    return self.segmentation_head(self.decoder([x] + self.encoder.features(x)))


# ---- jaxseg's plain UNet and FCN, and its train step (benchmarks/bench_train.py's PyTorch side). ----
# BatchNorm: Flax's momentum 0.9 is PyTorch's 0.1, epsilon 1e-5 in both (PyTorch's defaults).


def pad_to_multiple(x, multiple):
  """Zero-pads NCHW input at the bottom/right to a multiple of `multiple`, as jaxseg; returns it and (H, W)."""
  h, w = x.shape[-2:]
  return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple)), (h, w)


def conv_relu(in_channels, out_channels, kernel_size, norm):
  """jaxseg's conv -> norm -> ReLU: Conv2dReLU for norm 'batch' (conv without bias), conv with bias -> ReLU for 'none'."""
  if norm == 'batch':
    return Conv2dReLU(in_channels, out_channels, kernel_size)
  return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                       nn.ReLU(inplace=True))


class UNet(nn.Module):
  """jaxseg.models.UNet(norm='batch', upsample='transpose'): images [N, C, H, W] -> logits [N, K, H, W]."""

  def __init__(self, num_classes, base_width=64, depth=4, in_channels=3):
    super().__init__()
    self.depth = depth
    widths = [base_width * 2 ** level for level in range(depth + 1)]
    double = lambda cin, cout: nn.Sequential(conv_relu(cin, cout, 3, 'batch'), conv_relu(cout, cout, 3, 'batch'))
    self.enc = nn.ModuleList([double(cin, cout) for cin, cout in zip([in_channels] + widths[:-1], widths)])
    self.up = nn.ModuleList([nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in widths[:-1]])  # Index = level.
    self.dec = nn.ModuleList([double(2 * w, w) for w in widths[:-1]])
    self.head = nn.Conv2d(base_width, num_classes, 1)

  def forward(self, x):
    x, (h, w) = pad_to_multiple(x, 2 ** self.depth)
    skips = []
    for level, block in enumerate(self.enc):
      if level:
        skips.append(x)
        x = F.max_pool2d(x, 2)
      x = block(x)
    for level in reversed(range(self.depth)):
      x = self.dec[level](torch.cat([skips[level], self.up[level](x)], dim=1))
    return self.head(x)[:, :, :h, :w]


class FCN(nn.Module):
  """jaxseg.models.FCN (VGG16 x width_multiplier, fc6/fc7 as convolutions, norm 'none' or 'batch'): NCHW -> logits.

  The 2x up-samplings are ConvTranspose2d(k=4, s=2, padding=1): Flax's ConvTranspose 'SAME' (k=4, s=2); the final
  up-sampling F.interpolate(align_corners=False) is jax.image.resize's 'bilinear' when up-sampling.
  """

  def __init__(self, num_classes, variant='fcn8s', width_multiplier=1.0, fc_width=4096, fc6_kernel=7,
               dropout_rate=0.5, norm='none', in_channels=3):
    super().__init__()
    self.variant, self.dropout_rate = variant, dropout_rate
    self.blocks, block, widths, c = nn.ModuleList(), nn.ModuleList(), [], in_channels
    for v in VGG16_CFG:
      if v == 'M':
        self.blocks.append(block)
        widths.append(c)
        block = nn.ModuleList()
      else:
        feats = max(1, int(round(v * width_multiplier)))  # Python's round, as jaxseg's.
        block.append(conv_relu(c, feats, 3, norm))
        c = feats
    self.fc6 = conv_relu(c, fc_width, fc6_kernel, norm)
    self.fc7 = conv_relu(fc_width, fc_width, 1, norm)
    self.score_fr = nn.Conv2d(fc_width, num_classes, 1)
    up2 = lambda: nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
    if variant in ('fcn16s', 'fcn8s'):
      self.upscore2, self.score_pool4 = up2(), nn.Conv2d(widths[3], num_classes, 1)
    if variant == 'fcn8s':
      self.upscore_pool4, self.score_pool3 = up2(), nn.Conv2d(widths[2], num_classes, 1)

  def forward(self, x):
    x, (h, w) = pad_to_multiple(x, 32)
    pools = []
    for block in self.blocks:
      for layer in block:
        x = layer(x)
      x = F.max_pool2d(x, 2)
      pools.append(x)
    x = F.dropout(self.fc6(x), self.dropout_rate, self.training)
    x = F.dropout(self.fc7(x), self.dropout_rate, self.training)
    score, stride = self.score_fr(x), 32
    if self.variant in ('fcn16s', 'fcn8s'):
      score, stride = self.upscore2(score) + self.score_pool4(pools[3]), 16
    if self.variant == 'fcn8s':
      score, stride = self.upscore_pool4(score) + self.score_pool3(pools[2]), 8
    return F.interpolate(score, scale_factor=stride, mode='bilinear', align_corners=False)[:, :, :h, :w]


class UperNet(nn.Module):
  """transformers' UperNetForSemanticSegmentation on ConvNeXt (random weights, built from a config): logits only."""

  def __init__(self, encoder, num_classes, auxiliary_head=False):
    super().__init__()
    import transformers  # pylint: disable=g-import-not-at-top
    from jaxseg.models.encoders.convnext import ARCHS  # pylint: disable=g-import-not-at-top
    arch = ARCHS[encoder]
    backbone = transformers.ConvNextConfig(out_features=['stage1', 'stage2', 'stage3', 'stage4'],
                                           hidden_sizes=list(arch['dims']), depths=list(arch['depths']))
    self.model = transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=backbone, num_labels=num_classes, use_auxiliary_head=auxiliary_head))

  def forward(self, x):
    return self.model(x).logits


def hf_segformer_config(encoder: str, num_classes: int = 150):
  """transformers' SegformerConfig of MiT `encoder` (jaxseg's mit_b0 .. mit_b5) and its head."""
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxseg.models.encoders import mit  # pylint: disable=g-import-not-at-top
  arch = mit.ARCHS[encoder]
  return transformers.SegformerConfig(
      hidden_sizes=list(arch['dims']), depths=list(arch['depths']), num_labels=num_classes,
      decoder_hidden_size=mit.ENCODERS[encoder].decoder_defaults['segformer']['channels'])


def hf_segformer_state_dict(encoder: str, num_classes=None) -> dict:
  """A random SegFormer's file as transformers writes it (save_pretrained; the published key names): the
  ImageNet classification model (nvidia/mit-bN) when num_classes is None, else the segmentation model."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = hf_segformer_config(encoder, num_classes or 1000)
  cls = (transformers.SegformerForImageClassification if num_classes is None
         else transformers.SegformerForSemanticSegmentation)
  with tempfile.TemporaryDirectory() as d:
    cls(config).save_pretrained(d)
    return safetensors.torch.load_file(os.path.join(d, 'model.safetensors'))


class Segformer(nn.Module):
  """transformers' SegformerForSemanticSegmentation (random weights), its stride-4 logits resized to the input
  (bilinear, align_corners=False) as its loss does."""

  def __init__(self, encoder, num_classes):
    super().__init__()
    import transformers  # pylint: disable=g-import-not-at-top
    self.model = transformers.SegformerForSemanticSegmentation(hf_segformer_config(encoder, num_classes))

  def forward(self, x):
    return F.interpolate(self.model(x).logits, size=x.shape[-2:], mode='bilinear', align_corners=False)


class DinoV2DPT(nn.Module):
  """DPT on a DINOv2 ViT as transformers computes it (random weights): Dinov2Backbone (blocks 3, 6, 9, 12, final
  LayerNorm, tokens), DPTNeck as DPTForDepthEstimation runs it on a backbone, DPTSemanticSegmentationHead, and the
  logits resized to the input (bilinear, align_corners=False) as DPTForSemanticSegmentation's loss does."""

  def __init__(self, encoder, num_classes):
    super().__init__()
    import transformers  # pylint: disable=g-import-not-at-top
    from transformers.models.dpt import modeling_dpt  # pylint: disable=g-import-not-at-top
    from jaxseg.models.encoders import vit  # pylint: disable=g-import-not-at-top
    arch = vit.ARCHS[encoder]
    backbone = transformers.Dinov2Config(
        hidden_size=arch['dim'], num_hidden_layers=arch['depth'], num_attention_heads=arch['heads'],
        image_size=518, patch_size=14, out_indices=[i + 1 for i in vit.OUT_BLOCKS], apply_layernorm=True,
        reshape_hidden_states=False)
    width = arch['dim']
    config = transformers.DPTConfig(backbone_config=backbone, num_labels=num_classes,
                                    neck_hidden_sizes=[width // 8, width // 4, width // 2, width])
    self.backbone = transformers.Dinov2Backbone(backbone)
    self.neck = modeling_dpt.DPTNeck(config)
    self.head = modeling_dpt.DPTSemanticSegmentationHead(config)
    # Parameters transformers keeps but never uses here, which jaxseg's model does not have: the mask token (masked
    # pretraining only) and the first fusion layer's residual unit (it has no coarser level to add).
    del self.backbone.embeddings.mask_token
    del self.neck.fusion_stage.layers[0].residual_layer1

  def forward(self, x):
    height, width = x.shape[-2:]
    tokens = self.backbone(x).feature_maps
    logits = self.head(self.neck(tokens, height // 14, width // 14))
    return F.interpolate(logits, size=(height, width), mode='bilinear', align_corners=False)


def jaxseg_peer(model: dict, num_classes: int) -> nn.Module:
  """The PyTorch peer of jaxseg's config.model (as a dict); ValueError for a model without one."""
  if model['name'] == 'fpn' and model.get('encoder') in RESNETS:
    return FPN(model['encoder'], num_classes)
  if model['name'] == 'upernet' and str(model.get('encoder')).startswith('convnext_'):
    return UperNet(model['encoder'], num_classes, bool(model.get('auxiliary_head')))
  if model['name'] == 'segformer' and str(model.get('encoder')).startswith('mit_') and not model.get('channels'):
    return Segformer(model['encoder'], num_classes)
  dpt_defaults = {'readout': 'project', 'neck_hidden_sizes': None, 'fusion_hidden_size': 256,
                  'fusion_batch_norm': False}
  if model['name'] == 'dpt' and str(model.get('encoder')) in ('vit_small_patch14_dinov2', 'vit_base_patch14_dinov2') \
      and all(model.get(k, v) == v for k, v in dpt_defaults.items()):
    return DinoV2DPT(model['encoder'], num_classes)
  if model['name'] == 'unet' and not model.get('encoder') and model.get('norm') == 'batch' and \
      model.get('upsample') == 'transpose':
    return UNet(num_classes, model['base_width'], model['depth'])
  fields = ('variant', 'width_multiplier', 'fc_width', 'fc6_kernel', 'dropout_rate', 'norm')
  if model['name'] == 'fcn' and model.get('norm', 'none') in ('none', 'batch'):
    return FCN(num_classes, **{k: model[k] for k in fields if k in model})
  raise ValueError(f'no PyTorch peer of {model}: the plain UNet (norm batch, upsample transpose), FCN, FPN on a '
                   'ResNet, UPerNet on a ConvNeXt, SegFormer and DPT on a DINOv2 ViT only')


def load_jaxseg_variables(model: nn.Module, variables: dict) -> None:
  """Copies a jaxseg UNet/FCN's variables ({'params', 'batch_stats'} of arrays) into its peer from `jaxseg_peer`."""
  params, stats = variables['params'], variables.get('batch_stats', {})

  def put(tensor, value):
    value = torch.as_tensor(np.array(value, dtype=np.float32))
    if tuple(tensor.shape) != tuple(value.shape):
      raise ValueError(f'shape mismatch: {tuple(tensor.shape)} vs {tuple(value.shape)}')
    with torch.no_grad():
      tensor.copy_(value)

  def conv(layer, p, norm_p=None, norm_s=None):
    """A Conv2d, or conv_relu's Sequential, from Flax conv params (kernel [kh, kw, in, out]) and its norm's."""
    c = layer[0] if isinstance(layer, nn.Sequential) else layer
    put(c.weight, np.asarray(p['kernel']).transpose(3, 2, 0, 1))
    if c.bias is not None:
      put(c.bias, p['bias'])
    if isinstance(layer, nn.Sequential) and isinstance(layer[1], nn.BatchNorm2d):
      for tensor, value in zip((layer[1].weight, layer[1].bias, layer[1].running_mean, layer[1].running_var),
                               (norm_p['scale'], norm_p['bias'], norm_s['mean'], norm_s['var'])):
        put(tensor, value)

  def up(layer, p):
    # Flax's ConvTranspose (and UpConv2x2) correlate the dilated input with the kernel unflipped; PyTorch's
    # ConvTranspose2d scatters, i.e. correlates with the spatially flipped kernel [in, out, kh, kw].
    put(layer.weight, np.asarray(p['kernel'])[::-1, ::-1].transpose(2, 3, 0, 1))
    if layer.bias is not None:
      put(layer.bias, p['bias'])

  if isinstance(model, UNet):
    for name, blocks in (('enc', model.enc), ('dec', model.dec)):
      for level, block in enumerate(blocks):
        p, s = params[f'{name}{level}'], stats[f'{name}{level}']
        for i in range(2):
          conv(block[i], p[f'conv{i}'], p[f'norm{i}'], s[f'norm{i}'])
    for level, layer in enumerate(model.up):
      up(layer, params[f'up{level}'])
    conv(model.head, params['head'])
  elif isinstance(model, FCN):
    named = [(f'conv{b + 1}_{i + 1}', layer) for b, block in enumerate(model.blocks) for i, layer in enumerate(block)]
    for name, layer in named + [('fc6', model.fc6), ('fc7', model.fc7)]:
      conv(layer, params[name], params.get(f'{name}_norm'), stats.get(f'{name}_norm'))
    for name in ('score_fr', 'score_pool4', 'score_pool3'):
      if hasattr(model, name):
        conv(getattr(model, name), params[name])
    for name in ('upscore2', 'upscore_pool4'):
      if hasattr(model, name):
        up(getattr(model, name), params[name])
  else:
    raise TypeError(f'not a jaxseg peer: {type(model).__name__}')


class Trainer:
  """jaxseg's train step in PyTorch, in its fast standard settings, on uint8 batches.

  uint8 images normalised on the device (ImageNet statistics, jaxseg's default), the forward autocast to bfloat16
  when `bf16`, float32 cross-entropy ignoring `ignore_index` (mean over the other pixels), config.optimizer's SGD
  (momentum, L2 weight decay) or AdamW (decoupled weight decay), decay on kernels only (ndim > 1) as jaxseg's
  optimiser, and with `ema_decay` > 0 the moving average of the parameters and BatchNorm statistics that jaxseg
  keeps (decay min(ema_decay, (1 + step) / (10 + step))). channels_last memory format; `compile`: torch.compile.
  """

  def __init__(self, model: nn.Module, device, optimizer: dict, *, bf16: bool, ema_decay: float = 0.0,
               channels_last: bool = True, compile: bool = False, ignore_index: int = 255):  # pylint: disable=redefined-builtin
    self.device, self.bf16, self.ignore_index, self.ema_decay, self.steps = device, bf16, ignore_index, ema_decay, 0
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = model.to(device=device, memory_format=self.memory_format).train()
    groups = [{'params': [p for p in model.parameters() if p.ndim > 1], 'weight_decay': optimizer['weight_decay']},
              {'params': [p for p in model.parameters() if p.ndim <= 1], 'weight_decay': 0.0}]
    if optimizer['name'] == 'adamw':
      self.optimizer = torch.optim.AdamW(groups, lr=optimizer['learning_rate'], betas=(optimizer['b1'], optimizer['b2']),
                                         eps=optimizer['eps'])
    else:
      self.optimizer = torch.optim.SGD(groups, lr=optimizer['learning_rate'], momentum=optimizer['momentum'],
                                       nesterov=optimizer['nesterov'])
    self.live = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    self.ema = [t.detach().clone() for t in self.live] if ema_decay > 0 else None
    self.mean = torch.tensor((123.675, 116.28, 103.53), device=device).view(1, 3, 1, 1)
    self.std = torch.tensor((58.395, 57.12, 57.375), device=device).view(1, 3, 1, 1)
    self.forward = torch.compile(self.model) if compile else self.model

  def prepare_batch(self, images_nhwc_uint8, labels_uint8):
    """numpy uint8 [N, H, W, 3] and [N, H, W] -> device tensors (NCHW in the chosen memory format)."""
    images = torch.as_tensor(images_nhwc_uint8).permute(0, 3, 1, 2).to(self.device)
    return images.contiguous(memory_format=self.memory_format), torch.as_tensor(labels_uint8).to(self.device)

  def step(self, images, labels):
    """One update; returns the loss (on the device, not synchronised)."""
    x = (images.float() - self.mean) / self.std
    with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      logits = self.forward(x)
    loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=self.ignore_index)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    if self.ema is not None:
      decay = min(self.ema_decay, (1 + self.steps) / (10 + self.steps))
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, self.live, 1 - decay)  # pylint: disable=protected-access
    self.steps += 1
    return loss.detach()
