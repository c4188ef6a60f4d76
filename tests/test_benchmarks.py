"""benchmarks/bench_train.py run in --smoke mode (a harness check, never a timing), its figures against hand counts,
and its PyTorch peers (tests/torch_reference.py) against jaxseg's networks."""

import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REQUIRE_TORCH, ROOT, import_torch_or_skip, xla_flags


def conv_flops(n: int, k: int, c_in: int, c_out: int) -> int:
  """2 x multiply-adds of a k x k stride-1 'same' convolution on an n x n map, as XLA's cost analysis counts them:
  only the taps that land inside the map (along an axis, output i sees the input rows max(0, i - k//2) to
  min(n - 1, i + k//2); for k = 3 that is 3n - 2 taps per axis, not 3n)."""
  taps = sum(min(n, i + k // 2 + 1) - max(0, i - k // 2) for i in range(n))
  return 2 * taps * taps * c_in * c_out


def unet_by_hand(size: int, width: int, depth: int, classes: int) -> tuple[int, int]:
  """(parameters, train FLOPs per image counted in convolutions and matrix products) of jaxseg's UNet
  (norm 'batch', upsample 'transpose') on size x size RGB images.

  Each level: two 3x3 convs without bias, each followed by BatchNorm (scale, bias); each up-step a 2x2 stride-2
  up-convolution with bias (a matrix product to 4 x C_out channels: every output pixel once from C_in inputs);
  a 1x1 head with bias. Training computes each product three times (forward, input gradient, kernel gradient)
  except the first convolution's input gradient: the images are not differentiated.
  """
  widths = [width * 2 ** level for level in range(depth + 1)]
  params = flops = 0
  first = conv_flops(size, 3, 3, widths[0])
  for level, (c_in, c_out) in enumerate(zip([3] + widths[:-1], widths)):  # Encoder.
    n = size >> level
    params += 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out
    flops += conv_flops(n, 3, c_in, c_out) + conv_flops(n, 3, c_out, c_out)
  for level in range(depth):  # Decoder: up-convolution from level + 1, then the double conv on [skip, up].
    n, c = size >> level, widths[level]
    params += 4 * 2 * c * c + c + 9 * 2 * c * c + 9 * c * c + 4 * c
    flops += 2 * n * n * 2 * c * c + conv_flops(n, 3, 2 * c, c) + conv_flops(n, 3, c, c)
  params += widths[0] * classes + classes
  flops += conv_flops(size, 1, widths[0], classes)
  return params, 3 * flops - first


def test_hand_counts_agree_with_known_values():
  assert conv_flops(32, 3, 3, 4) == 2 * 94 * 94 * 3 * 4  # 3 x 32 - 2 = 94 taps per axis.
  assert unet_by_hand(32, 4, 2, 3)[0] == 7559  # The previous harness's unet-tiny, counted by both frameworks.
  assert unet_by_hand(32, 64, 4, 2)[0] == 31_037_698  # UNet-64 (NOTES.md: 31,037,698 in both).


def children_max_rss_mib() -> float:
  """The kernel's largest resident set of any finished child process of this one (its descendants included)."""
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def test_smoke_run_writes_the_report(tmp_path):
  """configs/unet.py shrunk (--smoke: base width 4, depth 2, 32x32, batch 2) on 2 CPU devices, against PyTorch eager
  when it is installed: the figures against hand counts, the kernel's accounting and the run's own clock."""
  out = tmp_path / 'smoke.json'
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS='cpu')
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_train.py'), '--smoke', '--configs', 'configs/unet.py',
         '--dtypes', 'float32', '--json', str(out)]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  wall = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert 'jaxseg/this' in proc.stdout and 'unet.py' in proc.stdout

  report = json.loads(out.read_text())
  assert report['schema'] == 'jaxseg-bench-train/2' and report['settings']['smoke'] is True
  assert 'conventions' not in report  # The docstring says what the figures are, not every report.
  [row] = report['rows']
  assert (row['config'], row['dtype'], row['image_size'], row['batch_size']) == ('configs/unet.py', 'float32',
                                                                                   [32, 32], 2)
  assert (row['platform'], row['devices'], row['num_classes']) == ('cpu', 2, 4)  # jaxseg_shapes: 4 classes.
  assert row['model']['base_width'] == 4 and row['model']['depth'] == 2
  params, flops = unet_by_hand(32, 4, 2, 4)
  assert row['param_count'] == params == 7564
  # XLA's count of the compiled step per image: the convolutions and matrix products counted by hand, plus the
  # elementwise work (BatchNorm, ReLU, the loss, AdamW, the moving average: 14% here), which a forward-only or a
  # per-step (2 images) count would miss by far.
  assert flops <= row['train_gflops_per_image'] * 1e9 <= 1.25 * flops

  entries = {'jaxseg': row['jaxseg']}
  have_torch = importlib.util.find_spec('torch') is not None
  assert have_torch or not REQUIRE_TORCH, 'JAXSEG_REQUIRE_TORCH=1 but torch is not installed'
  if have_torch:
    assert report['torch_skipped'] is None and 'torch_compile' not in row  # Not in --smoke unless asked.
    entries['torch_eager'] = row['torch_eager']
    assert row['torch_eager']['threads'] == len(os.sched_getaffinity(0))
  else:
    assert report['torch_skipped'] == 'torch is not installed' and 'PyTorch skipped' in proc.stdout
  for name, entry in entries.items():
    assert entry['status'] == 'ok', (name, entry)
    assert entry['param_count'] == params, name
    [block] = entry['block_s']  # 1 repeat of 2 steps of 2 images, after 1 warm-up step.
    assert len(entry['warmup_step_s']) == 1 and block + entry['warmup_step_s'][0] < wall
    assert entry['images_per_s'] == pytest.approx(2 * 2 / block) and entry['step_ms'] == pytest.approx(1e3 * block / 2)
    assert 0 <= entry['compile_s'] < wall and math.isfinite(entry['final_loss'])
    # Sampled from /proc (bench_memory.rss_bytes): at most the kernel's peak of the largest process run (give or
    # take its per-thread page counters, which it folds in lazily: 0.16 MiB of 1058 seen).
    assert 0 < entry['rss_growth_mib'] < entry['peak_rss_mib'] <= 1.01 * children_max_rss_mib(), name
  assert row['jaxseg']['compile_s'] > 0
  if have_torch:
    assert row['ratio_jaxseg_over_torch_eager'] == pytest.approx(
        row['jaxseg']['images_per_s'] / row['torch_eager']['images_per_s'])  # Per host on CPU.


# ---------------------------------------------------------------------------
# The PyTorch peers: the same networks.
# ---------------------------------------------------------------------------

TINY_FCN = dict(width_multiplier=1 / 16, fc_width=16, fc6_kernel=3)


def jaxseg_net(name: str, num_classes: int, **fields):
  from jaxseg.models.fcn import FCN  # pylint: disable=g-import-not-at-top
  from jaxseg.models.unet import UNet  # pylint: disable=g-import-not-at-top
  return {'unet': UNet, 'fcn': FCN}[name](num_classes=num_classes, **fields)


@pytest.mark.parametrize('name,num_classes,fields,expected', [
    ('unet', 3, dict(base_width=4, depth=2), unet_by_hand(32, 4, 2, 3)[0]),
    ('unet', 2, dict(base_width=64, depth=4), unet_by_hand(32, 64, 4, 2)[0]),
    ('fcn', 3, dict(TINY_FCN, norm='none'), 63_213),
    ('fcn', 21, dict(norm='none'), 134_376_863),  # FCN-8s on VGG16, as the paper.
])
def test_parameter_counts_match_jaxseg(ref, name, num_classes, fields, expected):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  net = jaxseg_net(name, num_classes, **fields)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))
  with torch.device('meta'):
    peer = ref.jaxseg_peer(dict(fields, name=name, norm=fields.get('norm', 'batch'), upsample='transpose'),
                           num_classes)
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == sum(p.numel() for p in peer.parameters()) == expected


@pytest.mark.parametrize('name,fields,size', [
    ('unet', dict(base_width=4, depth=2), (37, 50)),
    ('fcn', dict(TINY_FCN, norm='none'), (70, 45)),
    ('fcn', dict(TINY_FCN, norm='batch'), (40, 33)),  # configs/fcn.py's VGG16-BN.
])
def test_torch_peer_computes_the_same_function(ref, name, fields, size):
  """jaxseg's weights copied into the PyTorch peer give the same logits (eval mode; odd sizes exercise padding)."""
  torch = import_torch_or_skip('torch')
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  net = jaxseg_net(name, 3, **fields)
  x = np.random.default_rng(0).normal(size=(2,) + size + (3,)).astype(np.float32)
  # Random weights everywhere (the zero-initialised skip scores included) and non-trivial BatchNorm
  # statistics, drawn with numpy on the abstract init (no PRNG code to compile).
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.asarray(x)))
  rng = np.random.default_rng(1)
  variables = {'params': jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                                      shapes['params'])}
  if 'batch_stats' in shapes:
    variables['batch_stats'] = jax.tree.map(lambda s: (0.5 + np.abs(rng.normal(size=s.shape))).astype(np.float32),
                                            shapes['batch_stats'])  # Means and variances, both positive here.
  expected = np.asarray(jax.jit(lambda v, a: net.apply(v, a, train=False))(variables, jnp.asarray(x)))
  peer = ref.jaxseg_peer(dict(fields, name=name, norm=fields.get('norm', 'batch'), upsample='transpose'), 3)
  ref.load_jaxseg_variables(peer, variables)
  peer.eval()
  with torch.no_grad():
    got = peer(torch.as_tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert got.shape == expected.shape == (2,) + size + (3,)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())), rtol=1e-4)


def test_benchmarks_are_not_imported():
  """Nothing in jaxseg/, tools/ or tests/ imports a benchmark script: they are programs, run as processes."""
  scripts = [f[:-3] for f in os.listdir(os.path.join(ROOT, 'benchmarks')) if f.endswith('.py')]
  for folder in ('jaxseg', 'tools', 'tests'):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for f in (f for f in files if f.endswith('.py')):
        with open(os.path.join(dirpath, f), encoding='utf-8') as source:
          lines = [l.strip() for l in source]
        imports = [l for l in lines if l.startswith(('import ', 'from ')) and any(s in l.split() for s in scripts)]
        assert not imports, (os.path.join(dirpath, f), imports)
