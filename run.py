"""jaxseg command line: flags -> jaxseg entry points; nothing else.

  python run.py --config=configs/unet.py [--workdir=DIR] [--mode=train|eval|predict|export]
                [--checkpoint=best|latest] [--input=PATH --output=DIR] [--config.field=value ...]
"""

import os

# Quiet TensorFlow's C++ start-up chatter; tf.data only needs the CPU.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxseg import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() Python file).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and metrics go. Default: workdirs/<config name>.')
flags.DEFINE_enum('mode', 'train', list(cli.RUN_MODES), 'What to do.')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint eval/predict/export restore.')
flags.DEFINE_string('input', None, 'predict: an image, a folder of images or a glob ("imgs/*.jpg").')
flags.DEFINE_string('output', None, 'predict: folder for masks and overlays (default WORKDIR/predictions); '
                    'export: folder for the artefact (default WORKDIR/export).')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Libraries (orbax, tfds) log a lot at INFO; jaxseg's own lines go to stdout (reporting.py).
  logging.set_verbosity(logging.WARNING)
  workdir = FLAGS.workdir or cli.default_workdir(FLAGS['config'].config_filename)
  if not FLAGS.workdir:
    print(f'Workdir: {workdir}', flush=True)
  cli.run(FLAGS.mode, FLAGS.config, workdir, checkpoint=FLAGS.checkpoint, input_path=FLAGS.input,
          output_dir=FLAGS.output)


if __name__ == '__main__':
  app.run(main)
