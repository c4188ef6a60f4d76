"""UNet from scratch: the embedded jaxseg_shapes dataset within a 10-minute budget on any machine, and the first
recipe for your own folder (the three folder overrides, README "Your own folders"; --config.time_budget=20m for more).

  python run.py --config=configs/unet.py

Crops, evaluation size and class weighting follow the data ('auto', jaxseg/recipe.py); AdamW with a moving
average of the weights learns every class of small real folders faster than the paper's SGD (benchmarks/NOTES.md,
"Learning curves on two real-image folders").
"""

from configs import default


def get_config():
  config = default.get_config()
  # A small UNet for the CPU: 3 down-steps from 16 channels (the paper: 4 from 64).
  config.model.base_width = 16
  config.model.depth = 3
  config.input.crop_size = 'auto'         # The median training image (shapes: 96x96, whole scenes), multiples of 8.
  config.input.eval_size = 'auto'         # The largest evaluation image (shapes: 96x96).
  config.loss.class_weighting = 'auto'    # Median-frequency weights when classes are imbalanced (shapes: no, 7.7x).
  config.batch_size = 8                   # Twice the updates of 16 per minute: 0.893 against 0.875 mean IoU in 10 min (NOTES).
  config.time_budget = '10m'              # From launch to the final checkpoint, data preparation included.
  config.num_train_steps = 'auto'         # As many steps as fit the budget on this machine (measured at the start).
  config.optimizer.name = 'adamw'         # From scratch on small data: faster and steadier than SGD here.
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.01    # Decoupled (AdamW), kernels only.
  config.optimizer.warmup_steps = 100
  config.ema_decay = 0.99                 # Evaluation, predict and export use the average of the last ~100 steps.
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
