"""Confusion-matrix segmentation metrics.

The device side only accumulates a [K, K] confusion matrix (summed across
devices and hosts); every figure is computed from it on the host, so each
valid pixel counts exactly once however the data was sharded. Multi-label
tasks accumulate one 2x2 matrix per class ([K, 2, 2]): each class is its own
binary problem over the pixels where its label is not ignored.
"""

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels: jnp.ndarray, preds: jnp.ndarray, num_classes: int, ignore_label: int) -> jnp.ndarray:
  """[K, K] int32 counts; rows are ground truth, columns predictions; ignored pixels excluded."""
  labels = labels.astype(jnp.int32).reshape(-1)
  preds = preds.astype(jnp.int32).reshape(-1)
  valid = labels != ignore_label
  index = jnp.where(valid, labels * num_classes + preds, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def multilabel_confusion(labels: jnp.ndarray, preds: jnp.ndarray, ignore_label: int) -> jnp.ndarray:
  """[K, 2, 2] int32 counts: [c, truth, prediction] over the entries of class c whose label is 0 or 1.

  labels [..., K] of 0 / 1 / ignore_label; preds [..., K] of 0 / 1.
  """
  k = labels.shape[-1]
  labels = labels.astype(jnp.int32).reshape(-1, k)
  preds = preds.astype(jnp.int32).reshape(-1, k)
  valid = labels != ignore_label
  index = jnp.where(valid, jnp.arange(k) * 4 + labels * 2 + preds, 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32), length=4 * k)
  return counts.astype(jnp.int32).reshape(k, 2, 2)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  out = np.full(num.shape, np.nan, dtype=np.float64)
  np.divide(num, den, out=out, where=den > 0)
  return out


def metrics_from_confusion(cm: np.ndarray, class_names: Optional[Sequence[str]] = None) -> dict:
  """IoU and accuracy figures from a confusion matrix.

  Classes absent from both labels and predictions have IoU NaN and are left
  out of the means (the usual convention, as in mmsegmentation).

  Returns:
    dict with mean_iou, per_class_iou (list, NaN as None), pixel_accuracy,
    mean_class_accuracy, per_class_accuracy, and for binary tasks (K == 2)
    foreground_iou and foreground_dice.
  """
  cm = np.asarray(cm, dtype=np.float64)
  tp = np.diag(cm)
  gt = cm.sum(axis=1)
  pred = cm.sum(axis=0)
  iou = _safe_div(tp, gt + pred - tp)
  acc = _safe_div(tp, gt)
  total = cm.sum()
  out = {
      'mean_iou': float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float('nan'),
      'per_class_iou': [None if np.isnan(v) else float(v) for v in iou],
      'pixel_accuracy': float(tp.sum() / total) if total > 0 else float('nan'),
      'mean_class_accuracy': float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else float('nan'),
      'per_class_accuracy': [None if np.isnan(v) else float(v) for v in acc],
  }
  if cm.shape[0] == 2:
    out['foreground_iou'] = None if np.isnan(iou[1]) else float(iou[1])
    dice = _safe_div(2 * tp[1:2], gt[1:2] + pred[1:2])[0]
    out['foreground_dice'] = None if np.isnan(dice) else float(dice)
  if class_names is not None:
    out['class_names'] = list(class_names)
  return out


def metrics_from_multilabel_confusion(cm: np.ndarray, class_names: Optional[Sequence[str]] = None) -> dict:
  """Per-class binary figures from [K, 2, 2] confusion counts (multilabel_confusion), each class on its own.

  IoU, Dice, precision and recall of each class's positives (prediction at probability 0.5); NaN (None in the
  lists) where undefined (no positive in truth or prediction: IoU, Dice; no predicted positive: precision;
  no true positive pixel: recall), and left out of the means.

  Returns:
    dict with mean_iou, per_class_iou, mean_dice, per_class_dice, per_class_precision, per_class_recall,
    mean_class_accuracy (the mean recall, as a class's accuracy is in multi-class), per_class_accuracy (recall),
    pixel_accuracy (correct (pixel, class) entries over all counted entries).
  """
  cm = np.asarray(cm, dtype=np.float64)
  tn, fp, fn, tp = cm[:, 0, 0], cm[:, 0, 1], cm[:, 1, 0], cm[:, 1, 1]
  iou = _safe_div(tp, tp + fp + fn)
  dice = _safe_div(2 * tp, 2 * tp + fp + fn)
  precision = _safe_div(tp, tp + fp)
  recall = _safe_div(tp, tp + fn)
  mean = lambda v: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float('nan')
  listed = lambda v: [None if np.isnan(x) else float(x) for x in v]
  total = cm.sum()
  out = {
      'mean_iou': mean(iou), 'per_class_iou': listed(iou),
      'mean_dice': mean(dice), 'per_class_dice': listed(dice),
      'per_class_precision': listed(precision), 'per_class_recall': listed(recall),
      'mean_class_accuracy': mean(recall), 'per_class_accuracy': listed(recall),
      'pixel_accuracy': float((tp.sum() + tn.sum()) / total) if total > 0 else float('nan'),
  }
  if class_names is not None:
    out['class_names'] = list(class_names)
  return out
