"""The auto recipe: config values set to 'auto' are chosen from what the dataset holds.

Fields that may be 'auto' (explicit values always win):
  input.crop_size: the median training image (height, width), each side rounded to the model's size multiple
    (the model states it: 2**depth for the plain UNet, the encoder's coarsest stride for the others) and at
    most MAX_AUTO_SIDE: a crop holds about a whole image, so objects are not cut (small-image folders), and
    large images are still cropped.
  input.eval_size: the largest evaluation image, each side rounded up to the multiple and at most
    MAX_AUTO_SIDE: every image is scored in the batched eval step; larger ones at their own size.
  loss.class_weighting: 'median_frequency' when the classes are imbalanced (the most frequent class covers
    more than IMBALANCE_RATIO times the pixels of the least frequent one present), else 'none'.

Training resolves them once (`resolve`) and logs each choice with its reason; the start-up saves the chosen
values in WORKDIR/config.json, and --mode=eval, predict and export take them from there (`settle`), so they use
the sizes the model was trained with.
"""

import dataclasses
import logging
from typing import Optional

import numpy as np

from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg.errors import ConfigError
from jaxseg.settings import AUTO, Settings

log = logging.getLogger('jaxseg')

MAX_AUTO_SIDE = 512
IMBALANCE_RATIO = 10.0
STATISTICS_EXAMPLES = 2000  # Examples read for the statistics at most (evenly spaced over the split).


@dataclasses.dataclass(frozen=True)
class Choice:
  field: str    # e.g. 'input.crop_size'.
  value: object
  reason: str


def _round(value: float, multiple: int, up: bool) -> int:
  units = np.ceil(value / multiple) if up else max(np.round(value / multiple), 1)
  return int(min(units * multiple, MAX_AUTO_SIDE))


def choose(fields: list[str], statistics: dict, multiple: int, multilabel: bool = False) -> list[Choice]:
  """The choices for the 'auto' `fields` from `statistics` ({'train', 'eval': SplitStatistics}).

  `multiple`: the model's size multiple (settings.model.size_multiple): sides are rounded to it.
  `multilabel`: class weighting stays 'none' (median frequency balances classes competing for a pixel).
  """
  m = multiple
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
  if 'loss.class_weighting' in fields and multilabel:
    choices.append(Choice('loss.class_weighting', 'none',
                          'multi-label classes do not compete for a pixel, so median-frequency balancing does not '
                          'apply; for rare classes use config.loss.terms (focal, dice, lovasz) or class_weights'))
  elif 'loss.class_weighting' in fields:
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


def resolve(settings: Settings, spec: datasets.DatasetSpec, builder, *, is_primary: bool = True) -> Settings:
  """Training's step: the statistics the 'auto' fields need, the choices logged; the settings with them in place."""
  fields = settings.auto_fields()
  if not fields:
    return settings
  statistics = {}
  if 'input.crop_size' in fields or ('loss.class_weighting' in fields and not spec.multilabel):
    statistics['train'] = pipeline.split_statistics(builder, spec, spec.train_split, STATISTICS_EXAMPLES)
  if 'input.eval_size' in fields:
    statistics['eval'] = pipeline.split_statistics(builder, spec, spec.eval_split, STATISTICS_EXAMPLES)
  choices = choose(fields, statistics, settings.model.size_multiple, spec.multilabel)
  if is_primary:
    for c in choices:
      log.info('Auto recipe: %s=%s: %s.', c.field, _format(c.value), c.reason)
  return settings.with_choices({c.field: c.value for c in choices})


def _format(value) -> str:
  return f'({value[0]}, {value[1]})' if isinstance(value, tuple) else repr(value)


def settle(settings: Settings, trained: Optional[Settings], config_path: str) -> Settings:
  """--mode=eval, predict, export: 'auto' fields take the values training chose (`trained`, from its config.json)."""
  fields = settings.auto_fields()
  if not fields:
    return settings
  choices = {}
  for field in fields:
    section, name = field.split('.')
    value = None if trained is None else getattr(getattr(trained, section), name)
    if value is None or value == AUTO:
      raise ConfigError(f"config.{field}='auto' is chosen by training from the dataset, and {config_path} holds no "
                        f'chosen value; train in this workdir first, or give config.{field} explicitly')
    choices[field] = value
  return settings.with_choices(choices)


def class_weights(settings: Settings, spec: datasets.DatasetSpec, builder) -> Optional[tuple[float, ...]]:
  """Per-class cross-entropy weights: config.loss.class_weights, or computed (median frequency), or None."""
  if settings.loss.class_weights is not None:
    return settings.loss.class_weights
  if settings.loss.class_weighting == 'median_frequency':
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
