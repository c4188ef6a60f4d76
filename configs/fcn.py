"""FCN-8s on the embedded jaxseg_shapes dataset, sized to train in under 10 minutes on a 2-core CPU.

  python run.py --config=configs/fcn.py
"""

import ml_collections

from configs import default


def get_config():
  config = default.get_config()
  config.model = ml_collections.ConfigDict()
  config.model.name = 'fcn'
  config.model.variant = 'fcn8s'        # 'fcn32s', 'fcn16s' or 'fcn8s'.
  config.model.width_multiplier = 0.25  # VGG16 widths x 0.25 (16..128 channels) for the CPU; 1.0 = VGG16.
  config.model.fc_width = 256           # fc6/fc7 channels (4096 in the paper).
  config.model.fc6_kernel = 3           # fc6 kernel (7 in the paper); 3 covers the 3x3 stride-32 map of a 96x96 image.
  config.model.dropout_rate = 0.0       # No dropout: 4000 steps of fresh augmented crops do not overfit (paper: 0.5).
  config.model.norm = 'batch'           # VGG16-BN: trains from scratch in minutes ('none' = the paper's VGG16).
  config.batch_size = 16
  config.num_train_steps = 4000          # ~64k 64x64 crops: about 7.5 minutes on 2 CPU cores.
  config.optimizer.learning_rate = 0.1    # BatchNorm after every conv tolerates a high SGD rate.
  config.optimizer.warmup_steps = 100
  config.eval_every_steps = 800
  config.checkpoint_every_steps = 800
  return config
