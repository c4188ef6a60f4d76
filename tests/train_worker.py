"""Runs a tiny training job in a fresh process (so each run picks its own device count).

  XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/train_worker.py \
      DATA_DIR WORKDIR '{"num_train_steps": 6}' [STOP_AT_STEP]

Used by the device-equivalence, resume and multi-process tests.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from tests.helpers import make_deprecations_errors  # pylint: disable=g-import-not-at-top,wrong-import-position

make_deprecations_errors()


def main():
  data_dir, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
  from jaxseg import distributed, reporting, train  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_unet_config  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  reporting.setup_console_logging()
  config = tiny_unet_config(data_dir, **overrides)
  result = train.train_and_evaluate(config, workdir, stop_at_step=stop_at)
  print('RESULT ' + json.dumps({'mean_iou': result.get('mean_iou')}), flush=True)


if __name__ == '__main__':
  main()
