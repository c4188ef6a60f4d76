"""Learning benchmark: validation mean IoU against wall time for a recipe on a dataset, as a curve.

  python benchmarks/bench_learning.py --config=configs/unet.py --budget_s=1800 --label=unet-digits \\
      --json=benchmarks/results/learning_unet_digits.json --png=benchmarks/results/learning_unet_digits.png -- \\
      --config.dataset.name=folder --config.dataset.path=DIR --config.dataset.num_classes=11 \\
      --config.eval_every_steps=200                      # DIR: tools/make_digit_folder.py DIR
  python benchmarks/bench_learning.py --config=configs/unet.py --budget_s=600 --override=eval_every_steps=200 \\
      --override=dataset.name=folder --override=dataset.path=DIR --override=dataset.num_classes=4  # photo folder
  python benchmarks/bench_learning.py --compare before.json after.json --png=compare.png   # plot saved curves

A change to a recipe is judged by its curve, not by one number: where it starts, how fast it climbs, where it
ends within the same wall-time budget. The benchmark launches `python run.py --config=CONFIG --workdir=WORKDIR
[overrides]` in a fresh workdir (under --workdir, or a temporary one that is removed afterwards) and lets it run
until it finishes or --budget_s seconds have passed since its launch; then it sends SIGTERM, on which jaxseg
saves a checkpoint at the current step and exits cleanly (jaxseg/train.py, PreemptionWatcher; a SIGTERM that
arrives before the train loop has started ends the process at once). run.py's own output passes through.

The curve is the evaluation records of WORKDIR/metrics.jsonl, one point per evaluation, at the wall time its
record was written, measured from the launch of run.py: a cold start, so imports, dataset preparation (the
first run on a folder prepares it under the tfds data dir; later runs reuse it), compilation (XLA's persistent
cache, config.compilation_cache_dir, can save it on later runs; --override=compilation_cache_dir= disables it)
and the evaluations themselves all count. run.py evaluates every config.eval_every_steps steps and at the last
step, so that setting is the curve's resolution: choose it for 10-20 points within the budget (e.g.
num_train_steps / 10; 200 for configs/unet.py on a digit or photo folder on 2 CPU cores). Each evaluation
costs wall time the training does not get, the same for every recipe evaluated at the same interval.

The JSON written by --json (schema 'jaxseg-bench-learning/1'):

  schema       'jaxseg-bench-learning/1'
  label        the curve's name (--label; default: the config file's name)
  command      argv of run.py (the workdir included)
  config       the resolved config run.py saved (WORKDIR/config.json)
  class_names  the classes of per_class_iou
  host         cpu_count, platform, machine, python, jax and jaxlib versions, load average at the launch
  budget_s     the wall-time budget
  finished     true: the schedule ended (num_train_steps) before the budget; false: stopped by SIGTERM
  returncode   run.py's exit status (0 also after a SIGTERM in the train loop)
  wall_s       seconds from the launch to the end of run.py
  points       [{wall_s, step, mean_iou, per_class_iou, pixel_accuracy, mean_class_accuracy, loss, train_loss}],
               one per evaluation, in order (per_class_iou: null for a class absent from the split and never
               predicted; loss: the validation cross-entropy; train_loss: the training loss last logged at or
               before that step, class-weighted when training is): a training loss that keeps falling while the
               validation loss rises is a curve limited by overfitting, not by the budget
  final        the last point (null if no evaluation happened)
  classes_above  {'0.3': classes with IoU > 0.3 at the final point, '0.5': ... > 0.5}
  min_class_iou  the smallest IoU of a class at the final point
"""

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SCHEMA = 'jaxseg-bench-learning/1'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINT_KEYS = ('mean_iou', 'per_class_iou', 'pixel_accuracy', 'mean_class_accuracy', 'loss')
THRESHOLDS = ('0.3', '0.5')


def read_records(workdir: str) -> list[dict]:
  """WORKDIR/metrics.jsonl's records (a line still being written is skipped)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return records


def curve_points(records: list[dict], t_launch: float) -> list[dict]:
  """The eval records as curve points, wall time from the launch of run.py, with the training loss last logged."""
  points, train_loss = [], None
  for r in records:
    if r.get('split') == 'train':
      train_loss = r.get('loss')
    elif r.get('split') == 'eval':
      points.append({'wall_s': round(r['time'] - t_launch, 3), 'step': r['step'],
                     **{k: r[k] for k in POINT_KEYS if k in r}, 'train_loss': train_loss})
  return points


def summarise(points: list[dict]) -> dict:
  """final, classes_above and min_class_iou of a curve."""
  final = points[-1] if points else None
  ious = [v for v in (final or {}).get('per_class_iou', []) if v is not None]
  return {'final': final, 'classes_above': {t: sum(v > float(t) for v in ious) for t in THRESHOLDS},
          'min_class_iou': min(ious) if ious else None}


def host_info() -> dict:
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None
  return {'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'machine': platform.machine(),
          'python': platform.python_version(), 'jax': version('jax'), 'jaxlib': version('jaxlib'),
          'loadavg': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None}


def run_curve(config: str, run_args: list[str], budget_s: float, workdir: str, grace_s: float = 300) -> dict:
  """Runs run.py in `workdir` (fresh) until it ends or the budget is spent; returns the result (see the docstring)."""
  if os.path.exists(workdir) and os.listdir(workdir):
    sys.exit(f'{workdir} is not empty: the benchmark needs a fresh workdir (a resumed run is no cold start)')
  command = [sys.executable, os.path.join(ROOT, 'run.py'), f'--config={config}', f'--workdir={workdir}', *run_args]
  host = host_info()
  t_launch = time.time()
  proc = subprocess.Popen(command, cwd=ROOT)  # pylint: disable=consider-using-with
  stopped = False
  shown = 0
  while proc.poll() is None:
    now = time.time()
    if not stopped and now - t_launch >= budget_s:
      print(f'[bench_learning] budget of {budget_s:.0f}s spent: SIGTERM', flush=True)
      proc.send_signal(signal.SIGTERM)
      stopped = True
    elif stopped and now - t_launch >= budget_s + grace_s:
      print(f'[bench_learning] no exit {grace_s:.0f}s after SIGTERM: SIGKILL', flush=True)
      proc.kill()
      proc.wait()
      break
    points = curve_points(read_records(workdir), t_launch)
    for p in points[shown:]:
      print(f'[bench_learning] {p["wall_s"] / 60:6.2f} min  step {p["step"]}  mean IoU {p["mean_iou"]:.4f}',
            flush=True)
    shown = len(points)
    time.sleep(0.5)
  wall_s = time.time() - t_launch
  if proc.returncode != 0 and not stopped:
    sys.exit(f'run.py failed with exit status {proc.returncode}: {" ".join(command)}')
  records = read_records(workdir)
  points = curve_points(records, t_launch)
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    resolved = json.load(f)
  evals = [r for r in records if r.get('split') == 'eval']
  return {'schema': SCHEMA, 'label': None, 'command': command, 'config': resolved,
          'class_names': evals[-1].get('class_names') if evals else None, 'host': host, 'budget_s': budget_s,
          'finished': not stopped, 'returncode': proc.returncode, 'wall_s': round(wall_s, 3), 'points': points,
          **summarise(points)}


def format_table(result: dict) -> str:
  lines = [f'{result["label"]}: {"finished" if result["finished"] else "stopped at the budget"} after '
           f'{result["wall_s"] / 60:.2f} min (budget {result["budget_s"] / 60:.2f} min), evaluated every '
           f'{result["config"].get("eval_every_steps")} of {result["config"].get("num_train_steps")} steps',
           f'  {"min":>7} {"step":>7} {"mean IoU":>9} {"pix acc":>8} {"min cls":>8} {"val loss":>9} {"train loss":>10}']
  nan = float('nan')
  for p in result['points']:
    ious = [v for v in p.get('per_class_iou', []) if v is not None]
    losses = [nan if p.get(k) is None else p[k] for k in ('loss', 'train_loss')]  # Curves saved before they were.
    lines.append(f'  {p["wall_s"] / 60:7.2f} {p["step"]:7d} {p["mean_iou"]:9.4f} {p.get("pixel_accuracy", 0):8.4f} '
                 f'{min(ious) if ious else nan:8.4f} {losses[0]:9.4f} {losses[1]:10.4f}')
  if result['final'] is not None:
    above = ', '.join(f'{n} above {t}' for t, n in result['classes_above'].items())
    lines.append(f'  final: mean IoU {result["final"]["mean_iou"]:.4f}; classes: {above}; '
                 f'min class IoU {result["min_class_iou"]:.4f}')
  else:
    lines.append('  no evaluation within the budget: lower config.eval_every_steps or raise --budget_s')
  return '\n'.join(lines)


def plot(results: list[dict], path: str) -> None:
  """Mean IoU against minutes, one line per curve; an open marker where a run was stopped by the budget."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    xs = [p['wall_s'] / 60 for p in r['points']]
    ys = [p['mean_iou'] for p in r['points']]
    line, = ax.plot(xs, ys, 'o-', markersize=3, label=f'{r["label"]} ({"finished" if r["finished"] else "budget"})')
    if xs and not r['finished']:
      ax.plot(xs[-1:], ys[-1:], 'o', markersize=8, markerfacecolor='none', color=line.get_color())
  ax.set_xlabel('wall time from launch (min; start-up, compilation and evaluations included)')
  ax.set_ylabel('validation mean IoU')
  ax.set_ylim(bottom=0)
  ax.set_xlim(0, max([p['wall_s'] for r in results for p in r['points']] or [60]) / 60 * 1.04)
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right', fontsize='small')
  host = results[0]['host']
  ax.set_title(f'jaxseg learning curves ({host["cpu_count"]} CPUs, jax {host["jax"]})', fontsize='medium')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  rest = argv[argv.index('--') + 1:] if '--' in argv else []
  own = argv[:argv.index('--')] if '--' in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument('--config', help='training config file, as run.py takes it (e.g. configs/unet.py)')
  p.add_argument('--override', action='append', default=[], metavar='FIELD=VALUE',
                 help='passed to run.py as --config.FIELD=VALUE (repeatable); arguments after -- pass as they are')
  p.add_argument('--budget_s', type=float, default=1800, help='wall-time budget in seconds (default 1800)')
  p.add_argument('--label', help="the curve's name (default: the config file's name)")
  p.add_argument('--workdir', help='fresh workdir to keep (default: a temporary one, removed afterwards)')
  p.add_argument('--grace_s', type=float, default=300, help='after SIGTERM, seconds before SIGKILL (default 300)')
  p.add_argument('--json', help='write the result to this JSON file')
  p.add_argument('--png', help='plot mean IoU against minutes to this PNG file')
  p.add_argument('--compare', nargs='+', metavar='JSON', help='plot and print saved curves; no training')
  args = p.parse_args(own)

  if args.compare:
    results = []
    for path in args.compare:
      with open(path, encoding='utf-8') as f:
        results.append(json.load(f))
      if results[-1].get('schema') != SCHEMA:
        sys.exit(f'{path}: not a {SCHEMA} file')
  else:
    if not args.config:
      p.error('--config is needed (or --compare)')
    run_args = [f'--config.{o}' for o in args.override] + rest
    workdir = args.workdir or tempfile.mkdtemp(prefix='bench_learning_')
    try:
      result = run_curve(args.config, run_args, args.budget_s, os.path.abspath(workdir), args.grace_s)
    finally:
      if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    result['label'] = args.label or os.path.splitext(os.path.basename(args.config))[0]
    results = [result]
    if args.json:
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      with open(args.json, 'w', encoding='utf-8') as f:
        json.dump(result, f, indent=1)
  print('\n'.join(format_table(r) for r in results), flush=True)
  if args.png:
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(results, args.png)
    print(f'Plot: {args.png}')


if __name__ == '__main__':
  main()
