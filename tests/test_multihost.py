"""Multi-host training on one machine: 2 processes x 2 simulated CPU devices against 1 process x 4.

The two processes form one JAX program through jax.distributed (coordinator
on a free localhost port, gloo collectives between the CPU devices), exactly
as two hosts of a pod slice would.
"""

import json
import signal

import jax
import numpy as np
import pytest

from jaxseg import train
from tests import fault_worker as fw
from tests.conftest import tiny_unet_config
from tests.helpers import load_checkpoint, max_abs_diff

# The two runs add across devices in different orders, so their losses differ by ~1e-7 at first;
# at the tiny config's learning rate (0.05) training is chaotic enough to blow that up to ~1e-4
# within 7 steps. A smaller one keeps the comparison meaningful over 16 steps. (A 2-process resumed
# run matches an uninterrupted 2-process run bit for bit.)
STEPS = 16
CONFIG = {'num_train_steps': STEPS, 'log_every_steps': 1, 'eval_every_steps': STEPS,
          'checkpoint_every_steps': 8, 'optimizer.learning_rate': 0.01}


def test_two_processes_train_checkpoint_resume_and_evaluate_like_one(shapes_data_dir, tmp_path):
  """Pre-empted and resumed on 2 processes x 2 devices == uninterrupted on 1 process x 4 devices."""
  one = tmp_path / 'one_process'
  two = tmp_path / 'two_processes'
  spec = {'data_dir': shapes_data_dir, 'overrides': CONFIG}
  # The reference: one process, four devices (this pytest process's, conftest), no interruption.
  assert jax.device_count() == 4
  ref_result = train.train_and_evaluate(tiny_unet_config(shapes_data_dir, **CONFIG), str(one))
  procs = []
  try:
    # Two processes, pre-empted: SIGTERM to process 1 only; JAX tells process 0, both save the same step.
    (tmp_path / 'first').mkdir()
    procs = fw.launch_multiprocess(dict(spec, workdir=str(two)), processes=2, devices_per_process=2,
                                   log_dir=tmp_path / 'first')
    fw.wait_until(lambda: len(fw.logged_steps(two)) >= 3, procs, timeout=400, what='step 3 of the 2-process run')
    procs[1].send_signal(signal.SIGTERM)
    assert fw.wait_all(procs, timeout=120) == [0, 0], [fw.output(p)[-3000:] for p in procs]
    stopped = load_checkpoint(two)[1]
    for p in procs:
      assert f'Pre-empted (SIGTERM): checkpoint at step {stopped} of {STEPS} saved' in fw.output(p)
    assert 3 <= stopped < STEPS
    # A second 2-process launch resumes (every process restores) and finishes the schedule.
    (tmp_path / 'second').mkdir()
    procs = fw.launch_multiprocess(dict(spec, workdir=str(two)), processes=2, devices_per_process=2,
                                   log_dir=tmp_path / 'second')
    assert fw.wait_all(procs, timeout=400) == [0, 0], [fw.output(p)[-3000:] for p in procs]
    assert f'Resuming from the checkpoint at step {stopped}' in fw.output(procs[0])
    two_results = [fw.result_of(p) for p in procs]
  finally:
    fw.stop(procs)

  # Same parameters, to float tolerance (cross-process sums add in another order).
  a, step_a = load_checkpoint(one)
  b, step_b = load_checkpoint(two)
  assert step_a == step_b == STEPS
  diff = max_abs_diff(a['params'], b['params'])
  print(f'2 processes (pre-empted at step {stopped}, resumed) vs 1 process: largest parameter difference '
        f'{diff:.3g}; batch statistics {max_abs_diff(a["batch_stats"], b["batch_stats"]):.3g}')
  assert diff < 1e-4
  assert max_abs_diff(a['batch_stats'], b['batch_stats']) < 1e-4
  assert max_abs_diff(a['params'], load_checkpoint(one, step=8)[0]['params']) > 1e-4  # Training moved them.
  # Step by step the same losses, across the pre-emption too.
  losses = [[json.loads(l)['loss'] for l in open(w / 'metrics.jsonl') if '"train"' in l] for w in (one, two)]
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)

  # Only process 0 wrote metrics.jsonl: one line per step, no duplicates, across the pre-emption.
  assert fw.logged_steps(two) == list(range(1, STEPS + 1))
  assert fw.logged_steps(two, 'eval') == [STEPS]
  assert 'step 10/' not in fw.output(procs[1])  # No progress lines from process 1.

  # Evaluation: both processes report the figures of the whole validation split, every pixel counted exactly
  # once: the confusion matrix's rows hold the split's label histogram, counted here from the records.
  confusion = np.asarray(two_results[0]['confusion_matrix'])
  assert two_results[0]['confusion_matrix'] == two_results[1]['confusion_matrix']
  np.testing.assert_array_equal(confusion.sum(1), validation_label_histogram(shapes_data_dir))
  assert two_results[0]['mean_iou'] == pytest.approx(ref_result['mean_iou'], abs=1e-3)
  print(f'eval: {confusion.sum()} labelled pixels; mean IoU {two_results[0]["mean_iou"]:.6f} on 2 processes, '
        f'{ref_result["mean_iou"]:.6f} on 1')


def validation_label_histogram(data_dir, num_classes=4):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxseg.data import shapes  # pylint: disable=g-import-not-at-top,unused-import  # Registers the builder.
  source = tfds.data_source('jaxseg_shapes', split='validation', data_dir=data_dir)
  return sum(np.bincount(source[i]['segmentation_mask'].ravel(), minlength=num_classes) for i in range(len(source)))
