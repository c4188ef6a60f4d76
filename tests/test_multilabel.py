"""config.task='multilabel': the folder layout and its checks, the pipeline, per-class scores, and a run end to end.

References are computed another way: masks read back with PIL, confusion counts and figures by hand in numpy,
predictions from the checkpoint's raw arrays through the bare Flax module.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxseg import metrics
from jaxseg.data import augment
from jaxseg.data import datasets
from jaxseg.data import folder
from jaxseg.data import pipeline
from jaxseg.errors import ConfigError, DataError
from tests.conftest import tiny_unet_config
from tests.helpers import best_checkpoint_logits_fn

IGNORE = 255
CLASSES = ('thing', 'spot')


def _masks(rng, h, w):
  """Two overlapping classes: 'thing' a rectangle, 'spot' a square inside it and partly outside; an ignore band."""
  thing = np.zeros((h, w), np.uint8)
  spot = np.zeros((h, w), np.uint8)
  y, x = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 3))
  thing[y:y + h // 2, x:x + w // 2] = 1
  spot[y + h // 4:y + h // 4 + h // 3, x + w // 4:x + w // 4 + w // 3] = 1
  thing[y + h // 2, x:x + w // 2] = IGNORE  # Boundary band of 'thing' only.
  return np.stack([thing, spot], axis=-1)


def write_multilabel_folder(root, counts=(('train', 6), ('val', 3)), seed=0, sizes=((36, 44), (40, 40)),
                            class_names=CLASSES):
  """DIR/{train,val}/images/*.png and DIR/{train,val}/masks/<class>/*.png; returns {split: [masks [H, W, K]]}.

  The first two classes are drawn ('thing', 'spot'); any further class is a random half-plane.
  """
  rng = np.random.default_rng(seed)
  written = {}
  for split, n in counts:
    os.makedirs(root / split / 'images', exist_ok=True)
    for name in class_names:
      os.makedirs(root / split / 'masks' / name, exist_ok=True)
    written[split] = []
    for i in range(n):
      h, w = sizes[i % len(sizes)]
      masks = _masks(rng, h, w)
      extra = [(np.arange(w)[None, :] < rng.integers(1, w)).repeat(h, 0).astype(np.uint8)
               for _ in class_names[2:]]
      masks = np.concatenate([masks] + [m[..., None] for m in extra], axis=-1)
      image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
      image[masks[..., 0] == 1, 0] = 250  # Learnable in a few steps: red where 'thing', blue where 'spot'.
      image[masks[..., 1] == 1, 2] = 250
      Image.fromarray(image).save(root / split / 'images' / f'{i:03d}.png')
      for k, name in enumerate(class_names):
        Image.fromarray(masks[..., k]).save(root / split / 'masks' / name / f'{i:03d}.png')
      written[split].append(masks)
  return written


def assert_masks_of(mask, logits):
  """mask == logits > 0, away from logits so close to 0 that float rounding in another program may flip them."""
  sure = np.abs(logits) > 1e-4
  assert sure.mean() > 0.9
  np.testing.assert_array_equal(np.asarray(mask)[sure], (logits > 0)[sure])


def _spec(**changes):
  spec = datasets.resolve_spec({'name': 'folder', 'num_classes': 2, 'class_names': CLASSES, 'path': 'x'},
                               'multilabel')
  return spec.__class__(**{**spec.__dict__, **changes})


# ---------------------------------------------------------------------------
# The folder: preparation and its checks.
# ---------------------------------------------------------------------------


def test_prepared_masks_read_back_as_written(tmp_path):
  written = write_multilabel_folder(tmp_path / 'data')
  builder = folder.prepare_folder_dataset(str(tmp_path / 'data'), num_classes=2, data_dir=str(tmp_path / 'tfds'),
                                          class_names=CLASSES)
  spec = _spec()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = pipeline.records(builder, spec, 'validation', tf.data.Dataset.range(3))
  ds = ds.map(lambda ex: pipeline.decode_example(ex, spec))
  got = [label for _, label in ds.as_numpy_iterator()]
  assert len(got) == 3
  # tfds orders examples by a hash of their key: match each read-back label [H, W, K] with a written one.
  unmatched = list(written['val'])
  for label in got:
    same = [i for i, masks in enumerate(unmatched) if masks.shape == label.shape and np.array_equal(masks, label)]
    assert same, 'a label read back is none of the masks written'
    unmatched.pop(same[0])
  stats = pipeline.split_statistics(builder, spec, 'train')
  positives = np.sum([np.sum(m == 1, axis=(0, 1)) for m in written['train']], axis=0)
  np.testing.assert_array_equal(stats.class_pixels, positives)
  assert sorted(map(tuple, stats.sizes)) == sorted(m.shape[:2] for m in written['train'])


def _expect(root, tmp_path, *fragments):
  with pytest.raises(DataError) as e:
    folder.prepare_folder_dataset(str(root), num_classes=2, data_dir=str(tmp_path / 'tfds'), class_names=CLASSES)
  for fragment in fragments:
    assert fragment in str(e.value), str(e.value)
  assert not os.path.exists(tmp_path / 'tfds' / 'jaxseg_folder'), 'a failed check must write nothing'


def test_missing_class_folder_is_named(tmp_path):
  write_multilabel_folder(tmp_path / 'data')
  os.rename(tmp_path / 'data' / 'val' / 'masks' / 'spot', tmp_path / 'data' / 'val' / 'masks' / 'spots')
  _expect(tmp_path / 'data', tmp_path, "class 'spot'", str(tmp_path / 'data' / 'val' / 'masks' / 'spot'), 'spots')


def test_missing_class_mask_is_named(tmp_path):
  write_multilabel_folder(tmp_path / 'data')
  os.remove(tmp_path / 'data' / 'train' / 'masks' / 'spot' / '002.png')
  _expect(tmp_path / 'data', tmp_path, '002.png', os.path.join('masks', 'spot'), 'has no mask')


def test_wrong_size_and_values_are_named(tmp_path):
  write_multilabel_folder(tmp_path / 'data')
  bad = tmp_path / 'data' / 'train' / 'masks' / 'thing' / '001.png'
  Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad)
  _expect(tmp_path / 'data', tmp_path, str(bad), 'same size')
  write_multilabel_folder(tmp_path / 'data')
  mask = np.asarray(Image.open(bad)).copy()
  mask[0, 0] = 2
  Image.fromarray(mask).save(bad)
  _expect(tmp_path / 'data', tmp_path, str(bad), '[2]', '0 (class absent), 1')


def test_masks_written_as_0_255_are_refused(tmp_path):
  write_multilabel_folder(tmp_path / 'data')
  class_dir = tmp_path / 'data' / 'train' / 'masks' / 'spot'
  for name in os.listdir(class_dir):
    mask = np.asarray(Image.open(class_dir / name))
    Image.fromarray(np.where(mask == 1, 255, 0).astype(np.uint8)).save(class_dir / name)
  _expect(tmp_path / 'data', tmp_path, "class 'spot'", 'mark the class with 1')


def test_a_multilabel_folder_read_as_multiclass_says_so(tmp_path):
  write_multilabel_folder(tmp_path / 'data')
  with pytest.raises(DataError, match="config.task='multilabel'"):
    folder.prepare_folder_dataset(str(tmp_path / 'data'), num_classes=2, data_dir=str(tmp_path / 'tfds'))


def test_config_checks():
  with pytest.raises(ConfigError, match="multi-label dataset: config.dataset.name='folder'"):
    datasets.resolve_spec({'name': 'jaxseg_shapes'}, 'multilabel')
  with pytest.raises(ConfigError, match='needs config.dataset.class_names'):
    datasets.resolve_spec({'name': 'folder', 'num_classes': 2}, 'multilabel')
  with pytest.raises(ConfigError, match=r'ignore_label must be an integer in \[2, 255\]'):
    datasets.resolve_spec({'name': 'folder', 'num_classes': 2, 'class_names': CLASSES, 'ignore_label': 1},
                          'multilabel')
  spec = datasets.resolve_spec({'name': 'folder', 'num_classes': 1, 'class_names': ('tumour',)}, 'multilabel')
  assert spec.multilabel and spec.num_classes == 1  # One sigmoid: a binary task as multi-label.
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxseg import settings  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.task = 'multi-label'
  with pytest.raises(ConfigError, match=r"config.task must be one of \('multiclass', 'multilabel'\)"):
    settings.from_config(config)
  config = default.get_config()
  config.dataset.update({'name': 'folder', 'num_classes': 2, 'class_names': CLASSES})
  config.task = 'multilabel'
  config.loss.class_weighting = 'median_frequency'
  with pytest.raises(ConfigError, match='median_frequency'):
    settings.from_config(config)


# ---------------------------------------------------------------------------
# Augmentation moves every mask with its image.
# ---------------------------------------------------------------------------


def test_augmentation_moves_every_mask_with_the_image():
  rng = np.random.default_rng(3)
  masks = np.stack([_masks(rng, 50, 60)[..., 0], (rng.random((50, 60)) < 0.3).astype(np.uint8),
                    (rng.random((50, 60)) < 0.5).astype(np.uint8)], axis=-1)
  # The image carries the masks in its bands: the transform of one is read back from the other.
  image = np.where(masks == 1, 200, 20).astype(np.float32)
  image[masks == IGNORE] = 120
  for seed in range(6):
    out_image, out_label = augment.train_augment(image, masks, np.array([seed, 7]), crop_size=(40, 56),
                                                 hflip=True, ignore_label=IGNORE, multilabel=True)
    out_image, out_label = np.asarray(out_image), np.asarray(out_label)
    assert out_label.shape == (40, 56, 3)
    expected = np.select([out_image > 160, out_image > 70], [1, IGNORE], 0)
    np.testing.assert_array_equal(out_label, expected)
  # Padding (a crop larger than the image) is ignore in every class, and the image 0 there.
  out_image, out_label = augment.train_augment(image, masks, np.array([0, 1]), crop_size=(64, 64), hflip=False,
                                               ignore_label=IGNORE, multilabel=True)
  out_image, out_label = np.asarray(out_image), np.asarray(out_label)
  pad = np.all(out_image == 0, axis=-1)
  assert pad.sum() == 64 * 64 - 50 * 60
  assert np.all(out_label[pad] == IGNORE)


# ---------------------------------------------------------------------------
# Per-class scores.
# ---------------------------------------------------------------------------


def test_multilabel_confusion_and_figures_by_hand():
  labels = np.array([[1, 0], [1, 1], [0, IGNORE], [0, 0], [1, 0]], np.uint8)
  preds = np.array([[1, 1], [0, 1], [1, 1], [0, 0], [1, 0]], np.uint8)
  cm = np.asarray(metrics.multilabel_confusion(labels, preds, IGNORE))
  # Class 0: tp 2 (rows 0, 4), fn 1 (row 1), fp 1 (row 2), tn 1 (row 3).
  # Class 1: tp 1 (row 1), fp 1 (row 0), tn 2 (rows 3, 4), row 2 ignored.
  np.testing.assert_array_equal(cm, [[[1, 1], [1, 2]], [[2, 1], [0, 1]]])
  result = metrics.metrics_from_multilabel_confusion(cm, CLASSES)
  assert result['per_class_iou'] == pytest.approx([2 / 4, 1 / 2])
  assert result['mean_iou'] == pytest.approx((2 / 4 + 1 / 2) / 2)
  assert result['per_class_dice'] == pytest.approx([4 / 6, 2 / 3])
  assert result['per_class_precision'] == pytest.approx([2 / 3, 1 / 2])
  assert result['per_class_recall'] == pytest.approx([2 / 3, 1.0])
  assert result['pixel_accuracy'] == pytest.approx((3 + 3) / 9)
  # A class absent from truth and predictions is undefined, and left out of the mean.
  cm2 = np.concatenate([cm, [[[5, 0], [0, 0]]]])
  result2 = metrics.metrics_from_multilabel_confusion(cm2)
  assert result2['per_class_iou'][2] is None and result2['mean_iou'] == pytest.approx(result['mean_iou'])


# ---------------------------------------------------------------------------
# End to end: train, evaluate, predict, export, the API.
# ---------------------------------------------------------------------------


def test_multilabel_folder_end_to_end(tmp_path):
  from jaxseg import api  # pylint: disable=g-import-not-at-top
  from jaxseg import export  # pylint: disable=g-import-not-at-top
  from jaxseg import predict  # pylint: disable=g-import-not-at-top
  from jaxseg import train  # pylint: disable=g-import-not-at-top
  written = write_multilabel_folder(tmp_path / 'data')
  config = tiny_unet_config(str(tmp_path / 'tfds'), **{
      'task': 'multilabel', 'dataset.name': 'folder', 'dataset.path': str(tmp_path / 'data'),
      'dataset.num_classes': 2, 'dataset.class_names': CLASSES, 'input.eval_size': (48, 48), 'eval_batch_size': 4,
      'loss.terms': 'cross_entropy:1,lovasz:0.5', 'num_train_steps': 3, 'log_every_steps': 3,
      'eval_every_steps': 3, 'checkpoint_every_steps': 3, 'optimizer.warmup_steps': 1,
      'export.formats': 'jax,onnx'})
  workdir = tmp_path / 'work'
  with jax.default_prng_impl('rbg'):  # XLA:CPU compiles threefry initialisers several times slower.
    result = train.train_and_evaluate(config, str(workdir))

  # Evaluation: per class, from the checkpoint's logits on the padded validation images, counted by hand.
  logits_fn = best_checkpoint_logits_fn(config, str(workdir))
  images = [np.asarray(Image.open(tmp_path / 'data' / 'val' / 'images' / f'{i:03d}.png')) for i in range(3)]
  padded = np.zeros((3, 48, 48, 3), np.uint8)
  for i, image in enumerate(images):
    padded[i, :image.shape[0], :image.shape[1]] = image
  logits = logits_fn(padded)
  assert logits.shape == (3, 48, 48, 2)
  tp, fp, fn = np.zeros(2), np.zeros(2), np.zeros(2)
  for i, masks in enumerate(written['val']):
    h, w = masks.shape[:2]
    pred = logits[i, :h, :w] > 0
    valid = masks != IGNORE
    tp += np.sum(valid & (masks == 1) & pred, axis=(0, 1))
    fp += np.sum(valid & (masks == 0) & pred, axis=(0, 1))
    fn += np.sum(valid & (masks == 1) & ~pred, axis=(0, 1))
  expected = [None if t + p + n == 0 else t / (t + p + n) for t, p, n in zip(tp, fp, fn)]
  print('per-class IoU', result['per_class_iou'], 'expected', expected)
  assert result['per_class_iou'] == pytest.approx(expected, abs=1e-4)
  assert len(result['per_class_dice']) == 2 and 'per_class_recall' in result
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl', encoding='utf-8')]
  assert any(r.get('split') == 'eval' and 'per_class_dice' in r for r in records), records[-1]

  def logits_at(image, multiple):
    """The reference logits of one image zero-padded (bottom/right) to a multiple, as inference pads it."""
    h, w = image.shape[:2]
    frame = np.zeros((-(-h // multiple) * multiple, -(-w // multiple) * multiple, 3), np.uint8)
    frame[:h, :w] = image
    return logits_fn(frame[None])[0, :h, :w]

  # Whole-image inference pads to config.inference.size_multiple (32): the padding changes the logits near it.
  whole = [logits_at(image, 32) for image in images]

  # Predict: one 0/1 mask per class in the folder layout, and an overlay.
  out = tmp_path / 'pred'
  got = predict.predict(config, str(workdir), str(tmp_path / 'data' / 'val' / 'images'), str(out))
  assert len(got['written']) == 3 * 2
  for i in range(3):
    h, w = written['val'][i].shape[:2]
    for k, name in enumerate(CLASSES):
      mask = np.asarray(Image.open(out / name / f'{i:03d}.png'))
      assert mask.shape == (h, w)
      assert_masks_of(mask, whole[i][..., k])
    assert Image.open(out / f'{i:03d}_overlay.png').size == (w, h)

  # The Python API and the export return K masks.
  segmenter = api.Segmenter.from_workdir(str(workdir))
  mask = segmenter(images[0])
  h, w = images[0].shape[:2]
  assert mask.shape == (h, w, 2)
  assert_masks_of(mask, whole[0])
  probs = segmenter.probabilities(images[0])
  np.testing.assert_allclose(probs, 1 / (1 + np.exp(-whole[0])), atol=1e-5)
  export_dir = export.export_model(config, str(workdir))
  meta = json.load(open(os.path.join(export_dir, 'model.json'), encoding='utf-8'))
  assert meta['task'] == 'multilabel' and meta['outputs']['mask']['shape'] == ['batch', 'height', 'width', 2]
  exported = export.load(export_dir)(images[0])
  at_multiple = logits_at(images[0], meta['input']['size_multiple'])
  np.testing.assert_allclose(exported['logits'], at_multiple, atol=1e-4)
  assert_masks_of(exported['mask'], at_multiple)
  # ONNX: the same K masks from onnxruntime, the output declared [batch, height, width, K].
  import onnxruntime  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(os.path.join(export_dir, 'model.onnx'), providers=['CPUExecutionProvider'])
  shapes = {o.name: o.shape for o in session.get_outputs()}
  assert shapes['mask'] == ['batch', 'height', 'width', 2], shapes
  m = meta['onnx']['input']['size_multiple']
  assert h % m == 0 and w % m == 0, (h, w, m)  # The first validation image needs no padding here.
  onnx_mask = session.run(['mask'], {'images': images[0][None]})[0]
  assert onnx_mask.shape == (1, h, w, 2)
  assert_masks_of(onnx_mask[0], logits_at(images[0], m))
