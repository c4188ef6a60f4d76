"""PyTorch peers of jaxseg's UNet and FCN, and a PyTorch train step, for benchmarks/bench_train.py.

The networks are the same as jaxseg/models (same layers, widths, parameter
counts and, given the same weights, the same outputs; see
`load_jaxseg_variables` and tests/test_benchmarks.py):

* UNet: 'same'-padded DoubleConv = (3x3 conv without bias -> BatchNorm ->
  ReLU) x 2, 2x2 max-pooling, ConvTranspose2d(k=2, s=2, bias) up-sampling,
  concatenation [skip, up-sampled], 1x1 head with bias; input zero-padded
  at the bottom/right to a multiple of 2**depth, logits cropped back.
* FCN-8s/16s/32s on VGG16: 3x3 convs with bias + ReLU, 2x2 max-pooling,
  fc6 as a kxk 'same' conv, fc7 1x1, dropout after both, 1x1 score layer,
  zero-initialised 1x1 skip scores, ConvTranspose2d(k=4, s=2, padding=1,
  no bias) bilinear-initialised 2x up-samplings, final fixed bilinear
  up-sampling (`F.interpolate(..., align_corners=False)`, which is what
  `jax.image.resize(..., 'bilinear')` computes when up-sampling); input
  zero-padded to a multiple of 32.

BatchNorm: Flax's momentum 0.9 (running = 0.9 running + 0.1 batch) is
PyTorch's momentum 0.1; epsilon 1e-5 in both. (PyTorch keeps the unbiased
batch variance in its running variance, Flax the biased one: that changes
evaluation statistics slightly, not the cost.)

The train step is what jaxseg's is: uint8 images normalised on the device,
pixel-wise cross-entropy (float32 logits, ignore_index=255, mean over the
non-ignored pixels), SGD with momentum 0.9 and L2 weight decay 1e-4 on the
kernels only (tensors with ndim > 1, as jaxseg/optim.py's mask).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
  """Zero-pads NCHW input at the bottom/right to a multiple of `multiple`; returns it and the original (H, W)."""
  h, w = x.shape[-2:]
  ph, pw = (-h) % multiple, (-w) % multiple
  if ph or pw:
    x = F.pad(x, (0, pw, 0, ph))
  return x, (h, w)


class DoubleConv(nn.Module):
  """(3x3 conv without bias -> BatchNorm -> ReLU) x 2, as jaxseg.models.unet.DoubleConv with norm='batch'."""

  def __init__(self, in_channels: int, features: int):
    super().__init__()
    self.conv0 = nn.Conv2d(in_channels, features, 3, padding=1, bias=False)
    self.norm0 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
    self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=False)
    self.norm1 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)

  def forward(self, x):
    x = F.relu(self.norm0(self.conv0(x)), inplace=True)
    return F.relu(self.norm1(self.conv1(x)), inplace=True)


class UNet(nn.Module):
  """jaxseg.models.UNet(norm='batch', upsample='transpose') in PyTorch: images [N, C, H, W] -> logits [N, K, H, W]."""

  def __init__(self, num_classes: int, base_width: int = 64, depth: int = 4, in_channels: int = 3):
    super().__init__()
    self.depth = depth
    self.enc = nn.ModuleList()
    self.enc.append(DoubleConv(in_channels, base_width))
    for level in range(1, depth + 1):
      self.enc.append(DoubleConv(base_width * 2 ** (level - 1), base_width * 2 ** level))
    self.up = nn.ModuleList()
    self.dec = nn.ModuleList()
    for level in range(depth):  # Index = level; applied from the deepest level up.
      feats = base_width * 2 ** level
      self.up.append(nn.ConvTranspose2d(2 * feats, feats, 2, stride=2, bias=True))
      self.dec.append(DoubleConv(2 * feats, feats))
    self.head = nn.Conv2d(base_width, num_classes, 1, bias=True)

  def forward(self, x):
    x, (h, w) = pad_to_multiple(x, 2 ** self.depth)
    skips = []
    x = self.enc[0](x)
    for level in range(1, self.depth + 1):
      skips.append(x)
      x = F.max_pool2d(x, 2)
      x = self.enc[level](x)
    for level in reversed(range(self.depth)):
      x = self.up[level](x)
      x = torch.cat([skips[level], x], dim=1)
      x = self.dec[level](x)
    x = self.head(x)
    return x[:, :, :h, :w]


def bilinear_weight_(weight: torch.Tensor) -> torch.Tensor:
  """Fills a ConvTranspose2d weight [C, C, k, k] with per-channel bilinear up-sampling (the FCN paper's init)."""
  c_in, c_out, k, _ = weight.shape
  factor = (k + 1) // 2
  center = factor - 1 if k % 2 == 1 else factor - 0.5
  og = torch.arange(k, dtype=torch.float32)
  filt1d = 1 - (og - center).abs() / factor
  filt = filt1d[:, None] * filt1d[None, :]
  with torch.no_grad():
    weight.zero_()
    for c in range(min(c_in, c_out)):
      weight[c, c].copy_(filt)
  return weight


class FCN(nn.Module):
  """jaxseg.models.FCN in PyTorch: images [N, C, H, W] -> logits [N, K, H, W]."""

  def __init__(self, num_classes: int, variant: str = 'fcn8s', width_multiplier: float = 1.0,
               fc_width: int = 4096, fc6_kernel: int = 7, dropout_rate: float = 0.5, in_channels: int = 3):
    super().__init__()
    if variant not in ('fcn32s', 'fcn16s', 'fcn8s'):
      raise ValueError(f'unknown FCN variant {variant!r}')
    self.variant = variant
    self.blocks = nn.ModuleList()
    widths = []
    c = in_channels
    for n_convs, width in VGG16_BLOCKS:
      feats = max(1, int(round(width * width_multiplier)))  # Python's round, as jaxseg's.
      block = nn.ModuleList()
      for _ in range(n_convs):
        block.append(nn.Conv2d(c, feats, 3, padding=1, bias=True))
        c = feats
      self.blocks.append(block)
      widths.append(feats)
    self.fc6 = nn.Conv2d(c, fc_width, fc6_kernel, padding='same', bias=True)
    self.fc7 = nn.Conv2d(fc_width, fc_width, 1, bias=True)
    self.dropout_rate = dropout_rate
    self.score_fr = nn.Conv2d(fc_width, num_classes, 1, bias=True)

    def up2():
      # Flax ConvTranspose(k=4, s=2, 'SAME') pads the dilated input by 2 on each side: PyTorch's padding=1.
      layer = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
      bilinear_weight_(layer.weight)
      return layer

    def skip_score(channels):
      layer = nn.Conv2d(channels, num_classes, 1, bias=True)
      nn.init.zeros_(layer.weight)
      nn.init.zeros_(layer.bias)
      return layer

    if variant in ('fcn16s', 'fcn8s'):
      self.upscore2 = up2()
      self.score_pool4 = skip_score(widths[3])
    if variant == 'fcn8s':
      self.upscore_pool4 = up2()
      self.score_pool3 = skip_score(widths[2])

  def forward(self, x):
    x, (h, w) = pad_to_multiple(x, 32)
    pools = []
    for block in self.blocks:
      for conv in block:
        x = F.relu(conv(x), inplace=True)
      x = F.max_pool2d(x, 2)
      pools.append(x)
    pool3, pool4 = pools[2], pools[3]
    x = F.dropout(F.relu(self.fc6(x), inplace=True), self.dropout_rate, self.training)
    x = F.dropout(F.relu(self.fc7(x), inplace=True), self.dropout_rate, self.training)
    score = self.score_fr(x)
    stride = 32
    if self.variant in ('fcn16s', 'fcn8s'):
      score = self.upscore2(score) + self.score_pool4(pool4)
      stride = 16
    if self.variant == 'fcn8s':
      score = self.upscore_pool4(score) + self.score_pool3(pool3)
      stride = 8
    score = F.interpolate(score, scale_factor=stride, mode='bilinear', align_corners=False)
    return score[:, :, :h, :w]


def build_model(kind: str, num_classes: int, **kwargs) -> nn.Module:
  """'unet' (base_width, depth) or 'fcn' (variant, width_multiplier, fc_width, fc6_kernel, dropout_rate)."""
  if kind == 'unet':
    return UNet(num_classes, **kwargs)
  if kind == 'fcn':
    return FCN(num_classes, **kwargs)
  raise ValueError(f'unknown model kind {kind!r}')


def param_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def meta_param_count(kind: str, num_classes: int, **kwargs) -> int:
  """Parameter count without allocating the weights (built on the meta device)."""
  with torch.device('meta'):
    return param_count(build_model(kind, num_classes, **kwargs))


# ---------------------------------------------------------------------------
# Weights from jaxseg (for the equivalence test).
# ---------------------------------------------------------------------------


def _conv_weight(kernel):
  """Flax conv kernel [kh, kw, in, out] -> PyTorch [out, in, kh, kw]."""
  return torch.as_tensor(kernel).permute(3, 2, 0, 1)


def _conv_transpose_weight(kernel):
  """Flax transposed-conv kernel [kh, kw, in, out] -> PyTorch ConvTranspose2d [in, out, kh, kw].

  `flax.linen.ConvTranspose` (transpose_kernel=False), and jaxseg's UpConv2x2
  which computes the same function, correlate the dilated input with the
  kernel unflipped; PyTorch's ConvTranspose2d scatters, which is the
  correlation with the spatially flipped kernel.
  """
  return torch.flip(torch.as_tensor(kernel), dims=(0, 1)).permute(2, 3, 0, 1)


def load_jaxseg_variables(model: nn.Module, variables: dict) -> None:
  """Copies a jaxseg UNet/FCN's variables ({'params', 'batch_stats'} of numpy arrays) into the PyTorch peer."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  params = variables['params']
  stats = variables.get('batch_stats', {})
  arr = lambda x: np.array(x, dtype=np.float32)

  def set_(tensor, value):
    value = torch.as_tensor(arr(value)) if not isinstance(value, torch.Tensor) else value
    if tuple(tensor.shape) != tuple(value.shape):
      raise ValueError(f'shape mismatch: {tuple(tensor.shape)} vs {tuple(value.shape)}')
    with torch.no_grad():
      tensor.copy_(value)

  def set_double(block: DoubleConv, p, s):
    for i in range(2):
      set_(getattr(block, f'conv{i}').weight, _conv_weight(arr(p[f'conv{i}']['kernel'])))
      norm = getattr(block, f'norm{i}')
      set_(norm.weight, p[f'norm{i}']['scale'])
      set_(norm.bias, p[f'norm{i}']['bias'])
      set_(norm.running_mean, s[f'norm{i}']['mean'])
      set_(norm.running_var, s[f'norm{i}']['var'])

  if isinstance(model, UNet):
    for level in range(model.depth + 1):
      set_double(model.enc[level], params[f'enc{level}'], stats[f'enc{level}'])
    for level in range(model.depth):
      set_(model.up[level].weight, _conv_transpose_weight(arr(params[f'up{level}']['kernel'])))
      set_(model.up[level].bias, params[f'up{level}']['bias'])
      set_double(model.dec[level], params[f'dec{level}'], stats[f'dec{level}'])
    set_(model.head.weight, _conv_weight(arr(params['head']['kernel'])))
    set_(model.head.bias, params['head']['bias'])
  elif isinstance(model, FCN):
    for b, block in enumerate(model.blocks):
      for i, conv in enumerate(block):
        p = params[f'conv{b + 1}_{i + 1}']
        set_(conv.weight, _conv_weight(arr(p['kernel'])))
        set_(conv.bias, p['bias'])
    for name in ('fc6', 'fc7', 'score_fr', 'score_pool4', 'score_pool3'):
      if hasattr(model, name):
        set_(getattr(model, name).weight, _conv_weight(arr(params[name]['kernel'])))
        set_(getattr(model, name).bias, params[name]['bias'])
    for name in ('upscore2', 'upscore_pool4'):
      if hasattr(model, name):
        set_(getattr(model, name).weight, _conv_transpose_weight(arr(params[name]['kernel'])))
  else:
    raise TypeError(f'not a jaxseg peer: {type(model).__name__}')


# ---------------------------------------------------------------------------
# Train step.
# ---------------------------------------------------------------------------


# ImageNet statistics on the 0..255 scale, as jaxseg/data/augment.py.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def make_optimizer(model: nn.Module, learning_rate: float = 0.05, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.Optimizer:
  """SGD with momentum; L2 weight decay on kernels (ndim > 1) only, as jaxseg/optim.py."""
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.SGD([{'params': decay, 'weight_decay': weight_decay},
                          {'params': no_decay, 'weight_decay': 0.0}], lr=learning_rate, momentum=momentum)


class Trainer:
  """Model + optimiser + one train step on a uint8 batch, in PyTorch's fast standard settings.

  Args:
    model: a UNet or FCN above (moved to `device` here).
    device: torch.device.
    bf16: autocast the forward (and so the backward) to bfloat16; the loss is float32.
    channels_last: NHWC memory format for the model and the input (faster convolutions on CPU and tensor cores).
    compile: wrap the model in `torch.compile` (default mode).
  """

  def __init__(self, model: nn.Module, device: torch.device, *, bf16: bool, channels_last: bool = True,
               compile: bool = False, ignore_index: int = 255):  # pylint: disable=redefined-builtin
    self.device = device
    self.bf16 = bf16
    self.ignore_index = ignore_index
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = model.to(device=device, memory_format=self.memory_format)
    self.model.train()
    self.optimizer = make_optimizer(self.model)
    self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    self.forward = torch.compile(self.model) if compile else self.model

  def prepare_batch(self, images_nhwc_uint8, labels_uint8):
    """numpy uint8 [N, H, W, 3] and [N, H, W] -> device tensors (NCHW view in the chosen memory format)."""
    images = torch.as_tensor(images_nhwc_uint8).permute(0, 3, 1, 2).to(self.device)
    images = images.contiguous(memory_format=self.memory_format)
    labels = torch.as_tensor(labels_uint8).to(self.device)
    return images, labels

  def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One SGD step; returns the (device) loss without synchronising."""
    x = (images.float() - self.mean) / self.std
    with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      logits = self.forward(x)
    loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=self.ignore_index)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss.detach()


def forward_flops_per_image(model: nn.Module, image_size: tuple[int, int]) -> Optional[float]:
  """PyTorch's own count (torch.utils.flop_counter) of one image's forward, as a cross-check; None if unavailable."""
  try:
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  was_training = model.training
  model.eval()
  x = torch.zeros((1, 3) + tuple(image_size))
  counter = FlopCounterMode(display=False)
  with counter, torch.no_grad():
    model(x)
  model.train(was_training)
  return float(counter.get_total_flops())


__all__ = ['UNet', 'FCN', 'Trainer', 'build_model', 'param_count', 'meta_param_count', 'load_jaxseg_variables',
           'forward_flops_per_image', 'make_optimizer']
