"""benchmarks/bench_input.py in a tiny smoke setting: it runs and writes every field (a harness check, not a timing)."""

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
