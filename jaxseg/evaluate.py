"""Evaluation: the jitted eval step, the evaluation loop, and the --mode=eval job.

The eval step runs on global batches over the mesh and returns the batch's
confusion matrix and cross-entropy sums as replicated arrays (XLA sums them
over all devices of all hosts); padding pixels carry the ignore label, so
each real pixel counts exactly once. Images larger than input.eval_size skip
the fixed-size batches: the inference Predictor segments them at full
resolution on this process's devices and they are scored at the label's own
size.
"""

import collections
import dataclasses
import functools
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import checkpoint as checkpoint_lib
from jaxseg import compilation_cache
from jaxseg import config_utils
from jaxseg import finetune
from jaxseg import inference as inference_lib
from jaxseg import losses
from jaxseg import metrics as metrics_lib
from jaxseg import recipe
from jaxseg import reporting
from jaxseg import sharding
from jaxseg import viz
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg import state as state_lib
from jaxseg.models import normalize_images
from jaxseg.state import TrainState, inference_variables

log = logging.getLogger('jaxseg')


def eval_step(state: TrainState, batch: dict, *, num_classes: int, ignore_label: int, dtype,
              input_stats: tuple) -> tuple[dict, jax.Array]:
  """Confusion matrix and cross-entropy sums of a global batch, and its predictions.

  Returns:
    ({'confusion' [K, K], 'ce_sum', 'weight_sum'} over the whole batch,
     predictions uint8 [B, H, W], batch-sharded: fetched only for the few images shown in TensorBoard).
  """
  images = normalize_images(batch['image'], dtype, *input_stats)
  labels = batch['label'].astype(jnp.int32)
  logits = state.apply_fn(inference_variables(state), images, train=False)
  ce_sum, weight_sum = losses.cross_entropy_sums(logits, labels, ignore_label=ignore_label)
  preds = jnp.argmax(logits, axis=-1)
  sums = {'confusion': metrics_lib.confusion_matrix(labels, preds, num_classes, ignore_label),
          'ce_sum': ce_sum, 'weight_sum': weight_sum}
  return sums, preds.astype(jnp.uint8)


# Result keys that are not figures: log_eval turns them into pictures and strips them.
EXAMPLES_KEY = '_examples'


class Evaluator:
  """Evaluates a train state on the evaluation split; built (and compiled) once per run.

  The weights are `state.inference_variables(state)`: the moving averages when
  training keeps them (config.ema_decay > 0), else the live ones.

  Examples that fit input.eval_size are scored in global batches by the
  jitted eval step. Larger examples are segmented at full resolution by the
  inference Predictor (on this process's devices, the one --mode=predict
  uses, with config.inference's mode, window and stride and without TTA) and
  scored at their label's own size; the sums of all processes are added up.
  Every process calls `run` with its share of the split.
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: datasets.DatasetSpec, setup: state_lib.Setup):
    self._spec, self._setup = spec, setup
    batch = sharding.batch_sharding(setup.mesh)
    self._step = jax.jit(
        functools.partial(eval_step, num_classes=spec.num_classes, ignore_label=spec.ignore_label, dtype=setup.dtype,
                          input_stats=setup.input_stats),
        in_shardings=(setup.state_sharding, {'image': batch, 'label': batch}),
        out_shardings=(sharding.replicated(setup.mesh), batch))
    options = dataclasses.replace(inference_lib.options_from_config(config), flip=False, scales=(1.0,))
    self._predictor = inference_lib.Predictor(setup.model, None, spec.num_classes, options, dtype=setup.dtype,
                                              input_stats=setup.input_stats)

  def run(self, state: TrainState, eval_data: pipeline.EvalData, *, num_examples: int = 3) -> dict:
    """Host metrics of `state` on this process's share of the evaluation split (pipeline.eval_dataset).

    The result also holds, under EXAMPLES_KEY, up to `num_examples` (image,
    label, prediction) triples of the first batches for log_eval's pictures.
    """
    totals = None
    examples = []
    for batch in pipeline.as_numpy(eval_data.batches):
      sums, preds = self._step(state, sharding.global_batch(batch, self._setup.mesh))
      if len(examples) < num_examples:
        examples.extend(_examples_of(batch, preds, self._spec.ignore_label, num_examples - len(examples)))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: np.asarray(v, np.float64 if k != 'confusion' else np.int64)
              for k, v in jax.device_get(totals).items()}
    extra = self._large_example_sums(state, eval_data.large)
    totals = {k: v + extra[k] for k, v in totals.items()}
    result = metrics_lib.metrics_from_confusion(totals['confusion'], self._spec.class_names)
    result['loss'] = float(totals['ce_sum'] / max(totals['weight_sum'], 1.0))
    result['confusion_matrix'] = totals['confusion'].tolist()
    result[EXAMPLES_KEY] = examples
    return result

  def _large_example_sums(self, state: TrainState, large) -> dict:
    """Sums over the examples larger than eval_size of every process (a collective: all processes call it)."""
    sums = FullSizeSums(self._spec)
    any_large = next(pipeline.as_numpy(large.take(1)), None) is not None  # Read from the cache: cheap.
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      any_large = bool(np.any(multihost_utils.process_allgather(np.array(any_large))))
    if not any_large:
      return sums.totals()
    # Every process takes a full copy of the variables (a gather under fsdp), with large examples or not.
    predictor = self._predictor.with_variables(sharding.fetch_replicated(inference_variables(state), self._setup.mesh))
    labels = collections.deque()

    def images():
      for example in pipeline.as_numpy(large):
        labels.append(example['label'])
        yield example['image']

    for logits in predictor.iter_scores(images()):
      sums.add(logits, labels.popleft())
    return sums.totals()


class FullSizeSums:
  """Confusion matrix and cross-entropy sums of images scored one by one at their own size, over all processes.

  The figures come from metrics.confusion_matrix and losses.cross_entropy_sums
  (the eval step's own functions), jitted on the image padded with the ignore
  label to a multiple of PAD_MULTIPLE: a few compiled shapes for any mix of
  image sizes, and the padding counts nowhere.
  """
  PAD_MULTIPLE = 64

  def __init__(self, spec: datasets.DatasetSpec):
    self._spec = spec
    k = spec.num_classes
    self._sums = {'confusion': np.zeros((k, k), np.int64), 'ce_sum': np.zeros((), np.float64),
                  'weight_sum': np.zeros((), np.float64)}

  def add(self, scores: np.ndarray, label: np.ndarray) -> None:
    """scores: float32 [H, W, K] (logits, or TTA's mean probabilities: their log is used); label: [H, W]."""
    h, w = label.shape
    m = self.PAD_MULTIPLE
    ph, pw = -h % m, -w % m
    label = np.pad(np.asarray(label, np.int32), ((0, ph), (0, pw)), constant_values=self._spec.ignore_label)
    scores = np.pad(np.asarray(scores, np.float32), ((0, ph), (0, pw), (0, 0)))
    sums = _image_sums(scores, label, num_classes=self._spec.num_classes, ignore_label=self._spec.ignore_label)
    for key, value in jax.device_get(sums).items():
      self._sums[key] = self._sums[key] + value

  def totals(self) -> dict:
    """The sums over every process (all processes must call it)."""
    if jax.process_count() == 1:
      return dict(self._sums)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return {key: np.asarray(multihost_utils.process_allgather(v)).sum(axis=0) for key, v in self._sums.items()}


@functools.partial(jax.jit, static_argnames=('num_classes', 'ignore_label'))
def _image_sums(logits, labels, *, num_classes: int, ignore_label: int) -> dict:
  ce_sum, weight_sum = losses.cross_entropy_sums(logits, labels, ignore_label=ignore_label)
  preds = jnp.argmax(logits, axis=-1)
  return {'confusion': metrics_lib.confusion_matrix(labels, preds, num_classes, ignore_label),
          'ce_sum': ce_sum, 'weight_sum': weight_sum}


def _examples_of(batch: dict, preds: jax.Array, ignore_label: int, limit: int) -> list:
  """Up to `limit` (image, label, pred) numpy triples of this process's batch, padding examples left out."""
  images, labels = batch['image'], batch['label']
  real = [i for i in range(len(labels)) if np.any(labels[i] != ignore_label)][:limit]
  if not real:
    return []
  preds = sharding.local_rows(preds)
  return [(images[i], labels[i], preds[i]) for i in real]


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
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  share = pipeline.process_share(pipeline.split_size(builder, spec.eval_split), jax.process_index(),
                                 jax.process_count())
  count = len(share)
  ds = pipeline.records(builder, spec, spec.eval_split, tf.data.Dataset.from_tensor_slices(share))
  ds = ds.map(pipeline.no_autograph(lambda ex: pipeline.decode_example(ex, spec)))
  labels = collections.deque()

  def images():
    for image, label in tfds.as_numpy(ds):
      labels.append(label)
      yield image

  sums = FullSizeSums(spec)
  with tqdm.tqdm(total=count, desc='Evaluating (' + predictor.options.describe() + ')', unit='img',
                 file=sys.stderr, disable=not show_progress or jax.process_index() != 0) as bar:
    for scores in predictor.iter_scores(images()):
      sums.add(scores if not predictor.options.uses_tta else np.log(np.maximum(scores, 1e-30)), labels.popleft())
      bar.update(1)
  totals = sums.totals()
  result = metrics_lib.metrics_from_confusion(totals['confusion'], spec.class_names)
  result['loss'] = float(totals['ce_sum'] / max(totals['weight_sum'], 1.0))
  result['confusion_matrix'] = totals['confusion'].tolist()
  return result


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
  config = recipe.settle(config, workdir)  # 'auto' sizes: those training chose.
  is_primary = jax.process_index() == 0
  config_utils.check_batch(config, jax.device_count())
  options = inference_lib.options_from_config(config)  # Checked before any work.
  spec, builder = datasets.open_dataset(config.dataset, in_channels=finetune.in_channels_of(config.model))
  setup = state_lib.build(config, spec.num_classes, sharding.make_mesh())
  state, step = checkpoint_lib.restore_trained(config, workdir, setup.abstract_state, checkpoint=checkpoint)
  log.info('Evaluating the %s checkpoint: step %d of %s', checkpoint, step, os.path.join(workdir, 'checkpoints'))
  eval_data = pipeline.eval_dataset(
      builder, spec, config.input, global_batch=config.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  result = Evaluator(config, spec, setup).run(state, eval_data)
  result['checkpoint_step'] = step
  writer = reporting.MetricWriter(workdir, enabled=is_primary)
  log_eval(writer, step, result, spec, is_primary, include_confusion=True)

  if options.uses_tta or options.mode != 'auto':
    variables = sharding.fetch_replicated(inference_variables(state), setup.mesh)
    del state  # The predictor holds its own copy.
    predictor = inference_lib.Predictor(setup.model, variables, spec.num_classes, options, dtype=setup.dtype,
                                        input_stats=setup.input_stats)
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
