"""Fine-tuning from a pretrained encoder: the controls of `config.finetune` and the helpers they share.

A model with a pretrained encoder keeps it as the Flax submodule named
`encoder` (ENCODER), so its variables live at params['encoder'] and
batch_stats['encoder']. What this module provides:

* `settings(config)`: config.finetune as a checked `FineTune` (the optimiser
  (optim.create_optimizer), the train step and the model builder read it);
* `labels`: the encoder / rest partition of a parameter tree (optax.partition);
* `keep_encoder_batch_stats`: the train step's side of frozen BatchNorm statistics;
* `adapt_first_conv`: a pretrained RGB first convolution adapted to other
  input channel counts (for the pretrained-weights loader);
* `in_channels_of`, `input_statistics`: the input contract fields of config.model.

Imports nothing of jaxseg but errors (and the ImageNet constants, lazily), so
optim.py, state.py, train.py and the weight loaders can all use it.
"""

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from jaxseg.errors import ConfigError

ENCODER = 'encoder'  # The submodule name of a pretrained encoder, hence its key in params and batch_stats.
ENCODER_LABEL = 'encoder'  # optax.partition labels: the encoder's parameters ...
REST_LABEL = 'rest'  # ... and all the others (decoder, head).


@dataclasses.dataclass(frozen=True)
class FineTune:
  """The fine-tuning controls (config.finetune); the defaults change nothing.

  Attributes:
    encoder_lr_multiplier: the encoder's learning rate is this times the schedule's (> 0).
    freeze_encoder: the encoder's parameters never move.
    freeze_encoder_steps: the encoder's parameters do not move during the first N optimiser updates, then train
      with an optimiser state of their own that starts fresh at update N (0: never frozen).
    freeze_encoder_batch_stats: the encoder's BatchNorm statistics stay as loaded, and the encoder normalises with
      them in training too (the model is built with frozen_bn=True).
  """
  encoder_lr_multiplier: float = 1.0
  freeze_encoder: bool = False
  freeze_encoder_steps: int = 0
  freeze_encoder_batch_stats: bool = False

  @property
  def is_default(self) -> bool:
    return self == FineTune()


FIELDS = tuple(f.name for f in dataclasses.fields(FineTune))


def settings(config) -> FineTune:
  """config.finetune, checked, as a FineTune (configs saved before the section existed have none: the defaults).

  Raises ConfigError naming the field for a value of the wrong type or range,
  an unknown field (a typo would otherwise change nothing), or freeze_encoder
  together with freeze_encoder_steps.
  """
  section = config.get('finetune') if hasattr(config, 'get') else None
  if section is None:
    return FineTune()
  unknown = sorted(set(section.keys()) - set(FIELDS))
  if unknown:
    raise ConfigError(f'config.finetune has unknown fields {unknown}; it takes {list(FIELDS)}')
  defaults = FineTune()
  values = {f: section.get(f, getattr(defaults, f)) for f in FIELDS}

  m = values['encoder_lr_multiplier']
  if isinstance(m, bool) or not isinstance(m, numbers.Real) or not math.isfinite(m) or m <= 0:
    raise ConfigError(f'config.finetune.encoder_lr_multiplier must be a number > 0 (e.g. 0.1; to keep the encoder '
                      f'fixed set config.finetune.freeze_encoder=True), got {m!r}')
  for field in ('freeze_encoder', 'freeze_encoder_batch_stats'):
    if not isinstance(values[field], bool):
      raise ConfigError(f'config.finetune.{field} must be True or False, got {values[field]!r}')
  steps = values['freeze_encoder_steps']
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
    raise ConfigError(f'config.finetune.freeze_encoder_steps must be an integer >= 0 (0: not frozen; for the whole '
                      f'run set config.finetune.freeze_encoder=True), got {steps!r}')
  if values['freeze_encoder'] and steps > 0:
    raise ConfigError(f'config.finetune.freeze_encoder=True freezes the encoder for the whole run; '
                      f'freeze_encoder_steps={steps} would unfreeze it: set only one of them')
  return FineTune(encoder_lr_multiplier=float(m), freeze_encoder=values['freeze_encoder'],
                  freeze_encoder_steps=int(steps), freeze_encoder_batch_stats=values['freeze_encoder_batch_stats'])


def has_encoder(tree: Any) -> bool:
  """Whether a parameter (or gradient, batch_stats) tree has the encoder subtree."""
  return hasattr(tree, 'keys') and ENCODER in tree.keys()


def labels(params: Any) -> dict:
  """The optax.partition labels of a parameter tree, as a prefix of it: ENCODER_LABEL for params['encoder'],
  REST_LABEL for every other top-level entry."""
  return {k: ENCODER_LABEL if k == ENCODER else REST_LABEL for k in params.keys()}


def check_model_has_encoder(ft: FineTune, params: Any, model_name: str) -> None:
  """Non-default fine-tuning controls need a model with an encoder (else they would silently do nothing)."""
  if ft.is_default or has_encoder(params):
    return
  changed = [f'{f}={getattr(ft, f)!r}' for f in FIELDS if getattr(ft, f) != getattr(FineTune(), f)]
  raise ConfigError(f'config.finetune sets {", ".join(changed)}, but model {model_name!r} has no pretrained '
                    f"encoder (a submodule named '{ENCODER}'); use a model with an encoder or drop these fields")


def keep_encoder_batch_stats(new_batch_stats: Any, old_batch_stats: Any) -> Any:
  """`new_batch_stats` with the encoder's statistics taken from `old_batch_stats` (frozen BatchNorm statistics).

  The state side of config.finetune.freeze_encoder_batch_stats. The model side
  is the encoder normalising with those running averages in training too
  (frozen_bn=True, which state.build_model sets from the same field); without
  it the encoder would normalise with batch statistics that never reach the
  state, and evaluation (running averages) would see another network.
  """
  if not has_encoder(old_batch_stats):
    return new_batch_stats
  return {**new_batch_stats, ENCODER: old_batch_stats[ENCODER]}


# ---------------------------------------------------------------------------
# The input contract: channels and normalisation (config.model).
# ---------------------------------------------------------------------------

# config.model fields of the input contract (any model takes them), as absent means.
MODEL_INPUT_DEFAULTS = {'in_channels': 3, 'input_mean': None, 'input_std': None}


def in_channels_of(model_config) -> int:
  """config.model.in_channels (absent: 3, RGB), checked to be a positive integer."""
  value = model_config.get('in_channels', MODEL_INPUT_DEFAULTS['in_channels'])
  if value is None:
    value = MODEL_INPUT_DEFAULTS['in_channels']
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ConfigError(f'config.model.in_channels must be a positive integer (3: RGB, 1: grayscale, 4: e.g. RGB + '
                      f'near infrared), got {value!r}')
  return int(value)


def input_statistics(model_config) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per input channel in 0-255 units: config.model.input_mean / input_std, None or absent meaning
  ImageNet's (the statistics of today's normalisation and of most pretrained encoders).

  Checked: one value per channel of config.model.in_channels (ImageNet's has
  3, so other channel counts must give both), finite, std > 0.
  """
  from jaxseg.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD  # pylint: disable=g-import-not-at-top
  channels = in_channels_of(model_config)
  result = []
  for field, default in (('input_mean', IMAGENET_MEAN), ('input_std', IMAGENET_STD)):
    value = model_config.get(field)
    given = value is not None
    value = tuple(default) if value is None else value
    ok = isinstance(value, (tuple, list)) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if ok and field == 'input_std':
      ok = all(v > 0 for v in value)
    if not ok:
      raise ConfigError(f'config.model.{field} must be a tuple of finite numbers (0-255 units, one per channel'
                        f'{"; std > 0" if field == "input_std" else ""}), got {value!r}')
    if len(value) != channels:
      hint = '' if given else f' (None means ImageNet\'s, for 3 channels; give {channels} values)'
      raise ConfigError(f'config.model.{field} has {len(value)} values; config.model.in_channels is '
                        f'{channels}{hint}')
    result.append(tuple(float(v) for v in value))
  return result[0], result[1]


def adapt_first_conv(kernel: np.ndarray, in_channels: int) -> np.ndarray:
  """A pretrained RGB first-convolution kernel [kh, kw, 3, out] (HWIO) adapted to `in_channels` inputs.

  timm's `adapt_input_conv`, for Flax's layout:
  * 1 channel: the sum over R, G, B, so a grayscale image gives the response
    the original kernel gives to that image replicated into R = G = B;
  * 3 channels: the kernel unchanged (a copy);
  * any other count: R, G, B repeated cyclically up to `in_channels` (R, G, B,
    R, ...) and scaled by 3 / in_channels, which keeps the response's scale
    for inputs of the same statistics (4-band satellite images, RGB + depth).

  Computed in float64, returned in the kernel's dtype.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4 or kernel.shape[2] != 3:
    raise ValueError(f'adapt_first_conv takes an RGB kernel [kh, kw, 3, out] (HWIO), got shape {kernel.shape}')
  if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels < 1:
    raise ValueError(f'in_channels must be a positive integer, got {in_channels!r}')
  k = kernel.astype(np.float64)
  if in_channels == 1:
    adapted = k.sum(axis=2, keepdims=True)
  elif in_channels == 3:
    adapted = k.copy()
  else:
    repeats = -(-in_channels // 3)
    adapted = np.tile(k, (1, 1, repeats, 1))[:, :, :in_channels, :] * (3.0 / in_channels)
  return adapted.astype(kernel.dtype)

