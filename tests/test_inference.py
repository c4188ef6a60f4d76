"""Inference: predict mode, sliding window, TTA, the Python API, evaluation pictures, palettes."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from tests.conftest import tiny_flags, tiny_unet_config
from tests.helpers import ROOT, best_checkpoint_logits_fn, xla_flags

TRAIN = dict(num_train_steps=16, log_every_steps=8, eval_every_steps=16, checkpoint_every_steps=16)
# run.py flags giving the same model as tiny_unet_config (the checkpoint must fit it).
TINY_FLAGS = tiny_flags()


def with_inference(config, **fields):
  """Sets config.inference fields (creating the section when configs/default.py has none)."""
  if 'inference' not in config:
    config.inference = ml_collections.ConfigDict()
  for key, value in fields.items():
    config.inference[key] = value
  return config


@pytest.fixture(scope='module')
def trained(shapes_data_dir, tmp_path_factory):
  """A tiny UNet trained for a few steps (crop 32x32); returns (config, workdir)."""
  from jaxseg import train  # pylint: disable=g-import-not-at-top
  config = tiny_unet_config(shapes_data_dir, **TRAIN)
  config.optimizer.learning_rate = 0.1
  # Down-weighting the background makes even a few steps predict several classes.
  config.loss.class_weights = (0.2, 1.0, 1.0, 1.0)
  workdir = str(tmp_path_factory.mktemp('inference_wd'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope='module')
def restored(trained):
  """(model_logits, predictor) of the trained model's best checkpoint.

  model_logits is the model applied directly (jit): uint8 images [N, H, W, 3] -> float32 logits [N, H, W, K].
  """
  from jaxseg import inference  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  predictor, _, _ = inference.load_predictor(config, workdir)
  return best_checkpoint_logits_fn(config, workdir), predictor


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def random_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def reference_logits(model_logits, image, *, multiple=32, starts=None, window=(32, 32)):
  """The bare model's logits [H, W, K] for one image, by the method inference.py documents.

  Whole (starts None): zero-padded at the bottom/right to a multiple of `multiple`, cropped back. Sliding:
  the windows at the given (row starts, column starts), the image zero-padded only where smaller than the
  window, logits averaged where windows overlap.
  """
  h, w = image.shape[:2]
  if starts is None:
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
  else:
    ph, pw = max(h, window[0]), max(w, window[1])
  padded = np.zeros((ph, pw, 3), np.uint8)
  padded[:h, :w] = image
  if starts is None:
    return model_logits(padded[None])[0, :h, :w]
  corners = [(y, x) for y in starts[0] for x in starts[1]]
  tiles = model_logits(np.stack([padded[y:y + window[0], x:x + window[1]] for y, x in corners]))
  total = np.zeros((ph, pw, tiles.shape[-1]))
  count = np.zeros((ph, pw, 1))
  for (y, x), logits in zip(corners, tiles):
    total[y:y + window[0], x:x + window[1]] += logits
    count[y:y + window[0], x:x + window[1]] += 1
  assert count.min() >= 1, 'the windows must cover the image'
  return (total / count)[:h, :w]


def assert_masks_agree(got, expected_logits, max_fraction=1e-3):
  """Masks equal to the reference's argmax, but for the rare near-tie pixels programs may break differently."""
  expected = np.argmax(expected_logits, -1)
  assert got.shape == expected.shape
  differ = float(np.mean(got != expected))
  assert differ <= max_fraction, f'{differ:.2%} of the pixels differ from the reference'


def numpy_mean_iou(labels, preds, num_classes, ignore_label=255):
  """Independent mean IoU: classes absent from both labels and predictions are left out."""
  inter = np.zeros(num_classes)
  union = np.zeros(num_classes)
  for label, pred in zip(labels, preds):
    valid = label != ignore_label
    for c in range(num_classes):
      l, p = (label == c) & valid, (pred == c) & valid
      inter[c] += np.sum(l & p)
      union[c] += np.sum(l | p)
  present = union > 0
  return float(np.mean(inter[present] / union[present]))


def validation_examples(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxseg.data import shapes  # pylint: disable=g-import-not-at-top,unused-import
  source = tfds.data_source('jaxseg_shapes', split='validation', data_dir=data_dir)  # Decoded, in file order.
  return [(ex['image'], ex['segmentation_mask'][..., 0]) for ex in source]


def test_predict_mode_masks_score_the_mean_iou_that_eval_reports(trained, shapes_data_dir, tmp_path):
  """Masks written by predict mode (whole image, no TTA), scored in numpy == --mode=eval's mean IoU."""
  from jaxseg import api, cli, predict  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  config = with_inference(config.copy_and_resolve_references(), mode='whole')
  examples = validation_examples(shapes_data_dir)
  images_dir = tmp_path / 'val'
  images_dir.mkdir()
  for i, (image, _) in enumerate(examples):
    Image.fromarray(image).save(images_dir / f'{i:04d}.png')
  out = predict.predict(config, workdir, str(images_dir), str(tmp_path / 'out'))
  assert len(out['written']) == len(examples) and not out['skipped']
  preds = []
  for i, (image, label) in enumerate(examples):
    mask = np.asarray(Image.open(tmp_path / 'out' / f'{i:04d}.png'))
    assert mask.shape == label.shape and mask.dtype == np.uint8
    overlay = np.asarray(Image.open(tmp_path / 'out' / f'{i:04d}_overlay.png'))
    assert overlay.shape == image.shape
    preds.append(mask)
  assert len(np.unique(np.concatenate([p.ravel() for p in preds]))) > 1, 'the model predicts one class only'
  numpy_iou = numpy_mean_iou([l for _, l in examples], preds, 4)

  result = cli.evaluate_checkpoint(config, workdir)
  print(f'numpy mean IoU of predicted masks {numpy_iou:.6f}; eval {result["mean_iou"]:.6f}; '
        f'eval at label resolution {result["inference"]["mean_iou"]:.6f}')
  assert result['mean_iou'] == pytest.approx(numpy_iou, abs=1e-3)
  assert result['inference']['mean_iou'] == pytest.approx(numpy_iou, abs=1e-3)

  # The Python API gives the same masks.
  seg = api.Segmenter.from_workdir(workdir, mode='whole')
  assert seg.class_names == ('background', 'disc', 'square', 'triangle')
  for i in (0, 1, 2):
    mask = seg(examples[i][0])
    assert mask.shape == examples[i][0].shape[:2]
    np.testing.assert_array_equal(mask, preds[i])
    assert seg.overlay(examples[i][0], mask).shape == (96, 96, 3)
  np.testing.assert_array_equal(seg.predict([examples[3][0], examples[4][0]])[1], preds[4])


def test_sliding_window_segments_a_large_image_at_full_resolution(trained, restored):
  """A 128x128 image (4x the 32x32 crop each side): window logits stitched by hand == the predictor's."""
  from jaxseg import inference  # pylint: disable=g-import-not-at-top
  model_logits, base = restored
  image = random_image(128, 128)
  predictor = base.with_options(mode='slide', window=(32, 32), stride=(24, 24))
  scores = predictor.scores(image)
  assert scores.shape == (128, 128, 4)
  starts = [0, 24, 48, 72, 96]
  assert inference.window_starts(128, 32, 24) == starts
  windows = model_logits([image[y:y + 32, x:x + 32] for y in starts for x in starts])
  total = np.zeros((128, 128, 4))
  count = np.zeros((128, 128, 1))
  for (y, x), logits in zip([(y, x) for y in starts for x in starts], windows):
    total[y:y + 32, x:x + 32] += logits
    count[y:y + 32, x:x + 32] += 1
  np.testing.assert_allclose(scores, total / count, atol=1e-4)
  assert predictor.predict(image).shape == (128, 128)

  # One window covering the whole image: sliding == whole == the model on the image.
  one_window = base.with_options(mode='slide', window=(128, 128)).scores(image)
  whole = base.with_options(mode='whole').scores(image)
  np.testing.assert_allclose(one_window, whole, atol=1e-5)
  np.testing.assert_allclose(whole, model_logits(image[None])[0], atol=1e-4)

  # Sizes that are no multiple of the window or stride: still the input's own size.
  odd = random_image(100, 70, seed=1)
  assert predictor.predict(odd).shape == (100, 70)
  # 'auto' slides over images larger than input.eval_size and takes smaller ones whole.
  auto = base.with_options(mode='auto', window=(32, 32), stride=(24, 24))
  assert max(trained[0].input.eval_size) < 128
  np.testing.assert_allclose(auto.scores(image), scores, atol=1e-5)
  small = random_image(*(s // 2 for s in trained[0].input.eval_size), seed=2)
  assert small.shape[:2] == (48, 48)  # Whole: padded to 64 x 64 (a multiple of 32), cropped back.
  np.testing.assert_allclose(auto.scores(small), reference_logits(model_logits, small), atol=1e-4)


def test_flip_tta_is_the_mean_of_the_image_and_the_flipped_back_flipped_image(restored):
  model_logits, base = restored
  image = random_image(64, 64, seed=3)
  scores = base.with_options(mode='whole', flip=True).scores(image)
  plain, flipped = softmax(model_logits([image, image[:, ::-1]]))
  flipped = flipped[:, ::-1]
  np.testing.assert_allclose(scores, (plain + flipped) / 2, atol=1e-5)

  # Multi-scale (with flip): each view is the image resized (PIL, bilinear) to round(scale x size), maybe
  # flipped, padded to a multiple of 32; its logits are cropped, flipped back, resized to the input's size
  # (bilinear, half-pixel centres: tf.image.resize here); the scores are the mean of the views' softmax.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = random_image(50, 70)
  multi = base.with_options(mode='whole', flip=True, scales=(0.5, 1.0, 1.5)).scores(image)
  views = []
  for (h, w) in ((25, 35), (50, 70), (75, 105)):
    scaled = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    for flip in (False, True):
      logits = reference_logits(model_logits, scaled[:, ::-1] if flip else scaled)
      logits = logits[:, ::-1] if flip else logits
      views.append(softmax(tf.image.resize(logits, (50, 70), method='bilinear').numpy()))
  assert multi.shape == (50, 70, 4)
  np.testing.assert_allclose(multi, np.mean(views, axis=0), atol=1e-5)


def test_images_of_several_sizes_batch_together_in_input_order(restored):
  model_logits, base = restored
  predictor = base.with_options(mode='auto', batch_size=4)
  images = [random_image(*s, seed=i) for i, s in enumerate([(40, 40), (96, 64), (40, 40), (130, 60), (20, 33)])]
  together = list(predictor.iter_masks(images, chunk=5))
  assert len(together) == len(images)
  # 'auto' with eval_size 96 x 96: the 130 x 60 image slides (window 32 x 32, stride 21: rows 0, 21, ..., 84,
  # then 98 flush with the end; columns 0, 21, then 28); the others go whole.
  slide = ([0, 21, 42, 63, 84, 98], [0, 21, 28])
  for image, mask in zip(images, together):
    starts = slide if image.shape[:2] == (130, 60) else None
    assert_masks_agree(mask, reference_logits(model_logits, image, starts=starts))


def test_eval_with_tta_reports_both_figures_and_pictures(trained, restored, shapes_data_dir, tmp_path):
  """--mode=eval with flip TTA: mean IoU with and without it, metrics.jsonl records, TensorBoard images."""
  import shutil  # pylint: disable=g-import-not-at-top
  from jaxseg import cli  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  # A copy of the workdir, so that this test's records stay apart from the other tests'.
  copy = tmp_path / 'wd'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('metrics.jsonl', 'tensorboard'))
  config = with_inference(config.copy_and_resolve_references(), flip=True)
  result = cli.evaluate_checkpoint(config, str(copy))
  # Reference: flip TTA by hand with the bare model (96 x 96 images go whole, no padding): the mean of the
  # softmax of the image's logits and of the flipped image's logits flipped back; mean IoU in numpy.
  model_logits, _ = restored
  examples = validation_examples(shapes_data_dir)
  preds = []
  for start in range(0, len(examples), 50):
    images = np.stack([image for image, _ in examples[start:start + 50]])
    probs = softmax(model_logits(images)) + softmax(model_logits(images[:, :, ::-1]))[:, :, ::-1]
    preds.extend(np.argmax(probs, -1))
  assert len(np.unique(np.concatenate([p.ravel() for p in preds]))) > 1, 'the model predicts one class only'
  tta_iou = numpy_mean_iou([label for _, label in examples], preds, 4)
  print(f'TTA mean IoU {result["inference"]["mean_iou"]:.6f}, numpy {tta_iou:.6f}')
  assert result['inference']['mean_iou'] == pytest.approx(tta_iou, abs=1e-3)
  assert result['inference']['settings'] == 'auto, flip'
  assert '_examples' not in result
  records = [json.loads(l) for l in open(copy / 'metrics.jsonl')]
  splits = {r['split']: r for r in records}
  assert splits['eval']['class_names'] == ['background', 'disc', 'square', 'triangle']
  assert np.asarray(splits['eval']['confusion_matrix']).shape == (4, 4)
  assert splits['eval_inference']['mean_iou'] == pytest.approx(result['inference']['mean_iou'])
  assert splits['eval']['mean_iou'] == pytest.approx(result['mean_iou'])
  tags = tensorboard_tags(copy / 'tensorboard')
  assert {'eval/examples', 'eval/confusion_matrix', 'eval_inference/confusion_matrix'} <= tags


def tensorboard_tags(directory):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for name in os.listdir(directory):
    for record in tf.data.TFRecordDataset(str(directory / name)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_run_py_predict_skips_a_corrupt_file_and_writes_the_rest(trained, restored, tmp_path):
  config, workdir = trained
  model_logits, _ = restored
  inputs = tmp_path / 'in'
  inputs.mkdir()
  sizes = {'a.png': (96, 96), 'b.jpg': (50, 70), 'big.png': (150, 130)}
  for name, (h, w) in sizes.items():
    Image.fromarray(random_image(h, w)).save(inputs / name)
  (inputs / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 10)
  (inputs / 'notes.txt').write_text('not an image')
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  proc = subprocess.run(
      [sys.executable, 'run.py', '--config=configs/unet.py', f'--workdir={workdir}', '--mode=predict',
       f'--input={inputs}', f'--output={tmp_path / "out"}', f'--config.dataset.data_dir={config.dataset.data_dir}',
       *TINY_FLAGS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert str(inputs / 'corrupt.png') in proc.stdout + proc.stderr
  assert 'Wrote 3 mask(s)' in proc.stdout
  # configs/unet.py's 'auto' with eval_size 96 x 96: a.png and b.jpg go whole, big.png slides (window 32 x 32
  # from the crop size, stride 21: starts every 21 pixels, then one flush with the end).
  slide = {'big.png': ([0, 21, 42, 63, 84, 105, 118], [0, 21, 42, 63, 84, 98])}
  for name, (h, w) in sizes.items():
    stem = os.path.splitext(name)[0]
    mask = np.asarray(Image.open(tmp_path / 'out' / f'{stem}.png'))
    assert mask.shape == (h, w)
    image = np.asarray(Image.open(inputs / name).convert('RGB'))  # The JPEG as decoded, losses included.
    assert_masks_agree(mask, reference_logits(model_logits, image, starts=slide.get(name)))
    assert np.asarray(Image.open(tmp_path / 'out' / f'{stem}_overlay.png')).shape == (h, w, 3)
  assert sorted(os.listdir(tmp_path / 'out')) == sorted(
      [f'{os.path.splitext(n)[0]}{s}.png' for n in sizes for s in ('', '_overlay')])


def test_wrong_model_config_and_missing_input_give_clear_errors(trained, tmp_path):
  from jaxseg import inference, predict, settings  # pylint: disable=g-import-not-at-top
  from jaxseg.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  other = config.copy_and_resolve_references()
  other.model.base_width = 8
  with pytest.raises(ConfigError, match='model.base_width: 8 here, 4 in training'):
    inference.load_predictor(other, workdir)
  with pytest.raises(DataError, match='does not exist'):
    predict.predict(config, workdir, str(tmp_path / 'nothing_here.png'))
  with pytest.raises(ConfigError, match='config.inference.mode'):
    settings.from_config(with_inference(config.copy_and_resolve_references(), mode='tiles'))
  with pytest.raises(ConfigError, match='stride'):
    settings.from_config(config).inference_options(window=(32, 32), stride=(40, 40))


# ---------------------------------------------------------------------------
# Pictures (no model).
# ---------------------------------------------------------------------------


def test_palettes_overlays_panels_and_confusion_image():
  from jaxseg import viz  # pylint: disable=g-import-not-at-top
  voc = viz.voc_palette(21)
  assert voc.shape == (21, 3) and voc.dtype == np.uint8
  assert voc[0].tolist() == [0, 0, 0] and voc[1].tolist() == [128, 0, 0] and voc[15].tolist() == [192, 128, 128]
  assert len({tuple(c) for c in viz.voc_palette(256)}) == 256
  shapes = viz.palette_for('jaxseg_shapes', 4)
  assert shapes.shape == (4, 3) and len({tuple(c) for c in shapes}) == 4
  assert viz.palette_for('oxford_iiit_pet', 3).shape == (3, 3)
  np.testing.assert_array_equal(viz.palette_for('unknown', 5), viz.voc_palette(5))

  image = np.full((4, 6, 3), 100, np.uint8)
  mask = np.zeros((4, 6), np.int32)
  mask[:, 3:] = 1
  mask[0, 0] = 255
  out = viz.overlay(image, mask, shapes, alpha=0.5, skip_classes=viz.background_classes(
      ('background', 'disc', 'square', 'triangle')))
  np.testing.assert_array_equal(out[:, :3], image[:, :3])  # Background and ignore left as they are.
  np.testing.assert_array_equal(out[0, 3], np.round(0.5 * 100 + 0.5 * shapes[1]).astype(np.uint8))
  colours = viz.colorize(mask, shapes)
  assert colours[0, 0].tolist() == list(viz.IGNORE_COLOUR) and colours[0, 4].tolist() == shapes[1].tolist()
  panel = viz.comparison_panel(image, mask, mask, shapes)
  assert panel.shape == (4, 3 * 6 + 2 * 2, 3)

  cm = np.array([[50, 0, 0, 0], [5, 5, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]])
  picture = viz.confusion_matrix_image(cm, ['background', 'disc', 'square', 'triangle'])
  assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
  assert picture.shape[0] > 4 * 20 and picture.shape[1] > 4 * 20


def test_mask_png_holds_class_indices(tmp_path):
  from jaxseg import image_io, viz  # pylint: disable=g-import-not-at-top
  mask = np.arange(12, dtype=np.uint8).reshape(3, 4) % 4
  image_io.mask_to_png(mask, viz.palette_for('jaxseg_shapes', 4)).save(tmp_path / 'm.png')
  back = Image.open(tmp_path / 'm.png')
  assert back.mode == 'P'
  np.testing.assert_array_equal(np.asarray(back), mask)
  assert np.asarray(back.convert('RGB'))[0, 1].tolist() == list(viz.FIXED_PALETTES['jaxseg_shapes'][1])


def test_window_starts_cover_the_image():
  from jaxseg import inference  # pylint: disable=g-import-not-at-top
  assert inference.window_starts(32, 32, 24) == [0]
  assert inference.window_starts(20, 32, 24) == [0]
  assert inference.window_starts(100, 32, 24) == [0, 24, 48, 68]
  for size, window, stride in [(97, 32, 21), (64, 64, 1), (200, 48, 48)]:
    covered = np.zeros(size, bool)
    for s in inference.window_starts(size, window, stride):
      assert 0 <= s and s + window <= size
      covered[s:s + window] = True
    assert covered.all()
