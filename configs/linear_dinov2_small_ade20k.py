"""The DINOv2 paper's linear segmentation probe: a frozen DINOv2 ViT-S/14, BatchNorm and a 1x1 convolution on its
last block's patch tokens, logits resized to the image (ADE20K, 150 classes).

The probe of the DINOv2 paper's "lin." rows as its repository trains it: the encoder frozen (no gradient is even
computed for it), AdamW at 1e-3 with weight decay 1e-4, a linear warmup of 1500 steps, then polynomial decay
(power 1) to zero over 40k steps of 16 crops (518x518 here, 37x37 patches). The cheap way to see what a DINOv2
backbone knows about a dataset. Fetch DINOv2's ViT-S/14 and write ADE20K as a folder (see
configs/dpt_dinov2_small_ade20k.py), then:

  python run.py --config=configs/linear_dinov2_small_ade20k.py --config.dataset.path=ade20k \
      --config.model.encoder_weights=vit_small_patch14_dinov2.lvd142m.safetensors

--config.model.class_token=True also feeds the class token (broadcast over the grid) to the probe.

Expected time on one GPU: not measured (no GPU was lent to the sessions that wrote this).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default
from jaxseg.data import catalog


def get_config():
  config = default.get_config()
  # Only the fields of jaxseg/models MODELS['linear'] (and the input contract every model takes).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'linear'
  config.model.encoder = 'vit_small_patch14_dinov2'  # Or vit_base_patch14_dinov2, vit_{small,base}_patch14_reg4_dinov2.
  config.model.encoder_weights = 'vit_small_patch14_dinov2.lvd142m.safetensors'  # DINOv2's ViT-S/14 (timm's file); a path.
  config.model.weights = placeholder(str)  # No published whole-model file has this layout.
  config.model.class_token = False    # Patch tokens only (the paper's probe); True: with the class token (2C inputs).
  config.model.in_channels = 3        # RGB (see configs/default.py).
  config.model.input_mean = placeholder(tuple)  # None: the encoder's (ImageNet's).
  config.model.input_std = placeholder(tuple)   # None: the encoder's.

  config.dataset.name = 'folder'      # tools/ade20k_folder.py's copy of ADEChallengeData2016.
  config.dataset.path = placeholder(str)  # That folder.
  config.dataset.num_classes = 150    # The benchmark's classes; "other" (mask value 0) is ignored.
  config.dataset.class_names = catalog.ADE20K_CLASS_NAMES
  config.dataset.cache = False        # 2000 decoded evaluation images: decode them at each evaluation.

  config.input.crop_size = (518, 518)  # 37x37 patches.
  config.input.scale_range = (0.5, 2.0)  # mmsegmentation's random rescale.
  config.input.photometric = True     # Its PhotoMetricDistortion.
  config.input.eval_size = (518, 700)  # Most validation images in one frame.

  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3  # The probe's rate.
  config.optimizer.weight_decay = 1e-4  # Decoupled, on its convolution's kernel.
  config.optimizer.schedule = 'poly'  # Polynomial decay after the warmup.
  config.optimizer.poly_power = 1.0   # Linear decay.
  config.optimizer.end_learning_rate = 0.0  # Decays to zero.
  config.optimizer.warmup_steps = 1500  # Linear warmup.
  config.finetune.freeze_encoder = True  # A probe: the backbone never moves.

  config.batch_size = 16              # 16 crops of 518x518.
  config.eval_batch_size = 16         # 518x700 evaluation frames.
  config.num_train_steps = 40_000     # The probe's schedule.
  config.log_every_steps = 100        # Fewer, less noisy log points over the long run.
  config.eval_every_steps = 4000      # 10 evaluations on the 2000 validation images.
  config.checkpoint_every_steps = 4000  # Matches the evaluations.
  return config
