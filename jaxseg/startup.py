"""The one start-up path of every mode: the config read once, then the run opened (data, model, state).

`open_run(config, workdir, mode=...)` is what train, eval, predict (and
jaxseg.api) and export call first:
  1. the config checked into Settings (jaxseg/settings.py), the compilation cache on;
  2. the workdir: training creates it and writes config.json; the other modes check that the config describes
     the model trained there and take the 'auto' values training chose (or, in a workdir without training, use
     a whole-model file, config.model.weights, as it is: its 'auto' values must then be given);
  3. the data, when the mode reads a split (train, eval), else only the dataset's spec;
  4. training chooses the 'auto' values from the data (jaxseg/recipe.py) and saves them in config.json;
  5. the model, optimiser and state layout (state.build) on the mode's devices;
  6. the state: training resumes from the latest checkpoint or starts fresh; the others restore the best or
     latest checkpoint (or build the state from config.model.weights).
"""

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from jaxseg import checkpoint as checkpoint_lib
from jaxseg import compilation_cache
from jaxseg import recipe
from jaxseg import settings as settings_lib
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg import time_budget
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg.errors import CheckpointError, ConfigError

log = logging.getLogger('jaxseg')

MODES = ('train', 'eval', 'predict', 'export')
CONFIG_FILE = 'config.json'


@dataclasses.dataclass
class Run:
  """An opened run.

  Attributes:
    settings: the checked settings, 'auto' values resolved.
    workdir: the absolute workdir.
    spec: the dataset as the pipeline sees it.
    builder: the prepared tfds builder (train and eval), else None.
    setup: model, optimiser and state layout (state.build).
    state: the train state in its layout (restored, or fresh when training starts).
    step: the state's step.
    checkpoints: training's checkpoint manager (it saves there; close it), else None.
    class_weights: training's per-class loss weights, else None.
  """
  settings: settings_lib.Settings
  workdir: str
  spec: datasets.DatasetSpec
  builder: Any
  setup: state_lib.Setup
  state: Any
  step: int
  checkpoints: Optional[checkpoint_lib.Checkpoints] = None
  class_weights: Optional[tuple[float, ...]] = None


def open_run(config: ml_collections.ConfigDict, workdir: str, *, mode: str, checkpoint: str = 'best',
             devices: Optional[Sequence[Any]] = None, sharding_mode: Optional[str] = None) -> Run:
  """Opens a run of `mode` on `workdir` (see the module docstring).

  Args:
    config: the experiment config (configs/default.py's fields).
    workdir: the run's directory.
    mode: 'train', 'eval', 'predict' or 'export'.
    checkpoint: eval/predict/export: 'best' (by validation mean IoU) or 'latest'.
    devices: the devices of the mesh (default: every device of every process).
    sharding_mode: overrides config.sharding (prediction holds a replicated copy per process).
  """
  if mode not in MODES:
    raise ConfigError(f'--mode={mode!r}; choose one of {list(MODES)}')
  if mode != 'train' and checkpoint not in ('best', 'latest'):
    raise ConfigError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
  # ---- Settings, cache, workdir. ----
  settings = settings_lib.from_config(config)
  compilation_cache.enable(settings.compilation_cache_dir)
  pipeline.hide_accelerators_from_tf()
  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  is_primary = jax.process_index() == 0
  from_weights = False  # eval/predict/export of config.model.weights as it is, in a workdir without training.
  if mode == 'train':
    _prepare_workdir_on_all_processes(workdir, config)
  elif not os.path.isdir(os.path.join(workdir, 'checkpoints')) and settings.model.weights:
    from_weights = True
    settings = recipe.settle(settings, None, 'the config (no training in this workdir)')
    os.makedirs(workdir, exist_ok=True)  # Where eval writes metrics.jsonl, predict its masks, export its files.
  else:
    if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise CheckpointError(f'no checkpoints in {workdir}: train first (--mode=train), pass the right --workdir, '
                            'or give a whole-model file (config.model.weights) to use as it is')
    trained = trained_settings(workdir)
    _check_same_model(settings, trained, workdir)
    settings = recipe.settle(settings, trained, os.path.join(workdir, CONFIG_FILE))
  if mode in ('train', 'eval'):
    settings_lib.check_batch(settings, jax.device_count())

  # ---- Data. ----
  if mode in ('train', 'eval'):
    spec, builder = datasets.open_dataset(settings.dataset, in_channels=settings.model.in_channels,
                                          task=settings.task)
  else:
    spec = dataclasses.replace(datasets.resolve_spec(settings.dataset, settings.task),
                               image_channels=settings.model.in_channels)
    builder = None
  class_weights = None
  if mode == 'train':
    settings = recipe.resolve(settings, spec, builder, is_primary=is_primary)
    if settings.num_train_steps == settings_lib.AUTO:  # Read before write_config replaces the previous start's file.
      settings = time_budget.chosen_on_resume(settings, trained_settings(workdir), checkpoint_lib.has_steps(workdir))
    elif settings.time_budget_s is not None and is_primary:
      log.info('config.time_budget is not used: config.num_train_steps=%d fixes the schedule (give '
               "num_train_steps='auto' to size it to the budget).", settings.num_train_steps)
    if is_primary:
      write_config(workdir, config, settings)
    class_weights = recipe.class_weights(settings, spec, builder)

  # ---- Model and state. ----
  mesh = sharding.make_mesh(devices)
  setup = state_lib.build(settings, spec.num_classes, mesh, sharding=sharding_mode)
  if from_weights:
    if is_primary:
      log.info('No training in %s: using the weights of %s as they are (step 0)', workdir, settings.model.weights)
    return Run(settings, workdir, spec, builder, setup, setup.init_state(), 0)
  if mode != 'train':
    state, step = checkpoint_lib.restore_trained(workdir, setup.abstract_state, checkpoint=checkpoint)
    return Run(settings, workdir, spec, builder, setup, state, step)
  checkpoints = checkpoint_lib.Checkpoints(workdir, keep=settings.keep_checkpoints)
  try:
    if checkpoints.latest_step() is not None:
      state, step = checkpoints.restore(setup.abstract_state)
      if is_primary:
        log.info('Resuming from the checkpoint at step %d in %s', step, checkpoints.directory)
    else:
      state, step = setup.init_state(), 0
    state_lib.check_distinct_buffers(state)  # The step donates the state: one buffer passed twice aborts XLA.
  except BaseException:
    checkpoints.close()
    raise
  return Run(settings, workdir, spec, builder, setup, state, step, checkpoints, class_weights)


# ---------------------------------------------------------------------------
# The workdir's config.json.
# ---------------------------------------------------------------------------


def trained_settings(workdir: str) -> Optional[settings_lib.Settings]:
  """The settings of the config training saved in WORKDIR/config.json; None when there is none or it is unreadable."""
  try:
    saved = load_config(workdir)
  except (CheckpointError, OSError, ValueError):
    return None
  try:
    return settings_lib.from_config(saved)
  except ConfigError as e:
    raise ConfigError(f'{os.path.join(workdir, CONFIG_FILE)} (the config training saved) does not read as a config: '
                      f'{e}') from None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved as WORKDIR/config.json, as a ConfigDict."""
  path = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(workdir))), CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f'{path} does not exist: is {workdir} the workdir of a training run?')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def _check_same_model(settings: settings_lib.Settings, trained: Optional[settings_lib.Settings], workdir: str) -> None:
  """ConfigError when the config describes another model (or state layout) than the one trained in `workdir`."""
  if trained is None:
    return
  # Where the initial weights came from does not change the trained model (and the file is not needed).
  current = dataclasses.replace(settings.model, encoder_weights=None, weights=None).as_dict()
  saved = dataclasses.replace(trained.model, encoder_weights=None, weights=None).as_dict()
  diffs = [f'model.{k}: {current.get(k)!r} here, {saved.get(k)!r} in training'
           for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  layout = lambda s: {'task': s.task, 'optimizer.name': s.optimizer.name, 'ema_decay > 0': s.ema_decay > 0,
                      'finetune.param_rules': [r.pattern for r in s.param_rules]}
  here, there = layout(settings), layout(trained)
  diffs += [f'{k}: {here[k]!r} here, {there[k]!r} in training' for k in here if here[k] != there[k]]
  if diffs:
    raise ConfigError(f'the config describes another model than the one trained in {workdir} '
                      f'({os.path.join(workdir, CONFIG_FILE)}): ' + '; '.join(diffs)
                      + '. Pass the same --config (and overrides) as for training.')


def write_config(workdir: str, config: ml_collections.ConfigDict, settings: settings_lib.Settings) -> None:
  """WORKDIR/config.json: the config of the run with the recipe's choices in place of 'auto' (eval, predict,
  export and jaxseg.api read it back)."""
  config = config.copy_and_resolve_references()
  with config.ignore_type():  # A size field, or num_train_steps, may hold 'auto' (a str) until here.
    for name in ('crop_size', 'eval_size'):
      value = getattr(settings.input, name)
      config.input[name] = value if value == settings_lib.AUTO else tuple(value)
    config.loss.class_weighting = settings.loss.class_weighting
    config.num_train_steps = settings.num_train_steps  # A budgeted run's chosen length, once it has measured.
  with open(os.path.join(workdir, CONFIG_FILE), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))


def _prepare_workdir_on_all_processes(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Process 0 creates the workdir, checks it is writable (now, not after an hour of training) and saves the
  config; with several processes, all of them stop if that failed (else the others would wait forever in the
  first collective for a process 0 that has already exited)."""
  error = None
  if jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
      probe = os.path.join(workdir, '.write_test')
      with open(probe, 'w', encoding='utf-8') as f:
        f.write('ok')
      os.remove(probe)
    except OSError as e:
      error = ConfigError(f'the workdir {workdir} cannot be written: {e.strerror or e}')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = bool(multihost_utils.broadcast_one_to_all(np.array(error is not None)))
    if failed and error is None:
      error = ConfigError(f'the workdir {workdir} cannot be written (reported by process 0)')
  if error is not None:
    raise error
