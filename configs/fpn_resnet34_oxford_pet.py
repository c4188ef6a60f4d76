"""FPN on ResNet-34 (segmentation_models_pytorch's FPN) on Oxford-IIIT Pet, from an ImageNet-pretrained encoder.

Fetch the encoder's weights once (torchvision's ImageNet ResNet-34; see README: Pretrained encoders) and
prepare the data once (see README: Datasets), then:

  wget https://download.pytorch.org/models/resnet34-b627a593.pth
  tfds build oxford_iiit_pet --data_dir=DIR --file_format=array_record
  python run.py --config=configs/fpn_resnet34_oxford_pet.py --config.dataset.data_dir=DIR \
      --config.model.encoder_weights=resnet34-b627a593.pth

Expected time on one GPU: not measured (no GPU was lent to the sessions that wrote this). Its compute is
39.8 GFLOP per 256x256 training image (XLA's count of the compiled train step in benchmarks/bench_train.py):
10,000 steps of 16 crops are 6.4 PFLOP, ~2.5 minutes at 30% of an A100's TF32 peak (156 TFLOP/s); the input
pipeline (160k photos decoded and augmented on the host) and the 10 evaluations of 3669 photos come on top and will
likely take longer than the steps.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default


def get_config():
  config = default.get_config()
  # Only the fields of jaxseg/models MODELS['fpn'] (and the input contract every model takes).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'fpn'
  config.model.encoder = 'resnet34'   # smp's FPN decoder (pyramid 256, segmentation 128, merged by addition).
  config.model.encoder_weights = 'resnet34-b627a593.pth'  # torchvision's ImageNet weights (IMAGENET1K_V1); a path.
  config.model.dropout_rate = 0.2     # smp's channel dropout before the head.
  config.model.in_channels = 3        # RGB (see configs/default.py).
  config.model.input_mean = placeholder(tuple)  # None: the encoder's (ImageNet's).
  config.model.input_std = placeholder(tuple)   # None: the encoder's.

  config.dataset.name = 'oxford_iiit_pet'  # Preset in jaxseg/data/catalog.py: 3 classes, splits 'train'/'test'.

  # Photos are ~500x375: train on 256x256 crops of images rescaled by 0.5..2 (mmsegmentation-style).
  config.input.crop_size = (256, 256)
  config.input.scale_range = (0.5, 2.0)
  config.input.photometric = True     # Colour jitter: pets come in every coat colour and lighting.
  config.input.eval_size = (512, 512)  # Holds most test photos in one frame; larger ones go by sliding window.

  # A pretrained encoder fine-tunes with AdamW at a small rate; the encoder at a tenth of the decoder's.
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3  # Peak rate of the decoder.
  config.optimizer.weight_decay = 1e-2  # Decoupled weight decay on kernels.
  config.optimizer.schedule = 'cosine'  # Cosine decay after the warmup.
  config.optimizer.warmup_steps = 500  # Lets the random decoder settle before the encoder's weights move much.
  config.finetune.encoder_lr_multiplier = 0.1  # The ImageNet features change slowly.
  config.ema_decay = 0.999            # Evaluate and export an average of the weights over ~1000 steps.

  config.batch_size = 16              # 16 crops of 256x256.
  config.eval_batch_size = 16         # 512x512 evaluation frames.
  config.num_train_steps = 10_000     # ~43 epochs of the 3680 training images.
  config.log_every_steps = 100        # Fewer, less noisy log points over the longer run.
  config.eval_every_steps = 1000      # 10 evaluations on the 3669 test images.
  config.checkpoint_every_steps = 1000  # Matches the evaluations, so the best one can be kept.
  return config
