"""What run.py's flags call: one function per mode (and --mode=eval's job), user errors without a traceback."""

import logging
import os
import sys
from typing import Any, Optional

import jax
import ml_collections

from jaxseg import distributed
from jaxseg import evaluate
from jaxseg import export
from jaxseg import inference
from jaxseg import predict
from jaxseg import reporting
from jaxseg import sharding
from jaxseg import startup
from jaxseg import state as state_lib
from jaxseg import time_budget
from jaxseg import train
from jaxseg.data import pipeline
from jaxseg.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger('jaxseg')

RUN_MODES = startup.MODES  # run.py --mode.


def default_workdir(config_path: str) -> str:
  """workdirs/<config file stem>, e.g. configs/unet.py -> workdirs/unet."""
  stem = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  return os.path.join('workdirs', stem)


def run(mode: str, config, workdir: str, *, checkpoint: str = 'best', input_path: Optional[str] = None,
        output_dir: Optional[str] = None) -> Any:
  """Runs one mode; ConfigError/DataError/CheckpointError become 'jaxseg: error: ...' and exit status 2.

  Returns:
    The mode's result: train_and_evaluate's last evaluation metrics (train), evaluate's result (eval),
    predict's {'written', 'skipped', 'step'} (predict), the export directory (export).
  """
  reporting.setup_console_logging()
  try:
    distributed.split_cpu_into_devices(config.get('cpu_devices', 0), (config.batch_size, config.eval_batch_size))
    distributed.initialize()
    if mode == 'train':
      return train.train_and_evaluate(config, workdir, start_time=time_budget.process_start_time())
    elif mode == 'eval':
      return evaluate_checkpoint(config, workdir, checkpoint=checkpoint)
    elif mode == 'predict':
      if not input_path:
        raise ConfigError('--mode=predict needs --input=PATH (an image, a folder or a glob such as "imgs/*.jpg")')
      return predict.predict(config, workdir, input_path, output_dir, checkpoint=checkpoint)
    elif mode == 'export':
      return export.export_model(config, workdir, checkpoint=checkpoint, output_dir=output_dir)
    raise ConfigError(f'--mode={mode!r}; choose one of {list(RUN_MODES)}')
  except (ConfigError, DataError, CheckpointError, train.NonFiniteLossError) as e:
    print(f'jaxseg: error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'best') -> dict:
  """--mode=eval: restores the best (or latest) checkpoint of `workdir`, evaluates it, prints a per-class table.

  The standard evaluation is the one training runs (images padded to
  input.eval_size; larger ones segmented at full resolution as --mode=predict
  does; every label scored at its own size). When config.inference asks for
  TTA (flip, scales) or names a mode ('whole' or 'slide'), the split is scored
  a second time with those settings, at each label's own resolution; both
  figures are reported, the second under the key 'inference' and the
  metrics.jsonl split 'eval_inference'.
  """
  run = startup.open_run(config, workdir, mode='eval', checkpoint=checkpoint)
  settings, spec, setup, step = run.settings, run.spec, run.setup, run.step
  options = settings.inference_options(processes=jax.process_count())
  is_primary = jax.process_index() == 0
  trained = os.path.isdir(os.path.join(run.workdir, 'checkpoints'))
  what = (f'the {checkpoint} checkpoint (step {step})' if trained
          else f'the weights of {settings.model.weights} as they are')
  log.info('Evaluating %s of %s', what, run.workdir)
  eval_data = pipeline.eval_dataset(
      run.builder, spec, settings.input, global_batch=settings.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  result, examples = evaluate.Evaluator(spec, setup, options).run(run.state, eval_data)
  result['checkpoint_step'] = step
  writer = reporting.MetricWriter(run.workdir, enabled=is_primary)
  reporting.log_eval(writer, step, result, spec, examples=examples, include_confusion=True)

  if options.uses_tta or options.mode != 'auto':
    variables = sharding.fetch_replicated(state_lib.inference_variables(run.state), setup.mesh)
    run.state = None  # The predictor holds its own copy.
    predictor = inference.Predictor.create(setup.model, variables, spec.num_classes, options, dtype=setup.dtype,
                                           input_stats=setup.input_stats, multilabel=spec.multilabel)
    extra = evaluate.evaluate_with_predictor(predictor, run.builder, spec)
    extra['settings'] = options.describe()
    extra['checkpoint_step'] = step
    reporting.log_eval(writer, step, extra, spec, split='eval_inference', include_confusion=True)
    result['inference'] = extra
  writer.close()
  if is_primary:
    print(f'{"Checkpoint step " + str(step) + " (" + checkpoint + ")" if trained else settings.model.weights}: '
          f'mean IoU {result["mean_iou"]:.4f}, pixel accuracy '
          f'{result["pixel_accuracy"]:.4f}, mean class accuracy {result["mean_class_accuracy"]:.4f}')
    print(reporting.format_iou_table(result, spec.class_names))
    if 'inference' in result:
      extra = result['inference']
      what = 'TTA' if options.uses_tta else 'these settings'
      print(f'\nWith {options.describe()} (each label at its own size): mean IoU {extra["mean_iou"]:.4f} '
            f'(without {what}: {result["mean_iou"]:.4f}), pixel accuracy {extra["pixel_accuracy"]:.4f}, '
            f'mean class accuracy {extra["mean_class_accuracy"]:.4f}')
      print(reporting.format_iou_table(extra, spec.class_names))
  return result
