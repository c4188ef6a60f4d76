"""Reporting: one writer fans out to the console, TensorBoard and WORKDIR/metrics.jsonl.

Only process 0 writes; the other processes get a writer that does nothing,
so callers never have to ask which process they are.
"""

import json
import math
import os
import sys
import time
from typing import Any, Optional

import logging
import numpy as np

from jaxseg import viz

log = logging.getLogger('jaxseg')

class QuietOrbaxNotices(logging.Filter):
  """Orbax notices that ask nothing of the user.

  Checkpoints between evaluations have no metrics by design, and a read-only
  manager (eval, predict) is read-only as asked: orbax warns about each.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(m in message for m in ('did not provide metrics', 'read_only=True', 'Given directory is read only'))


def setup_console_logging(level: int = logging.INFO) -> None:
  """Sends jaxseg's own log lines (progress, evaluation, warnings) to stdout, once; quiets orbax's notices."""
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, QuietOrbaxNotices) for f in absl_logger.filters):
    absl_logger.addFilter(QuietOrbaxNotices())
  logger = logging.getLogger('jaxseg')
  logger.setLevel(level)
  if not any(getattr(h, '_jaxseg', False) for h in logger.handlers):
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname).1s %(message)s', '%H:%M:%S'))
    handler._jaxseg = True  # pylint: disable=protected-access
    logger.addHandler(handler)
  logger.propagate = False


def format_duration(seconds: float) -> str:
  """Seconds -> '1h02m03s' / '4m05s' / '6s' (the one place durations are formatted)."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f'{h}h{m:02d}m{s:02d}s'
  return f'{m}m{s:02d}s' if m else f'{s}s'


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, np.ndarray):
    return [_jsonable(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


class MetricWriter:
  """Writes scalars (and images) for one workdir."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: dict) -> None:
    """One point: a JSON line with step, split and the metrics; scalars to TensorBoard as split/name."""
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, 'time': round(time.time(), 3)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for name, value in metrics.items():
        if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
          self._tf.summary.scalar(f'{split}/{name}', float(value))
        elif name == 'per_class_iou' and isinstance(value, (list, tuple)):
          for i, v in enumerate(value):
            if v is not None:
              self._tf.summary.scalar(f'{split}/iou/class_{i}', float(v))
    self._tb.flush()

  def write_images(self, step: int, name: str, images: np.ndarray) -> None:
    """uint8 images [N, H, W, 3] to TensorBoard."""
    if not self.enabled:
      return
    with self._tb.as_default(step=int(step)):
      self._tf.summary.image(name, images, max_outputs=len(images))
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Console progress line every log step: step/total, loss, learning rate, images/s, ETA."""

  def __init__(self, total_steps: int, start_step: int, global_batch: int, *, enabled: bool = True):
    self.total = total_steps
    self.global_batch = global_batch
    self.enabled = enabled
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._steady_start: Optional[tuple[int, float]] = None
    self._excluded = 0.0  # Seconds spent outside training steps (evaluation, checkpoints) since the last line.
    self._excluded_total = 0.0

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (evaluation, saving) out of images/s and the ETA."""
    self._excluded += seconds
    self._excluded_total += seconds

  def update(self, step: int, loss: float, learning_rate: float) -> float:
    """Logs the line; returns images/s over the steps since the previous call."""
    now = time.perf_counter()
    steps = step - self._last_step
    images_per_sec = steps * self.global_batch / max(now - self._last_time - self._excluded, 1e-9)
    # The first interval includes compilation: the ETA uses the ones after it.
    if self._steady_start is None:
      self._steady_start = (step, now + self._excluded_total)
      eta = float('nan')
    else:
      s0, t0 = self._steady_start
      eta = (now - t0 - self._excluded_total) / max(step - s0, 1) * (self.total - step)
    self._last_step, self._last_time, self._excluded = step, now, 0.0
    if self.enabled:
      log.info('step %d/%d | loss %.4f | lr %.4g | %.1f img/s | ETA %s', step, self.total, loss,
                   learning_rate, images_per_sec, format_duration(eta))
    return images_per_sec


def format_iou_table(result: dict, class_names) -> str:
  """A per-class table of an evaluation's figures (percent): IoU and accuracy; multi-label: IoU, Dice,
  precision and recall."""
  if 'per_class_dice' in result:
    columns = {'IoU': 'per_class_iou', 'Dice': 'per_class_dice', 'Prec': 'per_class_precision',
               'Recall': 'per_class_recall'}
  else:
    columns = {'IoU': 'per_class_iou', 'Acc': 'per_class_accuracy'}
  width = max([len('class')] + [len(n) for n in class_names])
  lines = [f'{"class":<{width}}' + ''.join(f'  {c:>7}' for c in columns)]
  fmt = lambda v: '    n/a' if v is None else f'{100 * v:7.2f}'
  for i, name in enumerate(class_names):
    lines.append(f'{name:<{width}}' + ''.join(f'  {fmt(result[key][i])}' for key in columns.values()))
  return '\n'.join(lines)


def eval_pictures(result: dict, spec, examples=()) -> dict:
  """TensorBoard pictures of an evaluation: name -> uint8 [N, H, W, 3].

  `examples`: (image, label, prediction) triples, drawn as image | ground truth | prediction panels.
  """
  pictures = {}
  palette = viz.palette_for(spec.name, spec.num_classes, spec.multilabel)
  if examples:
    panels = [viz.comparison_panel(i, l, p, palette, ignore_label=spec.ignore_label) for i, l, p in examples]
    pictures['examples'] = np.stack(panels)  # Same eval_size for all.
  if result.get('confusion_matrix') is not None and not spec.multilabel:  # Multi-label: 2x2 per class, in JSON.
    pictures['confusion_matrix'] = viz.confusion_matrix_image(
        np.asarray(result['confusion_matrix']), spec.class_names)[None]
  return pictures


def log_eval(writer: MetricWriter, step: int, result: dict, spec, *, examples=(), split: str = 'eval',
             include_confusion: bool = False) -> None:
  """Writes an evaluation: figures to metrics.jsonl/TensorBoard, pictures to TensorBoard, a console line.

  Only the writer's process (process 0) writes anything.
  """
  if not writer.enabled:
    return
  drop = () if include_confusion else ('confusion_matrix',)
  scalars = {k: v for k, v in result.items() if k not in drop and not isinstance(v, dict)}
  scalars.setdefault('class_names', list(spec.class_names))
  writer.write(step, split, scalars)
  for name, images in eval_pictures(result, spec, examples).items():
    writer.write_images(step, f'{split}/{name}', images)
  log.info('%s at step %d | loss %.4f | mean IoU %.4f | pixel acc %.4f | mean class acc %.4f',
           split.replace('_', ' '), step, result.get('loss', float('nan')), result['mean_iou'],
           result['pixel_accuracy'], result['mean_class_accuracy'])
