"""The run's settings: the config read once, checked, and turned into one frozen object.

`from_config(config)` is the only reader of an ml_collections config in jaxseg
(besides writing it back to WORKDIR/config.json): it checks every field and
returns a `Settings` of plain values. Everything inward takes that object or
plain values. It does no data access and starts no JAX backend, so it runs
before the devices are set up and fails fast on a typo.

Fields that may be 'auto' (image sizes, class weighting) keep 'auto' until
jaxseg/recipe.py chooses them from the data (`Settings.with_choices`).
"""

import ast
import dataclasses
import math
import numbers
import re
from typing import Any, Optional, Union

from jaxseg import losses
from jaxseg import models
from jaxseg import optim
from jaxseg.data import copy_paste
from jaxseg.data import datasets
from jaxseg.errors import ConfigError

AUTO = 'auto'
TASKS = ('multiclass', 'multilabel')  # config.task.
WEIGHT_FIELDS = ('encoder_weights', 'weights')  # config.model's weight files (see ModelSettings).
NONFINITE_POLICIES = ('stop', 'skip')  # config.on_nonfinite_loss.
CLASS_WEIGHTINGS = ('none', 'median_frequency', AUTO)  # config.loss.class_weighting.
SHARDINGS = ('replicated', 'fsdp')  # config.sharding.
SEGMENTATION_MODES = ('auto', 'whole', 'slide')  # config.inference.mode.
INFERENCE_FIELDS = ('mode', 'window', 'stride', 'flip', 'scales', 'batch_size', 'size_multiple')
FINETUNE_FIELDS = ('encoder_lr_multiplier', 'freeze_encoder', 'freeze_encoder_steps', 'freeze_encoder_batch_stats',
                   'param_rules')

Size = Union[str, tuple[int, int]]  # 'auto' or (height, width).


# ---------------------------------------------------------------------------
# Value checks (each names the field).
# ---------------------------------------------------------------------------


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def size_pair(value, name: str, *, allow_auto: bool = False) -> Size:
  """An image size (height, width) in positive pixels, or 'auto' where allowed; ConfigError naming it otherwise.

  `name`: what the message calls the value, e.g. 'config.input.crop_size'.

  Takes what a command line gives too: '--config.input.crop_size=auto' parses as ('auto',) where the field held a
  tuple, and '--config.input.crop_size=(96,128)' as the string '(96,128)' where it held 'auto'.
  """
  wanted = "'auto' or (height, width) in pixels" if allow_auto else '(height, width) in pixels'
  if isinstance(value, str):
    text = value.strip()
    if text == AUTO and allow_auto:
      return AUTO
    try:
      value = ast.literal_eval(text if text.startswith('(') else f'({text})')
    except (ValueError, SyntaxError):
      raise ConfigError(f'{name} must be {wanted}, got {value!r}') from None
  if allow_auto and isinstance(value, (tuple, list)) and tuple(value) == (AUTO,):
    return AUTO
  size = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if len(size) != 2 or not all(_is_int(v) and v >= 1 for v in size):
    raise ConfigError(f'{name} must be {wanted}, got {value!r}')
  return (int(size[0]), int(size[1]))


def _positive_int(value, field: str) -> int:
  if not _is_int(value) or value < 1:
    raise ConfigError(f'config.{field} must be a positive integer, got {value!r}')
  return int(value)


def _number(value, field: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
  """`value` as a float in [low, high] (or open ends); ConfigError naming config.`field` otherwise."""
  ok = _is_real(value)
  if ok:
    value = float(value)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    raise ConfigError(f'config.{field} must be a number in {interval}, got {value!r}')
  return value


def _choice(value, field: str, choices) -> str:
  if value not in choices:
    raise ConfigError(f'config.{field} must be one of {tuple(choices)}, got {value!r}')
  return value


def _bool(value, field: str) -> bool:
  if not isinstance(value, bool):
    raise ConfigError(f'config.{field} must be True or False, got {value!r}')
  return value


# ---------------------------------------------------------------------------
# The sections.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """config.model: which network, its fields, and the input contract every model has.

  Attributes:
    name: the registered architecture (models.MODELS).
    fields: the module's own fields of config.model (name, the weight files and the input contract left out).
    encoder_weights: a weight file the encoder starts from when training starts from scratch, or None.
    weights: a whole-model weight file (encoder, decoder and head, in the decoder's published layout) the model
      starts from when training starts from scratch, or None.
    in_channels: bands per input pixel (3 RGB, 1 grayscale, 4 e.g. RGB + near-infrared).
    input_mean, input_std: per channel, 0-255 units: how images are normalised (None in the config: the
      encoder's, ImageNet's without one).
    size_multiple: the factor the model pads its input sides to (the module states it).
    has_encoder: the model keeps a pretrained-style encoder as its submodule 'encoder'.
  """
  name: str
  fields: tuple[tuple[str, Any], ...]
  encoder_weights: Optional[str]
  weights: Optional[str]
  in_channels: int
  input_mean: tuple[float, ...]
  input_std: tuple[float, ...]
  size_multiple: int
  has_encoder: bool

  @property
  def kwargs(self) -> dict[str, Any]:
    return dict(self.fields)

  @property
  def input_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return self.input_mean, self.input_std

  def as_dict(self) -> dict[str, Any]:
    """The fields as config.model spells them (model.json, comparisons with a saved config)."""
    return {'name': self.name, **self.kwargs, 'in_channels': self.in_channels, 'input_mean': list(self.input_mean),
            'input_std': list(self.input_std)}


@dataclasses.dataclass(frozen=True)
class InputSettings:
  """config.input: the crop and evaluation sizes ('auto' until the recipe chooses) and the augmentation."""
  crop_size: Size
  eval_size: Size
  scale_range: tuple[float, float]  # Checked by jaxseg/data/augment.py.
  hflip: bool
  photometric: bool
  prefetch_to_device: int
  # Fields with defaults: a config.json written before they existed still loads (README "Augmentation").
  vflip: bool = False
  rot90: bool = False
  rotate_degrees: float = 0.0
  aspect_range: tuple[float, float] = (1.0, 1.0)
  blur_prob: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  noise_std: float = 0.0
  cutout_holes: int = 0
  cutout_size: float = 0.25
  # Copy-paste (jaxseg/data/copy_paste.py): objects of another training image pasted in, before train_augment.
  copy_paste_prob: float = 0.0
  copy_paste_object_classes: Optional[tuple[int, ...]] = None  # None: every class but 0 (multi-label: every class).
  copy_paste_scale_range: tuple[float, float] = (0.5, 1.5)
  copy_paste_object_prob: float = 0.5


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How images are segmented (jaxseg/inference.py): config.inference, its defaults filled in."""
  mode: str = 'auto'
  window: tuple[int, int] = (64, 64)
  stride: tuple[int, int] = (43, 43)
  flip: bool = False
  scales: tuple[float, ...] = (1.0,)
  batch_size: int = 8
  size_multiple: int = 32
  whole_max_size: tuple[int, int] = (96, 96)  # 'auto': views that fit in this go whole, larger ones slide.

  @property
  def uses_tta(self) -> bool:
    return self.flip or tuple(self.scales) != (1.0,)

  def describe(self) -> str:
    parts = [self.mode if self.mode != 'slide' else f'slide {self.window[0]}x{self.window[1]} stride '
             f'{self.stride[0]}x{self.stride[1]}']
    if self.flip:
      parts.append('flip')
    if tuple(self.scales) != (1.0,):
      parts.append('scales ' + '/'.join(f'{s:g}' for s in self.scales))
    return ', '.join(parts)


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """config.loss."""
  class_weights: Optional[tuple[float, ...]]
  class_weighting: str  # 'none', 'median_frequency' or 'auto' (until the recipe chooses).
  terms: tuple[tuple[str, float], ...]  # (loss term of losses.TERMS, weight), summed.
  params: losses.LossParams


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a run reads from its config, checked. Build it with `from_config`."""
  model: ModelSettings
  task: str  # 'multiclass' (softmax; a binary task is 2 classes) or 'multilabel' (a sigmoid per class).
  dataset: dict  # config.dataset as plain values (jaxseg/data/datasets.py resolves it into a DatasetSpec).
  input: InputSettings
  inference: dict  # config.inference as given (checked); `inference_options` fills in the defaults.
  loss: LossSettings
  optimizer: optim.OptimizerSettings
  param_rules: tuple[optim.ParamRule, ...]  # Fine-tuning: the optimiser's parameter-group rules, first match wins.
  freeze_encoder_batch_stats: bool
  seed: int
  batch_size: int
  eval_batch_size: int
  num_train_steps: Union[int, str]  # 'auto' (with time_budget_s) until the run has measured and chosen.
  time_budget_s: Optional[float]  # config.time_budget in seconds; None: no budget.
  log_every_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  half_precision: bool
  ema_decay: float
  sharding: str
  on_nonfinite_loss: str
  compilation_cache_dir: Optional[str]
  export_formats: tuple[str, ...]  # What --mode=export writes: of EXPORT_FORMATS.
  export_formats_given: bool  # config.export.formats was set (not the default): a format it cannot write fails.

  def auto_fields(self) -> list[str]:
    """The fields still 'auto' (the recipe chooses them from the data)."""
    fields = [f'input.{f}' for f in ('crop_size', 'eval_size') if getattr(self.input, f) == AUTO]
    if self.loss.class_weighting == AUTO:
      fields.append('loss.class_weighting')
    return fields

  def with_choices(self, choices: dict[str, Any]) -> 'Settings':
    """These settings with the recipe's values {'input.crop_size': (h, w), ...} in place of 'auto'."""
    changes = {'input': {}, 'loss': {}}
    for field, value in choices.items():
      section, name = field.split('.')
      changes[section][name] = size_pair(value, f'config.{field}') if section == 'input' else value
    return dataclasses.replace(self, input=dataclasses.replace(self.input, **changes['input']),
                               loss=dataclasses.replace(self.loss, **changes['loss']))

  def inference_options(self, *, processes: int = 1, **overrides) -> InferenceOptions:
    """config.inference with keyword overrides (jaxseg.api's), defaults filled in from the resolved sizes.

    Defaults: mode 'auto'; window input.crop_size; stride 2/3 of the window; no TTA; batch_size
    eval_batch_size / processes; size_multiple 32.
    """
    if any(f.startswith('input.') for f in self.auto_fields()):
      raise ValueError('inference options need the resolved sizes (recipe.resolve or recipe.settle first)')
    return _inference_options({**self.inference, **{k: v for k, v in overrides.items() if v is not None}},
                              self.input.crop_size, self.input.eval_size, self.eval_batch_size, processes,
                              'inference option' if overrides else 'config.inference')


# ---------------------------------------------------------------------------
# Reading a config.
# ---------------------------------------------------------------------------


def _model(config, spec: datasets.DatasetSpec) -> ModelSettings:
  section = config.model
  name = section.get('name')
  in_channels = section.get('in_channels', 3)
  in_channels = 3 if in_channels is None else in_channels
  datasets.check_channels(spec.name, in_channels)  # 1, 3 or 4; RGB datasets need 3.
  own = {k: v for k, v in section.items() if k not in (*WEIGHT_FIELDS, 'name', *models.INPUT_FIELDS)}
  module = models.create_model(name, own, num_classes=spec.num_classes)  # The model's own checks of its fields.
  # None: the statistics the encoder's published weights were trained with (ImageNet's for every encoder so far),
  # and ImageNet's for the models without an encoder.
  encoder = getattr(module, 'encoder_spec', None)
  defaults = (encoder.input_mean, encoder.input_std) if encoder else (models.IMAGENET_MEAN, models.IMAGENET_STD)
  stats = []
  for field, default in zip(('input_mean', 'input_std'), defaults):
    value = section.get(field)
    given = value is not None
    value = tuple(default) if value is None else value
    ok = isinstance(value, (tuple, list)) and all(_is_real(v) for v in value)
    if ok and field == 'input_std':
      ok = all(v > 0 for v in value)
    if not ok:
      raise ConfigError(f'config.model.{field} must be a tuple of finite numbers (0-255 units, one per channel'
                        f'{"; std > 0" if field == "input_std" else ""}), got {value!r}')
    if len(value) != in_channels:
      hint = '' if given else f" (None means the encoder's or ImageNet's, for 3 channels; give {in_channels} values)"
      raise ConfigError(f'config.model.{field} has {len(value)} values; config.model.in_channels is '
                        f'{in_channels}{hint}')
    stats.append(tuple(float(v) for v in value))
  files = {}
  for field in WEIGHT_FIELDS:
    value = section.get(field) or None
    if value == 'None':  # `--config.model.encoder_weights=None`: ml_collections' flags give a str field the string.
      value = None
    if value is not None and not isinstance(value, str):
      raise ConfigError(f'config.model.{field} must be a file path, got {value!r}')
    if value and not models.has_encoder(module):
      raise ConfigError(f'config.model.{field}={value!r} needs a model with a pretrained encoder; model '
                        f'{name!r} has none here (e.g. set config.model.encoder)')
    files[field] = value
  if files['encoder_weights'] and files['weights']:
    raise ConfigError('config.model.encoder_weights and config.model.weights are both set: weights (a whole-model '
                      'file) already holds the encoder; set one of them')
  return ModelSettings(name=name, fields=tuple(sorted(own.items())), encoder_weights=files['encoder_weights'],
                       weights=files['weights'], in_channels=int(in_channels), input_mean=stats[0],
                       input_std=stats[1], size_multiple=int(module.size_multiple),
                       has_encoder=models.has_encoder(module))


def _input(section) -> InputSettings:
  from jaxseg.data import augment  # pylint: disable=g-import-not-at-top  (augment imports size_pair from here)
  default = InputSettings  # The later augmentation options' defaults: a config.json without them still loads.
  get = lambda field: section.get(field, getattr(default, field))
  rotate_degrees, aspect_range, blur_prob, blur_sigma, noise_std, cutout_holes, cutout_size = augment.check_options(
      get('rotate_degrees'), get('aspect_range'), get('blur_prob'), get('blur_sigma'), get('noise_std'),
      get('cutout_holes'), get('cutout_size'))
  given_classes = get('copy_paste_object_classes')
  classes, paste_scale, object_prob, paste_prob = copy_paste.check_options(
      object_classes=(1,) if given_classes is None else given_classes, scale_range=get('copy_paste_scale_range'),
      object_prob=get('copy_paste_object_prob'), prob=get('copy_paste_prob'))
  return InputSettings(crop_size=size_pair(section.crop_size, 'config.input.crop_size', allow_auto=True),
                       eval_size=size_pair(section.eval_size, 'config.input.eval_size', allow_auto=True),
                       scale_range=tuple(section.get('scale_range', (1.0, 1.0))),
                       hflip=_bool(section.get('hflip', True), 'input.hflip'),
                       photometric=_bool(section.get('photometric', False), 'input.photometric'),
                       prefetch_to_device=_positive_int(section.get('prefetch_to_device', 2),
                                                        'input.prefetch_to_device'),
                       vflip=_bool(get('vflip'), 'input.vflip'), rot90=_bool(get('rot90'), 'input.rot90'),
                       rotate_degrees=rotate_degrees, aspect_range=aspect_range, blur_prob=blur_prob,
                       blur_sigma=blur_sigma, noise_std=noise_std, cutout_holes=cutout_holes, cutout_size=cutout_size,
                       copy_paste_prob=paste_prob, copy_paste_object_classes=None if given_classes is None else classes,
                       copy_paste_scale_range=paste_scale, copy_paste_object_prob=object_prob)


def _inference_options(section: dict, crop_size, eval_size, eval_batch_size: int, processes: int,
                       source: str = 'config.inference') -> InferenceOptions:
  unknown = sorted(set(section) - set(INFERENCE_FIELDS))
  if unknown:
    raise ConfigError(f'unknown {source} field(s) {unknown}; the fields are {list(INFERENCE_FIELDS)}')
  get = lambda key, default: default if section.get(key) is None else section[key]
  mode = _choice(get('mode', 'auto'), 'inference.mode', SEGMENTATION_MODES)
  window = size_pair(get('window', crop_size), 'config.inference.window')
  stride = size_pair(get('stride', tuple(max(1, (2 * w) // 3) for w in window)), 'config.inference.stride')
  if any(s > w for s, w in zip(stride, window)):
    raise ConfigError(f'config.inference.stride={stride} is larger than the window {window}: pixels between '
                      f'windows would get no prediction')
  scales = get('scales', (1.0,))
  if not isinstance(scales, (tuple, list)) or not scales or not all(_is_real(s) and s > 0 for s in scales):
    raise ConfigError(f'config.inference.scales must be positive numbers, got {scales!r}')
  batch_size = _positive_int(get('batch_size', max(1, eval_batch_size // processes)), 'inference.batch_size')
  size_multiple = _positive_int(get('size_multiple', 32), 'inference.size_multiple')
  flip = _bool(get('flip', False), 'inference.flip')
  return InferenceOptions(mode=mode, window=window, stride=stride, flip=flip, scales=tuple(float(s) for s in scales),
                          batch_size=batch_size, size_multiple=size_multiple, whole_max_size=tuple(eval_size))


def _loss(section, num_classes: int, task: str) -> LossSettings:
  if section.get('dice_weight'):  # A saved config.json of an older run holds 0.0: that changes nothing.
    raise ConfigError("config.loss.dice_weight was replaced by config.loss.terms: e.g. 'cross_entropy:1,dice:0.5' "
                      'adds soft Dice with weight 0.5')
  weights = section.get('class_weights')
  if weights is not None:
    if not isinstance(weights, (tuple, list)) or not all(_is_real(w) and w >= 0 for w in weights):
      raise ConfigError(f'config.loss.class_weights must be numbers >= 0 (one per class), got {weights!r}')
    if len(weights) != num_classes:
      raise ConfigError(f'config.loss.class_weights has {len(weights)} values; num_classes is {num_classes}')
    weights = tuple(float(w) for w in weights)
  params = {}
  for field, low, high in (('focal_gamma', 0, math.inf), ('focal_alpha', -math.inf, 1), ('tversky_alpha', 0, math.inf),
                           ('tversky_beta', 0, math.inf), ('smooth', 0, math.inf)):
    value = section.get(field, getattr(losses.LossParams, field))
    if not _is_real(value) or not low <= value <= high:
      raise ConfigError(f'config.loss.{field} must be a number in [{low}, {high}], got {value!r}')
    params[field] = float(value)
  weighting = _choice(section.class_weighting, 'loss.class_weighting', CLASS_WEIGHTINGS)
  if task == 'multilabel' and weighting == 'median_frequency':
    raise ConfigError("config.loss.class_weighting='median_frequency' balances classes that compete for a pixel; "
                      "with config.task='multilabel' give config.loss.class_weights, or use the focal, dice or "
                      'lovasz terms')
  return LossSettings(class_weights=weights, class_weighting=weighting,
                      terms=loss_terms(section.get('terms', 'cross_entropy:1')), params=losses.LossParams(**params))


def loss_terms(value) -> tuple[tuple[str, float], ...]:
  """config.loss.terms, 'name:weight,name:weight' (e.g. 'cross_entropy:1,lovasz:0.5'), as ((name, weight), ...)."""
  usage = (f"config.loss.terms must be 'term:weight' pairs separated by commas, each term of "
           f"{', '.join(losses.TERMS)} at most once with a weight >= 0, some weight > 0 "
           f"(e.g. 'cross_entropy:1,lovasz:0.5'), got {value!r}")
  if not isinstance(value, str):
    raise ConfigError(usage)
  terms = []
  for part in filter(None, (p.strip() for p in value.split(','))):
    name, sep, weight = part.partition(':')
    name = name.strip()
    if name not in losses.TERMS:
      raise ConfigError(f'config.loss.terms: unknown term {name!r}; the terms are {", ".join(losses.TERMS)}')
    try:
      weight = float(weight) if sep else math.nan
    except ValueError:
      weight = math.nan
    if not weight >= 0 or not math.isfinite(weight) or name in dict(terms):
      raise ConfigError(usage)
    terms.append((name, weight))
  if not any(w > 0 for _, w in terms):
    raise ConfigError(usage)
  return tuple(terms)


def _optimizer(section) -> optim.OptimizerSettings:
  inf = math.inf
  name = _choice(section.name, 'optimizer.name', optim.OPTIMIZERS)
  schedule = _choice(section.schedule, 'optimizer.schedule', optim.SCHEDULES)
  learning_rate = section.learning_rate
  if not _is_real(learning_rate) or learning_rate <= 0:
    raise ConfigError(f'config.optimizer.learning_rate must be > 0, got {learning_rate!r}')
  warmup = section.get('warmup_steps', 0)
  if not _is_int(warmup) or warmup < 0:
    raise ConfigError(f'config.optimizer.warmup_steps must be an integer >= 0, got {warmup!r}')
  number = lambda field, default, low, high, **ends: _number(section.get(field, default), f'optimizer.{field}', low,
                                                            high, **ends)
  return optim.OptimizerSettings(
      name=name, learning_rate=float(learning_rate), schedule=schedule, warmup_steps=int(warmup),
      end_learning_rate=number('end_learning_rate', 0.0, 0.0, inf, high_open=True),
      poly_power=number('poly_power', 0.9, 0.0, inf, low_open=True, high_open=True),
      momentum=number('momentum', 0.9, 0.0, 1.0, high_open=True),
      nesterov=_bool(section.get('nesterov', False), 'optimizer.nesterov'),
      b1=number('b1', 0.9, 0.0, 1.0, high_open=True),
      b2=number('b2', 0.999, 0.0, 1.0, high_open=True),
      eps=number('eps', 1e-8, 0.0, inf, low_open=True, high_open=True),
      weight_decay=number('weight_decay', 1e-4, 0.0, inf, high_open=True))


def _param_rules(section) -> tuple[tuple[optim.ParamRule, ...], bool]:
  """config.finetune -> (the parameter-group rules, freeze_encoder_batch_stats).

  The rules, first match wins per property (jaxseg/optim.py): the user's config.finetune.param_rules, then
  the encoder's rule from the four encoder fields, then no weight decay on biases and normalisation scales.
  """
  section = section or {}
  unknown = sorted(set(section.keys()) - set(FINETUNE_FIELDS))
  if unknown:
    raise ConfigError(f'config.finetune has unknown fields {unknown}; it takes {list(FINETUNE_FIELDS)}')
  m = section.get('encoder_lr_multiplier', 1.0)
  if not _is_real(m) or m <= 0:
    raise ConfigError(f'config.finetune.encoder_lr_multiplier must be a number > 0 (e.g. 0.1; to keep the encoder '
                      f'fixed set config.finetune.freeze_encoder=True), got {m!r}')
  freeze = _bool(section.get('freeze_encoder', False), 'finetune.freeze_encoder')
  freeze_stats = _bool(section.get('freeze_encoder_batch_stats', False), 'finetune.freeze_encoder_batch_stats')
  steps = section.get('freeze_encoder_steps', 0)
  if not _is_int(steps) or steps < 0:
    raise ConfigError(f'config.finetune.freeze_encoder_steps must be an integer >= 0 (0: not frozen; for the whole '
                      f'run set config.finetune.freeze_encoder=True), got {steps!r}')
  if freeze and steps > 0:
    raise ConfigError(f'config.finetune.freeze_encoder=True freezes the encoder for the whole run; '
                      f'freeze_encoder_steps={steps} would unfreeze it: set only one of them')
  user = tuple(_user_rule(i, r) for i, r in enumerate(section.get('param_rules') or ()))
  encoder = optim.ParamRule(f'^{models.ENCODER}/', lr_multiplier=float(m),
                            frozen_steps=optim.FROZEN if freeze else int(steps),
                            required=(m != 1.0 or freeze or steps > 0),
                            origin="config.finetune's encoder fields need a model with an encoder (a submodule "
                                   "named 'encoder')")
  return user + (encoder, optim.NO_DECAY_RULE), freeze_stats


def _user_rule(index: int, rule) -> optim.ParamRule:
  """config.finetune.param_rules[index]: (pattern, learning-rate multiplier or 'frozen' or None, decay or None)."""
  field = f'config.finetune.param_rules[{index}]'
  if not isinstance(rule, (tuple, list)) or len(rule) != 3:
    raise ConfigError(f"{field} must be (pattern, lr multiplier | 'frozen' | None, weight decay True/False/None), "
                      f'got {rule!r}')
  pattern, lr, decay = rule
  try:
    re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ConfigError(f'{field}: {pattern!r} is not a regular expression: {e}') from None
  if lr == 'frozen':
    lr, frozen = None, optim.FROZEN
  elif lr is None or (_is_real(lr) and lr > 0):
    frozen = None
  else:
    raise ConfigError(f"{field}: the learning-rate multiplier must be a number > 0, 'frozen' or None, got {lr!r}")
  if decay is not None and not isinstance(decay, bool):
    raise ConfigError(f'{field}: weight decay must be True, False or None, got {decay!r}')
  return optim.ParamRule(pattern, lr_multiplier=None if lr is None else float(lr), frozen_steps=frozen,
                         weight_decay=decay, required=True, origin=field)


def from_config(config) -> Settings:
  """The checked settings of `config` (a ConfigDict as configs/default.py builds it); ConfigError names any bad field.

  Cheap: no data access, no JAX computation or backend.
  """
  dataset = config.dataset.to_dict() if hasattr(config.dataset, 'to_dict') else dict(config.dataset)
  task = _choice(config.get('task', 'multiclass'), 'task', TASKS)
  spec = datasets.resolve_spec(dataset, task=task)  # Checks num_classes, class names and the ignore label.
  model = _model(config, spec)
  loop = {f: _positive_int(config[f], f) for f in ('batch_size', 'eval_batch_size', 'log_every_steps',
                                                   'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints')}
  loop.update(_schedule_length(config.num_train_steps, config.get('time_budget')))
  ema_decay = config.get('ema_decay', 0.0)
  if not _is_real(ema_decay) or not 0 <= ema_decay < 1:
    raise ConfigError(f'config.ema_decay must be a number in [0, 1) (0: no moving average; e.g. 0.999), '
                      f'got {ema_decay!r}')
  cache_dir = config.get('compilation_cache_dir')
  if cache_dir is not None and not isinstance(cache_dir, str):
    raise ConfigError(f"config.compilation_cache_dir must be a directory path (a string; '' disables the cache), "
                      f'got {cache_dir!r}')
  rules, freeze_stats = _param_rules(config.get('finetune'))
  input_settings = _input(config.input)
  inference = dict(config.get('inference') or {})
  # Checked now with stand-in sizes where they are still 'auto' (a typo fails before any work).
  stand_in = lambda size: (64, 64) if size == AUTO else size
  _inference_options(inference, stand_in(input_settings.crop_size), stand_in(input_settings.eval_size),
                     loop['eval_batch_size'], 1)
  settings = Settings(
      model=model, task=task, dataset=dataset, input=input_settings, inference=inference,
      loss=_loss(config.loss, spec.num_classes, task), optimizer=_optimizer(config.optimizer), param_rules=rules,
      freeze_encoder_batch_stats=freeze_stats, seed=_seed(config.seed), **loop,
      half_precision=_bool(config.get('half_precision', False), 'half_precision'), ema_decay=float(ema_decay),
      sharding=_choice(config.get('sharding', 'replicated'), 'sharding', SHARDINGS),
      on_nonfinite_loss=_choice(config.on_nonfinite_loss, 'on_nonfinite_loss', NONFINITE_POLICIES),
      compilation_cache_dir=cache_dir,
      **_export(config.get('export') or {}))
  if settings.freeze_encoder_batch_stats and not model.has_encoder:
    raise ConfigError(f'config.finetune.freeze_encoder_batch_stats=True, but model {model.name!r} has no '
                      f"encoder (a submodule named '{models.ENCODER}')")
  return settings


_DURATION = re.compile(r'(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?')


def parse_duration(value, field: str = 'time_budget') -> Optional[float]:
  """'20m', '1h30m', '90s', '1.5h' or a number of seconds -> seconds; '' or None -> None."""
  if value is None or value == '':
    return None
  text = str(value).replace(' ', '').lower()
  match = _DURATION.fullmatch(text) if not isinstance(value, bool) else None
  if not text or match is None or not any(match.groups()) or sum(float(g or 0) for g in match.groups()) <= 0:
    raise ConfigError(f"config.{field} must be a duration such as '20m', '1h30m', '90s' or a number of seconds "
                      f"('' for none), got {value!r}")
  hours, minutes, seconds = (float(g or 0) for g in match.groups())
  return hours * 3600 + minutes * 60 + seconds


def _schedule_length(steps, budget) -> dict:
  """config.num_train_steps (a count, or 'auto': sized to config.time_budget) and config.time_budget."""
  budget_s = parse_duration(budget)
  if steps == AUTO:
    if budget_s is None:
      raise ConfigError("config.num_train_steps='auto' sizes the schedule to config.time_budget, which is not set: "
                        "give a budget (e.g. --config.time_budget=20m) or a number of steps")
    return {'num_train_steps': AUTO, 'time_budget_s': budget_s}
  if isinstance(steps, str) and steps.strip().isdigit():
    steps = int(steps)  # A string field (a config that set 'auto') overridden with a number on the command line.
  if not _is_int(steps) or steps < 1:
    raise ConfigError(f"config.num_train_steps must be a positive integer or 'auto' (sized to config.time_budget), "
                      f'got {steps!r}')
  return {'num_train_steps': int(steps), 'time_budget_s': budget_s}


EXPORT_FORMATS = ('jax', 'saved_model', 'onnx')
DEFAULT_EXPORT_FORMATS = 'jax,saved_model,onnx'


def _export(export: dict) -> dict:
  """config.export: formats, a comma-separated subset of EXPORT_FORMATS."""
  if 'saved_model' in export:
    raise ConfigError("config.export.saved_model was replaced by config.export.formats: e.g. 'jax,onnx' leaves "
                      'the SavedModel out')
  unknown = set(export) - {'formats'}
  if unknown:
    raise ConfigError(f'config.export has fields {sorted(unknown)} it does not take; it takes formats')
  value = export.get('formats', DEFAULT_EXPORT_FORMATS)
  formats = tuple(f.strip() for f in value.split(',') if f.strip()) if isinstance(value, str) else None
  if not formats or any(f not in EXPORT_FORMATS for f in formats) or len(set(formats)) != len(formats):
    raise ConfigError(f'config.export.formats must be a comma-separated list of {", ".join(EXPORT_FORMATS)} '
                      f'(each at most once), got {value!r}')
  return {'export_formats': formats, 'export_formats_given': value != DEFAULT_EXPORT_FORMATS}


def _seed(value) -> int:
  if not _is_int(value) or value < 0:
    raise ConfigError(f'config.seed must be an integer >= 0, got {value!r}')
  return int(value)


def check_batch(settings: Settings, device_count: int) -> None:
  """The global batches must split evenly over all devices (so over the processes too: each has as many)."""
  for field in ('batch_size', 'eval_batch_size'):
    value = getattr(settings, field)
    if value % device_count:
      raise ConfigError(f'config.{field}={value} is not divisible by the number of devices ({device_count}); '
                        f'use a multiple of {device_count}')
