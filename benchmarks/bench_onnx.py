"""Inference speed of the ONNX export under onnxruntime (CPU) against jaxseg's Predictor, same model, same images.

  python benchmarks/bench_onnx.py [--configs=configs/unet.py,configs/segformer_b0_ade20k.py]
                                  [--image-size=H,W] [--batch-size=8] [--repeats=5] [--json=FILE] [--smoke]

For each config: its model with freshly initialised weights (speed does not depend on the values) at the config's
evaluation size (or --image-size), exported to ONNX as --mode=export does (jaxseg/onnx_export.py, checked against
jax), then, one after the other in this process:
  * throughput: --batch-size images per call, img/s over --repeats timed calls after two warm-up calls;
  * latency: one image per call, the median milliseconds of --repeats * 4 calls.
"jaxseg" is Predictor.iter_scores (whole-image mode, one device; its program compiled in the warm-up), "onnxruntime"
an InferenceSession on CPUExecutionProvider with its default threads and graph optimisations. Both return float32
logits at the image size, on the host. The last line is `ONNX {json}`; NOTES.md has results.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def timed(call, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times


def bench(config_path: str, size, batch: int, repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  from jaxseg import export, inference, models, onnx_export  # pylint: disable=g-import-not-at-top
  from jaxseg import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.settings import InferenceOptions  # pylint: disable=g-import-not-at-top

  config = load_config(config_path)
  settings = settings_lib.from_config(config)
  eval_size = settings.input.eval_size
  h, w = size or ((96, 96) if eval_size == settings_lib.AUTO else tuple(eval_size))
  k = config.dataset.num_classes if config.dataset.get('num_classes') else 4
  model = models.create_model(settings.model.name, settings.model.kwargs, num_classes=k)
  stats = (settings.model.input_mean, settings.model.input_std)
  images = np.random.default_rng(0).integers(0, 256, (batch, h, w, len(stats[0])), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(0), models.normalize_images(jnp.asarray(images[:1]), jnp.float32, *stats),
                         train=False)
  fn = export.serving_function(model, variables, jnp.float32, stats)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as directory:
    meta = onnx_export.write(fn, directory, channels=len(stats[0]), num_classes=k,
                             multiples=export.size_multiples(model), fixed_size=(h, w), name=settings.model.name)
    convert_s = time.perf_counter() - start
    session = onnxruntime.InferenceSession(os.path.join(directory, onnx_export.ONNX_FILE),
                                           providers=['CPUExecutionProvider'])
  rule = meta['input']
  if rule['size_multiple'] and (h % rule['size_multiple'] or w % rule['size_multiple']):
    raise SystemExit(f'{config_path}: {h}x{w} is not a multiple of {rule["size_multiple"]}: pass --image-size')
  options = InferenceOptions(mode='whole', size_multiple=1, batch_size=batch, whole_max_size=(h, w))
  predictor = inference.Predictor.create(model, variables, k, options, input_stats=stats,
                                         devices=jax.local_devices()[:1])

  def jax_batch(n):
    return lambda: list(predictor.iter_scores(list(images[:n])))

  def onnx_batch(n):
    return lambda: session.run(['logits'], {'images': images[:n]})

  row = {'config': config_path, 'model': settings.model.name, 'size': [h, w], 'batch': batch, 'classes': k,
         'onnx_size_rule': {k2: rule[k2] for k2 in ('size_multiple', 'fixed_size')},
         'checked_relative_error': meta['checked_relative_error'], 'convert_s': round(convert_s, 1)}
  for name, make in (('jaxseg', jax_batch), ('onnxruntime', onnx_batch)):
    timed(make(batch), 2)
    throughput = timed(make(batch), repeats)
    timed(make(1), 2)
    latency = timed(make(1), repeats * 4)
    row[name] = {'img_per_s': round(batch / statistics.median(throughput), 2),
                 'latency_ms_batch1': round(1000 * statistics.median(latency), 2)}
  row['onnx_vs_jaxseg_throughput'] = round(row['onnxruntime']['img_per_s'] / row['jaxseg']['img_per_s'], 2)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument('--configs', default='configs/unet.py,configs/segformer_b0_ade20k.py')
  p.add_argument('--image-size', help='H,W (default: the config\'s evaluation size; 96x96 for auto)')
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--json', help='write the report here')
  p.add_argument('--smoke', action='store_true', help='2 images, 1 repeat: checks the harness; not a timing')
  args = p.parse_args()
  size = tuple(int(v) for v in args.image_size.split(',')) if args.image_size else None
  batch, repeats = (2, 1) if args.smoke else (args.batch_size, args.repeats)
  rows = []
  for path in args.configs.split(','):
    row = bench(path, size, batch, repeats)
    print(f"{row['model']:>10} {row['size'][0]}x{row['size'][1]} batch {batch}: "
          f"jaxseg {row['jaxseg']['img_per_s']:.2f} img/s, {row['jaxseg']['latency_ms_batch1']:.1f} ms/img | "
          f"onnxruntime {row['onnxruntime']['img_per_s']:.2f} img/s, "
          f"{row['onnxruntime']['latency_ms_batch1']:.1f} ms/img ({row['onnx_vs_jaxseg_throughput']:.2f}x)",
          flush=True)
    rows.append(row)
  import jax  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  report = {'rows': rows, 'jax': jax.__version__, 'onnxruntime': onnxruntime.__version__,
            'devices': str(jax.devices()), 'cpus': os.cpu_count()}
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
  print('ONNX ' + json.dumps(report), flush=True)


if __name__ == '__main__':
  main()
