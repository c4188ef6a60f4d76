"""UPerNet on ConvNeXt-T (transformers' UperNetForSemanticSegmentation) on tfds scene_parse150.

After the ConvNeXt paper's (and mmsegmentation's) 512x512 160k ADE20K recipe for UPerNet-ConvNeXt-T, with its
auxiliary FCN head (loss weight 0.4). tfds's scene_parse150 carries the 100 object categories of the ADE20K
instance masks, not the 150-class benchmark (see jaxseg/data/catalog.py), so its mean IoU does not compare with
published ADE20K numbers. Fetch timm's ImageNet-22k -> 1k ConvNeXt-T (huggingface.co/timm/
convnext_tiny.fb_in22k_ft_in1k, model.safetensors) and prepare the data once, then:

  tfds build scene_parse150 --data_dir=DIR --file_format=array_record
  python run.py --config=configs/upernet_convnext_tiny_scene_parse150.py --config.dataset.data_dir=DIR \
      --config.model.encoder_weights=convnext_tiny.fb_in22k_ft_in1k.safetensors

Or start the whole model from transformers' ADE20K-trained file (openmmlab/upernet-convnext-tiny,
model.safetensors or pytorch_model.bin; its 150-class classifiers stay random here, the rest loads) with
--config.model.encoder_weights=None --config.model.weights=PATH.

Expected time on one GPU: not measured (no GPU was lent to the sessions that wrote this). Its compute is
~1.6 TFLOP per 512x512 training image (403.8 GFLOP at 256x256 without the auxiliary head, XLA's count of the
compiled train step in benchmarks/bench_train.py, x 4 pixels): 160,000 steps of 16 crops are 4.1 EFLOP, ~24 hours
at 30% of an A100's TF32 peak (156 TFLOP/s); the input pipeline and the evaluations come on top.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default


def get_config():
  config = default.get_config()
  # Only the fields of jaxseg/models MODELS['upernet'] (and the input contract every model takes).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'upernet'
  config.model.encoder = 'convnext_tiny'  # Also convnext_small, convnext_base, or a ResNet.
  config.model.encoder_weights = 'convnext_tiny.fb_in22k_ft_in1k.safetensors'  # timm's ImageNet-22k->1k weights; a path.
  config.model.weights = placeholder(str)  # A whole UperNetForSemanticSegmentation file instead (see above).
  config.model.channels = 512         # Width of the decoder's convolutions (transformers' hidden_size).
  config.model.auxiliary_head = True  # The FCN head on the stride-16 map, trained with loss weight 0.4.
  config.model.auxiliary_weight = 0.4  # transformers' auxiliary_loss_weight.
  config.model.in_channels = 3        # RGB (see configs/default.py).
  config.model.input_mean = placeholder(tuple)  # None: the encoder's (ImageNet's).
  config.model.input_std = placeholder(tuple)   # None: the encoder's.

  config.dataset.name = 'scene_parse150'  # Preset in jaxseg/data/catalog.py: 100 classes, splits 'train'/'test'.
  config.dataset.cache = False        # 2000 decoded evaluation images (~2.8 GB): decode them at each evaluation.

  # ADE20K images have a ~512 px short side: rescale by 0.5..2 and crop 512x512, as mmsegmentation.
  config.input.crop_size = (512, 512)
  config.input.scale_range = (0.5, 2.0)
  config.input.photometric = True     # mmsegmentation's PhotoMetricDistortion.
  config.input.eval_size = (768, 768)  # Holds most validation images in one frame.

  config.optimizer.name = 'adamw'     # The ConvNeXt paper's segmentation optimiser.
  config.optimizer.learning_rate = 1e-4  # Its peak rate for batch 16.
  config.optimizer.weight_decay = 0.05  # Decoupled, not on biases and norm scales (the default rules).
  config.optimizer.schedule = 'poly'  # Polynomial decay after the warmup, as mmsegmentation.
  config.optimizer.end_learning_rate = 0.0  # Decays to zero.
  config.optimizer.warmup_steps = 1500  # mmsegmentation's linear warmup.

  config.batch_size = 16              # mmsegmentation's 8 GPUs x 2 crops.
  config.eval_batch_size = 16         # 768x768 evaluation frames.
  config.num_train_steps = 160_000    # The 160k schedule (~127 epochs of 20210 images).
  config.log_every_steps = 100        # Fewer, less noisy log points over the long run.
  config.eval_every_steps = 16_000    # 10 evaluations on the 2000 validation images.
  config.checkpoint_every_steps = 4000  # A crash loses at most ~2.5% of the run.
  return config
