"""The auto recipe: config values set to 'auto' are chosen from what the dataset holds.

Fields that may be 'auto' (explicit values always win):
  input.crop_size: the median training image (height, width), each side rounded to the model's size multiple
    (2**depth for the plain UNet, 32 for the others) and at most MAX_AUTO_SIDE: a crop holds about a whole
    image, so objects are not cut (small-image folders), and large images are still cropped.
  input.eval_size: the largest evaluation image, each side rounded up to the multiple and at most
    MAX_AUTO_SIDE: every image is scored in the batched eval step; larger ones at their own size.
  loss.class_weighting: 'median_frequency' when the classes are imbalanced (the most frequent class covers
    more than IMBALANCE_RATIO times the pixels of the least frequent one present), else 'none'.

Training resolves them once (`resolve`), logs each choice with its reason and saves the chosen values in
WORKDIR/config.json; --mode=eval, predict and export take them from there (`settle`), so they use the
sizes the model was trained with.
"""

import dataclasses
import json
import logging
import os
from typing import Optional

import ml_collections
import numpy as np

from jaxseg import config_utils
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg.errors import ConfigError

log = logging.getLogger('jaxseg')

AUTO = 'auto'
SIZE_FIELDS = ('crop_size', 'eval_size')  # Of config.input.
MAX_AUTO_SIDE = 512
IMBALANCE_RATIO = 10.0
STATISTICS_EXAMPLES = 2000  # Examples read for the statistics at most (evenly spaced over the split).


@dataclasses.dataclass(frozen=True)
class Choice:
  field: str    # e.g. 'input.crop_size'.
  value: object
  reason: str


def auto_fields(config) -> list[str]:
  """The fields of `config` set to 'auto'."""
  fields = [f'input.{f}' for f in SIZE_FIELDS if config_utils.size_value(config.input[f], f'input.{f}') == AUTO]
  if config.loss.class_weighting == AUTO:
    fields.append('loss.class_weighting')
  return fields


def size_multiple(model_config) -> int:
  """The factor a model's input sides are padded to (no padding is wasted on sides that are multiples of it)."""
  if model_config.name == 'unet' and not model_config.get('encoder'):
    return 2 ** int(model_config.depth)
  return 32


def _round(value: float, multiple: int, up: bool) -> int:
  units = np.ceil(value / multiple) if up else max(np.round(value / multiple), 1)
  return int(min(units * multiple, MAX_AUTO_SIDE))


def choose(config, statistics: dict) -> list[Choice]:
  """The choices for the 'auto' fields of `config` from `statistics` ({'train', 'eval': SplitStatistics})."""
  fields = auto_fields(config)
  m = size_multiple(config.model)
  choices = []
  if 'input.crop_size' in fields:
    stats = statistics['train']
    median = np.median(stats.sizes, axis=0)
    value = (_round(median[0], m, up=False), _round(median[1], m, up=False))
    choices.append(Choice('input.crop_size', value,
                          f'the median training image is {median[0]:g}x{median[1]:g} ({_read(stats)}); sides '
                          f'rounded to a multiple of {m} (the model\'s), at most {MAX_AUTO_SIDE}: crops hold whole '
                          'objects'))
  if 'input.eval_size' in fields:
    stats = statistics['eval']
    largest = stats.sizes.max(axis=0)
    value = (_round(largest[0], m, up=True), _round(largest[1], m, up=True))
    fit = int(np.sum(np.all(stats.sizes <= np.array(value), axis=1)))
    choices.append(Choice('input.eval_size', value,
                          f'the largest evaluation image is {largest[0]}x{largest[1]} ({_read(stats)}); rounded up '
                          f'to a multiple of {m}, at most {MAX_AUTO_SIDE}: {fit} of {stats.num_examples} images are '
                          'scored in batches, the others at their own size'))
  if 'loss.class_weighting' in fields:
    stats = statistics['train']
    freq = stats.class_pixels / max(stats.class_pixels.sum(), 1)
    present = stats.class_pixels > 0
    ratio = freq[present].max() / freq[present].min() if present.any() else 1.0
    common, rare = int(np.argmax(np.where(present, freq, -1))), int(np.argmin(np.where(present, freq, np.inf)))
    value = 'median_frequency' if ratio > IMBALANCE_RATIO else 'none'
    verdict = f'> {IMBALANCE_RATIO:g}: weighted' if value != 'none' else f'<= {IMBALANCE_RATIO:g}: balanced enough'
    choices.append(Choice('loss.class_weighting', value,
                          f'class pixel frequencies from {100 * freq[rare]:.2g}% (class {rare}) to '
                          f'{100 * freq[common]:.3g}% (class {common}), ratio {ratio:.3g} {verdict}'
                          + (f'; {int(np.sum(~present))} class(es) absent' if not present.all() else '')))
  return choices


def _read(stats) -> str:
  if stats.num_examples == stats.split_examples:
    return f'{stats.num_examples} images'
  return f'{stats.num_examples} of {stats.split_examples} images, evenly spaced'


def apply(config, choices: list[Choice]) -> ml_collections.ConfigDict:
  """A copy of `config` with the chosen values in place of 'auto', and every image size as a (height, width) tuple."""
  config = config.copy_and_resolve_references()
  with config.ignore_type():  # A size field may hold 'auto' (a str) until here.
    for field in SIZE_FIELDS:
      value = config_utils.size_value(config.input[field], f'input.{field}')
      if value != AUTO:
        config.input[field] = value
    for choice in choices:
      section, name = choice.field.split('.')
      config[section][name] = choice.value
  return config


def resolve(config, spec: datasets.DatasetSpec, builder, workdir: Optional[str] = None, *,
            is_primary: bool = True) -> tuple[ml_collections.ConfigDict, list[Choice]]:
  """Training's step: the statistics the 'auto' fields need, the choices logged, WORKDIR/config.json updated.

  Returns:
    (the config with concrete values, the choices made; [] when nothing is 'auto').
  """
  fields = auto_fields(config)
  if not fields:
    return apply(config, []), []
  statistics = {}
  if 'input.crop_size' in fields or 'loss.class_weighting' in fields:
    statistics['train'] = pipeline.split_statistics(builder, spec, spec.train_split, STATISTICS_EXAMPLES)
  if 'input.eval_size' in fields:
    statistics['eval'] = pipeline.split_statistics(builder, spec, spec.eval_split, STATISTICS_EXAMPLES)
  choices = choose(config, statistics)
  config = apply(config, choices)
  if is_primary:
    for c in choices:
      log.info('Auto recipe: %s=%s: %s.', c.field, _format(c.value), c.reason)
    if workdir is not None:
      config_utils.write_config(workdir, config)
  return config, choices


def _format(value) -> str:
  return f'({value[0]}, {value[1]})' if isinstance(value, tuple) else repr(value)


def settle(config, workdir: str) -> ml_collections.ConfigDict:
  """--mode=eval, predict, export: 'auto' fields take the values training chose (WORKDIR/config.json)."""
  fields = auto_fields(config)
  if not fields:
    return apply(config, [])
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError):
    saved = {}
  choices = []
  for field in fields:
    section, name = field.split('.')
    value = saved.get(section, {}).get(name)
    if isinstance(value, list):
      value = tuple(value)
    if value is None or value == AUTO:
      raise ConfigError(f"config.{field}='auto' is chosen by training from the dataset, and {path} holds no "
                        f'chosen value; train in this workdir first, or give config.{field} explicitly')
    choices.append(Choice(field, value, 'as chosen in training'))
  return apply(config, choices)


def class_weights(config, spec: datasets.DatasetSpec, builder) -> Optional[tuple[float, ...]]:
  """Per-class cross-entropy weights: config.loss.class_weights, or computed (median frequency), or None."""
  if config.loss.class_weights is not None:
    weights = tuple(float(w) for w in config.loss.class_weights)
    if len(weights) != spec.num_classes:
      raise ConfigError(f'config.loss.class_weights has {len(weights)} values; num_classes is '
                        f'{spec.num_classes}')
    return weights
  if config.loss.class_weighting == 'median_frequency':
    stats = pipeline.split_statistics(builder, spec, spec.train_split)
    weights = tuple(float(w) for w in median_frequency_weights(stats.class_pixels, stats.present_pixels))
    log.info('Class weights (median frequency): %s', ', '.join(f'{w:.3g}' for w in weights))
    return weights
  return None


def median_frequency_weights(counts: np.ndarray, present: np.ndarray) -> np.ndarray:
  """Median-frequency balancing (Eigen & Fergus, 2015): w_c = median(f) / f_c.

  f_c = pixels of class c / pixels of the images where c is present; the
  median is over classes present in the split; absent classes get weight 0.
  """
  counts = np.asarray(counts, np.float64)
  present = np.asarray(present, np.float64)
  seen = present > 0
  freq = np.zeros_like(counts)
  freq[seen] = counts[seen] / present[seen]
  weights = np.zeros_like(freq)
  weights[seen] = np.median(freq[seen]) / freq[seen]
  return weights
