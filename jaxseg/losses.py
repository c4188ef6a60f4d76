"""Pixel-wise losses for segmentation, multi-class (softmax) and multi-label (sigmoid).

Shapes: logits [..., H, W, K]. Multi-class labels are class indices [..., H, W]; multi-label labels are
[..., H, W, K] with 0 (absent), 1 (present) or the ignore label per (pixel, class) entry. Ignored pixels
(entries) count nowhere, neither in a numerator nor in a denominator.

Each term is computed on the array it is given as a whole: the train step gives it the global batch (a global
array over the mesh), so a mean is over the valid pixels of the whole batch, Dice's sums are over the whole
batch, and Lovász sorts the errors of the whole batch, whatever the number of devices; XLA adds the
cross-device sums (and, for Lovász's sort, the gather). Everything is computed in float32, or float64 for
float64 logits.

The terms (config.loss.terms combines them with weights):
  cross_entropy  softmax cross-entropy; multi-label: binary cross-entropy per class
  focal          Lin et al. 2017: softmax focal (class weights as alpha_t); multi-label: sigmoid focal (alpha)
  dice           soft Dice (Milletari et al. 2016), per class over the batch
  jaccard        soft Jaccard (IoU), per class over the batch
  tversky        Tversky (Salehi et al. 2017): alpha weighs false positives, beta false negatives
  lovasz         Berman et al. 2018: Lovász-softmax over the classes present; multi-label: Lovász hinge per class
Class weights w_c weigh pixels of class c in cross-entropy and focal (means divide by the summed weights, as
PyTorch's weighted cross-entropy does) and classes in the per-class terms (a weighted mean over classes).
"""

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

TERMS = ('cross_entropy', 'focal', 'dice', 'jaccard', 'tversky', 'lovasz')


@dataclasses.dataclass(frozen=True)
class LossParams:
  """The parameters of the terms (config.loss)."""
  focal_gamma: float = 2.0  # Focusing exponent: (1 - p_t)^gamma; 0 gives cross-entropy.
  focal_alpha: float = 0.25  # Sigmoid focal: positives weigh alpha, negatives 1 - alpha; < 0: no balancing.
  tversky_alpha: float = 0.5  # Weight of false positives (alpha = beta = 0.5 is Dice).
  tversky_beta: float = 0.5  # Weight of false negatives.
  smooth: float = 1.0  # Added to numerator and denominator of Dice, Jaccard and Tversky.


def _float(logits: jnp.ndarray) -> jnp.ndarray:
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _ratio(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """num / den, and 0 where den is 0 (nothing counted), with a finite gradient."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


def _class_weights(class_weights, k: int, dtype) -> jnp.ndarray:
  return jnp.ones((k,), dtype) if class_weights is None else jnp.asarray(class_weights, dtype)


def cross_entropy_sums(logits: jnp.ndarray, labels: jnp.ndarray, *, ignore_label: int,
                       class_weights: Optional[Sequence[float]] = None,
                       multilabel: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Cross-entropy summed over the valid pixels (entries): (sum of w * ce, sum of w).

  Multi-class: softmax cross-entropy, pixel p of class c weighs w_c. Multi-label: binary cross-entropy of
  each valid (pixel, class) entry, weighing w_c. Evaluation adds these sums over batches and processes.
  """
  logits = _float(logits)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_label
  weights = _class_weights(class_weights, logits.shape[-1], logits.dtype)
  if multilabel:
    ce = optax.sigmoid_binary_cross_entropy(logits, (labels == 1).astype(logits.dtype))
    w = valid * weights
  else:
    safe_labels = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    w = valid * weights[safe_labels]
  return jnp.sum(ce * w), jnp.sum(w)


def _targets(logits: jnp.ndarray, labels: jnp.ndarray, ignore_label: int, multilabel: bool):
  """(probabilities P, 0/1 targets Y, valid 0/1), each [..., K], P and Y zero where not valid."""
  labels = labels.astype(jnp.int32)
  if multilabel:
    valid = (labels != ignore_label).astype(logits.dtype)
    probs = jax.nn.sigmoid(logits)
    targets = (labels == 1).astype(logits.dtype)
  else:
    valid = (labels != ignore_label)[..., None].astype(logits.dtype)
    probs = jax.nn.softmax(logits, axis=-1)
    targets = jax.nn.one_hot(jnp.where(labels == ignore_label, 0, labels), logits.shape[-1], dtype=logits.dtype)
    valid = jnp.broadcast_to(valid, probs.shape)
  return probs * valid, targets * valid, valid


def focal_loss(logits, labels, *, ignore_label: int, multilabel: bool, class_weights=None, gamma: float = 2.0,
               alpha: float = 0.25) -> jnp.ndarray:
  """Focal loss, -alpha_t (1 - p_t)^gamma log p_t, averaged as cross-entropy is (over the weights of the valid)."""
  logits = _float(logits)
  labels = labels.astype(jnp.int32)
  weights = _class_weights(class_weights, logits.shape[-1], logits.dtype)
  valid = labels != ignore_label
  if multilabel:
    positive = labels == 1
    # log p_t and log(1 - p_t) from the logit, stable: p_t = sigmoid(+-x).
    signed = jnp.where(positive, logits, -logits)
    log_pt = jax.nn.log_sigmoid(signed)
    alpha_t = jnp.where(positive, alpha, 1 - alpha) if alpha >= 0 else 1.0
    w = valid * weights
  else:
    safe = jnp.where(valid, labels, 0)
    log_pt = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None], axis=-1)[..., 0]
    alpha_t = 1.0
    w = valid * weights[safe]
  # (1 - p_t)^gamma with gamma = 0 is 1 everywhere (also where p_t = 1), as the paper's gamma = 0 is CE.
  modulating = (-jnp.expm1(log_pt)) ** gamma if gamma else 1.0
  return _ratio(jnp.sum(-alpha_t * modulating * log_pt * w), jnp.sum(w))


def _counted_classes(k: int, multilabel: bool) -> jnp.ndarray:
  """Which classes the per-class overlap terms may average: all, but the foreground only for a 2-class softmax task
  (and only those with a valid pixel)."""
  counted = jnp.ones((k,), bool)
  return counted.at[0].set(False) if (not multilabel and k == 2) else counted


def overlap_loss(name: str, logits, labels, *, ignore_label: int, multilabel: bool, class_weights=None,
                 params: LossParams = LossParams()) -> jnp.ndarray:
  """1 - the weighted mean over classes of soft Dice, Jaccard or Tversky, each class's sums over the batch."""
  logits = _float(logits)
  probs, targets, valid = _targets(logits, labels, ignore_label, multilabel)
  axes = tuple(range(logits.ndim - 1))
  inter = jnp.sum(probs * targets, axis=axes)
  pred = jnp.sum(probs, axis=axes)
  true = jnp.sum(targets, axis=axes)
  s = params.smooth
  if name == 'dice':
    score = (2 * inter + s) / (pred + true + s)
  elif name == 'jaccard':
    score = (inter + s) / (pred + true - inter + s)
  elif name == 'tversky':
    score = (inter + s) / (inter + params.tversky_alpha * (pred - inter) + params.tversky_beta * (true - inter) + s)
  else:
    raise ValueError(f'unknown overlap loss {name!r}')
  k = logits.shape[-1]
  # A class without a valid pixel (multi-label: every entry of it ignored) counts nowhere, as in the other terms.
  counted = _counted_classes(k, multilabel) & (jnp.sum(valid, axis=axes) > 0)
  w = _class_weights(class_weights, k, logits.dtype) * counted
  return _ratio(jnp.sum(w * (1 - score)), jnp.sum(w))


def _lovasz_gradient(sorted_targets: jnp.ndarray, sorted_valid: jnp.ndarray) -> jnp.ndarray:
  """The Lovász extension's weights for errors sorted in decreasing order (Berman et al. 2018, Alg. 1).

  sorted_targets [N, K] 0/1, sorted_valid [N, K] 0/1 (invalid entries, sorted last, get weight 0):
  J_i = 1 - (G - cumsum(fg)_i) / (G + cumsum(1 - fg)_i) over the valid entries, g = J_i - J_{i-1}.
  """
  fg = sorted_targets * sorted_valid
  g = jnp.sum(fg, axis=0)
  inter = g - jnp.cumsum(fg, axis=0)
  union = g + jnp.cumsum((1 - sorted_targets) * sorted_valid, axis=0)
  jaccard = 1 - _ratio(inter, union)
  grad = jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]], axis=0)
  return grad * sorted_valid


def lovasz_loss(logits, labels, *, ignore_label: int, multilabel: bool, class_weights=None) -> jnp.ndarray:
  """Lovász-softmax (multi-class, classes present in the batch) or Lovász hinge per class (multi-label).

  Every class's errors over the valid pixels of the whole batch are sorted together (the loss is of the
  batch's Jaccard index, not a sum over pixels); classes then average with their weights.
  """
  logits = _float(logits)
  k = logits.shape[-1]
  probs, targets, valid = _targets(logits, labels, ignore_label, multilabel)
  logits, targets, valid = (a.reshape(-1, k) for a in (logits, targets, valid))
  if multilabel:
    errors = jax.nn.relu(1 - logits * (2 * targets - 1))
    counted = jnp.any(valid > 0, axis=0)
  else:
    errors = jnp.abs(targets - probs.reshape(-1, k))
    counted = jnp.any(targets > 0, axis=0)  # 'present' classes.
  # Invalid entries sort last (key -1 < any error) and weigh nothing.
  order = jnp.argsort(-jnp.where(valid > 0, errors, -1), axis=0)
  take = lambda a: jnp.take_along_axis(a, order, axis=0)
  grad = jax.lax.stop_gradient(_lovasz_gradient(take(targets), take(valid)))
  per_class = jnp.sum(take(errors) * grad, axis=0)
  w = _class_weights(class_weights, k, logits.dtype) * counted
  return _ratio(jnp.sum(w * per_class), jnp.sum(w))


def term_loss(name: str, logits, labels, *, multilabel: bool, ignore_label: int, class_weights=None,
              params: LossParams = LossParams(), gather: Optional[Callable] = None) -> jnp.ndarray:
  """One loss term (of TERMS), a scalar.

  `gather`: applied to the logits and labels of a term that sorts the whole batch (lovasz) before it does. On a
  mesh the train step passes a sharding constraint to the replicated layout: every device then sorts the batch's
  errors itself, where XLA's partitioning of a sort (and of its gradient's scatter) over a sharded axis is
  ~100x slower on CPU (measured: 25 s for one 2-device UNet step).
  """
  if name == 'cross_entropy':
    total, weight = cross_entropy_sums(logits, labels, ignore_label=ignore_label, class_weights=class_weights,
                                       multilabel=multilabel)
    return _ratio(total, weight)
  if name == 'focal':
    return focal_loss(logits, labels, ignore_label=ignore_label, multilabel=multilabel,
                      class_weights=class_weights, gamma=params.focal_gamma, alpha=params.focal_alpha)
  if name in ('dice', 'jaccard', 'tversky'):
    return overlap_loss(name, logits, labels, ignore_label=ignore_label, multilabel=multilabel,
                        class_weights=class_weights, params=params)
  if name == 'lovasz':
    if gather is not None:
      logits, labels = gather(logits), gather(labels)
    return lovasz_loss(logits, labels, ignore_label=ignore_label, multilabel=multilabel,
                       class_weights=class_weights)
  raise ValueError(f'unknown loss term {name!r}; the terms are {", ".join(TERMS)}')


def combined_loss(logits, labels, terms: Sequence[tuple[str, float]], *, multilabel: bool, ignore_label: int,
                  class_weights=None, params: LossParams = LossParams(),
                  gather: Optional[Callable] = None) -> jnp.ndarray:
  """sum of weight * term_loss(name) over `terms` [(name, weight), ...] (config.loss.terms); `gather`: term_loss's."""
  return sum(weight * term_loss(name, logits, labels, multilabel=multilabel, ignore_label=ignore_label,
                                class_weights=class_weights, params=params, gather=gather)
             for name, weight in terms)
