"""DPT on a DINOv2 ViT-S/14 (the 'reassemble' neck, fusion and head of transformers' DPT) on ADE20K, 150 classes.

A ViT fine-tuned as BEiT and its successors fine-tune ViTs for segmentation (this exact schedule is jaxseg's, not
a published DPT-DINOv2 run): AdamW at 1e-4 with weight decay 0.05, layer-wise learning-rate decay 0.9 (block i of
12 learns at 0.9^(12 - i) of the rate, the patch embedding and tokens at 0.9^13, the neck and decoder at 1), no
weight decay on norms, biases, layer scales, position embeddings and tokens; a linear warmup of 1500 steps, then
polynomial decay (power 1) to zero over 80k steps of 16 crops of 518x518 (37x37 patches, DINOv2's pretraining
grid). Fetch DINOv2's ViT-S/14 (huggingface.co/timm/vit_small_patch14_dinov2.lvd142m, model.safetensors; or
facebook/dinov2-small's model.safetensors) and write ADE20K as a folder (tools/ade20k_folder.py), then:

  python run.py --config=configs/dpt_dinov2_small_ade20k.py --config.dataset.path=ade20k \
      --config.model.encoder_weights=vit_small_patch14_dinov2.lvd142m.safetensors

ViT-B/14: --config.model.encoder=vit_base_patch14_dinov2 (the neck's widths follow the encoder's: 96-768); the
register variants: vit_small_patch14_reg4_dinov2 / vit_base_patch14_reg4_dinov2 with facebook/dinov2-with-
registers-small / -base files.

Expected time on one GPU: not measured (no GPU was lent to the sessions that wrote this).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default
from jaxseg.data import catalog

DEPTH = 12          # Blocks of ViT-S/14 and ViT-B/14.
LAYER_DECAY = 0.9   # Each block closer to the input learns at 0.9x the rate of the one after it.


def layer_decay_rules(depth: int = DEPTH, decay: float = LAYER_DECAY) -> tuple:
  """Fine-tuning rules of a ViT encoder: layer-wise learning-rate decay, and no weight decay on its tokens, position
  embeddings and layer scales (biases and norm scales have none by default)."""
  embeddings = decay ** (depth + 1)
  return (('^encoder/(cls_token|reg_token|pos_embed)$', embeddings, False),
          ('^encoder/patch_embed_proj/', embeddings, None),
          *((f'^encoder/blocks_{i}/', decay ** (depth - i), None) for i in range(depth)),
          ('^encoder/blocks_[0-9]+/ls[12]_gamma$', None, False))


def get_config():
  config = default.get_config()
  # Only the fields of jaxseg/models MODELS['dpt'] (and the input contract every model takes).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'dpt'
  config.model.encoder = 'vit_small_patch14_dinov2'  # Or vit_base_patch14_dinov2, vit_{small,base}_patch14_reg4_dinov2.
  config.model.encoder_weights = 'vit_small_patch14_dinov2.lvd142m.safetensors'  # DINOv2's ViT-S/14 (timm's file); a path.
  config.model.weights = placeholder(str)  # No published whole-model file has this layout.
  config.model.readout = 'project'    # How the class token joins the patches (transformers' readout_type).
  config.model.neck_hidden_sizes = placeholder(tuple)  # The reassembled maps' widths; None: C/8, C/4, C/2, C.
  config.model.fusion_hidden_size = 256  # The fusion stage's width (transformers' default).
  config.model.fusion_batch_norm = False  # BatchNorm in the fusion residual units (transformers' default: none).
  config.model.dropout_rate = 0.1     # Before the head's classifier, training only.
  config.model.in_channels = 3        # RGB (see configs/default.py).
  config.model.input_mean = placeholder(tuple)  # None: the encoder's (ImageNet's).
  config.model.input_std = placeholder(tuple)   # None: the encoder's.

  config.dataset.name = 'folder'      # tools/ade20k_folder.py's copy of ADEChallengeData2016.
  config.dataset.path = placeholder(str)  # That folder.
  config.dataset.num_classes = 150    # The benchmark's classes; "other" (mask value 0) is ignored.
  config.dataset.class_names = catalog.ADE20K_CLASS_NAMES
  config.dataset.cache = False        # 2000 decoded evaluation images: decode them at each evaluation.

  config.input.crop_size = (518, 518)  # 37x37 patches; sides that are not multiples of 14 lose their remainder.
  config.input.scale_range = (0.5, 2.0)  # mmsegmentation's random rescale.
  config.input.photometric = True     # Its PhotoMetricDistortion.
  config.input.eval_size = (518, 700)  # Most validation images (short side 512 or less) in one frame.

  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-4  # Peak rate of the neck and decoder (and of the last block).
  config.optimizer.weight_decay = 0.05  # Decoupled; see the rules below.
  config.optimizer.schedule = 'poly'  # Polynomial decay after the warmup.
  config.optimizer.poly_power = 1.0   # Linear decay.
  config.optimizer.end_learning_rate = 0.0  # Decays to zero.
  config.optimizer.warmup_steps = 1500  # Linear warmup.
  config.finetune.param_rules = layer_decay_rules()  # Layer-wise decay; no decay on tokens and layer scales.

  config.batch_size = 16              # 16 crops of 518x518.
  config.eval_batch_size = 16         # 518x700 evaluation frames.
  config.num_train_steps = 80_000     # ~63 epochs of 20210 images.
  config.log_every_steps = 100        # Fewer, less noisy log points over the long run.
  config.eval_every_steps = 8000      # 10 evaluations on the 2000 validation images.
  config.checkpoint_every_steps = 4000  # A crash loses at most 5% of the run.
  return config
