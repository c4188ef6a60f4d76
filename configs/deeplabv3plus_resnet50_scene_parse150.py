"""DeepLabV3+ (segmentation_models_pytorch's DeepLabV3Plus) on an ImageNet ResNet-50, on tfds scene_parse150.

After mmsegmentation's 512x512 80k ADE20K recipe for DeepLabV3+ R-50. tfds's scene_parse150 carries the 100
object categories of the ADE20K instance masks, not the 150-class benchmark (see jaxseg/data/catalog.py), so
its mean IoU does not compare with published ADE20K numbers. Fetch the weights and prepare the data once:

  wget https://download.pytorch.org/models/resnet50-11ad3fa6.pth
  tfds build scene_parse150 --data_dir=DIR --file_format=array_record
  python run.py --config=configs/deeplabv3plus_resnet50_scene_parse150.py --config.dataset.data_dir=DIR \
      --config.model.encoder_weights=resnet50-11ad3fa6.pth

Expected time on one GPU: not measured (no GPU was lent to the sessions that wrote this). Its compute is
~223 GFLOP per 512x512 training image (55.8 GFLOP at 256x256, counted from the jaxpr's convolutions and
matrix products, x 4 pixels): 80,000 steps of 16 crops are 285 PFLOP,
~1.7 hours at 30% of an A100's TF32 peak (156 TFLOP/s); the input pipeline and the 10 evaluations come on top.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default


def get_config():
  config = default.get_config()
  # Only the fields of jaxseg/models MODELS['deeplabv3plus'] (and the input contract every model takes).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'deeplabv3plus'
  config.model.encoder = 'resnet50'   # 'resnet50' or 'resnet101' (resnet101-63fe2227.pth).
  config.model.encoder_weights = 'resnet50-11ad3fa6.pth'  # torchvision's ImageNet ResNet-50 (IMAGENET1K_V1); a path.
  config.model.output_stride = 16     # 16 (layer4 dilated, ASPP rates 6/12/18) or 8 (layer3+4, rates 12/24/36).
  config.model.in_channels = 3        # RGB (see configs/default.py).
  config.model.input_mean = placeholder(tuple)  # None: ImageNet's, which torchvision's weights expect.
  config.model.input_std = placeholder(tuple)   # None: ImageNet's.

  config.dataset.name = 'scene_parse150'  # Preset in jaxseg/data/catalog.py: 100 classes, splits 'train'/'test'.
  config.dataset.cache = False        # 2000 decoded evaluation images (~2.8 GB): decode them at each evaluation.

  # ADE20K images have a ~512 px short side: rescale by 0.5..2 and crop 512x512, as mmsegmentation.
  config.input.crop_size = (512, 512)
  config.input.scale_range = (0.5, 2.0)
  config.input.photometric = True     # mmsegmentation's PhotoMetricDistortion.
  config.input.eval_size = (768, 768)  # Holds most validation images in one frame.

  config.optimizer.learning_rate = 0.01  # mmsegmentation's SGD rate for batch 16.
  config.optimizer.weight_decay = 5e-4  # mmsegmentation's ADE20K weight decay.
  config.optimizer.schedule = 'poly'  # Polynomial decay (power 0.9), as mmsegmentation.
  config.optimizer.end_learning_rate = 1e-4  # mmsegmentation's min_lr.
  config.optimizer.warmup_steps = 500  # The random decoder settles before the pretrained encoder moves much.

  config.batch_size = 16              # mmsegmentation's 4 GPUs x 4 crops.
  config.eval_batch_size = 16         # 768x768 evaluation frames.
  config.num_train_steps = 80_000     # mmsegmentation's 80k schedule (~63 epochs of 20210 images).
  config.log_every_steps = 100        # Fewer, less noisy log points over the long run.
  config.eval_every_steps = 8000      # 10 evaluations on the 2000 validation images.
  config.checkpoint_every_steps = 4000  # A crash loses at most ~5% of the run.
  return config
