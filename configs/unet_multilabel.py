"""UNet on a multi-label folder: classes that overlap (config.task='multilabel'), one sigmoid per class.

  python tools/make_multilabel_folder.py ML_DIR  # 300 + 60 photo scenes: object, horse, ball, damaged
  python run.py --config=configs/unet_multilabel.py --config.dataset.path=ML_DIR

For a folder of your own, set dataset.class_names (one mask folder per class: README "Multi-label folders") and
dataset.num_classes to match. Everything else is configs/unet.py's recipe ('auto' crops, AdamW, EMA).
"""

from configs import unet


def get_config():
  config = unet.get_config()
  config.task = 'multilabel'              # K independent sigmoids; a pixel may be in several classes.
  config.dataset.name = 'folder'
  config.dataset.num_classes = 4
  config.dataset.class_names = ('object', 'horse', 'ball', 'damaged')  # tools/make_multilabel_folder.py's classes.
  # Binary cross-entropy per class plus soft Dice per class over the batch (Dice weighs a rare class's few pixels
  # as much as a common one's; ball and damaged cover under 3%). CE + Lovász learnt slower within this budget
  # (benchmarks/NOTES.md, "Multi-label").
  config.loss.terms = 'cross_entropy:1,dice:1'
  config.input.crop_size = (96, 96)       # Not the auto crop (144, the median scene): twice the steps a minute.
  config.num_train_steps = 1000           # 7.2 min on 2 CPU cores from a cold start (benchmarks/NOTES.md).
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  return config
