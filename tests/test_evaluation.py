"""Evaluation scores every label pixel once, at the label's own size, also for images larger than input.eval_size."""

import jax
import numpy as np
from PIL import Image

from jaxseg import evaluate
from jaxseg import inference
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
  spec, builder = datasets.open_dataset(config.dataset)
  setup = state_lib.build(config, NUM_CLASSES, sharding.make_mesh())
  state = setup.init_state()
  # Non-trivial BatchNorm statistics, so predictions vary over the image.
  state = state.replace(batch_stats=jax.tree.map(lambda x: x + 0.1, state.batch_stats))
  host_variables = jax.device_get(state_lib.variables_of(state))

  eval_ds, _ = pipeline.eval_dataset(builder, spec, config.input, global_batch=4, process_index=0, process_count=1,
                                     cache=False)
  result = evaluate.Evaluator(config, spec, setup).run(state, eval_ds)

  confusion = np.asarray(result['confusion_matrix'])
  labelled = sum(int((np.asarray(Image.open(tmp_path / 'ds' / 'val' / 'masks' / f'{i}.png')) != 255).sum())
                 for i in range(len(VAL_SIZES)))
  # Every labelled pixel at its own resolution, exactly once (not a shrunken label, not the padding).
  assert confusion.sum() == labelled
  # The same predictions as --mode=predict's Predictor scoring every image on its own: whole for the
  # ones that fit (padded to the same 24x24 frame), a sliding window of the crop for the larger ones.
  options = inference.options_from_config(config, size_multiple=EVAL_SIZE[0])
  predictor = inference.Predictor(state_lib.build_model(config, NUM_CLASSES), host_variables, NUM_CLASSES, options)
  reference = np.asarray(evaluate.evaluate_with_predictor(predictor, builder, spec,
                                                          show_progress=False)['confusion_matrix'])
  assert reference.sum() == labelled
  assert np.abs(confusion - reference).sum() <= 0.002 * labelled, (confusion, reference)
  assert np.isfinite(result['loss']) and result['loss'] > 0
