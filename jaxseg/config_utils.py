"""Checks on the config and the workdir, done before any expensive work starts."""

import ast
import os

from jaxseg.errors import ConfigError

NONFINITE_POLICIES = ('stop', 'skip')
CLASS_WEIGHTINGS = ('none', 'median_frequency', 'auto')  # 'auto': jaxseg/recipe.py decides from the data.


def size_value(value, field: str):
  """config.<field>, an image size: 'auto' or (height, width) in positive pixels; ConfigError otherwise.

  Accepts what a command line gives as well: '--config.input.crop_size=auto' parses as ('auto',) where the
  field held a tuple, and '--config.input.crop_size=(96,128)' as the string '(96,128)' where it held 'auto'.
  """
  if isinstance(value, str):
    text = value.strip()
    if text == 'auto':
      return 'auto'
    try:
      value = ast.literal_eval(text if text.startswith('(') else f'({text})')
    except (ValueError, SyntaxError):
      raise ConfigError(f"config.{field} must be 'auto' or (height, width) in pixels, got {value!r}") from None
  if isinstance(value, (tuple, list)) and tuple(value) == ('auto',):
    return 'auto'
  size = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
    raise ConfigError(f"config.{field} must be 'auto' or (height, width) in pixels, got {value!r}")
  return size


def validate(config) -> None:
  """Raises ConfigError naming the field for values that cannot work (cheap checks, no data access)."""
  from jaxseg import models  # pylint: disable=g-import-not-at-top
  if config.model.name not in models.MODELS:
    raise ConfigError(f'config.model.name={config.model.name!r} is not a known model; choose one of '
                      f'{sorted(models.MODELS)}')
  num_classes = config.dataset.get('num_classes')
  if num_classes is not None and num_classes < 2:
    raise ConfigError(f'config.dataset.num_classes must be >= 2 (a binary task has 2: background and '
                      f'foreground), got {num_classes}')
  for field in ('batch_size', 'eval_batch_size', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    value = config[field]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'config.{field} must be a positive integer, got {value!r}')
  for field in ('crop_size', 'eval_size'):
    size_value(config.input[field], f'input.{field}')
  if config.on_nonfinite_loss not in NONFINITE_POLICIES:
    raise ConfigError(f'config.on_nonfinite_loss must be one of {NONFINITE_POLICIES}, got '
                      f'{config.on_nonfinite_loss!r}')
  if config.get('sharding', 'replicated') not in ('replicated', 'fsdp'):
    raise ConfigError(f"config.sharding must be 'replicated' or 'fsdp', got {config.sharding!r}")
  if config.loss.class_weighting not in CLASS_WEIGHTINGS:
    raise ConfigError(f'config.loss.class_weighting must be one of {CLASS_WEIGHTINGS}, got '
                      f'{config.loss.class_weighting!r}')
  cache_dir = config.get('compilation_cache_dir')
  if cache_dir is not None and not isinstance(cache_dir, str):
    raise ConfigError(f"config.compilation_cache_dir must be a directory path (a string; '' disables the cache), "
                      f'got {cache_dir!r}')
  if config.optimizer.learning_rate <= 0:
    raise ConfigError(f'config.optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}')
  from jaxseg import optim  # pylint: disable=g-import-not-at-top
  optim.check_config(config.optimizer, config.num_train_steps)
  from jaxseg import finetune  # pylint: disable=g-import-not-at-top
  finetune.settings(config)
  in_channels = finetune.in_channels_of(config.model)
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  datasets.check_channels(config.dataset.get('name'), in_channels)  # 1, 3 or 4; RGB datasets need 3.
  finetune.input_statistics(config.model)
  ema_decay = config.get('ema_decay', 0.0)
  if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
    raise ConfigError(f'config.ema_decay must be a number in [0, 1) (0: no moving average; e.g. 0.999), '
                      f'got {ema_decay!r}')


def check_batch(config, device_count: int) -> None:
  """The global batches must split evenly over all devices (so over the processes too: each has as many)."""
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if value % device_count:
      raise ConfigError(f'config.{field}={value} is not divisible by the number of devices ({device_count}); '
                        f'use a multiple of {device_count}')


def prepare_workdir(workdir: str, config, *, write: bool) -> None:
  """Creates the workdir, checks it is writable (now, not after an hour of training), saves the config."""
  if not write:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'the workdir {workdir} cannot be written: {e.strerror or e}') from None
  write_config(workdir, config)


def write_config(workdir: str, config) -> None:
  """WORKDIR/config.json: the config of the run (eval, predict, export and jaxseg.api read it back)."""
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))
