"""Per-convolution timings: XLA's 3x3 convolutions against PyTorch's (oneDNN), forward and both gradients.

  python benchmarks/bench_conv.py                       # the default UNet's convolutions, 8 images, 1 thread
  taskset -c 0 python benchmarks/bench_conv.py          # pinned to one core, as each of run.py's CPU devices runs
  python benchmarks/bench_conv.py --batch 4 --json /tmp/conv.json

Splits the train step's convolution cost into its three parts for every 3x3 'SAME' convolution shape of
configs/unet.py's network (base width 16, depth 3, 64x64 crops; `--batch` images, 8 = one device's share of the
global batch of 16 on a 2-core host): forward, input gradient and kernel gradient, each jitted on its own
(`jax.vjp` of `lax.conv_general_dilated`, NHWC/HWIO, as flax's nn.Conv lowers it) against
`aten.convolution` / `aten.convolution_backward` on channels_last tensors with one intra-op thread. Best of
`--repeats` blocks of 10 calls, in ms. The two frameworks agree on the result (checked before timing).

This is where the train step's convolution time goes per core, not a throughput figure (bench_train.py is).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

# (height = width, input channels, output channels, how many of the network's convolutions have that shape) of
# the default UNet's 3x3 convolutions, encoder and decoder; the first layer's input gradient is not needed in
# training (its input is the image) and is left out of the totals.
SHAPES = [(64, 3, 16, 1), (64, 16, 16, 2), (64, 32, 16, 1), (32, 16, 32, 1), (32, 32, 32, 2), (32, 64, 32, 1),
          (16, 32, 64, 1), (16, 64, 64, 2), (16, 128, 64, 1), (8, 64, 128, 1), (8, 128, 128, 1)]
PARTS = ('forward', 'input_grad', 'kernel_grad')


def _best_ms(fn, repeats: int, sync=lambda r: r) -> float:
  sync(fn())
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(10):
      r = fn()
    sync(r)
    best = min(best, (time.perf_counter() - t0) / 10)
  return 1000 * best


def jax_parts(x, w, dy, repeats: int) -> tuple[dict, dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  fns = {'forward': jax.jit(conv),
         'input_grad': jax.jit(lambda w, dy, x=x: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
         'kernel_grad': jax.jit(lambda x, dy, w=w: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])}
  args = {'forward': (x, w), 'input_grad': (w, dy), 'kernel_grad': (x, dy)}
  out = {k: np.asarray(fns[k](*args[k])) for k in PARTS}
  ms = {k: _best_ms(lambda k=k: fns[k](*args[k]), repeats, jax.block_until_ready) for k in PARTS}
  return ms, out


def torch_parts(x, w, dy, repeats: int) -> tuple[dict, dict]:
  import torch  # pylint: disable=g-import-not-at-top
  cl = torch.channels_last
  tx = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous(memory_format=cl)
  tw = torch.as_tensor(w).permute(3, 2, 0, 1).contiguous(memory_format=cl)
  tdy = torch.as_tensor(dy).permute(0, 3, 1, 2).contiguous(memory_format=cl)
  conv_args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
  fns = {'forward': lambda: torch.ops.aten.convolution(tx, tw, None, *conv_args),
         'input_grad': lambda: torch.ops.aten.convolution_backward(tdy, tx, tw, None, *conv_args,
                                                                   [True, False, False])[0],
         'kernel_grad': lambda: torch.ops.aten.convolution_backward(tdy, tx, tw, None, *conv_args,
                                                                    [False, True, False])[1]}
  with torch.no_grad():
    out = {'forward': fns['forward']().permute(0, 2, 3, 1).numpy(),
           'input_grad': fns['input_grad']().permute(0, 2, 3, 1).numpy(),
           'kernel_grad': fns['kernel_grad']().permute(2, 3, 1, 0).numpy()}
    ms = {k: _best_ms(fns[k], repeats) for k in PARTS}
  return ms, out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=8, help='images per call (default 8: one device of run.py on '
                      '2 cores)')
  parser.add_argument('--repeats', type=int, default=7, help='timed blocks of 10 calls; the best is reported')
  parser.add_argument('--json', default=None, help='write the report here')
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import bench_train  # pylint: disable=g-import-not-at-top  # cpu_count (this folder: sys.path[0])
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("bench_conv: PyTorch is not installed: pip install -e '.[bench]'")
  torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  rows = []
  print(f'{"conv (HxW, in->out)":22s} ' + ' '.join(f'{p + " jax/torch ms":>24s}' for p in PARTS), flush=True)
  for size, cin, cout, count in SHAPES:
    x = rng.standard_normal((args.batch, size, size, cin), np.float32)
    w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    dy = rng.standard_normal((args.batch, size, size, cout), np.float32)
    jax_ms, jax_out = jax_parts(x, w, dy, args.repeats)
    torch_ms, torch_out = torch_parts(x, w, dy, args.repeats)
    for part in PARTS:
      scale = float(np.abs(torch_out[part]).max())
      np.testing.assert_allclose(jax_out[part], torch_out[part], atol=1e-4 * scale, rtol=1e-3,
                                 err_msg=f'{part} of {size}x{size} {cin}->{cout}')
    rows.append({'size': size, 'in': cin, 'out': cout, 'count': count, 'jax_ms': jax_ms, 'torch_ms': torch_ms})
    print(f'{size:3d}x{size:<3d} {cin:4d}->{cout:<4d} x{count}    ' +
          ' '.join(f'{jax_ms[p]:10.2f} /{torch_ms[p]:6.2f} ({jax_ms[p] / torch_ms[p]:4.2f}x)' for p in PARTS),
          flush=True)
  # The whole network's convolutions: each shape times its count.
  totals = {fw: {p: sum(r['count'] * r[f'{fw}_ms'][p] for i, r in enumerate(rows)
                        if not (i == 0 and p == 'input_grad'))
                 for p in PARTS} for fw in ('jax', 'torch')}
  for fw in totals:
    totals[fw]['all'] = sum(totals[fw][p] for p in PARTS)
  print('network (training)      ' + ' '.join(
      f'{totals["jax"][p]:10.2f} /{totals["torch"][p]:6.2f} ({totals["jax"][p] / totals["torch"][p]:4.2f}x)'
      for p in PARTS) + f'   all: {totals["jax"]["all"]:.1f} / {totals["torch"]["all"]:.1f} ms '
      f'({totals["jax"]["all"] / totals["torch"]["all"]:.2f}x)', flush=True)
  report = {'schema': 'jaxseg-bench-conv/1', 'batch': args.batch, 'repeats': args.repeats, 'rows': rows,
            'totals_ms': totals,
            'host': {'affinity_cpus': bench_train.cpu_count(),
                     'machine': platform.machine(), 'jax_version': jax.__version__,
                     'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads()}}
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    print(f'Wrote {args.json}', flush=True)
  return report


if __name__ == '__main__':
  main()
