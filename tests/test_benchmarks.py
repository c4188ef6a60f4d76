"""benchmarks/bench_train.py in --smoke mode (a harness check, never a timing) and the PyTorch peers' equivalence."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, 'benchmarks')
if BENCH_DIR not in sys.path:
  sys.path.insert(0, BENCH_DIR)

import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.helpers import REQUIRE_TORCH, import_torch_or_skip  # pylint: disable=g-import-not-at-top,wrong-import-position

ENTRY_FIELDS = ('images_per_s', 'images_per_s_per_device', 'step_ms', 'compile_s', 'peak_memory_bytes',
                'memory_method', 'param_count', 'devices_used', 'achieved_tflops')
def unet_tiny_forward_flops_by_hand(size=32):
  """2 x multiply-adds of unet-tiny's convolutions at SIZE x SIZE (3 -> 3 classes, base width 4, depth 2).

  Levels at SIZE, SIZE/2, SIZE/4; each level is two 3x3 convs; each 2x2 stride-2 up-convolution writes
  every output pixel once from its C_in input channels (no zeros of a dilated input); the head is 1x1.
  """
  conv = lambda hw, k, cin, cout: 2 * hw * hw * k * k * cin * cout
  s0, s1, s2 = size, size // 2, size // 4
  encoder = conv(s0, 3, 3, 4) + conv(s0, 3, 4, 4) + conv(s1, 3, 4, 8) + conv(s1, 3, 8, 8) \
      + conv(s2, 3, 8, 16) + conv(s2, 3, 16, 16)
  decoder = conv(s1, 2, 16, 8) // 4 + conv(s1, 3, 16, 8) + conv(s1, 3, 8, 8) \
      + conv(s0, 2, 8, 4) // 4 + conv(s0, 3, 8, 4) + conv(s0, 3, 4, 4)
  head = conv(s0, 1, 4, 3)
  return encoder + decoder + head


def test_smoke_run_writes_the_report(tmp_path):
  """One tiny UNet row on 2 simulated CPU devices: the table is printed and the JSON has every field."""
  out = tmp_path / 'smoke.json'
  # A cache of its own, empty: the step's compilations are counted cold (a cache hit compiles nothing).
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'))
  cmd = [sys.executable, os.path.join(BENCH_DIR, 'bench_train.py'), '--smoke', '--models', 'unet-tiny',
         '--dtypes', 'float32', '--json', str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert 'jaxseg/this' in proc.stdout and 'unet-tiny' in proc.stdout

  report = json.loads(out.read_text())
  assert report['schema'] == bench_train.SCHEMA
  for key in ('jax_version', 'flax_version', 'device', 'settings', 'conventions', 'models', 'rows', 'host'):
    assert key in report, key
  assert report['device']['platform'] == 'cpu' and report['device']['local_device_count'] == 2
  assert report['settings']['smoke'] is True
  assert set(report['conventions']) >= {'throughput', 'compile', 'flops', 'mfu', 'memory', 'ratio'}
  [row] = report['rows']
  assert (row['model'], row['dtype'], row['image_size'], row['batch_size']) == ('unet-tiny', 'float32', 32, 2)
  flops = unet_tiny_forward_flops_by_hand(32)
  assert flops == 3_325_952
  assert row['forward_gflops_per_image'] == pytest.approx(flops / 1e9, rel=1e-12)
  assert row['train_gflops_per_image'] == pytest.approx(3 * flops / 1e9, rel=1e-12)  # The convention: 3 x forward.
  jax_entry = row['jaxseg']
  assert jax_entry['status'] == 'ok', jax_entry
  for field in ENTRY_FIELDS:
    assert field in jax_entry, field
  assert jax_entry['images_per_s'] > 0 and jax_entry['devices_used'] == 2
  assert jax_entry['param_count'] == row['param_count']['jaxseg'] == 7559
  assert jax_entry['train_step_xla_compiles'] == 1  # Compiled at its first call, never again.
  assert jax_entry['peak_memory_bytes'] > jax_entry['state_bytes_per_device'] > 0
  assert np.isfinite(jax_entry['final_loss'])
  assert 'mfu' not in jax_entry  # No MFU on CPU.

  assert bench_train.torch_available() or not REQUIRE_TORCH, 'JAXSEG_REQUIRE_TORCH=1 but torch is not installed'
  if bench_train.torch_available():
    assert report['torch_version'] and report['torch_skipped'] is None
    assert row['param_count'] == {'jaxseg': 7559, 'torch': 7559, 'equal': True}
    torch_entry = row['torch_eager']
    assert torch_entry['status'] == 'ok', torch_entry
    for field in ENTRY_FIELDS:
      assert field in torch_entry, field
    assert torch_entry['param_count'] == 7559 and torch_entry['settings']['channels_last']
    assert row['ratio_jaxseg_over_torch_eager'] == pytest.approx(
        jax_entry['images_per_s_per_device'] / torch_entry['images_per_s_per_device'])
    assert 'torch_compile' not in row  # Not in --smoke unless asked.
  else:
    assert report['torch_skipped'] == 'torch is not installed'
    assert 'PyTorch skipped' in proc.stdout


def test_table_shows_unavailable_variants():
  row = {'model': 'unet64', 'dtype': 'bfloat16', 'image_size': 128, 'batch_size': 4,
         'jaxseg': {'status': 'ok', 'images_per_s': 2.0, 'step_ms': 2000.0, 'compile_s': 30.0,
                    'peak_memory_bytes': 2**30, 'devices_used': 1},
         'torch_eager': {'status': 'ok', 'images_per_s': 4.0, 'step_ms': 1000.0, 'compile_s': 0.1,
                         'peak_memory_bytes': 2**29, 'devices_used': 1},
         'torch_compile': {'status': 'n/a', 'reason': 'torch.compile failed: BackendCompilerFailed: no compiler'},
         'ratio_jaxseg_over_torch_eager': 0.5}
  table = bench_train.format_table({'rows': [row]})
  assert '0.50x' in table and 'n/a: torch.compile failed' in table and '1024' in table


@pytest.mark.parametrize('model,expected', [('unet-tiny', 7559), ('fcn8s-tiny', 63213), ('unet64', 31_037_698)])
def test_parameter_counts_match_jaxseg(model, expected):
  torch_models = import_torch_or_skip('torch_models')  # Needs torch.
  kind, num_classes, kw = bench_train.model_kwargs(model)
  jax_count = bench_train.jaxseg_param_count(model)
  assert jax_count == torch_models.meta_param_count(kind, num_classes, **kw) == expected


def test_fcn8s_full_parameter_counts_match():
  torch_models = import_torch_or_skip('torch_models')
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg.models.fcn import FCN  # pylint: disable=g-import-not-at-top
  variables = jax.eval_shape(lambda: FCN(num_classes=21).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  jax_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  assert jax_count == torch_models.meta_param_count('fcn', 21) == 134_376_863


@pytest.mark.parametrize('model,size', [('unet-tiny', (37, 50)), ('fcn8s-tiny', (70, 45))])
def test_torch_peer_computes_the_same_function(model, size):
  """jaxseg's weights copied into the PyTorch peer give the same logits (eval mode; odd sizes exercise padding)."""
  torch = import_torch_or_skip('torch')
  import torch_models  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg import models  # pylint: disable=g-import-not-at-top
  kind, num_classes, kw = bench_train.model_kwargs(model)
  net = models.create_model(bench_train.jaxseg_config(model, 'float32', 32, 2).model, num_classes=num_classes)
  x = np.random.default_rng(0).normal(size=(2,) + size + (3,)).astype(np.float32)
  # Random weights everywhere (the zero-initialised skip scores included) and non-trivial BatchNorm
  # statistics, drawn with numpy on the abstract init (no PRNG code to compile).
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.asarray(x)))
  rng = np.random.default_rng(1)
  variables = {'params': jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                                      shapes['params'])}
  if 'batch_stats' in shapes:
    variables['batch_stats'] = {
        block: {norm: {'mean': (0.1 * rng.normal(size=s['mean'].shape)).astype(np.float32),
                       'var': (0.5 + np.abs(rng.normal(size=s['var'].shape))).astype(np.float32)}
                for norm, s in norms.items()}
        for block, norms in shapes['batch_stats'].items()}
  expected = np.asarray(jax.jit(lambda v, a: net.apply(v, a, train=False))(variables, jnp.asarray(x)))
  peer = torch_models.build_model(kind, num_classes, **kw)
  torch_models.load_jaxseg_variables(peer, variables)
  peer.eval()
  with torch.no_grad():
    got = peer(torch.as_tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert got.shape == expected.shape == (2,) + size + (num_classes,)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())), rtol=1e-4)
