"""FCN-8s (full VGG16) on tfds scene_parse150 (ADE20K images), after mmsegmentation's 512x512 80k ADE20K recipe.

Note: tfds's scene_parse150 carries the 100 object categories of the ADE20K
instance masks, not the 150-class benchmark masks (see jaxseg/data/catalog.py),
so its mean IoU does not compare with published ADE20K numbers.

  tfds build scene_parse150 --data_dir=DIR
  python run.py --config=configs/fcn_scene_parse150.py --config.dataset.data_dir=DIR
"""

import ml_collections

from configs import default


def get_config():
  config = default.get_config()
  # Only FCN fields (jaxseg/models MODELS['fcn']); the paper's FCN-8s on a full-width VGG16.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'fcn'
  config.model.variant = 'fcn8s'      # Skips from pool4 and pool3: the finest of the three FCNs.
  config.model.width_multiplier = 1.0  # VGG16 widths (64..512 channels).
  config.model.fc_width = 4096        # fc6/fc7 as in the paper.
  config.model.fc6_kernel = 7         # As in the paper; a 512x512 crop gives a 16x16 map at stride 32.
  config.model.dropout_rate = 0.5     # As in the paper.

  config.dataset.name = 'scene_parse150'  # Preset in jaxseg/data/catalog.py: 100 classes, splits 'train'/'test'.
  config.dataset.cache = False        # 2000 eval images decoded (~512x683, image and mask) hold ~2.8 GB: decode them at each evaluation instead.

  # ADE20K images have a ~512 px short side: rescale by 0.5..2 and crop 512x512, as mmsegmentation.
  config.input.crop_size = (512, 512)
  config.input.scale_range = (0.5, 2.0)
  config.input.photometric = True     # mmsegmentation's PhotoMetricDistortion.
  config.input.eval_size = (768, 768)  # Holds most validation images (512 x up to 768) without shrinking.

  config.optimizer.learning_rate = 0.01  # mmsegmentation's SGD rate for batch 16.
  config.optimizer.weight_decay = 5e-4  # mmsegmentation's ADE20K weight decay.
  config.optimizer.schedule = 'poly'  # Polynomial decay (power 0.9), as mmsegmentation.
  config.optimizer.end_learning_rate = 1e-4  # mmsegmentation's min_lr.
  config.optimizer.warmup_steps = 1000  # VGG16 without normalisation trains from scratch here: ease in.

  config.batch_size = 16              # mmsegmentation's 4 GPUs x 4 crops; ~13 GiB of activations in float32.
  config.eval_batch_size = 16         # 768x768 evaluation images; ~4 GiB at inference.
  config.num_train_steps = 80_000     # mmsegmentation's 80k schedule (~63 epochs of 20210 images).
  config.log_every_steps = 100        # Fewer, less noisy log points over the long run.
  config.eval_every_steps = 8000      # As mmsegmentation: 10 evaluations on the 2000 validation images.
  config.checkpoint_every_steps = 4000  # A crash loses at most ~5% of the run.
  return config
