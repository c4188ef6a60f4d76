"""DPT's reassemble stage (Ranftl et al., 2021) as Hugging Face transformers' `DPTReassembleStage`: a ViT's four
block outputs, all at its patch stride p, made a pyramid at strides p/4, p/2, p, 2p (3.5, 7, 14, 28 on a ViT/14).

For map i (finest first; transformers' neck.reassemble_stage, in eval mode):
  readout   how the class token enters (transformers' readout_type):
              'project' (the default): [patch token, class token] (2C) -> Linear to C -> GELU (exact), per token
                (`readout_projects_i`, transformers' readout_projects.i.0);
              'add': patch token + class token;  'ignore': the patch tokens as they are;
  project   a 1x1 conv (+ bias) to hidden_sizes[i] channels (`layers_i_projection`);
  resize    by reassemble factor (4, 2, 1, 0.5)[i] (`layers_i_resize`): a transposed conv with kernel = stride =
            factor (+ bias) for 4 and 2, nothing for 1, a 3x3 conv with stride 2 and padding 1 (+ bias) for 0.5,
            which gives ceil(h / 2) (the declared stride 2p is nominal for odd grids, as in the reference).

hidden_sizes: transformers' neck_hidden_sizes; None: (C/8, C/4, C/2, C) for a ViT of width C, which is what the
DPT and Depth Anything configs give ViT-S (48, 96, 192, 384) and ViT-B (96, 192, 384, 768) -- ViT-L's (256, 512,
1024, 1024) is not of this form and must be given.

Flax names: params['neck']['readout_projects_i'] (Dense), ['layers_i_projection'] (Conv), ['layers_i_resize']
(ConvTranspose with transpose_kernel=True, whose [k, k, out, in] kernel is torch's ConvTranspose2d [in, out, k, k]
weight read as the 'conv' kind, OIHW -> HWIO; or Conv). `hf_key_table` maps transformers' DPTNeck keys
neck.reassemble_stage.* onto them.
"""

from typing import ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.decoders.base import DECODER_KERNEL_INIT
from jaxseg.models.encoders import base as encoder_base
from jaxseg.models.encoders.base import FeatureMap
from jaxseg.models.necks.base import Neck

READOUTS = ('project', 'add', 'ignore')
FACTORS = (4, 2, 1, 0.5)  # transformers' reassemble_factors (DPT's, for ViTs).


def default_hidden_sizes(width: int) -> tuple[int, ...]:
  """(C/8, C/4, C/2, C): the DPT / Depth Anything neck_hidden_sizes of ViT-S and ViT-B."""
  return (width // 8, width // 4, width // 2, width)


def _stride(patch_stride: float, factor: float) -> float:
  stride = patch_stride / factor
  return int(stride) if float(stride).is_integer() else stride


class ReassembleNeck(Neck):
  """transformers' DPTReassembleStage: 4 PatchTokens maps -> 4 NHWC maps at strides p/4, p/2, p, 2p.

  Attributes:
    readout: 'project', 'add' or 'ignore' (see the module docstring).
    hidden_sizes: channels of the 4 maps (transformers' neck_hidden_sizes); None: (C/8, C/4, C/2, C).
  """
  readout: str = 'project'
  hidden_sizes: Optional[Sequence[int]] = None

  NAME: ClassVar[str] = 'reassemble'
  FIELDS: ClassVar[tuple[str, ...]] = ('readout', 'hidden_sizes')

  @classmethod
  def features(cls, encoder_features: Sequence[FeatureMap], *, readout: str = 'project',
               hidden_sizes: Optional[Sequence[int]] = None) -> tuple[FeatureMap, ...]:
    del readout
    sizes = tuple(hidden_sizes) if hidden_sizes is not None else default_hidden_sizes(encoder_features[-1].channels)
    return tuple(FeatureMap(_stride(f.stride, factor), size)
                 for f, factor, size in zip(encoder_features, FACTORS, sizes))

  @classmethod
  def check(cls, encoder: str, encoder_features: Sequence[FeatureMap], *, readout: str = 'project',
            hidden_sizes: Optional[Sequence[int]] = None) -> None:
    """ConfigError unless the encoder gives 4 maps at one stride with class tokens (a ViT's blocks)."""
    if readout not in READOUTS:
      raise ConfigError(f"neck 'reassemble': readout must be one of {list(READOUTS)}, got {readout!r}")
    if hidden_sizes is not None and (
        len(hidden_sizes) != len(FACTORS)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hidden_sizes)):
      raise ConfigError(f"neck 'reassemble': hidden_sizes must be {len(FACTORS)} positive integers, got "
                        f'{hidden_sizes!r}')
    strides = sorted({f.stride for f in encoder_features})
    if (len(encoder_features) != len(FACTORS) or len(strides) != 1
        or not all(f.class_token for f in encoder_features)):
      raise ConfigError(
          f"neck 'reassemble' takes a ViT's {len(FACTORS)} block outputs (maps at one stride with a class token); "
          f'encoder {encoder!r} gives {len(encoder_features)} map(s) at strides {strides}'
          + ('' if all(f.class_token for f in encoder_features) else ' without class tokens'))

  @nn.compact
  def __call__(self, maps: Sequence[encoder_base.PatchTokens]) -> list[jnp.ndarray]:
    if self.readout not in READOUTS:
      raise ConfigError(f"neck 'reassemble': readout must be one of {list(READOUTS)}, got {self.readout!r}")
    sizes = [f.channels for f in self.features(self.encoder_features, hidden_sizes=self.hidden_sizes)]
    out = []
    for i, (tokens, factor, size) in enumerate(zip(maps, FACTORS, sizes)):
      x, cls_token = tokens.patches, tokens.class_token
      width = x.shape[-1]
      if self.readout == 'project':
        readout = jnp.broadcast_to(cls_token[:, None, None, :], x.shape)
        x = nn.Dense(width, dtype=self.dtype, name=f'readout_projects_{i}')(jnp.concatenate([x, readout], -1))
        x = nn.gelu(x, approximate=False)
      elif self.readout == 'add':
        x = x + cls_token[:, None, None, :]
      x = layers.Conv(size, (1, 1), kernel_init=DECODER_KERNEL_INIT, dtype=self.dtype, name=f'layers_{i}_projection')(x)
      if factor > 1:
        f = int(factor)
        x = nn.ConvTranspose(size, (f, f), strides=(f, f), padding='VALID', transpose_kernel=True,
                             kernel_init=DECODER_KERNEL_INIT, dtype=self.dtype, name=f'layers_{i}_resize')(x)
      elif factor < 1:
        s = int(round(1 / factor))
        x = layers.Conv(size, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)), kernel_init=DECODER_KERNEL_INIT,
                    dtype=self.dtype, name=f'layers_{i}_resize')(x)
      out.append(x)
    return out


def hf_key_table(readout: str = 'project') -> encoder_base.KeyTable:
  """transformers' neck.reassemble_stage.* keys (DPTNeck in DPTForDepthEstimation files) -> paths from the model's
  root (params['neck'])."""
  table: encoder_base.KeyTable = {}
  for i, factor in enumerate(FACTORS):
    if readout == 'project':
      encoder_base.add_dense(table, f'neck.reassemble_stage.readout_projects.{i}.0', ('neck', f'readout_projects_{i}'))
    encoder_base.add_conv(table, f'neck.reassemble_stage.layers.{i}.projection', ('neck', f'layers_{i}_projection'),
                          bias=True)
    if factor != 1:
      encoder_base.add_conv(table, f'neck.reassemble_stage.layers.{i}.resize', ('neck', f'layers_{i}_resize'),
                            bias=True)
  return table
