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
from tests.helpers import load_checkpoint

# The two runs add across devices in different orders (any change of device count does): their losses differ by
# ~3e-7 (relative) at the first steps, float32 rounding, and training at the tiny config's learning rate (0.05) is
# chaotic enough to blow that up to ~1e-4 within 7 steps. A smaller one keeps the comparison meaningful over 16
# steps. Measured (benchmarks/NOTES.md, "Multi-host equality"), as ||a - b|| / ||a|| over all parameters (or all
# BatchNorm statistics) after 16 steps: 2 processes x 2 devices against 1 x 4, 2.5e-5 and 5.6e-5; 1 process x 2
# devices against 1 x 4, 1.4e-4 and 4.4e-4. The multi-process run is as close as a change of device count within
# one process: reduction order, which float32 rounding and the training dynamics bound, not something the
# processes compute differently. The bound is twice the single-process spread; the first steps, before the
# amplification, are held to rounding. (A 2-process resumed run matches an uninterrupted 2-process run bit for bit.)
RELATIVE_TOLERANCE = 1e-3
FIRST_STEPS, FIRST_STEPS_RTOL = 3, 1e-5
STEPS = 16
CONFIG = {'num_train_steps': STEPS, 'log_every_steps': 1, 'eval_every_steps': STEPS,
          'checkpoint_every_steps': 8, 'optimizer.learning_rate': 0.01}


# jax 0.12.1 on CPU (gloo): the resumed 2-process run deadlocks in its first train step (both processes connected,
# no progress for 400 s); the code of before this repository's settings change does the same, jax 0.10.2 and 0.12.0.1
# pass. Run on jax 0.10 by CI's Python 3.11 leg.
@pytest.mark.slow  # 64 s: CI's slow leg runs it (the default set stays under 10 minutes on 2 cores).
@pytest.mark.skipif(tuple(int(v) for v in jax.__version__.split('.')[:3]) >= (0, 12, 1),
                    reason='jax 0.12.1: a resumed 2-process CPU (gloo) run deadlocks in its first step')
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
  params, stats = (relative_difference(a[c], b[c]) for c in ('params', 'batch_stats'))
  print(f'2 processes (pre-empted at step {stopped}, resumed) vs 1 process: ||a - b|| / ||a|| of the parameters '
        f'{params:.3g}, of the batch statistics {stats:.3g}')
  assert params < RELATIVE_TOLERANCE and stats < RELATIVE_TOLERANCE
  # Training moved them far more than that (9.5e-3 from step 8 to 16, measured).
  assert relative_difference(a['params'], load_checkpoint(one, step=8)[0]['params']) > 5 * RELATIVE_TOLERANCE
  # Step by step the same losses, across the pre-emption too.
  losses = [[json.loads(l)['loss'] for l in open(w / 'metrics.jsonl') if '"train"' in l] for w in (one, two)]
  np.testing.assert_allclose(losses[1][:FIRST_STEPS], losses[0][:FIRST_STEPS], rtol=FIRST_STEPS_RTOL)
  np.testing.assert_allclose(losses[1], losses[0], rtol=RELATIVE_TOLERANCE)

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


def relative_difference(tree_a, tree_b) -> float:
  """||a - b|| / ||a|| over all the leaves as one vector (float64)."""
  a = np.concatenate([np.float64(x).ravel() for x in jax.tree.leaves(tree_a)])
  b = np.concatenate([np.float64(x).ravel() for x in jax.tree.leaves(tree_b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))
