"""benchmarks/bench_input.py run tiny, as a program: every field is written, and its figures agree with hand
calculations from the raw times it reports (a harness check, not a timing)."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from tests.helpers import ROOT, xla_flags


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
  rates are the images over the seconds it reports, the loop's temporary workdir is removed."""
  out = tmp_path / 'input.json'
  # 'rbg' keys: XLA:CPU compiles the threefry parameter initialisers several times slower.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DEFAULT_PRNG_IMPL='rbg', TMPDIR=str(tmp_path),
             XLA_FLAGS=xla_flags(2))
  # The config arguments in both spellings ('--config.x VALUE' and '--config.x=VALUE') and a shorthand flag
  # between them: run.py must get all of them, the shorthand last as a config field.
  config_args = ['--config.model.base_width', '4', '--config.model.depth=2', '--config.input.crop_size=(32,32)',
                 '--config.batch_size=8', '--config.eval_batch_size=40', '--config.log_every_steps=2',
                 '--config.checkpoint_every_steps=3', '--config.optimizer.learning_rate=0.01']
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_input.py'), f'--json={out}', *config_args[:2],
         f'--data_dir={shapes_data_dir}', *config_args[2:], '--batches=3', '--warmup_batches=1', '--steps=2',
         '--warmup_steps=1', '--fed_steps=2', '--rounds=1', '--loop_steps=6']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

  report = json.loads(out.read_text())
  assert report['schema'] == 'jaxseg-bench-input/2'
  assert report['dataset']['name'] == 'jaxseg_shapes' and report['dataset']['train_examples'] == 2000
  assert report['device']['platform'] == 'cpu' and report['device']['device_count'] == 2
  config = report['config']
  assert config['batch_size'] == 8 and config['crop_size'] == [32, 32] and config['sharding'] == 'replicated'
  assert config['model']['base_width'] == 4 and config['file'].endswith('configs/unet.py')
  assert report['host']['cpu_count'] == allowed_cpus_from_proc()  # The benchmark inherits this process's CPUs.
  # run.py got the same config: the file the benchmark read (its default), the config arguments as given, the
  # --data_dir shorthand as a config field, last.
  assert report['loop_args'] == [f'--config={os.path.join(ROOT, "configs", "unet.py")}', *config_args,
                                 f'--config.dataset.data_dir={shapes_data_dir}']

  positive = lambda x: isinstance(x, (int, float)) and math.isfinite(x) and x > 0
  pipe = report['pipeline']
  assert pipe['batches'] == 3 and pipe['warmup_batches'] == 1
  assert positive(pipe['seconds']) and positive(pipe['time_to_first_batch_s'])
  assert pipe['images_per_s'] == pytest.approx(3 * 8 / pipe['seconds'])
  assert pipe['ms_per_batch'] == pytest.approx(1000 * pipe['seconds'] / 3)
  step = report['train_step']
  assert step['steps'] == 2 and len(step['warmup_step_s']) == 1 and positive(step['compile_s'])
  assert step['images_per_s'] == pytest.approx(2 * 8 / step['seconds'])
  assert step['ms_per_step'] == pytest.approx(1000 * step['seconds'] / 2)
  assert math.isfinite(step['final_loss']) and positive(step['state_bytes_per_device'])
  assert step['recompiles'] == 0  # The jitted step keeps the state's layout: it compiles once.
  fed = report['fed']
  assert fed['steps'] == 2 and fed['recompiles'] == 0
  assert fed['images_per_s'] == pytest.approx(2 * 8 / fed['seconds'])

  [r] = report['rounds']
  loop = r['loop']
  # Log points at steps 2, 4, 6: the first interval (compilation) is left out; the other two, of 2 steps (16
  # images) each, are timed from their logged rates, and the loop's rate is their images over their seconds (not
  # the mean of the two rates).
  assert loop['steps'] == 6 and loop['timed_steps'] == 4 and positive(loop['wall_s'])
  rate_a, rate_b = loop['interval_images_per_s']
  assert loop['timed_seconds'] == pytest.approx(16 / rate_a + 16 / rate_b)
  assert loop['images_per_s'] == pytest.approx(32 / (16 / rate_a + 16 / rate_b))
  assert loop['checkpoints_kept'] == [3, 6]  # A mid-run save and the final one, as in production.
  # overhead = 1 - loop / mean(step before, step after); one round: its own overhead is the median.
  before, after = r['step_before_images_per_s'], r['step_after_images_per_s']
  assert positive(before) and positive(after)
  assert r['overhead'] == pytest.approx(1 - loop['images_per_s'] / ((before + after) / 2))
  assert report['overhead_median'] == pytest.approx(statistics.median([r['overhead']]))
  assert report['ratio_pipeline_over_step'] == pytest.approx(pipe['images_per_s'] / step['images_per_s'])
  assert report['ratio_fed_over_step'] == pytest.approx(fed['images_per_s'] / step['images_per_s'])
  for line in ('train step (fixed batch)', 'train step fed by pipeline',
               f'ratio pipeline / train step: {report["ratio_pipeline_over_step"]:.2f}x',
               f'training-loop overhead (median of 1 rounds): {100 * r["overhead"]:.1f}% of the step time'):
    assert line in proc.stdout, line
  assert not [p for p in os.listdir(tmp_path) if p.startswith('jaxseg_bench_loop_')]


def test_refuses_a_loop_too_short_to_time():
  """The loop's rate leaves out its first log interval, so a round needs two: a shorter one is refused before
  anything is built (configs/unet.py logs every 50 steps)."""
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_input.py'), '--rounds=1', '--loop_steps=99']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert 'bench_input: error: --loop_steps=99 must cover at least two log intervals of config.log_every_steps=50' \
      in proc.stderr
