"""SegFormer-B0 (MiT-B0 + the all-MLP head; transformers' SegformerForSemanticSegmentation) on ADE20K, 150 classes.

The SegFormer paper's ADE20K recipe as mmsegmentation and Hugging Face train it: 512x512 crops of images rescaled
by 0.5..2, flips and photometric distortion, AdamW at 6e-5 with weight decay 0.01 (none on norms and biases), the
head at 10x the encoder's learning rate, a linear warmup of 1500 steps, then polynomial decay (power 1) to zero over
160k steps of 16 crops. Fetch the ImageNet-1k encoder (huggingface.co/nvidia/mit-b0: pytorch_model.bin, or a
model.safetensors) and the benchmark (ADEChallengeData2016.zip, see tools/ade20k_folder.py), write it as a folder
dataset once, then:

  python tools/ade20k_folder.py ADEChallengeData2016 ade20k
  python run.py --config=configs/segformer_b0_ade20k.py --config.dataset.path=ade20k \
      --config.model.encoder_weights=mit-b0.bin

Other sizes: --config.model.encoder=mit_b1 .. mit_b5 (the head is 256 wide on B0/B1 and 768 on B2-B5 unless
config.model.channels says otherwise) with nvidia/mit-b1 .. -b5. To score an ADE20K-trained SegFormer as it is
(nvidia/segformer-b0-finetuned-ade-512-512, one file holding encoder and head), run --mode=eval on a fresh workdir
with --config.model.encoder_weights=None --config.model.weights=FILE; to fine-tune from it, the same two flags
without --mode (a head for another number of classes stays random, with a warning).

Expected time on one GPU: not measured (no GPU was lent to the sessions that wrote this).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default
from jaxseg.data import catalog


def get_config():
  config = default.get_config()
  # Only the fields of jaxseg/models MODELS['segformer'] (and the input contract every model takes).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'segformer'
  config.model.encoder = 'mit_b0'     # MiT-B0 .. B5 ('mit_b0' .. 'mit_b5').
  config.model.encoder_weights = 'mit-b0.bin'  # nvidia/mit-b0's ImageNet-1k file (transformers' layout); a path.
  config.model.weights = placeholder(str)  # A whole SegformerForSemanticSegmentation file instead (see above).
  config.model.channels = placeholder(int)  # The head's width; None: the encoder's pairing (256 B0/B1, 768 B2-B5).
  config.model.in_channels = 3        # RGB (see configs/default.py).
  config.model.input_mean = placeholder(tuple)  # None: the encoder's (ImageNet's).
  config.model.input_std = placeholder(tuple)   # None: the encoder's.

  config.dataset.name = 'folder'      # tools/ade20k_folder.py's copy of ADEChallengeData2016.
  config.dataset.path = placeholder(str)  # That folder.
  config.dataset.num_classes = 150    # The benchmark's classes; "other" (mask value 0) is ignored.
  config.dataset.class_names = catalog.ADE20K_CLASS_NAMES  # In the benchmark's (and transformers' id2label) order.
  config.dataset.cache = False        # 2000 decoded evaluation images: decode them at each evaluation.

  config.input.crop_size = (512, 512)  # mmsegmentation's crop.
  config.input.scale_range = (0.5, 2.0)  # Its random rescale.
  config.input.photometric = True     # Its PhotoMetricDistortion.
  config.input.eval_size = (512, 704)  # Most validation images (short side 512 or less) in one frame.

  config.optimizer.name = 'adamw'     # The paper's optimiser.
  config.optimizer.learning_rate = 6e-5  # Its rate for batch 16 (the encoder's; the head's is 10x).
  config.optimizer.weight_decay = 0.01  # Decoupled, not on biases and norm scales (the default rules).
  config.optimizer.schedule = 'poly'  # Polynomial decay after the warmup.
  config.optimizer.poly_power = 1.0   # Linear decay, as mmsegmentation's PolyLR(power=1).
  config.optimizer.end_learning_rate = 0.0  # Decays to zero.
  config.optimizer.warmup_steps = 1500  # mmsegmentation's linear warmup.
  # The head (decoder and classifier) learns at 10x (mmsegmentation's `head` lr_mult=10).
  config.finetune.param_rules = (('^(decoder|segmentation_head)/', 10.0, None),)

  config.batch_size = 16              # 8 GPUs x 2 crops.
  config.eval_batch_size = 16         # 512x704 evaluation frames.
  config.num_train_steps = 160_000    # The 160k schedule (~127 epochs of 20210 images).
  config.log_every_steps = 100        # Fewer, less noisy log points over the long run.
  config.eval_every_steps = 16_000    # 10 evaluations on the 2000 validation images.
  config.checkpoint_every_steps = 4000  # A crash loses at most ~2.5% of the run.
  return config
