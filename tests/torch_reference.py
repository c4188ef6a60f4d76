"""Plain torch.nn references for jaxseg's encoders and UNet decoder, with the real libraries' parameter names.

torchvision cannot be imported next to the CPU build of torch that CI installs (its compiled extension), so
the tests use these instead: torchvision's ResNet (BasicBlock, Bottleneck, replace_stride_with_dilation)
and VGG (`features` Sequential with the same indices, avgpool, classifier), and smp 0.6's Unet decoder
(DecoderBlock of two Conv2dReLU, SegmentationHead), written from those libraries' code with the same module
names, so that their state dicts have torchvision's / smp's keys and shapes (tests/test_encoders.py pins
resnet18's and VGG's key lists, and smp's parameter counts).

Deviation, deliberate: torchvision's BasicBlock refuses dilation; here (as in jaxseg) a dilated stage's first
BasicBlock keeps the previous dilation in conv1 (the conv that held the stride) and uses the stage's in conv2.
"""

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
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.in_features) ** 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
  return model.eval()


# ---- segmentation_models_pytorch 0.6's Unet (center off, BatchNorm), with its module names. ----


class Conv2dReLU(nn.Sequential):
  """smp.base.modules.Conv2dReLU with BatchNorm: conv (no bias), BN, ReLU -> keys '0.weight', '1.weight', ..."""

  def __init__(self, in_channels, out_channels):
    super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                     nn.ReLU(inplace=True))


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
