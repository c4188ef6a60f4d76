"""UNet on the embedded jaxseg_shapes dataset, sized to train in under 10 minutes on a 2-core CPU.

  python run.py --config=configs/unet.py
"""

from configs import default


def get_config():
  config = default.get_config()
  # A small UNet for the CPU: 3 down-steps from 16 channels (the paper: 4 from 64).
  config.model.base_width = 16
  config.model.depth = 3
  config.batch_size = 16
  config.num_train_steps = 2800           # ~45k 64x64 crops: about 8.5 minutes on 2 CPU cores.
  config.optimizer.learning_rate = 0.1    # BatchNorm everywhere tolerates a high SGD rate.
  config.optimizer.warmup_steps = 100
  config.eval_every_steps = 700
  config.checkpoint_every_steps = 350
  return config
