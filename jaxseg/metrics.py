"""Confusion-matrix segmentation metrics.

The device side only accumulates a [K, K] confusion matrix (summed across
devices and hosts); every figure is computed from it on the host, so each
valid pixel counts exactly once however the data was sharded.
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
