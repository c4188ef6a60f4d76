"""Layers shared by the segmentation models.

The formulations here compute the same functions as the textbook layers but
are chosen for speed under XLA (see benchmarks/NOTES.md for measurements).
"""

import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling with stride 2 on NHWC input (H and W even).

  Written as a reshape and a max over the two window axes: the same function
  as `nn.max_pool(x, (2, 2), (2, 2))`, but its gradient is a cheap
  elementwise select instead of XLA's generic select-and-scatter.
  """
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def depth_to_space_2x2(x: jnp.ndarray, features: int) -> jnp.ndarray:
  """[N, H, W, 2*2*F] -> [N, 2H, 2W, F], channel block (dy, dx) to pixel (2y+dy, 2x+dx)."""
  n, h, w, _ = x.shape
  x = x.reshape(n, h, w, 2, 2, features)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, 2 * h, 2 * w, features)


class UpConv2x2(nn.Module):
  """Transposed convolution with kernel 2 and stride 2 (the UNet up-convolution).

  Kernel 2 with stride 2 means the output windows never overlap: each input
  pixel writes its own 2x2 output block. That is a 1x1 convolution to 4*F
  channels followed by depth-to-space, which XLA runs (forward and backward)
  as one plain matrix product. Parameters have the layout and count of
  `nn.ConvTranspose(F, (2, 2), strides=(2, 2))`: kernel [2, 2, C_in, F] and
  bias [F], and the same outputs for the same parameters.
  """
  features: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_features = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (2, 2, in_features, self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # nn.ConvTranspose (lax.conv_transpose, untransposed kernel) writes input pixel y to
    # output 2y+dy with kernel[1-dy]: flip, then flatten [C_in, dy, dx, F] so that the
    # output channel index is (dy, dx, f).
    w = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(in_features, 4 * self.features)
    y = jnp.einsum('nhwc,cd->nhwd', x, w)
    return depth_to_space_2x2(y, self.features) + bias


class PatchMatmulConv(nn.Module):
  """A stride-1 'SAME' convolution computed as one matrix product over the input's neighbourhoods.

  For a kernel larger than its input map: FCN's fc6 (7x7, 4096 channels) on the 4x4 or smaller pool5 maps of
  small images. XLA:CPU hands such a convolution (forward and input gradient) to Eigen's generic kernel,
  which ran fc6 at ~1.5 GFLOP/s; here it is `patches [N*H*W, taps*C] @ kernel [taps*C, F]`, a matrix product
  (see benchmarks/NOTES.md). Kernel taps that only ever see the zero padding are skipped, which does not
  change the result. Parameters have nn.Conv's names, shapes and initialisers: the same parameters give the
  same outputs as `nn.Conv(features, kernel_size, padding='SAME')`.
  """
  features: int
  kernel_size: tuple[int, int]
  use_bias: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    (kh, kw), (_, h, w, c) = self.kernel_size, x.shape
    kernel = self.param('kernel', self.kernel_init, (kh, kw, c, self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # 'SAME' pads (k - 1) // 2 before. Output i reads input i + t - pad for tap t, so tap t touches the
    # image for some output iff pad - (size - 1) <= t <= pad + (size - 1).
    taps = []
    for k, size in ((kh, h), (kw, w)):
      pad = (k - 1) // 2
      first, last = max(0, pad - size + 1), min(k - 1, pad + size - 1)
      taps.append((first, last + 1, pad))
    (y0, y1, pad_y), (x0, x1, pad_x) = taps
    xp = jnp.pad(x, ((0, 0), (pad_y - y0, y1 - 1 - pad_y), (pad_x - x0, x1 - 1 - pad_x), (0, 0)))
    patches = jnp.concatenate([xp[:, dy:dy + h, dx:dx + w] for dy in range(y1 - y0) for dx in range(x1 - x0)],
                              axis=-1)  # channel index (dy, dx, c), the order of the kernel's reshape
    used = kernel[y0:y1, x0:x1].reshape(-1, self.features)
    y = jnp.einsum('nhwk,kf->nhwf', patches, used)
    return y + bias if bias is not None else y


class Conv(nn.Conv):
  """nn.Conv (same fields, parameters and function) whose 1x1, stride-1, ungrouped, unpadded convolutions are one
  matrix product over the channels.

  XLA:CPU runs a 1x1 convolution's backward pass ~10x slower than the same product as a matmul (a [2, 128, 128,
  1024] -> 256 layer: 5.7 s against 0.59 s forward and backward; benchmarks/NOTES.md). Every model builds its
  convolutions with this class, so the decoders' 1x1 laterals, projections and classifiers and ResNet's
  bottleneck convolutions take the fast path, and their parameters ([1, 1, in, out] kernels) stay nn.Conv's.
  """

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    if not self._pointwise():
      return super().__call__(inputs)
    in_features = inputs.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (1, 1, in_features, self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = jnp.einsum('...c,cd->...d', inputs, kernel[0, 0], precision=self.precision)
    return y if bias is None else y + bias

  def _pointwise(self) -> bool:
    size = self.kernel_size if isinstance(self.kernel_size, (tuple, list)) else (self.kernel_size,)
    strides = self.strides if isinstance(self.strides, (tuple, list)) else (self.strides or 1,) * len(size)
    padding = self.padding
    unpadded = (padding in ('SAME', 'VALID', 0) or
                (isinstance(padding, (tuple, list)) and all(tuple(p) == (0, 0) for p in padding)))
    return (all(k == 1 for k in size) and all(s == 1 for s in strides) and self.feature_group_count == 1
            and self.input_dilation in (None, 1) and self.mask is None and unpadded)


class DepthwiseConv(nn.Module):
  """A depthwise k x k convolution, stride 1, 'same' padding (k // 2 each side), + bias: nn.Conv(C, (k, k),
  feature_group_count=C) with the same parameters (kernel [k, k, 1, C], bias [C]) and the same function.

  Computed as the sum of the k*k shifted copies of the padded input, each times its per-channel weight: on
  XLA:CPU that is 4x (7x7) to 9x (3x3) faster forward and backward than the grouped convolution (ConvNeXt's and
  Mix-FFN's depthwise layers; benchmarks/NOTES.md), and XLA fuses it into one loop on any platform.
  """
  features: int
  kernel_size: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Optional[Dtype] = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, 1, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pad = k // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    out = bias
    for i in range(k):
      for j in range(k):
        out = out + padded[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
    return out


def bilinear_kernel_init(key, shape, dtype=jnp.float32):
  """Initialises a [k, k, C, C] transposed-conv kernel to bilinear up-sampling per channel (FCN paper)."""
  del key
  k, _, c_in, c_out = shape
  factor = (k + 1) // 2
  center = factor - 1 if k % 2 == 1 else factor - 0.5
  og = jnp.arange(k, dtype=jnp.float32)
  filt1d = 1 - jnp.abs(og - center) / factor
  filt = filt1d[:, None] * filt1d[None, :]
  eye = jnp.eye(c_in, c_out, dtype=jnp.float32)
  return (filt[:, :, None, None] * eye[None, None]).astype(dtype)


def make_norm(norm: str, *, train: bool, dtype: Optional[Dtype]) -> Callable[..., nn.Module]:
  """Returns a constructor for the configured normalisation layer ('batch', 'group' or 'none')."""
  if norm == 'batch':
    # The step runs on global arrays, so the statistics are over the global
    # batch, whatever the number of devices (XLA adds the cross-device sums).
    return lambda name=None: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)
  if norm == 'group':
    return lambda name=None: nn.GroupNorm(num_groups=None, group_size=8, dtype=dtype, name=name)
  if norm == 'none':
    return lambda name=None: (lambda x: x)
  raise ValueError(f"model.norm must be 'batch', 'group' or 'none', got {norm!r}")


def pad_to_multiple(x: jnp.ndarray, multiple: int) -> tuple[jnp.ndarray, tuple[int, int]]:
  """Zero-pads NHWC input at the bottom/right to a multiple of `multiple`; returns it and the original (H, W)."""
  _, h, w, _ = x.shape
  ph, pw = (-h) % multiple, (-w) % multiple
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return x, (h, w)


# ---- Resampling as the PyTorch references do it. ----


def upsample_nearest_2x(x: jnp.ndarray) -> jnp.ndarray:
  """[N, H, W, C] -> [N, 2H, 2W, C], each pixel copied into its 2x2 block (torch's interpolate 'nearest', x2)."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return x.reshape(n, 2 * h, 2 * w, c)


def _align_corners_matrix(n_in, n_out, dtype) -> jnp.ndarray:
  """[n_out, n_in] linear-interpolation weights of torch's bilinear resize with align_corners=True.

  Output i reads source position s_i = i (n_in - 1) / (n_out - 1) with the tent weights max(0, 1 - |s_i - j|),
  written with jnp so that the sizes may be symbolic (an export for any image size); n_in = 1 gives weight 1.
  """
  src = jnp.arange(n_out, dtype=jnp.float32) * (jnp.asarray(n_in - 1, jnp.float32)
                                                / jnp.maximum(jnp.asarray(n_out - 1, jnp.float32), 1.0))
  taps = jnp.arange(n_in, dtype=jnp.float32)
  return jnp.maximum(0.0, 1.0 - jnp.abs(src[:, None] - taps[None, :])).astype(dtype)


def upsample_bilinear_align_corners(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """[N, H, W, C] -> [N, factor*H, factor*W, C]: torch's bilinear up-sampling with align_corners=True.

  smp's nn.UpsamplingBilinear2d and F.interpolate(..., align_corners=True); jax.image.resize's 'linear' is
  align_corners=False (half-pixel centres).
  """
  _, h, w, _ = x.shape
  mh = _align_corners_matrix(h, factor * h, x.dtype)
  mw = _align_corners_matrix(w, factor * w, x.dtype)
  return jnp.einsum('ph,nhwc,qw->npqc', mh, x, mw)


def resize_bilinear(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """[N, H, W, C] -> [N, *size, C]: torch's F.interpolate(size=..., mode='bilinear', align_corners=False).

  Half-pixel centres, two taps per output pixel also when shrinking (no anti-aliasing, as torch). Sides enlarged
  by powers of two (the decoders' 2x, 4x, 8x) go through `_upsample_axis_by`; other sizes through
  jax.image.resize, whose dense [out, in] weight matrix costs `in` times more than two taps. (Powers of two only:
  there torch's source positions, (dst + 0.5) / s - 0.5 in float32, are exact; for a factor of 3 torch's own
  rounding moves them by ~1e-5, which jax.image.resize reproduces and exact weights would not.)
  """
  n, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  fh, fw = size[0] // h, size[1] // w
  if (fh * h, fw * w) == tuple(size) and _power_of_two(fh) and _power_of_two(fw):
    return _upsample_axis_by(_upsample_axis_by(x, fh, 1), fw, 2)
  return jax.image.resize(x, (n, *size, c), method='linear', antialias=False).astype(x.dtype)


def _power_of_two(k: int) -> bool:
  return isinstance(k, int) and k >= 1 and k & (k - 1) == 0  # A symbolic factor (an export for any size): no.


def _upsample_axis_by(x: jnp.ndarray, factor: int, axis: int) -> jnp.ndarray:
  """Axis `axis` enlarged `factor` times as torch's bilinear (align_corners=False) does it, with two taps.

  Output s*i + r reads source position i + f_r, f_r = (r + 0.5) / s - 0.5 in (-1/2, 1/2): (1 - |f_r|) x[i] +
  |f_r| x[i +- 1]. Edge replication gives torch's clamping: below 0 its source index is clamped to 0, above the
  last it reads the last twice. Slices and weighted sums only (cheap forward and backward), phases interleaved.
  """
  if factor == 1:
    return x
  n = x.shape[axis]
  padded = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), x,
                            jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
  here = jax.lax.slice_in_dim(padded, 1, n + 1, axis=axis)
  before = jax.lax.slice_in_dim(padded, 0, n, axis=axis)
  after = jax.lax.slice_in_dim(padded, 2, n + 2, axis=axis)
  phases = []
  for r in range(factor):
    f = (r + 0.5) / factor - 0.5
    neighbour = after if f >= 0 else before
    phases.append(here * jnp.asarray(1 - abs(f), x.dtype) + neighbour * jnp.asarray(abs(f), x.dtype))
  stacked = jnp.stack(phases, axis=axis + 1)  # [..., n, factor, ...]: output s*i + r at (i, r).
  shape = list(x.shape)
  shape[axis] = n * factor
  return stacked.reshape(shape)


def _adaptive_pool_matrix(n_in, n_out: int, dtype) -> jnp.ndarray:
  """[n_out, n_in] averaging weights of torch's AdaptiveAvgPool: bin i is [floor(i*n/o), ceil((i+1)*n/o)).

  Integer arithmetic in jnp, so that n_in may be symbolic (an export for any image size).
  """
  i = jnp.arange(n_out)
  start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
  j = jnp.arange(n_in)[None, :]
  inside = (j >= start[:, None]) & (j < end[:, None])
  return (inside / (end - start)[:, None].astype(jnp.float32)).astype(dtype)


def adaptive_avg_pool(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[N, H, W, C] -> [N, size, size, C]: torch's nn.AdaptiveAvgPool2d(size) (bins may overlap or repeat)."""
  _, h, w, _ = x.shape
  mh = _adaptive_pool_matrix(h, size, x.dtype)
  mw = _adaptive_pool_matrix(w, size, x.dtype)
  return jnp.einsum('ph,nhwc,qw->npqc', mh, x, mw)


# cuDNN's fused (flash) attention takes half-precision inputs and head dims that are multiples of 8 up to 128.
CUDNN_ATTENTION_DTYPES = (jnp.bfloat16, jnp.float16)
ATTENTION_ENV = 'JAXSEG_ATTENTION'  # 'auto' (default), 'xla' or 'cudnn': which dot_product_attention to use.


def attention_implementation(dtype: Dtype, head_dim: int) -> Optional[str]:
  """The implementation `dot_product_attention` asks jax for: 'cudnn' (the fused flash kernel) on a GPU for
  bfloat16/float16 inputs of a head dim it supports, else None (jax's XLA formulation, which jax's default picks
  in every case: jax 0.10-0.12 never selects cuDNN by itself). $JAXSEG_ATTENTION=xla or cudnn forces one."""
  choice = os.environ.get(ATTENTION_ENV, 'auto')
  if choice not in ('auto', 'xla', 'cudnn'):
    raise ValueError(f'${ATTENTION_ENV} must be auto, xla or cudnn, got {choice!r}')
  if choice != 'auto':
    return None if choice == 'xla' else 'cudnn'
  fused = (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_ATTENTION_DTYPES]
           and head_dim % 8 == 0 and head_dim <= 128)
  return 'cudnn' if fused else None


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """softmax(q k^T / sqrt(head_dim)) v on [B, T, heads, head_dim] (keys and values [B, S, heads, head_dim]).

  jax.nn.dot_product_attention, with cuDNN's fused kernel where `attention_implementation` chooses it; where that
  kernel cannot take the call (jax checks the cuDNN version and the shapes when tracing) it falls back to XLA's.
  """
  implementation = attention_implementation(q.dtype, q.shape[-1])
  if implementation == 'cudnn' and os.environ.get(ATTENTION_ENV, 'auto') == 'auto':
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
    except (NotImplementedError, RuntimeError, ValueError):
      implementation = None
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
