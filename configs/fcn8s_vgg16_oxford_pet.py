"""FCN-8s on an ImageNet VGG16 (the paper's fine-tuning set-up) on Oxford-IIIT Pet (pet / background / border).

Fetch the weights once (torchvision's ImageNet VGG16: its features and its classifier, whose fc6/fc7 become
7x7 and 1x1 convolutions; see README: Pretrained encoders) and prepare the data once (README: Datasets):

  wget https://download.pytorch.org/models/vgg16-397923af.pth
  tfds build oxford_iiit_pet --data_dir=DIR --file_format=array_record
  python run.py --config=configs/fcn8s_vgg16_oxford_pet.py --config.dataset.data_dir=DIR \
      --config.model.encoder_weights=vgg16-397923af.pth

Expected time on one GPU: not measured (no GPU was lent to the sessions that wrote this). Its compute is
~166 GFLOP per 256x256 training image (13.87 GFLOP forward at 128x128, counted from the jaxpr's
convolutions and matrix products, x 4 pixels, x 3 for training): 20,000 steps of 16 crops are 53 PFLOP, ~19 minutes at 30% of
an A100's TF32 peak (156 TFLOP/s); the input pipeline and the 10 evaluations come on top.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default


def get_config():
  config = default.get_config()
  # Only the fields of jaxseg/models MODELS['fcn_vgg16'] (and the input contract every model takes).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'fcn_vgg16'
  config.model.variant = 'fcn8s'      # 'fcn32s', 'fcn16s' or 'fcn8s' (skips from pool4 and pool3).
  config.model.encoder = 'vgg16'      # Or 'vgg16_bn' (with its own weights file, vgg16_bn-6c64b313.pth).
  config.model.encoder_weights = 'vgg16-397923af.pth'  # torchvision/timm VGG16 state dict: encoder and fc6/fc7; a path.
  config.model.dropout_rate = 0.5     # After fc6 and fc7, as in the paper.
  config.model.in_channels = 3        # RGB (see configs/default.py).
  config.model.input_mean = placeholder(tuple)  # None: ImageNet's, which torchvision's weights expect.
  config.model.input_std = placeholder(tuple)   # None: ImageNet's.

  config.dataset.name = 'oxford_iiit_pet'  # Preset in jaxseg/data/catalog.py: 3 classes, splits 'train'/'test'.

  # Photos are ~500x375: 256x256 crops of images rescaled by 0.5..2.
  config.input.crop_size = (256, 256)
  config.input.scale_range = (0.5, 2.0)
  config.input.photometric = True     # Colour jitter.
  config.input.eval_size = (512, 512)  # Holds most test photos in one frame; larger ones go by sliding window.

  # SGD as mmsegmentation's FCN recipes; the pretrained VGG16 at a tenth of the new layers' rate.
  config.optimizer.learning_rate = 0.01  # Peak rate for batch 16 (new layers).
  config.optimizer.weight_decay = 5e-4  # L2 on kernels, as mmsegmentation.
  config.optimizer.schedule = 'poly'  # Polynomial decay (power 0.9).
  config.optimizer.end_learning_rate = 1e-4  # mmsegmentation's min_lr.
  config.optimizer.warmup_steps = 500  # The zero-initialised score layers and random skips settle first.
  config.finetune.encoder_lr_multiplier = 0.1  # ImageNet features change slowly (fc6/fc7 train at the full rate).

  config.batch_size = 16              # 16 crops of 256x256.
  config.eval_batch_size = 16         # 512x512 evaluation frames.
  config.num_train_steps = 20_000     # ~87 epochs of the 3680 training images.
  config.log_every_steps = 100        # Fewer, less noisy log points over the longer run.
  config.eval_every_steps = 2000      # 10 evaluations on the 3669 test images.
  config.checkpoint_every_steps = 2000  # Matches the evaluations, so the best one can be kept.
  return config
