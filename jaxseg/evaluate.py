"""Evaluation: the jitted eval step, the sums every score is made of, and the evaluation loop.

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
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import inference as inference_lib
from jaxseg import losses
from jaxseg import metrics as metrics_lib
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg.models import normalize_images
from jaxseg.settings import InferenceOptions
from jaxseg.state import TrainState, inference_variables



def eval_step(variables: dict, batch: dict, *, apply_fn, num_classes: int, ignore_label: int, dtype,
              input_stats: tuple, multilabel: bool = False) -> tuple[dict, jax.Array]:
  """Confusion matrix and cross-entropy sums of a global batch, and its predictions.

  `variables`: the weights to evaluate (state.inference_variables), not the whole train state, so the step does
  not depend on the optimiser (a budgeted run changes its schedule after its first evaluation timings).

  Returns:
    ({'confusion' [K, K] (multi-label [K, 2, 2]), 'ce_sum', 'weight_sum'} over the whole batch,
     predictions uint8 [B, H, W] (multi-label [B, H, W, K]), batch-sharded: fetched only for the few images
     shown in TensorBoard).
  """
  images = normalize_images(batch['image'], dtype, *input_stats)
  logits = apply_fn(variables, images, train=False)
  return score_sums(logits, batch['label'], num_classes=num_classes, ignore_label=ignore_label,
                    multilabel=multilabel)


def score_sums(logits: jax.Array, labels: jax.Array, *, num_classes: int, ignore_label: int,
               multilabel: bool = False) -> tuple[dict, jax.Array]:
  """The sums every score is made of: confusion matrix [K, K], cross-entropy sum and weight, and the predictions.

  Multi-label: a 2x2 confusion matrix per class ([K, 2, 2], prediction where the logit is > 0, probability 0.5)
  and binary cross-entropy sums over the (pixel, class) entries. Labels equal to `ignore_label` (padding
  included) count nowhere, so sums over any split of the pixels add up.
  """
  labels = labels.astype(jnp.int32)
  ce_sum, weight_sum = losses.cross_entropy_sums(logits, labels, ignore_label=ignore_label, multilabel=multilabel)
  if multilabel:
    preds = logits > 0
    confusion = metrics_lib.multilabel_confusion(labels, preds, ignore_label)
  else:
    preds = jnp.argmax(logits, axis=-1)
    confusion = metrics_lib.confusion_matrix(labels, preds, num_classes, ignore_label)
  sums = {'confusion': confusion, 'ce_sum': ce_sum, 'weight_sum': weight_sum}
  return sums, preds.astype(jnp.uint8)


def metrics_from_sums(totals: dict, class_names) -> dict:
  """The figures of an evaluation from its summed confusion matrix (multi-label: [K, 2, 2]) and cross-entropy."""
  confusion = np.asarray(totals['confusion'])
  if confusion.ndim == 3:
    result = metrics_lib.metrics_from_multilabel_confusion(confusion, class_names)
  else:
    result = metrics_lib.metrics_from_confusion(confusion, class_names)
  result['loss'] = float(totals['ce_sum'] / max(totals['weight_sum'], 1.0))
  result['confusion_matrix'] = np.asarray(totals['confusion']).tolist()
  return result


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

  def __init__(self, spec: datasets.DatasetSpec, setup: state_lib.Setup, options: InferenceOptions):
    """`options`: how the larger images are segmented (settings.inference_options(); TTA is not used)."""
    self._spec, self._setup = spec, setup
    batch = sharding.batch_sharding(setup.mesh)
    self._step = jax.jit(
        functools.partial(eval_step, apply_fn=setup.model.apply, num_classes=spec.num_classes,
                          ignore_label=spec.ignore_label, dtype=setup.dtype, input_stats=setup.input_stats,
                          multilabel=spec.multilabel),
        in_shardings=(inference_variables(setup.state_sharding), {'image': batch, 'label': batch}),
        out_shardings=(sharding.replicated(setup.mesh), batch))
    options = dataclasses.replace(options, flip=False, scales=(1.0,))
    self._predictor = inference_lib.Predictor.create(setup.model, None, spec.num_classes, options,
                                                     dtype=setup.dtype, input_stats=setup.input_stats,
                                                     multilabel=spec.multilabel)

  def run(self, state: TrainState, eval_data: pipeline.EvalData, *, num_examples: int = 3) -> tuple[dict, list]:
    """The metrics of `state` on the evaluation split (this process reads its share: pipeline.eval_dataset).

    Returns:
      (metrics, up to `num_examples` (image, label, prediction) triples of the first batches, for pictures).
    """
    totals = None
    examples = []
    for batch in pipeline.as_numpy(eval_data.batches):
      sums, preds = self._step(inference_variables(state), sharding.global_batch(batch, self._setup.mesh))
      if len(examples) < num_examples:
        examples.extend(_examples_of(batch, preds, self._spec.ignore_label, num_examples - len(examples)))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: np.asarray(v, np.float64 if k != 'confusion' else np.int64)
              for k, v in jax.device_get(totals).items()}
    extra = self._large_example_sums(state, eval_data.large)
    totals = {k: v + extra[k] for k, v in totals.items()}
    return metrics_from_sums(totals, self._spec.class_names), examples

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

  The sums are the eval step's (`score_sums`), jitted on the image padded with
  the ignore label to a multiple of PAD_MULTIPLE: a few compiled shapes for any
  mix of image sizes, and the padding counts nowhere.
  """
  PAD_MULTIPLE = 64

  def __init__(self, spec: datasets.DatasetSpec):
    self._spec = spec
    k = spec.num_classes
    confusion = (k, 2, 2) if spec.multilabel else (k, k)
    self._sums = {'confusion': np.zeros(confusion, np.int64), 'ce_sum': np.zeros((), np.float64),
                  'weight_sum': np.zeros((), np.float64)}

  def add(self, scores: np.ndarray, label: np.ndarray) -> None:
    """scores: float32 [H, W, K] (logits, or TTA's mean probabilities: their log is used); label: [H, W]
    (multi-label: [H, W, K], and the scores logits)."""
    h, w = label.shape[:2]
    m = self.PAD_MULTIPLE
    ph, pw = -h % m, -w % m
    label = np.asarray(label, np.int32)
    label = np.pad(label, ((0, ph), (0, pw)) + ((0, 0),) * (label.ndim - 2), constant_values=self._spec.ignore_label)
    scores = np.pad(np.asarray(scores, np.float32), ((0, ph), (0, pw), (0, 0)))
    sums, _ = _image_sums(scores, label, num_classes=self._spec.num_classes, ignore_label=self._spec.ignore_label,
                          multilabel=self._spec.multilabel)
    for key, value in jax.device_get(sums).items():
      self._sums[key] = self._sums[key] + value

  def totals(self) -> dict:
    """The sums over every process (all processes must call it)."""
    if jax.process_count() == 1:
      return dict(self._sums)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return {key: np.asarray(multihost_utils.process_allgather(v)).sum(axis=0) for key, v in self._sums.items()}


_image_sums = jax.jit(score_sums, static_argnames=('num_classes', 'ignore_label', 'multilabel'))


def _examples_of(batch: dict, preds: jax.Array, ignore_label: int, limit: int) -> list:
  """Up to `limit` (image, label, pred) numpy triples of this process's batch, padding examples left out."""
  images, labels = batch['image'], batch['label']
  real = [i for i in range(len(labels)) if np.any(labels[i] != ignore_label)][:limit]  # Any label rank.
  if not real:
    return []
  preds = sharding.local_rows(preds)
  return [(images[i], labels[i], preds[i]) for i in real]


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
      tta_probs = predictor.options.uses_tta and not predictor.multilabel  # Multi-label scores are logits.
      sums.add(np.log(np.maximum(scores, 1e-30)) if tta_probs else scores, labels.popleft())
      bar.update(1)
  return metrics_from_sums(sums.totals(), spec.class_names)
