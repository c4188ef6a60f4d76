"""Evaluation scores every label pixel once, at the label's own size, also for images larger than input.eval_size."""

import jax
import numpy as np
from PIL import Image
import pytest

from jaxseg import evaluate
from jaxseg import inference
from jaxseg import settings as settings_lib
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg.data import datasets
from jaxseg.data import pipeline
from tests.conftest import tiny_unet_config

EVAL_SIZE = (24, 24)
NUM_CLASSES = 3
# (height, width) of the validation images: fits, fits exactly, too tall, too wide, too big both ways.
VAL_SIZES = [(16, 20), (24, 24), (40, 18), (21, 50), (61, 47)]


def _write_folder(root):
  rng = np.random.default_rng(0)
  for split, sizes in (('train', [(24, 24)] * 2), ('val', VAL_SIZES)):
    (root / split / 'images').mkdir(parents=True)
    (root / split / 'masks').mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
      image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
      mask = rng.integers(0, NUM_CLASSES, size=(h, w), dtype=np.uint8)
      mask[0, :5] = 255  # Ignored pixels count nowhere.
      Image.fromarray(image).save(root / split / 'images' / f'{i}.png')
      Image.fromarray(mask).save(root / split / 'masks' / f'{i}.png')


def test_images_larger_than_eval_size_are_scored_at_the_labels_own_size(tmp_path):
  _write_folder(tmp_path / 'ds')
  config = tiny_unet_config(str(tmp_path / 'tfds'), **{
      'dataset.name': 'folder', 'dataset.path': str(tmp_path / 'ds'), 'dataset.num_classes': NUM_CLASSES,
      'input.eval_size': EVAL_SIZE, 'eval_batch_size': 4})
  settings = settings_lib.from_config(config)
  spec, builder = datasets.open_dataset(settings.dataset)
  setup = state_lib.build(settings, NUM_CLASSES, sharding.make_mesh())
  state = setup.init_state()
  # Non-trivial BatchNorm statistics, so predictions vary over the image.
  state = state.replace(batch_stats=jax.tree.map(lambda x: x + 0.1, state.batch_stats))
  host_variables = jax.device_get(state_lib.variables_of(state))

  eval_data = pipeline.eval_dataset(builder, spec, settings.input, global_batch=4, process_index=0, process_count=1,
                                    cache=False)
  # The three images larger than eval_size travel in their own stream, at their own size.
  assert sorted(e['label'].shape for e in pipeline.as_numpy(eval_data.large)) == sorted(VAL_SIZES[2:])
  result, _ = evaluate.Evaluator(spec, setup, settings.inference_options()).run(state, eval_data)

  confusion = np.asarray(result['confusion_matrix'])
  labelled = sum(int((np.asarray(Image.open(tmp_path / 'ds' / 'val' / 'masks' / f'{i}.png')) != 255).sum())
                 for i in range(len(VAL_SIZES)))
  # Every labelled pixel at its own resolution, exactly once (not a shrunken label, not the padding).
  assert confusion.sum() == labelled
  # The same predictions as --mode=predict's Predictor scoring every image on its own: whole for the
  # ones that fit (padded to the same 24x24 frame), a sliding window of the crop for the larger ones.
  options = settings.inference_options(size_multiple=EVAL_SIZE[0])
  predictor = inference.Predictor.create(state_lib.build_model(settings, NUM_CLASSES), host_variables, NUM_CLASSES,
                                         options)
  reference = np.asarray(evaluate.evaluate_with_predictor(predictor, builder, spec,
                                                          show_progress=False)['confusion_matrix'])
  assert reference.sum() == labelled
  assert np.abs(confusion - reference).sum() <= 0.002 * labelled, (confusion, reference)
  # Independently: the bare Flax module on numpy-normalised pixels. Images that fit are zero-padded at the
  # bottom/right to eval_size; larger ones are covered by windows of the 32x32 crop every 21 pixels (2/3 of
  # it), the last flush with the end, averaged where they overlap. Confusion and cross-entropy in numpy.
  model = state_lib.build_model(settings, NUM_CLASSES)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
  logits_of = lambda tiles: np.asarray(apply(host_variables, ((np.stack(tiles) - mean) / std).astype(np.float32)),
                                       np.float64)
  window_starts = {(40, 18): ([0, 8], [0]), (21, 50): ([0], [0, 18]), (61, 47): ([0, 21, 29], [0, 15])}
  own_confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  ce_sum = 0.0
  for i, (h, w) in enumerate(VAL_SIZES):
    image = np.asarray(Image.open(tmp_path / 'ds' / 'val' / 'images' / f'{i}.png'))
    label = np.asarray(Image.open(tmp_path / 'ds' / 'val' / 'masks' / f'{i}.png')).astype(np.int64)
    if (h, w) in window_starts:
      ys, xs = window_starts[(h, w)]
      padded = np.zeros((max(h, 32), max(w, 32), 3), np.uint8)
      padded[:h, :w] = image
      total = np.zeros(padded.shape[:2] + (NUM_CLASSES,))
      count = np.zeros(padded.shape[:2] + (1,))
      for (y, x), tile in zip([(y, x) for y in ys for x in xs],
                              logits_of([padded[y:y + 32, x:x + 32] for y in ys for x in xs])):
        total[y:y + 32, x:x + 32] += tile
        count[y:y + 32, x:x + 32] += 1
      assert count.min() >= 1  # The windows cover the image.
      logits = (total / count)[:h, :w]
    else:
      padded = np.zeros(EVAL_SIZE + (3,), np.uint8)
      padded[:h, :w] = image
      logits = logits_of([padded])[0, :h, :w]
    valid = label != 255
    own_confusion += np.bincount(label[valid] * NUM_CLASSES + logits.argmax(-1)[valid],
                                 minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
    shifted = logits[valid] - logits[valid].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce_sum -= np.take_along_axis(log_probs, label[valid][:, None], 1).sum()
  assert own_confusion.sum() == labelled
  assert np.abs(confusion - own_confusion).sum() <= 0.002 * labelled, (confusion, own_confusion)
  assert result['loss'] == pytest.approx(ce_sum / labelled, rel=1e-5)
