"""What run.py's flags call: one function per mode, user errors printed without a traceback."""

import os
import sys
from typing import Any, Optional

from jaxseg.errors import CheckpointError, ConfigError, DataError

RUN_MODES = ('train', 'eval', 'predict', 'export')  # run.py --mode.


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
  from jaxseg import distributed  # pylint: disable=g-import-not-at-top
  from jaxseg import reporting  # pylint: disable=g-import-not-at-top
  from jaxseg import evaluate, train  # pylint: disable=g-import-not-at-top
  reporting.setup_console_logging()
  try:
    distributed.split_cpu_into_devices(config)
    distributed.initialize()
    if mode == 'train':
      return train.train_and_evaluate(config, workdir)
    elif mode == 'eval':
      return evaluate.evaluate(config, workdir, checkpoint=checkpoint)
    elif mode == 'predict':
      from jaxseg import predict  # pylint: disable=g-import-not-at-top
      if not input_path:
        raise ConfigError('--mode=predict needs --input=PATH (an image, a folder or a glob such as "imgs/*.jpg")')
      return predict.predict(config, workdir, input_path, output_dir, checkpoint=checkpoint)
    elif mode == 'export':
      from jaxseg import export  # pylint: disable=g-import-not-at-top
      return export.export_model(config, workdir, checkpoint=checkpoint, output_dir=output_dir)
    else:
      raise ConfigError(f'--mode={mode!r}; choose one of {list(RUN_MODES)}')
  except (ConfigError, DataError, CheckpointError, train.NonFiniteLossError) as e:
    print(f'jaxseg: error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
