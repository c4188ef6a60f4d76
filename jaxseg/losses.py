"""Pixel-wise losses for segmentation.

Every loss here returns *sums* and *counts* over the pixels of the batch it is
given, never means: the train step adds them up across devices (and hosts) so
the loss is a mean over the non-ignored pixels of the global batch, whatever
the number of devices.
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax


def cross_entropy_sums(logits: jnp.ndarray, labels: jnp.ndarray, *, ignore_label: int,
                       class_weights: Optional[Sequence[float]] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Softmax cross-entropy summed over valid pixels.

  Args:
    logits: [..., H, W, K] (any float dtype; computed in float32).
    labels: [..., H, W] integer class indices; `ignore_label` pixels count nowhere.
    ignore_label: label value that is excluded from the loss.
    class_weights: optional [K] weights; pixel p of class c weighs w_c. As in
      PyTorch's weighted cross-entropy, the mean divides by the summed weights.

  Returns:
    (sum over valid pixels of w * ce, sum over valid pixels of w).
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe_labels]
  return jnp.sum(ce * weights), jnp.sum(weights)


def dice_terms(logits: jnp.ndarray, labels: jnp.ndarray, *, ignore_label: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-class soft-Dice terms summed over valid pixels: (intersection [K], sum of cardinalities [K])."""
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  valid = (labels != ignore_label)[..., None].astype(jnp.float32)
  onehot = jax.nn.one_hot(jnp.where(labels == ignore_label, 0, labels), num_classes) * valid
  probs = probs * valid
  axes = tuple(range(logits.ndim - 1))
  return jnp.sum(probs * onehot, axis=axes), jnp.sum(probs + onehot, axis=axes)


def dice_loss_from_terms(intersection: jnp.ndarray, cardinality: jnp.ndarray, *, smooth: float = 1.0,
                         classes: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """1 - mean over classes of (2 I + s) / (C + s); `classes` selects which classes count (e.g. foreground)."""
  dice = (2.0 * intersection + smooth) / (cardinality + smooth)
  if classes is not None:
    dice = dice[classes]
  return 1.0 - jnp.mean(dice)
