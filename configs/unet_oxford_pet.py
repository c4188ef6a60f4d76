"""UNet on Oxford-IIIT Pet (pet / background / border), sized for one GPU.

Prepare the data once (see README: Datasets), then:

  tfds build oxford_iiit_pet --data_dir=DIR
  python run.py --config=configs/unet_oxford_pet.py --config.dataset.data_dir=DIR
"""

from configs import default


def get_config():
  config = default.get_config()
  # The paper's UNet: 4 down-steps from 64 channels (also the defaults; stated so the recipe reads alone).
  config.model.base_width = 64
  config.model.depth = 4

  config.dataset.name = 'oxford_iiit_pet'  # Preset in jaxseg/data/catalog.py: 3 classes, splits 'train'/'test'.

  # Photos are ~500x375: train on 256x256 crops of images rescaled by 0.5..2 (mmsegmentation-style).
  config.input.crop_size = (256, 256)
  config.input.scale_range = (0.5, 2.0)
  config.input.photometric = True     # Colour jitter: pets come in every coat colour and lighting.
  config.input.eval_size = (512, 512)  # Holds most test photos (~500x375) in one frame; larger ones are segmented at full size by a sliding window.

  config.optimizer.learning_rate = 0.01  # mmsegmentation's SGD rate for batch 16.
  config.optimizer.schedule = 'poly'  # Polynomial decay (power 0.9), the usual segmentation schedule.
  config.optimizer.end_learning_rate = 1e-4  # mmsegmentation's min_lr.
  config.optimizer.warmup_steps = 500  # Longer warmup for the longer run.

  config.batch_size = 16              # 16 crops of 256x256: ~7 GiB of activations in float32.
  config.eval_batch_size = 16         # 512x512 evaluation images (4x a crop): ~4 GiB at inference.
  config.num_train_steps = 20_000     # ~87 epochs of the 3680 training images.
  config.log_every_steps = 100        # Fewer, less noisy log points over the longer run.
  config.eval_every_steps = 2000      # 10 evaluations on the 3669 test images.
  config.checkpoint_every_steps = 2000  # Matches the evaluations, so the best one can be kept.
  return config
