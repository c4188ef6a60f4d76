"""jaxseg.losses' terms against independent numpy references written from the papers' formulas.

References (float64 numpy, written without reading jaxseg/losses.py):
  cross entropy / BCE with logits; focal loss (Lin et al. 2017, softmax and sigmoid forms); soft Dice
  (Milletari et al. 2016); soft Jaccard; Tversky (Salehi et al. 2017); Lovász-softmax (Berman et al. 2018,
  Alg. 1, classes='present') and the Lovász hinge (same paper), in jaxseg's conventions:
  - Invalid pixels (multiclass) / entries (multilabel) count nowhere.
  - Dice, Jaccard and Tversky sum over the whole batch per class, then 1 - weighted mean of the per-class
    scores over the counted classes (all K, but only class 1 for a multiclass task with K == 2; a class with no
    valid entry, e.g. a multi-label class whose every entry is ignored, is not counted).
  - Lovász-softmax averages over the classes present among the batch's valid labels; the Lovász hinge over
    the classes with at least one valid entry.
Gradients w.r.t. the logits: jax's against central finite differences of the reference, in float64
(jax's x64 mode, switched on only inside a context manager). The float32 path is checked against the same
float64 reference with a looser tolerance.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import losses

IGNORE = 255
TERMS = ('cross_entropy', 'focal', 'dice', 'jaccard', 'tversky', 'lovasz')
F64_TOL = 1e-6
F32_TOL = 1e-5


@contextlib.contextmanager
def x64():
  """jax's float64 mode for the block, restored afterwards (jax.enable_x64 on jax 0.10.2 and 0.12.1)."""
  if hasattr(jax, 'enable_x64'):
    with jax.enable_x64(True):
      yield
  else:  # Older jax.
    from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
    with enable_x64():
      yield


# ----------------------------------------------------------------------------------------------------------
# numpy references (float64)
# ----------------------------------------------------------------------------------------------------------


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def np_lovasz_grad(fg_sorted):
  """Berman et al. 2018, Alg. 1: g_i = J_i - J_{i-1}, J_i = 1 - (G - cumsum(fg)_i) / (G + cumsum(1 - fg)_i)."""
  fg = fg_sorted.astype(np.float64)
  total = fg.sum()
  intersection = total - np.cumsum(fg)
  union = total + np.cumsum(1.0 - fg)
  jac = 1.0 - intersection / union
  grad = jac.copy()
  grad[1:] = jac[1:] - jac[:-1]
  return grad


def np_lovasz_sorted_dot(errors, fg, hinge):
  order = np.argsort(-errors, kind='stable')
  e = errors[order]
  if hinge:
    e = np.maximum(e, 0.0)
  return float(np.dot(e, np_lovasz_grad(fg[order])))


def ref_loss(name, logits, labels, *, multilabel, ignore_label=IGNORE, class_weights=None,
             params=losses.LossParams()):
  """The term `name` in jaxseg's conventions (see the module docstring), float64."""
  x = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  k = x.shape[-1]
  w = np.ones(k) if class_weights is None else np.asarray(class_weights, np.float64)
  if multilabel:
    valid = labels != ignore_label  # [B, H, W, K]
    y = np.where(valid, labels, 0).astype(np.float64)
    probs = np_sigmoid(x)
    mask = valid.astype(np.float64)
  else:
    valid = labels != ignore_label  # [B, H, W]
    y_int = np.where(valid, labels, 0).astype(np.int64)
    y = np.eye(k)[y_int] * valid[..., None]
    probs = np.exp(np_log_softmax(x))
    mask = np.broadcast_to(valid[..., None], x.shape).astype(np.float64)

  if name in ('cross_entropy', 'focal'):
    if multilabel:
      nll = np.logaddexp(0.0, x) - x * y  # BCE with logits = -log p_t.
      one_minus_pt = np.where(y == 1, np_sigmoid(-x), np_sigmoid(x))
      weight = w * mask
      if name == 'focal':
        alpha = params.focal_alpha
        alpha_t = np.ones_like(x) if alpha < 0 else np.where(y == 1, alpha, 1.0 - alpha)
        nll = alpha_t * one_minus_pt ** params.focal_gamma * nll
    else:
      lsm = np_log_softmax(x)
      nll = -np.take_along_axis(lsm, y_int[..., None], -1)[..., 0]
      weight = w[y_int] * valid
      if name == 'focal':
        p_y = np.exp(-nll)
        nll = (1.0 - p_y) ** params.focal_gamma * nll
    den = weight.sum()
    return float((weight * nll).sum() / den) if den > 0 else 0.0

  if name in ('dice', 'jaccard', 'tversky'):
    axes = (0, 1, 2)
    inter = (probs * y * mask).sum(axes)
    p_sum = (probs * mask).sum(axes)
    t_sum = (y * mask).sum(axes)
    s = params.smooth
    if name == 'dice':
      score = (2 * inter + s) / (p_sum + t_sum + s)
    elif name == 'jaccard':
      score = (inter + s) / (p_sum + t_sum - inter + s)
    else:
      score = (inter + s) / (inter + params.tversky_alpha * (p_sum - inter)
                             + params.tversky_beta * (t_sum - inter) + s)
    counted = [1] if (not multilabel and k == 2) else list(range(k))
    counted = [c for c in counted if mask[..., c].sum() > 0]  # A class with no valid entry counts nowhere.
    wsum = w[counted].sum()
    if wsum == 0:
      return 0.0
    return float(1.0 - (w[counted] * score[counted]).sum() / wsum)

  if name == 'lovasz':
    num = den = 0.0
    if multilabel:  # Lovász hinge per class over the class's valid entries of the whole batch.
      for c in range(k):
        v = valid[..., c].ravel()
        if not v.any():
          continue
        yc = y[..., c].ravel()[v]
        xc = x[..., c].ravel()[v]
        errors = 1.0 - xc * (2.0 * yc - 1.0)
        num += w[c] * np_lovasz_sorted_dot(errors, yc, hinge=True)
        den += w[c]
    else:  # Lovász-softmax, classes='present', over the valid pixels of the whole batch.
      v = valid.ravel()
      p_v = probs.reshape(-1, k)[v]
      y_v = y_int.ravel()[v]
      for c in range(k):
        fg = (y_v == c).astype(np.float64)
        if not fg.any():
          continue
        num += w[c] * np_lovasz_sorted_dot(np.abs(fg - p_v[:, c]), fg, hinge=False)
        den += w[c]
    return num / den if den > 0 else 0.0

  raise ValueError(name)


def ref_grad(fn, x, h=1e-6):
  """Central finite differences of the scalar numpy function fn at x (float64)."""
  x = np.array(x, np.float64)
  grad = np.zeros_like(x)
  flat, gflat = x.reshape(-1), grad.reshape(-1)
  for i in range(flat.size):
    orig = flat[i]
    flat[i] = orig + h
    up = fn(x)
    flat[i] = orig - h
    down = fn(x)
    flat[i] = orig
    gflat[i] = (up - down) / (2 * h)
  return grad


# ----------------------------------------------------------------------------------------------------------
# cases, and jaxseg's values and gradients. Jitted (as in training), with one compile per task, dtype and static
# arguments, shared by the tests: compiling dominates this file's time on 2 cores, so the cases share compiles
# (the weighted cases also carry the non-default loss parameters, the hand cases are embedded in standard-shaped
# batches).
# ----------------------------------------------------------------------------------------------------------

SHAPE = (2, 5, 7)
TASKS = {'multiclass3': (False, 3), 'multiclass2': (False, 2), 'multilabel3': (True, 3)}
# Random positive class weights, one tuple per K. They are static under jit (as in training, whose step closes over
# config.loss.class_weights), so the cases with the same K share them, and a compile.
WEIGHTS = {k: tuple(float(v) for v in np.random.default_rng(100 + k).uniform(0.2, 2.0, k)) for k in (2, 3, 4)}
# The weighted cases' loss parameters (the unweighted ones use the defaults); focal_alpha matters to the sigmoid
# focal only.
PARAMS_W = losses.LossParams(focal_gamma=1.5, focal_alpha=0.6, tversky_alpha=0.3, tversky_beta=0.7, smooth=0.5)
DEFAULTS = losses.LossParams()
REGION_TERMS = ('dice', 'jaccard', 'tversky')


def make_case(task, weighted, seed=0, ignore_frac=0.2):
  """Random logits [2, 5, 7, K] (spread so that probabilities vary), labels with ~20% ignored; weights, params."""
  multilabel, k = TASKS[task]
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 2.0, SHAPE + (k,))
  if multilabel:
    labels = rng.integers(0, 2, SHAPE + (k,))
  else:
    labels = rng.integers(0, k, SHAPE)
  labels[rng.random(labels.shape) < ignore_frac] = IGNORE
  if weighted:
    return logits, labels.astype(np.int32), multilabel, WEIGHTS[k], PARAMS_W
  return logits, labels.astype(np.int32), multilabel, None, DEFAULTS


@functools.partial(jax.jit, static_argnames=('names', 'multilabel', 'ignore_label', 'class_weights', 'params'))
def _jax_terms(logits, labels, *, names, multilabel, ignore_label, class_weights, params):
  def term(name, x):
    return losses.term_loss(name, x, labels, multilabel=multilabel, ignore_label=ignore_label,
                            class_weights=class_weights, params=params)
  return {name: jax.value_and_grad(functools.partial(term, name))(logits) for name in names}


def jax_terms(logits, labels, *, multilabel, class_weights=None, params=DEFAULTS, names=TERMS, ignore_label=IGNORE,
              f64=True):
  """{name: (value, grad)} as numpy: float64 logits in jax's x64 mode if f64, else float32 logits (x64 off)."""
  with x64() if f64 else contextlib.nullcontext():
    out = _jax_terms(jnp.asarray(logits, jnp.float64 if f64 else jnp.float32), jnp.asarray(labels, jnp.int32),
                     names=tuple(names), multilabel=multilabel, ignore_label=ignore_label,
                     class_weights=class_weights, params=params)
    out = jax.device_get(out)
  return {name: (np.asarray(v), np.array(g)) for name, (v, g) in out.items()}


def case_jax(logits, labels, multilabel, weights, params, **kwargs):
  return jax_terms(logits, labels, multilabel=multilabel, class_weights=weights, params=params, **kwargs)


@functools.lru_cache(maxsize=None)
def grid_jax(task, weighted, f64):
  return case_jax(*make_case(task, weighted), f64=f64)


def reference_and_grad(name, logits, labels, multilabel, weights, params, ignore_label=IGNORE):
  fn = lambda x: ref_loss(name, x, labels, multilabel=multilabel, class_weights=weights, params=params,
                          ignore_label=ignore_label)
  return fn(logits), ref_grad(fn, logits)


@functools.lru_cache(maxsize=None)
def grid_reference(name, task, weighted):
  return reference_and_grad(name, *make_case(task, weighted))


def assert_close(value, grad, ref_value, ref_grad_, tol, what, f64=True):
  dtype = np.float64 if f64 else np.float32
  assert value.dtype == dtype and grad.dtype == dtype, f'{what}: {dtype.__name__} in, {value.dtype}/{grad.dtype} out'
  value = float(value)
  assert np.isfinite(value) and np.all(np.isfinite(grad)), what
  assert abs(value - ref_value) <= tol * max(1.0, abs(ref_value)), f'{what}: value {value!r}, reference {ref_value!r}'
  scale = np.abs(ref_grad_).max()
  err = np.abs(grad - ref_grad_).max()
  assert err <= tol * max(scale, 1e-12), f'{what}: gradient max error {err:.3g}, largest reference entry {scale:.3g}'


# ----------------------------------------------------------------------------------------------------------
# the references themselves, by hand (on the jaxseg side each tiny case sits in a standard-shaped batch whose
# other pixels/entries are all ignored: they count nowhere, so the values are the tiny case's)
# ----------------------------------------------------------------------------------------------------------


def embed(task, values_at):
  """Zero logits and all-ignored labels of `task`'s shape; values_at: [(index, logits or logit, label)]."""
  multilabel, k = TASKS[task]
  logits = np.zeros(SHAPE + (k,))
  labels = np.full(SHAPE + ((k,) if multilabel else ()), IGNORE, np.int32)
  for index, logit, label in values_at:
    logits[index] = logit
    labels[index] = label
  return logits, labels, multilabel


def test_reference_lovasz_hinge_by_hand():
  # One class, 3 entries: logits x = [2, -0.5, 0.25], labels y = [1, 0, 1].
  # sign = 2y - 1 = [1, -1, 1]; errors e = 1 - x * sign = [-1, 0.5, 0.75].
  # Sorted descending: e = [0.75, 0.5, -1] with fg = [1, 0, 1]; G = 2.
  #   cumsum(fg) = [1, 1, 2], cumsum(1 - fg) = [0, 1, 1]
  #   J = 1 - (G - cumsum(fg)) / (G + cumsum(1 - fg)) = [1 - 1/2, 1 - 1/3, 1 - 0/3] = [1/2, 2/3, 1]
  #   g = [1/2, 1/6, 1/3]
  # loss = relu(0.75) * 1/2 + relu(0.5) * 1/6 + relu(-1) * 1/3 = 3/8 + 1/12 = 11/24.
  # d loss / d x = -sign * g * [e > 0], per entry (in the original order): [0, +1/6, -1/2].
  x, y = [2.0, -0.5, 0.25], [1, 0, 1]
  expected_grad = [0.0, 1 / 6, -1 / 2]
  logits = np.array(x).reshape(1, 1, 3, 1)
  labels = np.array(y, np.int32).reshape(1, 1, 3, 1)
  value, grad = reference_and_grad('lovasz', logits, labels, True, None, DEFAULTS)
  assert value == pytest.approx(11 / 24, abs=1e-12)
  np.testing.assert_allclose(grad.ravel(), expected_grad, atol=1e-8)
  # In jaxseg: class 0 of the multilabel batch; classes 1 and 2 have no valid entry and count nowhere.
  logits, labels, _ = embed('multilabel3', [((0, 0, j, 0), x[j], y[j]) for j in range(3)])
  value, grad = jax_terms(logits, labels, multilabel=True)['lovasz']
  assert float(value) == pytest.approx(11 / 24, abs=1e-12)
  np.testing.assert_allclose(grad[0, 0, :3, 0], expected_grad, atol=1e-12)
  grad[0, 0, :3, 0] = 0.0
  assert np.all(grad == 0.0)


def test_reference_lovasz_softmax_by_hand():
  # K = 2, two pixels: logits [0, 0] (p = [1/2, 1/2]) labelled 0, [0, ln 3] (p = [1/4, 3/4]) labelled 1.
  # Class 0: fg = [1, 0], errors |fg - p_0| = [1/2, 1/4], already sorted; G = 1;
  #   J = [1 - 0/1, 1 - 0/2] = [1, 1], g = [1, 0]: loss_0 = 1/2.
  # Class 1: fg = [0, 1], errors |fg - p_1| = [1/2, 1/4], sorted; G = 1;
  #   J = [1 - 1/2, 1 - 0/2] = [1/2, 1], g = [1/2, 1/2]: loss_1 = 1/4 + 1/8 = 3/8.
  # Both present: loss = (1/2 + 3/8) / 2 = 7/16.
  logits, labels, _ = embed('multiclass2', [((0, 0, 0), [0.0, 0.0], 0), ((0, 0, 1), [0.0, np.log(3.0)], 1)])
  tiny_value = ref_loss('lovasz', logits[:1, :1, :2], labels[:1, :1, :2], multilabel=False)
  assert tiny_value == pytest.approx(7 / 16, abs=1e-12)
  assert ref_loss('lovasz', logits, labels, multilabel=False) == pytest.approx(7 / 16, abs=1e-12)
  value, _ = jax_terms(logits, labels, multilabel=False)['lovasz']
  assert float(value) == pytest.approx(7 / 16, abs=1e-12)


def test_reference_focal_and_cross_entropy_by_hand():
  # One pixel, logits [0, ln 3], label 1: p_1 = 3/4, CE = -ln(3/4); focal (gamma 2) = (1/4)^2 * CE.
  ce = -np.log(0.75)
  logits, labels, _ = embed('multiclass2', [((1, 2, 3), [0.0, np.log(3.0)], 1)])
  results = jax_terms(logits, labels, multilabel=False)
  for name, expected in (('cross_entropy', ce), ('focal', ce / 16)):
    assert ref_loss(name, logits, labels, multilabel=False) == pytest.approx(expected, abs=1e-12), name
    assert float(results[name][0]) == pytest.approx(expected, abs=1e-12), name
  # Sigmoid focal, one entry, logit ln 3 (p = 3/4), alpha 0.25, gamma 2:
  # y = 1: alpha (1 - 3/4)^2 (-ln 3/4); y = 0: (1 - alpha) (3/4)^2 (-ln 1/4).
  for y, expected in ((1, 0.25 * 0.0625 * -np.log(0.75)), (0, 0.75 * 0.5625 * -np.log(0.25))):
    logits, labels, _ = embed('multilabel3', [((1, 2, 3, 1), np.log(3.0), y)])
    assert ref_loss('focal', logits, labels, multilabel=True) == pytest.approx(expected, abs=1e-12), y
    assert float(jax_terms(logits, labels, multilabel=True)['focal'][0]) == pytest.approx(expected, abs=1e-12), y


def test_reference_dice_jaccard_tversky_by_hand():
  # Per class, two valid entries with logit 0 (P = 1/2 each), labels [1, 0], smooth 1: I = 1/2, S = 1, T = 1.
  # dice = (1 + 1) / (2 + 1) = 2/3; jaccard = (1/2 + 1) / (2 - 1/2 + 1) = 3/5;
  # tversky (alpha = beta = 1/2) = (1/2 + 1) / (1/2 + 1/4 + 1/4 + 1) = 3/4. Every class alike: the losses are
  # 1/3, 2/5 and 1/4.
  logits, labels, _ = embed('multilabel3', [((0, 0, 0), 0.0, 1), ((0, 0, 1), 0.0, 0)])
  results = jax_terms(logits, labels, multilabel=True)
  for name, expected in (('dice', 1 / 3), ('jaccard', 2 / 5), ('tversky', 1 / 4)):
    assert ref_loss(name, logits, labels, multilabel=True) == pytest.approx(expected, abs=1e-12), name
    assert float(results[name][0]) == pytest.approx(expected, abs=1e-12), name


def test_terms_listed():
  assert tuple(losses.TERMS) == TERMS


def test_loss_params_defaults():
  defaults = {'focal_gamma': 2.0, 'focal_alpha': 0.25, 'tversky_alpha': 0.5, 'tversky_beta': 0.5, 'smooth': 1.0}
  params = dataclasses.asdict(losses.LossParams())
  assert {k: params.get(k) for k in defaults} == defaults


def test_x64_context_restores_the_setting():
  before = jnp.asarray(np.zeros(1)).dtype
  with x64():
    assert jnp.asarray(np.zeros(1)).dtype == jnp.float64
  assert jnp.asarray(np.zeros(1)).dtype == before == jnp.float32


# ----------------------------------------------------------------------------------------------------------
# every term x task x weighting against the reference: float64 to 1e-6, float32 to 1e-5
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('weighted', [False, True], ids=['unweighted', 'weighted'])
@pytest.mark.parametrize('task', list(TASKS))
@pytest.mark.parametrize('name', TERMS)
def test_term_float64(name, task, weighted):
  value, grad = grid_jax(task, weighted, True)[name]
  what = f'{name} {task} ' + (f'weighted {WEIGHTS[TASKS[task][1]]} {PARAMS_W}' if weighted else 'unweighted')
  assert_close(value, grad, *grid_reference(name, task, weighted), F64_TOL, what)


@pytest.mark.parametrize('task', ['multiclass3', 'multilabel3'])
@pytest.mark.parametrize('name', TERMS)
def test_term_float32(name, task):  # Some cases only: each costs a compile.
  value, grad = grid_jax(task, True, False)[name]
  assert_close(value, grad, *grid_reference(name, task, True), F32_TOL, f'{name} {task} float32', f64=False)


# ----------------------------------------------------------------------------------------------------------
# corner cases
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('task,f64', [(t, True) for t in TASKS] + [('multiclass3', False), ('multilabel3', False)])
def test_all_ignored_is_zero_with_zero_gradient(task, f64):
  logits, labels, multilabel, weights, params = make_case(task, True)
  labels = np.full_like(labels, IGNORE)
  results = case_jax(logits, labels, multilabel, weights, params, f64=f64)
  for name in TERMS:
    assert ref_loss(name, logits, labels, multilabel=multilabel, class_weights=weights, params=params) == 0.0, name
    value, grad = results[name]
    assert np.isfinite(value) and float(value) == 0.0, (name, float(value))
    assert np.all(np.isfinite(grad)), name
    assert np.all(grad == 0.0), (name, np.abs(grad).max())


@functools.lru_cache(maxsize=None)
def absent_class_case(multilabel):
  """Multiclass K=4 with class 3 never labelled; multilabel K=3 with class 2 all 0 (valid). Ignores elsewhere;
  the weights and PARAMS_W."""
  rng = np.random.default_rng(2)
  if multilabel:
    logits = rng.normal(0.0, 2.0, SHAPE + (3,))
    labels = rng.integers(0, 2, SHAPE + (3,))
    labels[..., 2] = 0
  else:
    logits = rng.normal(0.0, 2.0, SHAPE + (4,))
    labels = rng.integers(0, 3, SHAPE)
  labels[rng.random(labels.shape) < 0.2] = IGNORE
  case = (logits, labels.astype(np.int32), multilabel, WEIGHTS[logits.shape[-1]], PARAMS_W)
  return case, case_jax(*case)


@pytest.mark.parametrize('multilabel', [False, True], ids=['multiclass4', 'multilabel3'])
@pytest.mark.parametrize('name', TERMS)
def test_absent_class(name, multilabel):
  case, results = absent_class_case(multilabel)
  assert_close(*results[name], *reference_and_grad(name, *case), F64_TOL,
               f'{name} absent class {"multilabel" if multilabel else "multiclass"}')


@functools.lru_cache(maxsize=None)
def ignored_class_case():
  logits, labels, multilabel, weights, params = make_case('multilabel3', True, seed=3)
  labels[..., 1] = IGNORE
  case = (logits, labels, multilabel, weights, params)
  return case, case_jax(*case)


@pytest.mark.parametrize('name', TERMS)
def test_multilabel_class_entirely_ignored(name):
  # Class 1 has no valid entry: it adds nothing to any term (neither numerator nor denominator); for
  # Dice/Jaccard/Tversky it is not one of the counted classes (its score would be s/s = 1, a free point).
  case, results = ignored_class_case()
  assert_close(*results[name], *reference_and_grad(name, *case), F64_TOL, f'{name} multilabel, class 1 all ignored')
  assert np.all(results[name][1][..., 1] == 0.0)


def test_region_terms_zero_weight_sum():
  # Multiclass K = 2 counts class 1 only: with w_1 = 0 the weight sum over the counted classes is 0: loss 0.
  logits, labels, _, _, _ = make_case('multiclass2', False)
  results = jax_terms(logits, labels, multilabel=False, class_weights=(1.0, 0.0), names=REGION_TERMS)
  for name in REGION_TERMS:
    assert ref_loss(name, logits, labels, multilabel=False, class_weights=(1.0, 0.0)) == 0.0
    value, grad = results[name]
    assert float(value) == 0.0 and np.all(np.isfinite(grad)) and np.all(grad == 0.0), name


def test_other_ignore_label():
  logits, labels, multilabel, weights, params = make_case('multilabel3', True, seed=4)
  labels = np.where(labels == IGNORE, -1, labels).astype(np.int32)
  names = ('cross_entropy', 'lovasz')
  results = case_jax(logits, labels, multilabel, weights, params, ignore_label=-1, names=names)
  for name in names:
    expected = ref_loss(name, logits, labels, multilabel=True, ignore_label=-1, class_weights=weights, params=params)
    assert float(results[name][0]) == pytest.approx(expected, abs=F64_TOL), name


# ----------------------------------------------------------------------------------------------------------
# identities, and combined_loss
# ----------------------------------------------------------------------------------------------------------

# gamma 0 without alpha balancing: focal = cross entropy. alpha = beta = 1/2, smooth 1/4: Tversky = Dice with
# smooth 1/2 = the weighted cases' Dice (PARAMS_W.smooth), see test_tversky_half_half_is_dice.
PARAMS_ID = losses.LossParams(focal_gamma=0.0, focal_alpha=-1.0, tversky_alpha=0.5, tversky_beta=0.5, smooth=0.25)
ID_TERMS = ('cross_entropy', 'focal', 'tversky')


@functools.lru_cache(maxsize=None)
def identity_jax(task):
  logits, labels, multilabel, weights, _ = make_case(task, True)
  return jax_terms(logits, labels, multilabel=multilabel, class_weights=weights, params=PARAMS_ID, names=ID_TERMS)


@pytest.mark.parametrize('task', ['multiclass3', 'multilabel3'])
def test_focal_gamma0_is_cross_entropy(task):
  # Softmax focal with gamma 0 is CE; sigmoid focal with gamma 0 and alpha balancing off (alpha < 0) is BCE.
  results = identity_jax(task)
  (focal_value, focal_grad), (ce_value, ce_grad) = results['focal'], results['cross_entropy']
  assert float(focal_value) == pytest.approx(float(ce_value), abs=1e-12)
  np.testing.assert_allclose(focal_grad, ce_grad, rtol=0, atol=1e-12)
  logits, labels, multilabel, weights, _ = make_case(task, True)
  assert_close(focal_value, focal_grad, *reference_and_grad('focal', logits, labels, multilabel, weights, PARAMS_ID),
               F64_TOL, f'focal {task} {PARAMS_ID}')


@pytest.mark.parametrize('task', ['multiclass3', 'multilabel3'])
def test_tversky_half_half_is_dice(task):
  # Tversky(alpha = beta = 1/2, smooth s) = (I + s) / ((S + T) / 2 + s) = (2I + 2s) / (S + T + 2s): Dice with
  # smooth 2s (Dice itself only when s = 0). Here Tversky with s = 1/4 against the grid's weighted Dice (s = 1/2).
  tversky_value, tversky_grad = identity_jax(task)['tversky']
  dice_value, dice_grad = grid_jax(task, True, True)['dice']
  assert float(tversky_value) == pytest.approx(float(dice_value), abs=1e-12)
  np.testing.assert_allclose(tversky_grad, dice_grad, rtol=0, atol=1e-12)
  # ... and not Dice with the same smooth (the references):
  logits, labels, multilabel, weights, _ = make_case(task, True)
  same_s = [ref_loss(n, logits, labels, multilabel=multilabel, class_weights=weights, params=PARAMS_ID)
            for n in ('tversky', 'dice')]
  assert abs(same_s[0] - same_s[1]) > 1e-4


def test_combined_loss_is_weighted_sum():
  task = 'multiclass3'
  logits, labels, multilabel, weights, params = make_case(task, True)
  terms = (('cross_entropy', 1.0), ('lovasz', 0.5), ('dice', 0.25))
  with x64():
    fn = jax.jit(jax.value_and_grad(lambda x: losses.combined_loss(
        x, jnp.asarray(labels), terms, multilabel=multilabel, ignore_label=IGNORE, class_weights=weights,
        params=params)))
    value, grad = jax.device_get(fn(jnp.asarray(logits, jnp.float64)))
  parts = grid_jax(task, True, True)
  assert float(value) == pytest.approx(sum(wt * float(parts[n][0]) for n, wt in terms), abs=1e-12)
  np.testing.assert_allclose(grad, sum(wt * parts[n][1] for n, wt in terms), rtol=0, atol=1e-12)
  expected = sum(wt * grid_reference(n, task, True)[0] for n, wt in terms)
  assert float(value) == pytest.approx(expected, abs=F64_TOL * max(1.0, expected))


def test_unknown_term_raises():
  logits, labels, _, _, _ = make_case('multiclass3', False)
  x, y = jnp.asarray(logits, jnp.float32), jnp.asarray(labels)
  with pytest.raises(ValueError, match='dise'):
    losses.term_loss('dise', x, y, multilabel=False, ignore_label=IGNORE)
  with pytest.raises(ValueError, match='dise'):
    losses.combined_loss(x, y, [('dise', 1.0), ('cross_entropy', 1.0)], multilabel=False, ignore_label=IGNORE)


@pytest.mark.parametrize('task', ['multiclass3', 'multilabel3'])
def test_terms_on_a_mesh_are_the_whole_batch_terms(task):
  """The global batch split over 4 devices (the train step's layout): every term, and its gradient, is still the
  reference's over the whole batch; Lovász through the train step's `gather` (a replicated constraint)."""
  from jaxseg import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  assert mesh.size == 4, 'tests run with 4 simulated devices (tests/conftest.py)'
  multilabel, k = TASKS[task]
  rng = np.random.default_rng(5)
  shape = (4, 5, 7)
  logits = rng.normal(0.0, 2.0, shape + (k,))
  labels = rng.integers(0, 2, shape + (k,)) if multilabel else rng.integers(0, k, shape)
  labels[rng.random(labels.shape) < 0.2] = IGNORE
  labels[0] = IGNORE  # Device 0's share is all ignored: its own terms would be empty.
  labels = labels.astype(np.int32)
  terms = tuple((name, 1.0) for name in TERMS)
  gather = lambda a: jax.lax.with_sharding_constraint(a, sharding.replicated(mesh))
  with x64():
    x = jax.device_put(jnp.asarray(logits, jnp.float64), sharding.batch_sharding(mesh))
    y = jax.device_put(jnp.asarray(labels), sharding.batch_sharding(mesh))
    value, grad = jax.device_get(jax.jit(jax.value_and_grad(lambda x, y: losses.combined_loss(
        x, y, terms, multilabel=multilabel, ignore_label=IGNORE, gather=gather)))(x, y))
  fn = lambda z: sum(ref_loss(name, z, labels, multilabel=multilabel, params=DEFAULTS) for name in TERMS)
  expected = fn(logits)
  assert float(value) == pytest.approx(expected, abs=F64_TOL * max(1.0, expected))
  ref = ref_grad(fn, logits)
  np.testing.assert_allclose(grad, ref, rtol=0, atol=F64_TOL * max(1.0, np.abs(ref).max()))
