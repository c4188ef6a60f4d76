"""benchmarks/bench_input.py: its arithmetic against hand calculations, and a tiny smoke run of the whole harness
(it runs and writes every field: a harness check, not a timing)."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, xla_flags

BENCH_DIR = os.path.join(ROOT, 'benchmarks')
if BENCH_DIR not in sys.path:
  sys.path.insert(0, BENCH_DIR)

import bench_input  # pylint: disable=g-import-not-at-top,wrong-import-position


# ---------------------------------------------------------------------------
# Arithmetic, checked against figures worked out by hand.
# ---------------------------------------------------------------------------


def test_loop_rate_leaves_out_the_first_interval_and_weights_intervals_by_time():
  # Batch 8; train log points at steps 2, 4, 6 (an eval record in between is not a train point).
  # First interval (steps 0-2, compilation) left out. Steps 2-4 at 16 img/s: 16 images in 1.0 s;
  # steps 4-6 at 32 img/s: 16 images in 0.5 s. 32 images / 1.5 s = 21.33 img/s (not the mean 24).
  records = [{'split': 'train', 'step': 2, 'images_per_sec': 5.0},
             {'split': 'train', 'step': 4, 'images_per_sec': 16.0},
             {'split': 'eval', 'step': 4, 'mean_iou': 0.5},
             {'split': 'train', 'step': 6, 'images_per_sec': 32.0}]
  got = bench_input.loop_rate_from_metrics(records, batch_size=8)
  assert got['timed_steps'] == 4
  assert got['timed_seconds'] == pytest.approx(1.5)
  assert got['images_per_s'] == pytest.approx(64 / 3)
  assert got['interval_images_per_s'] == [16.0, 32.0]


def test_loop_rate_with_a_short_last_interval():
  # Batch 8; points at steps 2, 4, 5 (the last step is logged off the log_every grid). Steps 2-4 at 16 img/s:
  # 16 images in 1.0 s; step 4-5 at 4 img/s: 8 images in 2.0 s. 24 images / 3.0 s = 8 img/s.
  records = [{'split': 'train', 'step': 2, 'images_per_sec': 10.0},
             {'split': 'train', 'step': 4, 'images_per_sec': 16.0},
             {'split': 'train', 'step': 5, 'images_per_sec': 4.0}]
  got = bench_input.loop_rate_from_metrics(records, batch_size=8)
  assert got['timed_steps'] == 3 and got['timed_seconds'] == pytest.approx(3.0)
  assert got['images_per_s'] == pytest.approx(8.0)


def test_loop_rate_needs_two_train_points():
  with pytest.raises(ValueError, match='at least 2'):
    bench_input.loop_rate_from_metrics([{'split': 'train', 'step': 2, 'images_per_sec': 5.0}], batch_size=8)


@pytest.mark.parametrize('before,loop,after,expected', [
    (100.0, 81.0, 80.0, 0.10),   # step mean 90; 81 / 90 = 0.9: the loop adds 10%.
    (98.0, 98.0, 102.0, 0.02),   # step mean 100; 98 / 100.
    (50.0, 55.0, 50.0, -0.10),   # a loop faster than the step shows as negative, not clipped.
])
def test_overhead_against_the_mean_of_the_two_steps(before, loop, after, expected):
  assert bench_input.overhead(before, loop, after) == pytest.approx(expected)


def test_derived_ratios_and_median():
  got = bench_input.derived(500.0, 100.0, 95.0, [0.04, 0.01, 0.025])
  assert got['ratio_pipeline_over_step'] == pytest.approx(5.0)
  assert got['ratio_fed_over_step'] == pytest.approx(0.95)
  assert got['overhead_median'] == pytest.approx(0.025)
  got = bench_input.derived(50.0, 200.0, None, [0.01, 0.03])  # No fed phase; even count: mean of the middle two.
  assert got['ratio_pipeline_over_step'] == pytest.approx(0.25)
  assert got['ratio_fed_over_step'] is None and got['overhead_median'] == pytest.approx(0.02)
  assert bench_input.derived(1.0, 1.0, 1.0, [])['overhead_median'] is None  # --rounds=0.


def test_rate():
  assert bench_input.rate(32, 4.0) == 8.0
  assert bench_input.rate(32, 0.0) == math.inf


def test_measure_pipeline_times_the_first_batch_and_the_timed_batches(monkeypatch):
  """A fake clock that moves 0.5 s per batch: first batch at 0.5 s; 2 timed batches of 4 images in 1.0 s."""
  clock = [0.0]
  monkeypatch.setattr(bench_input.time, 'perf_counter', lambda: clock[0])

  def batches():
    while True:
      clock[0] += 0.5
      yield {}

  got = bench_input.measure_pipeline(batches(), batch_size=4, warmup_batches=1, batches=2, t_start=0.0)
  assert got['time_to_first_batch_s'] == pytest.approx(0.5)
  assert got['seconds'] == pytest.approx(1.0)
  assert got['images_per_s'] == pytest.approx(8.0)
  assert got['ms_per_batch'] == pytest.approx(500.0)
  assert clock[0] == pytest.approx(2.0)  # 1 first + 1 warm-up + 2 timed batches read, no more.


def test_config_args_hand_run_py_the_same_config():
  argv = ['--config=configs/fcn.py', '--rounds=1', '--config.batch_size', '32', '--config.input.hflip',
          '--json=/tmp/x.json', '--config.model.depth=2', '--dataset=folder']
  shorthands = {'dataset': 'folder', 'path': '/data/photos', 'num_classes': 4, 'data_dir': None}
  assert bench_input.config_args(argv, '/repo/configs/fcn.py', shorthands) == [
      '--config=configs/fcn.py', '--config.batch_size', '32', '--config.input.hflip', '--config.model.depth=2',
      '--config.dataset.name=folder', '--config.dataset.path=/data/photos', '--config.dataset.num_classes=4']
  # No --config given: the file the benchmark read (its default) is named.
  assert bench_input.config_args(['--steps=3', '--config.batch_size=8'], '/repo/configs/unet.py', {}) == [
      '--config=/repo/configs/unet.py', '--config.batch_size=8']


def test_report_prints_the_overhead_as_a_percentage():
  rounds = [{'step_before_images_per_s': 100.0, 'loop': {'images_per_s': 81.0}, 'step_after_images_per_s': 80.0,
             'overhead': 0.1}]
  report = {
      'dataset': {'name': 'jaxseg_shapes', 'train_examples': 2000},
      'config': {'batch_size': 16, 'crop_size': [64, 64], 'scale_range': [1.0, 1.0], 'photometric': False,
                 'sharding': 'replicated', 'prefetch_to_device': 2, 'log_every_steps': 50,
                 'checkpoint_every_steps': 350},
      'device': {'device_count': 2, 'kind': 'cpu'}, 'host': {'cpu_count': 2, 'loadavg_start': None,
                                                              'loadavg_end': None},
      'settings': {'loop_steps': 400},
      'pipeline': {'images_per_s': 500.0, 'batches': 50, 'ms_per_batch': 32.0, 'time_to_first_batch_s': 1.0},
      'train_step': {'images_per_s': 100.0, 'steps': 60, 'ms_per_step': 160.0, 'warmup_step_s': [5.0, 0.2],
                     'compile_s': 4.5, 'recompiles': 0},
      'fed': {'images_per_s': 95.0, 'steps': 20, 'recompiles': 0},
      'rounds': rounds, 'ratio_pipeline_over_step': 5.0, 'ratio_fed_over_step': 0.95, 'overhead_median': 0.1}
  text = bench_input.format_report(report)
  assert 'ratio pipeline / train step: 5.00x' in text and 'ratio fed / train step: 0.950x' in text
  assert '10.0%' in text and 'training-loop overhead (median of 1 rounds): 10.0% of the step time' in text


# ---------------------------------------------------------------------------
# The harness end to end, tiny.
# ---------------------------------------------------------------------------


def allowed_cpus_from_proc() -> int:
  """The CPUs this process may run on, counted from the kernel's Cpus_allowed_list (e.g. '0-3,8,10-11')."""
  with open('/proc/self/status', encoding='utf-8') as f:
    [line] = [l for l in f if l.startswith('Cpus_allowed_list:')]
  count = 0
  for part in line.split(':', 1)[1].strip().split(','):
    first, _, last = part.partition('-')
    count += int(last or first) - int(first) + 1
  return count


@pytest.mark.slow
def test_bench_input_smoke_writes_the_report(shapes_data_dir, tmp_path):
  """Every phase with a tiny UNet on 2 CPU devices, one loop round of 6 run.py steps: every field is written, the
  figures are positive and finite, the loop's temporary workdir is removed."""
  out = tmp_path / 'input.json'
  # 'rbg' keys: XLA:CPU compiles the threefry parameter initialisers several times slower.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DEFAULT_PRNG_IMPL='rbg', TMPDIR=str(tmp_path),
             XLA_FLAGS=xla_flags(2))
  cmd = [sys.executable, os.path.join(BENCH_DIR, 'bench_input.py'), f'--json={out}',
         f'--data_dir={shapes_data_dir}', '--config.model.base_width=4', '--config.model.depth=2',
         '--config.input.crop_size=(32,32)', '--config.batch_size=8', '--config.eval_batch_size=40',
         '--config.log_every_steps=2', '--config.checkpoint_every_steps=3', '--config.optimizer.learning_rate=0.01',
         '--batches=3', '--warmup_batches=1', '--steps=2', '--warmup_steps=1', '--fed_steps=2',
         '--rounds=1', '--loop_steps=6']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  for line in ('train step (fixed batch)', 'train step fed by pipeline', 'ratio pipeline / train step',
               'training-loop overhead (median of 1 rounds)'):
    assert line in proc.stdout, line

  report = json.loads(out.read_text())
  assert report['schema'] == bench_input.SCHEMA == 'jaxseg-bench-input/2'
  assert report['dataset']['name'] == 'jaxseg_shapes' and report['dataset']['train_examples'] == 2000
  assert report['device']['platform'] == 'cpu' and report['device']['device_count'] == 2
  config = report['config']
  assert config['batch_size'] == 8 and config['crop_size'] == [32, 32] and config['sharding'] == 'replicated'
  assert config['model']['base_width'] == 4 and config['file'].endswith('configs/unet.py')
  assert report['host']['cpu_count'] == allowed_cpus_from_proc()  # The benchmark inherits this process's CPUs.
  # run.py got the same config: the default file, the overrides, and the --data_dir shorthand as a config field.
  assert report['loop_args'][0].endswith('configs/unet.py')
  assert '--config.batch_size=8' in report['loop_args']
  assert f'--config.dataset.data_dir={shapes_data_dir}' in report['loop_args']

  positive = lambda x: isinstance(x, (int, float)) and math.isfinite(x) and x > 0
  pipe = report['pipeline']
  assert pipe['batches'] == 3 and pipe['warmup_batches'] == 1
  assert positive(pipe['images_per_s']) and positive(pipe['seconds']) and positive(pipe['time_to_first_batch_s'])
  step = report['train_step']
  assert step['steps'] == 2 and len(step['warmup_step_s']) == 1
  assert positive(step['images_per_s']) and positive(step['ms_per_step']) and positive(step['compile_s'])
  assert math.isfinite(step['final_loss']) and positive(step['state_bytes_per_device'])
  assert step['recompiles'] == 0  # The jitted step keeps the state's layout: it compiles once.
  fed = report['fed']
  assert fed['steps'] == 2 and positive(fed['images_per_s']) and fed['recompiles'] == 0
  [r] = report['rounds']
  assert positive(r['step_before_images_per_s']) and positive(r['step_after_images_per_s'])
  loop = r['loop']
  # Log points at steps 2, 4, 6: the first interval (compilation) is left out, the other two are timed.
  assert loop['steps'] == 6 and loop['timed_steps'] == 4 and len(loop['interval_images_per_s']) == 2
  assert positive(loop['images_per_s']) and positive(loop['wall_s'])
  assert loop['checkpoints_kept'] == [3, 6]  # A mid-run save and the final one, as in production.
  for key in ('overhead_median', 'ratio_pipeline_over_step', 'ratio_fed_over_step'):
    assert isinstance(report[key], float) and math.isfinite(report[key]), key
  assert math.isfinite(r['overhead'])
  assert not [p for p in os.listdir(tmp_path) if p.startswith('jaxseg_bench_loop_')]
