"""benchmarks/bench_input.py and bench_loop.py in a tiny smoke setting: they run and write every field (harness
checks, not timings)."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

# A tiny model and crops; cheaper XLA:CPU code generation (compiling dominates a run this short).
SMOKE_FLAGS = ['--config.model.base_width=4', '--config.model.depth=2', '--config.input.crop_size=(32,32)',
               '--config.batch_size=32', '--batches=3', '--warmup_batches=1', '--steps=2', '--warmup_steps=1',
               '--fed_steps=2']
SMOKE_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def test_bench_input_smoke_writes_the_report(shapes_data_dir, tmp_path):
  out = tmp_path / 'input.json'
  # 'rbg' keys: XLA:CPU compiles the threefry parameter initialisers several times slower.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DEFAULT_PRNG_IMPL='rbg',
             XLA_FLAGS=f'--xla_force_host_platform_device_count=2 {SMOKE_XLA_FLAGS}')
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_input.py'), '--dataset=jaxseg_shapes',
         f'--data_dir={shapes_data_dir}', f'--json={out}', *SMOKE_FLAGS]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert 'pipeline, steady' in proc.stdout and 'ratio pipeline (steady) / train step' in proc.stdout

  report = json.loads(out.read_text())
  assert report['schema'] == 'jaxseg-bench-input/1'
  assert report['dataset']['name'] == 'jaxseg_shapes' and report['dataset']['train_examples'] == 2000
  assert report['device']['platform'] == 'cpu' and report['device']['local_device_count'] == 2
  config = report['config']
  assert config['batch_size'] == 32 and config['crop_size'] == [32, 32]
  assert config['model']['base_width'] == 4 and config['file'].endswith('configs/unet.py')
  assert report['host']['cpu_count'] >= 1

  pipe = report['pipeline']
  # 2000 examples in batches of 32: the first epoch is 63 batches.
  assert pipe['first_epoch']['batches'] == 63
  assert pipe['first_epoch']['seconds'] > 0 and pipe['first_epoch']['images_per_s'] > 0
  assert 0 < pipe['first_epoch']['time_to_first_batch_s'] <= pipe['first_epoch']['seconds']
  assert pipe['steady']['batches'] == 3 and pipe['steady']['images_per_s'] > 0
  step = report['train_step']
  assert step['steps'] == 2 and step['images_per_s'] > 0 and step['ms_per_step'] > 0
  assert 'final_loss' in step and step['compile_s'] > 0 and step['recompiles'] >= 0
  assert len(step['warmup_step_s']) == 1
  assert report['fed']['steps'] == 2 and report['fed']['images_per_s'] > 0 and report['fed']['recompiles'] >= 0
  assert abs(report['ratio_pipeline_over_step'] - pipe['steady']['images_per_s'] / step['images_per_s']) < 1e-9


def test_bench_loop_smoke_writes_the_report(shapes_data_dir, tmp_path):
  """One round of (fixed step, production loop, fixed step) with a tiny model: the overhead is computed from the
  loop's own metrics.jsonl, and its temporary workdir is removed."""
  out = tmp_path / 'loop.json'
  # Without SMOKE_XLA_FLAGS: XLA:CPU's unoptimised code turns this tiny UNet's third update non-finite (seen with
  # jax 0.10.2), which run.py rightly stops on.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DEFAULT_PRNG_IMPL='rbg', TMPDIR=str(tmp_path),
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_loop.py'), f'--json={out}',
         f'--config.dataset.data_dir={shapes_data_dir}', '--config.model.base_width=4', '--config.model.depth=2',
         '--config.input.crop_size=(32,32)', '--config.batch_size=8', '--config.eval_batch_size=40',
         '--config.log_every_steps=2', '--config.checkpoint_every_steps=3', '--config.optimizer.learning_rate=0.01',
         '--rounds=1', '--loop_steps=6',
         '--fixed_steps=2', '--warmup_steps=1']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert 'training-loop overhead (median of 1 rounds)' in proc.stdout

  report = json.loads(out.read_text())
  assert report['schema'] == 'jaxseg-bench-loop/1'
  assert report['device']['local_device_count'] == 2 and report['config']['batch_size'] == 8
  [r] = report['rounds']
  loop = r['loop']
  # Log points at steps 2, 4, 6: the first interval (compilation) is left out, the other two are timed.
  assert loop['steps'] == 6 and loop['timed_steps'] == 4 and len(loop['interval_images_per_s']) == 2
  expected = 4 * 8 / sum(2 * 8 / ips for ips in loop['interval_images_per_s'])
  assert abs(loop['images_per_s'] - expected) < 1e-6 * expected
  assert loop['checkpoints_kept'] == [3, 6]  # A mid-run save and the final one, as in production.
  step_rate = (r['step_before_images_per_s'] + r['step_after_images_per_s']) / 2
  assert abs(r['overhead'] - (1 - loop['images_per_s'] / step_rate)) < 1e-9
  assert report['overhead_median'] == r['overhead']
  assert not [p for p in os.listdir(tmp_path) if p.startswith('jaxseg_bench_loop_')]
