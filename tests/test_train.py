"""End-to-end training: the importable entry point against numpy, config errors.

Elsewhere: run.py's train, eval, predict and export as the README shows them in tests/test_readme.py; 1 device against 4 (replicated and fsdp) in tests/test_sharding.py, 1 process x 4 devices against
2 processes x 2 in tests/test_multihost.py; exact resume after a SIGTERM and a kill -9 mid-save (AdamW + EMA) in
tests/test_faults.py."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import tiny_unet_config
from tests.helpers import ROOT, best_checkpoint_logits_fn, xla_flags

def run_cli(*args, env=None, timeout=300):
  full_env = dict(os.environ)
  full_env['XLA_FLAGS'] = xla_flags(2)
  full_env.update(env or {})
  return subprocess.run([sys.executable, 'run.py', *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=timeout)



def test_default_workdir_comes_from_the_config_file_name():
  from jaxseg import cli  # pylint: disable=g-import-not-at-top
  assert cli.default_workdir('configs/unet.py') == os.path.join('workdirs', 'unet')
  assert cli.default_workdir('/x/configs/fcn.py:arg') == os.path.join('workdirs', 'fcn')


def test_a_bad_config_value_is_a_clear_error_from_run_py(tmp_path, shapes_data_dir):
  """run.py turns a ConfigError into 'jaxseg: error: ...' and exit status 2 (the other fields' checks: below)."""
  proc = run_cli('--config=configs/unet.py', f'--workdir={tmp_path / "wd"}',
                 f'--config.dataset.data_dir={shapes_data_dir}', '--config.batch_size=7', timeout=120)
  assert proc.returncode == 2
  assert 'jaxseg: error: config.batch_size=7 is not divisible by the number of devices (2)' in proc.stderr, \
      proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('field,value,message', [
    ('model.name', 'resnet', "config.model.name='resnet' is not a known model"),
    ('dataset.num_classes', 1, 'config.dataset.num_classes must be an integer in [2, 255]'),
])
def test_bad_config_values_name_the_field(field, value, message):
  from configs import unet  # pylint: disable=g-import-not-at-top
  from jaxseg import settings  # pylint: disable=g-import-not-at-top
  from jaxseg.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = unet.get_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    settings.from_config(config)


def test_train_and_evaluate_in_process_learns_something(shapes_data_dir, tmp_path):
  """The importable entry point (as notebooks use it) on 4 devices: loss goes down."""
  from jaxseg import train  # pylint: disable=g-import-not-at-top
  config = tiny_unet_config(shapes_data_dir, num_train_steps=30, log_every_steps=10, eval_every_steps=30,
                            checkpoint_every_steps=30)
  config.optimizer.learning_rate = 0.1
  config.loss.class_weights = (0.2, 1.0, 1.0, 1.0)  # A lighter background: 30 steps predict several classes.
  result = train.train_and_evaluate(config, str(tmp_path / 'wd'))
  losses = [json.loads(l)['loss'] for l in open(tmp_path / 'wd' / 'metrics.jsonl') if '"train"' in l]
  assert losses[-1] < losses[0]
  # The returned figures are those of the step-30 checkpoint scored independently: its raw orbax arrays
  # applied with the bare Flax module to the decoded validation split, confusion, IoU and loss in numpy.
  confusion, mean_iou, loss = numpy_scores(best_checkpoint_logits_fn(config, str(tmp_path / 'wd')), shapes_data_dir)
  assert (confusion.sum(0) > 0).sum() >= 2, 'the model predicts one class only'
  got = np.asarray(result['confusion_matrix'])
  print(f'mean IoU {result["mean_iou"]:.6f} (numpy {mean_iou:.6f}), loss {result["loss"]:.6f} (numpy {loss:.6f}); '
        f'confusion matrices differ by {np.abs(got - confusion).sum()} pixels')
  assert got.sum() == confusion.sum() == 200 * 96 * 96  # Every validation pixel once.
  assert np.abs(got - confusion).sum() <= 1e-4 * confusion.sum()  # Near-ties may flip a few argmaxes.
  assert result['mean_iou'] == pytest.approx(mean_iou, abs=1e-3)
  assert result['loss'] == pytest.approx(loss, rel=1e-4)


def numpy_scores(logits_fn, data_dir, num_classes=4):
  """(confusion matrix, mean IoU, mean pixel cross-entropy) of logits_fn on jaxseg_shapes' validation split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxseg.data import shapes  # pylint: disable=g-import-not-at-top,unused-import  # Registers the builder.
  source = tfds.data_source('jaxseg_shapes', split='validation', data_dir=data_dir)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  ce_sum = 0.0
  for start in range(0, len(source), 50):
    examples = [source[i] for i in range(start, min(start + 50, len(source)))]
    labels = np.stack([ex['segmentation_mask'][..., 0] for ex in examples]).astype(np.int64)
    logits = logits_fn(np.stack([ex['image'] for ex in examples])).astype(np.float64)
    preds = logits.argmax(-1)
    confusion += np.bincount((labels * num_classes + preds).ravel(),
                             minlength=num_classes ** 2).reshape(num_classes, num_classes)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce_sum -= np.take_along_axis(log_probs, labels[..., None], -1).sum()
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  present = union > 0  # Classes absent from labels and predictions have no IoU.
  return confusion, float(np.mean(tp[present] / union[present])), ce_sum / confusion.sum()
