"""Shared base configuration: every field jaxseg reads, with its meaning.

Recipe files (unet.py, fcn.py, ...) start from `get_config()` here and change
what their recipe needs. Any field can be overridden on the command line:
`python run.py --config=configs/unet.py --config.batch_size=32`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # ---- Model: which network and its shape (see jaxseg/models). ----
  config.model = ml_collections.ConfigDict()
  config.model.name = 'unet'          # The architecture: 'unet' or 'fcn' (plain, or on model.encoder), 'fpn', 'upernet', 'deeplabv3plus', 'fcn_vgg16', 'segformer', 'dpt', 'linear' (see jaxseg/models and the README's table; a recipe keeps only its model's fields).
  # UNet fields (ignored by other models; a recipe keeps only its model's fields).
  config.model.base_width = 64        # Channels at the first level; doubled at each down-step.
  config.model.depth = 4              # Number of down-steps (the paper: 4). Inputs are padded to a multiple of 2**depth.
  config.model.norm = 'batch'         # 'batch' (cross-replica BatchNorm), 'group' or 'none'.
  config.model.upsample = 'transpose'  # 'transpose' (2x2 stride-2 up-conv, as the paper) or 'bilinear'.
  config.model.encoder = placeholder(str)  # None: the UNet above. A backbone (resnet18/34/50/101, vgg16, vgg16_bn, convnext_tiny/small/base, mit_b0..b5, vit_*_patch14_dinov2 with a decoder that reads its strides): smp's UNet decoder on it (base_width, depth, norm, upsample then unused; inputs padded to a multiple of 32).
  config.model.encoder_weights = placeholder(str)  # Path of the encoder's state dict in one of its layouts (torchvision/timm/transformers; .safetensors; .pth/.pt/.bin with torch installed) that the encoder starts from; None: random init. Checked wherever the model is built; its values are the initial encoder when training starts from scratch. README "Pretrained encoders".
  config.model.weights = placeholder(str)  # Path of a whole-model file in the decoder's published layout (transformers' UperNetForSemanticSegmentation, SegformerForSemanticSegmentation) that the model starts from; not with encoder_weights. A classifier for another number of classes stays random.
  # Input contract, every model's (jaxseg/settings.py reads it; the train/eval steps and the export apply it):
  config.model.in_channels = 3        # Channels of the input images: 3 (RGB), 1 (grayscale) or 4 (e.g. RGB + near-infrared: 4-band PNG/TIFF), read so by folder datasets, --mode=predict, jaxseg.api and the export (README "Your own folders"); catalog and embedded datasets are RGB (3). 1 and 4 need input_mean/std of as many values. A pretrained RGB first convolution is adapted to it (jaxseg.models.encoders.weights.adapt_first_conv: 1 = sum of R, G, B; 4 = R, G, B, R, x 3/4).
  config.model.input_mean = placeholder(tuple)  # Per-channel mean (0-255 units) subtracted from the images; None: the encoder's (ImageNet's for every encoder so far), ImageNet's without one.
  config.model.input_std = placeholder(tuple)   # Per-channel standard deviation (0-255 units) the images are divided by; None: the encoder's, ImageNet's without one.

  # ---- Fine-tuning: the optimiser's parameter-group rules (jaxseg/optim.py). ----
  # Each parameter (path like 'encoder/layer1_0/conv1/kernel') takes each property -- learning-rate multiplier,
  # frozen, weight decay -- from the first rule that matches it and sets that property: param_rules first, then the
  # encoder's rule made from the four encoder fields below, then "no weight decay on biases and norm scales".
  # Training controls, not the model: changing the values between runs keeps the state's layout (a checkpoint of a
  # frozen stage resumes unfrozen). The encoder fields, other than their defaults, need a model with an encoder.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.encoder_lr_multiplier = 1.0  # The encoder's learning rate is this x the schedule's (e.g. 0.1); the same optimiser, weight decay included.
  config.finetune.freeze_encoder = False  # True: the encoder's parameters never move (no update, no weight decay; their gradients are not computed).
  config.finetune.freeze_encoder_steps = 0  # N > 0: the encoder is frozen for the first N optimiser updates, then trains with fresh momentum/Adam moments at the schedule's learning rate of step N. 0: not frozen. Not with freeze_encoder.
  config.finetune.freeze_encoder_batch_stats = False  # True: the encoder's BatchNorm statistics stay as loaded and it normalises with them in training too (frozen_bn; for small batches). Independent of freeze_encoder.
  config.finetune.param_rules = placeholder(tuple)  # Rules of your own, before the ones above: (regex on the parameter path, learning-rate multiplier or 'frozen' or None, weight decay True/False/None), None leaving that property to later rules. E.g. (('encoder/(conv1|bn1|layer1)', 'frozen', None), ('encoder/layer2', 0.1, None)). Each must match some parameter. Changing them changes the optimiser state's layout (eval/predict/export compare them).

  # ---- Task: what a pixel's label is. ----
  config.task = 'multiclass'          # 'multiclass': one class per pixel (softmax; a binary task is 2 classes, background and foreground). 'multilabel': classes may overlap, one sigmoid per class, a mask per class (a folder in the multi-label layout, README "Multi-label folders"); evaluation scores each class as its own binary problem.

  # ---- Data (see jaxseg/data/datasets.py for the registry). ----
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'jaxseg_shapes'  # Registered preset ('jaxseg_shapes', 'folder', 'oxford_iiit_pet', ...) or any tfds name.
  config.dataset.data_dir = placeholder(str)  # tfds data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.dataset.path = placeholder(str)  # For name='folder': DIR with train/{images,masks}, val/{images,masks}.
  config.dataset.num_classes = placeholder(int)  # None: the preset's value.
  config.dataset.class_names = placeholder(tuple)  # None: the preset's names (or class_0, class_1, ...).
  config.dataset.ignore_label = 255   # Label value that counts in neither loss nor metrics.
  config.dataset.image_key = placeholder(str)  # tfds feature with the image; None: preset's.
  config.dataset.label_key = placeholder(str)  # tfds feature with the mask; None: preset's.
  config.dataset.label_offset = placeholder(int)  # Added to raw mask values (e.g. -1 for 1-based masks); None: preset's.
  config.dataset.ignore_values = placeholder(tuple)  # Raw mask values mapped to ignore_label; None: preset's.
  config.dataset.train_split = placeholder(str)  # None: preset's (usually 'train').
  config.dataset.eval_split = placeholder(str)  # None: preset's (usually 'validation').
  config.dataset.cache = True         # Keep this process's share of the eval split in memory, decoded, after the first evaluation (later ones decode nothing).

  # ---- Input pipeline and augmentation (tf.data; see jaxseg/data/augment.py). ----
  config.input = ml_collections.ConfigDict(type_safe=False)  # A size is (H, W) or 'auto'.
  config.input.crop_size = (64, 64)   # Training crop (H, W); images smaller than it are padded (mask with ignore_label). 'auto': the median training image, sides rounded to the model's multiple, at most 512 (jaxseg/recipe.py; chosen at start, printed, saved in WORKDIR/config.json).
  config.input.eval_size = (96, 96)   # Evaluation pads images to this (H, W); larger ones are segmented at full size as --mode=predict does. 'auto': the largest evaluation image, rounded up to the model's multiple, at most 512.
  config.input.scale_range = (1.0, 1.0)  # Random rescale factor range before cropping; (1, 1) disables it.
  config.input.hflip = True           # Random horizontal flip (p = 0.5). Turn it off for text, digits, or classes that differ by left/right (README "Augmentation").
  config.input.vflip = False          # Random vertical flip (p = 0.5): for images with no up or down (aerial, satellite, microscopy).
  config.input.rot90 = False          # Random turn by 0, 90, 180 or 270 degrees (before the crop): for images with no up or down.
  config.input.rotate_degrees = 0.0   # Random rotation by up to this many degrees either way, about the centre (outside: image 0, label ignored); 0 disables it.
  config.input.aspect_range = (1.0, 1.0)  # Random aspect (width/height) factor range, log-uniform, on top of scale_range; (1, 1) disables it.
  config.input.photometric = False    # Colour jitter: random brightness, contrast, saturation and hue.
  config.input.blur_prob = 0.0        # Probability of a Gaussian blur of the image (label untouched); 0 disables it.
  config.input.blur_sigma = (0.1, 2.0)  # The blur's sigma range in pixels, drawn uniformly.
  config.input.noise_std = 0.0        # Additive Gaussian pixel noise, its std drawn from U(0, noise_std) per image (0-255 units); 0 disables it.
  config.input.cutout_holes = 0       # Cutout: this many rectangles blanked in the image and ignored in the label; 0 disables it.
  config.input.cutout_size = 0.25     # A cutout rectangle's side as a fraction of the crop's side, in (0, 1].
  config.input.copy_paste_prob = 0.0  # Copy-paste (Ghiasi et al. 2021): probability that an image gets objects (connected regions of a class) of another training image pasted in, before the augmentation above; 0 disables it (README "Augmentation").
  config.input.copy_paste_object_classes = None  # The classes whose regions are objects, e.g. (1, 2); None: every class but 0 (the background; multi-label: every class).
  config.input.copy_paste_scale_range = (0.5, 1.5)  # The pasted objects' random rescale factor range.
  config.input.copy_paste_object_prob = 0.5  # Each object of the other image is pasted with this probability (at least one is).
  config.input.prefetch_to_device = 2  # Batches staged on the devices ahead of the step.

  # ---- Inference: --mode=predict, the second scoring in --mode=eval, jaxseg.api (see jaxseg/inference.py). ----
  config.inference = ml_collections.ConfigDict()
  config.inference.mode = 'auto'      # 'whole' (one pass per image), 'slide' (sliding window) or 'auto': slide over images larger than input.eval_size.
  config.inference.window = placeholder(tuple)  # Sliding-window (H, W); None: input.crop_size.
  config.inference.stride = placeholder(tuple)  # Sliding-window step (H, W), <= window; None: 2/3 of the window. Overlapping logits are averaged.
  config.inference.flip = False       # Test-time augmentation: also the horizontally flipped image (softmax probabilities averaged).
  config.inference.scales = (1.0,)    # Test-time augmentation: image scales, e.g. (0.75, 1.0, 1.25); probabilities resized back and averaged.
  config.inference.batch_size = placeholder(int)  # Windows/images per batch on this host; None: eval_batch_size / processes.
  config.inference.size_multiple = 32  # Whole-image inference pads images to a multiple of this (fewer compilations); cropped off after.

  # ---- Export (--mode=export, see jaxseg/export.py). ----
  config.export = ml_collections.ConfigDict()
  config.export.formats = 'jax,saved_model,onnx'  # What --mode=export writes (comma-separated): 'jax' (model.jax_exported, jax.export), 'saved_model' (TensorFlow SavedModel via jax2tf; skipped with a warning where jax2tf fails), 'onnx' (model.onnx via jax2onnx, checked with onnxruntime; skipped with a warning when jax2onnx is not installed, unless listed here explicitly). README "Export".

  # ---- Loss. ----
  config.loss = ml_collections.ConfigDict()
  config.loss.terms = 'cross_entropy:1'  # The loss: 'term:weight' pairs, summed, e.g. 'cross_entropy:1,lovasz:0.5'. Terms: cross_entropy, focal, dice, jaccard, tversky, lovasz (jaxseg/losses.py; README "Losses"). Multi-label: cross_entropy is binary per class, focal sigmoid, lovasz the Lovász hinge.
  config.loss.class_weights = placeholder(tuple)  # Per-class weights (K values): pixels of class c weigh w_c in cross_entropy and focal; classes weigh w_c in the per-class means of dice, jaccard, tversky and lovasz. None: unweighted.
  config.loss.class_weighting = 'none'  # 'none'; 'median_frequency': weights computed from the training split; 'auto': median_frequency when the most frequent class has over 10x the pixels of the rarest, else none (multi-label: none).
  config.loss.focal_gamma = 2.0       # focal: the focusing exponent, (1 - p_t)^gamma (0 is cross-entropy).
  config.loss.focal_alpha = 0.25      # focal, multi-label (sigmoid) only: positives weigh alpha, negatives 1 - alpha (Lin et al.'s 0.25); negative: no balancing. Multi-class focal takes class_weights as its alpha_t.
  config.loss.tversky_alpha = 0.5     # tversky: the weight of false positives.
  config.loss.tversky_beta = 0.5      # tversky: the weight of false negatives (beta > alpha favours recall; 0.7 / 0.3 as Salehi et al.).
  config.loss.smooth = 1.0            # dice, jaccard, tversky: added to each class's numerator and denominator (keeps an absent class's score defined).

  # ---- Optimiser (see jaxseg/optim.py). ----
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'       # 'sgd' (with momentum, as the papers) or 'adamw' (Adam with decoupled weight decay; often better from scratch).
  config.optimizer.learning_rate = 0.05  # Peak learning rate for the global batch (SGD; AdamW wants ~1e-3).
  config.optimizer.momentum = 0.9     # SGD momentum (0 disables it). Ignored by adamw.
  config.optimizer.nesterov = False   # SGD: Nesterov momentum. Ignored by adamw.
  config.optimizer.b1 = 0.9           # AdamW: decay of the first-moment (mean) estimate, in [0, 1). Ignored by sgd.
  config.optimizer.b2 = 0.999         # AdamW: decay of the second-moment estimate, in [0, 1). Ignored by sgd.
  config.optimizer.eps = 1e-8         # AdamW: added to the root of the second moment, > 0. Ignored by sgd.
  config.optimizer.weight_decay = 1e-4  # Kernels only (not biases or norm scales). SGD: L2 added to the gradient. AdamW: decoupled, param -= lr * weight_decay * param (typical 0.01-0.05).
  config.optimizer.schedule = 'cosine'  # 'constant', 'cosine' or 'poly'.
  config.optimizer.warmup_steps = 100  # Linear warmup from 0 over this many steps.
  config.optimizer.end_learning_rate = 0.0  # Learning rate at the end of the decay.
  config.optimizer.poly_power = 0.9   # Exponent of the 'poly' schedule.

  # ---- Training loop. ----
  config.seed = 0                     # Seeds parameters, data order and augmentation.
  config.batch_size = 16              # Global batch over all devices of all hosts.
  config.eval_batch_size = 32         # Global evaluation batch; the last one is padded and masked.
  # Length of training: a number of steps, or 'auto': the longest schedule (warm-up, decay, evaluations, final
  # checkpoint) that ends within time_budget on this machine, measured in the run's first steps (jaxseg/time_budget.py);
  # the count chosen is logged and saved in WORKDIR/config.json, so a resumed run continues that schedule.
  config.num_train_steps = ml_collections.FieldReference(1000, field_type=object)  # An int or 'auto'.
  config.time_budget = ''             # With num_train_steps='auto': wall time from launch to the final checkpoint, e.g. '20m', '1h30m', '600s'; '' = none.
  config.log_every_steps = 50         # Progress line, TensorBoard and metrics.jsonl point every N steps.
  config.eval_every_steps = 500       # Evaluate (and keep the checkpoint if best) every N steps and at the end.
  config.checkpoint_every_steps = 500  # Save a checkpoint every N steps and at the end.
  config.keep_checkpoints = 2         # Keep the last K checkpoints (plus the best by validation mean IoU).
  config.half_precision = False       # Compute in bfloat16 with float32 parameters and loss.
  config.ema_decay = 0.0              # Exponential moving average of the weights (and BatchNorm statistics), e.g. 0.999; evaluation, predict, the API and export use it. 0 = off. Decay warms up as min(ema_decay, (1 + step) / (10 + step)).
  config.sharding = 'replicated'      # Train state layout over the devices: 'replicated', or 'fsdp' (each large parameter/optimiser array split over all devices; for models too big for one device).
  config.on_nonfinite_loss = 'stop'   # A NaN/inf loss: 'stop' with an error naming the step, or 'skip' that update.
  config.cpu_devices = 0               # run.py on a CPU-only host: JAX devices the cores form (data-parallel, a thread each); 0 = one per core that divides the batches, 1 = one.
  config.compilation_cache_dir = '~/.cache/jaxseg/xla'  # Where compiled XLA programs are kept across runs (resume, eval, predict); '' disables; ~, $VARS expanded.

  return config
