"""Evaluation: the pmapped eval step, the evaluation loop, and the --mode=eval job.

Every device accumulates a confusion matrix; the psum over the pmap axis
adds them up over all devices of all hosts, and padding pixels carry the
ignore label, so each real pixel counts exactly once. Images larger than
input.eval_size skip the devices' fixed-size batches: the inference Predictor
segments them at full resolution and they are scored at the label's own size.
"""

import collections
import dataclasses
import functools
import io
import logging
import os
import sys

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jaxseg import compilation_cache
from jaxseg import config_utils
from jaxseg import inference as inference_lib
from jaxseg import losses
from jaxseg import metrics as metrics_lib
from jaxseg import reporting
from jaxseg import viz
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg import state as state_lib
from jaxseg.state import AXIS, TrainState, normalize_images, variables_of

log = logging.getLogger('jaxseg')


def make_eval_step(config, spec: datasets.DatasetSpec):
  """The pmapped evaluation step for this config."""
  return jax.pmap(functools.partial(eval_step, num_classes=spec.num_classes, ignore_label=spec.ignore_label,
                                    dtype=state_lib.compute_dtype(config)), axis_name=AXIS)


def eval_step(state: TrainState, batch: dict, *, num_classes: int, ignore_label: int, dtype) -> dict:
  """Confusion matrix and cross-entropy sums of one batch, summed over all devices, plus this device's predictions.

  Returns:
    {'confusion', 'ce_sum', 'weight_sum'} (psum'd) and 'preds' (uint8 [b, H, W],
    this device's; fetched only for the few images shown in TensorBoard).
  """
  images = normalize_images(batch['image'], dtype)
  labels = batch['label'].astype(jnp.int32)
  logits = state.apply_fn(variables_of(state), images, train=False)
  sums = lax.psum(eval_sums(logits, labels, num_classes=num_classes, ignore_label=ignore_label), AXIS)
  sums['preds'] = jnp.argmax(logits, axis=-1).astype(jnp.uint8)
  return sums


def eval_sums(logits: jnp.ndarray, labels: jnp.ndarray, *, num_classes: int, ignore_label: int) -> dict:
  ce_sum, weight_sum = losses.cross_entropy_sums(logits, labels, ignore_label=ignore_label)
  preds = jnp.argmax(logits, axis=-1)
  return {'confusion': metrics_lib.confusion_matrix(labels, preds, num_classes, ignore_label),
          'ce_sum': ce_sum, 'weight_sum': weight_sum}


# Result keys that are not figures: log_eval turns them into pictures and strips them.
EXAMPLES_KEY = '_examples'


def run_evaluation(p_eval, state: TrainState, eval_ds, num_batches: int, spec: datasets.DatasetSpec,
                   config: ml_collections.ConfigDict, *, num_examples: int = 3) -> dict:
  """Evaluates the replicated `state` on the whole evaluation split; returns host metrics.

  Examples that fit input.eval_size are scored on the devices (confusion
  matrices psum'd over all devices and hosts). Larger examples are segmented
  at full resolution by the inference Predictor and scored at their label's
  own size (`_FullSizeScorer`), then added in. The result also holds, under
  EXAMPLES_KEY, up to `num_examples` (image, label, prediction) triples of
  the first batches for log_eval's pictures.
  """
  totals = None
  examples = []
  full_size = _FullSizeScorer(state, spec, config)
  for batch in pipeline.as_numpy(eval_ds):
    full_size.add(batch.pop('full_image'), batch.pop('full_label'))
    sums = p_eval(state, batch)
    preds = sums.pop('preds')
    if len(examples) < num_examples:
      examples.extend(_examples_of(batch, preds, spec.ignore_label, num_examples - len(examples)))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  # Every device holds the same psum'd totals: read device 0's copy.
  totals = jax.device_get(jax.tree.map(lambda x: x[0], totals))
  extra = full_size.totals()
  totals = {k: np.asarray(v) + extra[k] for k, v in totals.items()}
  result = metrics_lib.metrics_from_confusion(totals['confusion'], spec.class_names)
  result['loss'] = float(totals['ce_sum'] / max(totals['weight_sum'], 1.0))
  result['confusion_matrix'] = totals['confusion'].tolist()
  result[EXAMPLES_KEY] = examples
  del num_batches
  return result


class _FullSizeScorer:
  """Scores the examples larger than input.eval_size at full resolution, each at its label's own size.

  They are segmented after the pass over the split, all together (tiles of
  several images share batches), by the Predictor that --mode=predict uses,
  with config.inference's mode, window and stride ('auto': a sliding window
  of input.crop_size, the scale training saw) and without test-time
  augmentation (that is --mode=eval's second scoring). The Predictor runs on
  this process's devices without collectives, so processes may hold
  different numbers of such examples; `totals()` adds the sums of all
  processes, so every process must call it (run_evaluation does, once).
  """

  def __init__(self, state: TrainState, spec: datasets.DatasetSpec, config: ml_collections.ConfigDict):
    self._state, self._spec, self._config = state, spec, config
    self._encoded = []  # (PNG image, PNG label) pairs.

  def add(self, full_images: np.ndarray, full_labels: np.ndarray) -> None:
    self._encoded.extend((i, l) for i, l in zip(full_images, full_labels) if len(i))

  def _predictor(self) -> 'inference_lib.Predictor':
    # The replicated state's copy on this process's first device, as host arrays.
    variables = jax.device_get(jax.tree.map(lambda x: x.addressable_shards[0].data[0],
                                            variables_of(self._state)))
    model = state_lib.build_model(self._config, self._spec.num_classes, axis_name=None)
    options = inference_lib.options_from_config(self._config)
    options = dataclasses.replace(options, flip=False, scales=(1.0,))
    return inference_lib.Predictor(model, variables, self._spec.num_classes, options,
                                   dtype=state_lib.compute_dtype(self._config))

  def totals(self) -> dict:
    k = self._spec.num_classes
    sums = {'confusion': np.zeros((k, k), np.int64), 'ce_sum': np.zeros((), np.float64),
            'weight_sum': np.zeros((), np.float64)}
    if self._encoded:
      decode = lambda data: np.asarray(Image.open(io.BytesIO(data)))
      images = (decode(image) for image, _ in self._encoded)
      for (_, label_png), logits in zip(self._encoded, self._predictor().iter_scores(images)):
        label = decode(label_png)
        sums['confusion'] += numpy_confusion(label, logits.argmax(-1), k, self._spec.ignore_label)
        valid = label != self._spec.ignore_label
        log_probs = logits[valid] - _logsumexp(logits[valid])
        sums['ce_sum'] -= np.take_along_axis(log_probs, label[valid].astype(np.int64)[:, None], 1).sum()
        sums['weight_sum'] += valid.sum()
    if jax.process_count() == 1:
      return sums
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return {key: np.asarray(multihost_utils.process_allgather(v)).sum(axis=0) for key, v in sums.items()}


def _logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(axis=-1, keepdims=True)
  return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _examples_of(batch: dict, preds, ignore_label: int, limit: int) -> list:
  """Up to `limit` (image, label, pred) numpy triples of a device-shaped batch, padding examples left out."""
  images = batch['image'].reshape((-1,) + batch['image'].shape[2:])
  labels = batch['label'].reshape((-1,) + batch['label'].shape[2:])
  out = []
  real = [i for i in range(len(labels)) if np.any(labels[i] != ignore_label)][:limit]
  if real:
    preds = np.asarray(jax.device_get(preds))
    preds = preds.reshape((-1,) + preds.shape[2:])
    out = [(images[i], labels[i], preds[i]) for i in real]
  return out


def eval_pictures(result: dict, spec) -> dict:
  """TensorBoard pictures of an evaluation: name -> uint8 [N, H, W, 3]."""
  pictures = {}
  palette = viz.palette_for(spec.name, spec.num_classes)
  examples = result.get(EXAMPLES_KEY) or []
  if examples:
    panels = [viz.comparison_panel(i, l, p, palette, ignore_label=spec.ignore_label) for i, l, p in examples]
    pictures['examples'] = np.stack(panels)  # Same eval_size for all: image | ground truth | prediction.
  if result.get('confusion_matrix') is not None:
    pictures['confusion_matrix'] = viz.confusion_matrix_image(
        np.asarray(result['confusion_matrix']), spec.class_names)[None]
  return pictures


def log_eval(writer: reporting.MetricWriter, step: int, result: dict, spec, is_primary: bool, *,
             split: str = 'eval', include_confusion: bool = False) -> None:
  """Writes an evaluation: figures to metrics.jsonl/TensorBoard, pictures to TensorBoard, a console line.

  Private keys (the example triples) are removed from `result`, so what the
  caller keeps is plain figures.
  """
  pictures = eval_pictures(result, spec) if is_primary else {}
  for key in [k for k in result if k.startswith('_')]:
    del result[key]
  drop = () if include_confusion else ('confusion_matrix',)
  scalars = {k: v for k, v in result.items() if k not in drop and not isinstance(v, dict)}
  scalars.setdefault('class_names', list(spec.class_names))
  writer.write(step, split, scalars)
  for name, images in pictures.items():
    writer.write_images(step, f'{split}/{name}', images)
  if is_primary:
    log.info('%s at step %d | loss %.4f | mean IoU %.4f | pixel acc %.4f | mean class acc %.4f',
             split.replace('_', ' '), step, result.get('loss', float('nan')), result['mean_iou'],
             result['pixel_accuracy'], result['mean_class_accuracy'])


def evaluate_with_predictor(predictor, builder, spec: datasets.DatasetSpec, *, show_progress: bool = True) -> dict:
  """Scores `predictor` (whole or sliding window, TTA) on the evaluation split at each label's own size.

  Each process scores its share of the split; the confusion matrices are
  summed over processes.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  subsplit = tfds.even_splits(spec.eval_split, n=jax.process_count(), drop_remainder=False)[jax.process_index()]
  count = builder.info.splits[subsplit].num_examples
  ds = builder.as_dataset(split=subsplit, shuffle_files=False, decoders={
      spec.image_key: tfds.decode.SkipDecoding(), spec.label_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: pipeline.decode_example(ex, spec))
  labels = collections.deque()

  def images():
    for image, label in tfds.as_numpy(ds):
      labels.append(label)
      yield image

  k = spec.num_classes
  confusion = np.zeros((k, k), np.int64)
  with tqdm.tqdm(total=count, desc='Evaluating (' + predictor.options.describe() + ')', unit='img',
                 file=sys.stderr, disable=not show_progress or jax.process_index() != 0) as bar:
    for mask in predictor.iter_masks(images()):
      confusion += numpy_confusion(labels.popleft(), mask, k, spec.ignore_label)
      bar.update(1)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(axis=0)
  result = metrics_lib.metrics_from_confusion(confusion, spec.class_names)
  result['confusion_matrix'] = confusion.tolist()
  return result


def numpy_confusion(label: np.ndarray, pred: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
  """[K, K] int64 counts (rows ground truth, columns prediction) of one image, ignored pixels left out."""
  label = np.asarray(label).astype(np.int64).reshape(-1)
  pred = np.asarray(pred).astype(np.int64).reshape(-1)
  valid = label != ignore_label
  index = label[valid] * num_classes + pred[valid]
  return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'best') -> dict:
  """Restores the best (or latest) checkpoint of `workdir`, evaluates it, prints a per-class table.

  The standard evaluation is the one training runs (images padded to
  input.eval_size; larger ones segmented at full resolution as --mode=predict
  does; every label scored at its own size). When config.inference asks for TTA (flip, scales) or names
  a mode ('whole' or 'slide'), the split is scored a second time with those
  settings, at each label's own resolution; both figures are reported, the
  second under the key 'inference' and the metrics.jsonl split 'eval_inference'.
  """
  config_utils.validate(config)
  compilation_cache.enable(config)
  pipeline.hide_accelerators_from_tf()
  workdir = os.path.abspath(workdir)
  is_primary = jax.process_index() == 0
  config_utils.check_batch(config, jax.device_count(), jax.process_count())
  options = inference_lib.options_from_config(config)  # Checked before any work.
  spec, builder = datasets.open_dataset(config.dataset)
  _, state, step = inference_lib.restore_state(config, workdir, spec, checkpoint=checkpoint)
  host_variables = variables_of(state)
  log.info('Evaluating the %s checkpoint: step %d of %s', checkpoint, step, os.path.join(workdir, 'checkpoints'))
  state = state_lib.replicate(state)
  p_eval = make_eval_step(config, spec)
  eval_ds, eval_batches = pipeline.eval_dataset(
      builder, spec, config.input, global_batch=config.eval_batch_size, local_devices=jax.local_device_count(),
      process_index=jax.process_index(), process_count=jax.process_count(), cache=False)
  result = run_evaluation(p_eval, state, eval_ds, eval_batches, spec, config)
  result['checkpoint_step'] = step
  writer = reporting.MetricWriter(workdir, enabled=is_primary)
  log_eval(writer, step, result, spec, is_primary, include_confusion=True)

  if options.uses_tta or options.mode != 'auto':
    del state  # The predictor holds its own replicated copy.
    model = state_lib.build_model(config, spec.num_classes, axis_name=None)
    predictor = inference_lib.Predictor(model, host_variables, spec.num_classes, options,
                                    dtype=state_lib.compute_dtype(config))
    extra = evaluate_with_predictor(predictor, builder, spec)
    extra['settings'] = options.describe()
    extra['checkpoint_step'] = step
    log_eval(writer, step, extra, spec, is_primary, split='eval_inference', include_confusion=True)
    result['inference'] = extra
  writer.close()
  if is_primary:
    print(f'Checkpoint step {step} ({checkpoint}): mean IoU {result["mean_iou"]:.4f}, pixel accuracy '
          f'{result["pixel_accuracy"]:.4f}, mean class accuracy {result["mean_class_accuracy"]:.4f}')
    print(reporting.format_iou_table(result['per_class_iou'], spec.class_names, result['per_class_accuracy']))
    if 'inference' in result:
      extra = result['inference']
      what = 'TTA' if options.uses_tta else 'these settings'
      print(f'\nWith {options.describe()} (each label at its own size): mean IoU {extra["mean_iou"]:.4f} '
            f'(without {what}: {result["mean_iou"]:.4f}), pixel accuracy {extra["pixel_accuracy"]:.4f}, '
            f'mean class accuracy {extra["mean_class_accuracy"]:.4f}')
      print(reporting.format_iou_table(extra['per_class_iou'], spec.class_names, extra['per_class_accuracy']))
  return result
