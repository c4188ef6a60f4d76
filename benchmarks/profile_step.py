"""Where does jaxseg's train step spend its time? A per-op breakdown of the production step.

  python benchmarks/profile_step.py --model fcn8s --dtype float32 --image-size 128 --batch-size 2

Builds the step exactly as bench_train.py does (train.make_train_step on a
replicated state, a device-resident batch), warms it up, traces `--steps`
steps with jax.profiler, and prints the XLA ops that took the most time
(summed over the executor threads) with their HLO text, plus:

* how many times the step compiled in the warm-up (more than 1: a recompilation),
* the bytes the step's entry computation copies (e.g. the whole state copied
  because donated buffers are still read after being overwritten).

The trace is left in --trace-dir for TensorBoard/XProf.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_train as bt  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_trace(trace_dir: str):
  """Per-op and per-category seconds on XLA:CPU executor threads (or device lines) from the newest .xplane.pb."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
  space = xplane_pb2.XSpace()
  with open(files[-1], 'rb') as f:
    space.ParseFromString(f.read())
  ops, categories, counts = collections.Counter(), collections.Counter(), collections.Counter()
  for plane in space.planes:
    on_device = plane.name.startswith('/device:')
    for line in plane.lines:
      if not (on_device or 'XLAEigen' in line.name or 'XLA' in line.name and 'PjRt' not in line.name):
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if name.startswith(('ThunkExecutor', 'SlinkyThreadPool')):
          continue
        seconds = event.duration_ps / 1e12
        ops[name] += seconds
        counts[name] += 1
        categories[re.sub(r'\.\d+$', '', name)] += seconds
  return ops, categories, counts, files[-1]


def op_kinds(ops: dict, hlo_text: str) -> collections.Counter:
  """Op seconds summed by what the op computes: convolutions (YNNPACK fusions / Eigen), transposes, matmuls, other.

  A fusion counts as a convolution (or matrix product) when its fused computation contains one: XLA:CPU's
  YNNPACK fusions carry a convolution together with the elementwise ops fused around it.
  """
  bodies = {m.group(1): m.group(2) for m in re.finditer(r'^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo_text, re.M | re.S)}
  lines = {m.group(1): m.group(2) for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*)$', hlo_text, re.M)}
  kinds = collections.Counter()
  for name, seconds in ops.items():
    text = lines.get(name, '')
    called = re.search(r'calls=%?([\w.\-]+)', text)
    body = bodies.get(called.group(1), '') if called else ''
    op = re.match(r'\S+ (\w[\w\-]*)\(', text)
    op = op.group(1) if op else ''
    if op == 'convolution':
      kind = 'convolution, Eigen (not YNNPACK)'
    elif 'convolution(' in body:
      kind = 'convolution, YNNPACK fusion' if name.startswith('ynn_fusion') else 'convolution, other fusion'
    elif op == 'dot' or ' dot(' in body:
      kind = 'matrix product'
    elif op in ('transpose', 'copy') or ' transpose(' in body or name.startswith(('transpose', 'copy')):
      kind = 'transpose / copy'
    else:
      kind = 'other (normalisation, activations, loss, optimiser, ...)'
    kinds[kind] += seconds
  return kinds


def entry_copy_bytes(hlo_text: str) -> int:
  """Bytes written by plain `copy` instructions of the entry computation."""
  entry = hlo_text[hlo_text.index('ENTRY'):] if 'ENTRY' in hlo_text else hlo_text
  sizes = {'f32': 4, 'bf16': 2, 's32': 4, 'u32': 4, 'f16': 2, 'u8': 1, 's8': 1, 'pred': 1}
  total = 0
  for m in re.finditer(r'%copy(?:\.\d+)? = (\w+)\[([\d,]*)\]', entry):
    n = 1
    for d in m.group(2).split(','):
      if d:
        n *= int(d)
    total += n * sizes.get(m.group(1), 4)
  return total


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='unet32', choices=sorted(bt.MODELS))
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--image-size', type=int, default=128)
  p.add_argument('--batch-size', type=int, default=4)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--steps', type=int, default=1)
  p.add_argument('--top', type=int, default=15)
  p.add_argument('--trace-dir', default='/tmp/jaxseg_profile')
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg import optim  # pylint: disable=g-import-not-at-top

  model, size, batch = args.model, args.image_size, args.batch_size
  n_dev = jax.local_device_count()
  api = bt._Api()  # pylint: disable=protected-access
  _, num_classes, _ = bt.model_kwargs(model)
  config = bt.jaxseg_config(model, args.dtype, size, batch)
  net = api.build_model(config, num_classes)
  lr_fn = optim.create_learning_rate_schedule(config.optimizer, config.num_train_steps)
  tx = optim.create_optimizer(config.optimizer, lr_fn)
  events = bt.CompileEvents()
  state = state_lib.replicate(api.create_train_state(net, tx, jax.random.key(0), (size, size, 3)))
  p_train = api.make_train_step(config, bt.stub_spec(num_classes), lr_fn)
  images, labels = bt.make_batch(batch, size, num_classes)
  per = batch // n_dev
  device_batch = jax.pmap(lambda b: b)({'image': images.reshape(n_dev, per, size, size, 3),
                                        'label': labels.reshape(n_dev, per, size, size)})
  rng = state_lib.replicate(jax.random.key(1))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, device_batch, rng))
  events.take()
  compiles = []
  for _ in range(max(1, args.warmup)):
    state, metrics = p_train(state, device_batch, rng)
    jax.block_until_ready((state, metrics))
    compiles.append(events.take()['xla_compiles'])
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = p_train(state, device_batch, rng)
  jax.block_until_ready((state, metrics))
  steady = (time.perf_counter() - t0) / args.steps

  jax.profiler.start_trace(args.trace_dir)
  for _ in range(args.steps):
    state, metrics = p_train(state, device_batch, rng)
  jax.block_until_ready((state, metrics))
  jax.profiler.stop_trace()

  hlo = p_train.lower(*abstract).compile().as_text()
  ops, categories, counts, path = parse_trace(args.trace_dir)
  total = sum(categories.values()) or 1.0
  print(f'{model} {args.dtype} {size}x{size} batch {batch} on {n_dev} x {jax.devices()[0].device_kind}: '
        f'steady step {steady:.3f} s; XLA compiles per warm-up step {compiles}; '
        f'entry-computation copies {bt_mib(entry_copy_bytes(hlo))} MiB/step; '
        f'state {bt_mib(bt.tree_bytes(jax_utils.unreplicate(state)))} MiB')
  print(f'\nop time summed over executor threads: {total:.3f} s for {args.steps} step(s)  ({path})')
  print('\nby category:')
  for name, seconds in categories.most_common(args.top):
    print(f'  {seconds:8.3f} s {100 * seconds / total:5.1f}%  {name}')
  print('\nby kind (ms per step):')
  for kind, seconds in op_kinds(ops, hlo).most_common():
    print(f'  {1000 * seconds / args.steps:8.1f} ms {100 * seconds / total:5.1f}%  {kind}')
  print('\ntop ops:')
  lines = {m.group(1): m.group(0) for m in re.finditer(r'^\s*%([\w.\-]+) = .*$', hlo, re.M)}
  for name, seconds in ops.most_common(args.top):
    text = lines.get(name, '').strip()
    meta = re.search(r'op_name="([^"]+)"', text)
    shape = re.match(r'%[\w.\-]+ = (\S+)', text)
    print(f'  {seconds:8.3f} s {100 * seconds / total:5.1f}%  x{counts[name]:<3d} {name:32s} '
          f'{shape.group(1) if shape else "":28s} {meta.group(1) if meta else ""}')


def bt_mib(n: int) -> str:
  return f'{n / 2**20:.0f}'


if __name__ == '__main__':
  main()
