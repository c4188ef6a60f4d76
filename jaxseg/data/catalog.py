"""Presets for segmentation datasets in the tfds catalog.

`PRESETS` holds, per dataset, the fields of its preset as plain data;
`jaxseg.data.datasets` builds its registry from them. A preset only says how to
read a catalog dataset: which features hold the image and the mask, how mask
values become class indices, and which splits to use. The data itself comes
from tfds: prepare it once with `tfds build NAME --data_dir=DIR` (or let
jaxseg prepare it on first use, which needs the network).

oxford_iiit_pet
  Oxford-IIIT Pet, 7349 photos of cats and dogs with trimaps
  (`segmentation_mask`: 1 = pet, 2 = background, 3 = border/unclassified).
  Three classes, mask value v -> class v - 1. Splits: 'train' (3680, the
  official trainval list) and 'test' (3669); there is no validation split.

scene_parse150
  Images of the MIT Scene Parsing benchmark (ADE20K: 20210 train, 2000
  validation, exposed by tfds as 'train' and 'test'). Beware: the tfds builder
  (4.9.x, version 1.0.0) downloads the Places Challenge 2017
  `annotations_instance.tar`, not the benchmark's semantic masks
  (ADEChallengeData2016). Its `annotation` is an RGB png whose red channel is
  one of the 100 instance-segmentation categories (1 = bed, 2 = windowpane,
  ..., 100 = flag; see `SCENE_PARSE150_CLASS_NAMES`) and whose green channel
  is an instance id. Everything else -- the stuff classes (wall, sky, floor,
  ...), the other objects and unlabelled pixels -- is 0. So this preset is 100
  classes of objects: red value v -> class v - 1, and 0 is ignored. It is NOT
  the 150-class ADE20K benchmark, and its scores do not compare with
  published ADE20K mean IoU.
"""

# Oxford-IIIT Pet trimap values 1, 2, 3 in order.
OXFORD_IIIT_PET_CLASS_NAMES = ('pet', 'background', 'border')

# The 100 categories of the Places Challenge 2017 instance masks: index i is
# red value i + 1, as in CSAILVision/placeschallenge
# instancesegmentation/instanceInfo100_train.txt.
SCENE_PARSE150_CLASS_NAMES = (
    'bed', 'windowpane', 'cabinet', 'person', 'door', 'table', 'curtain', 'chair', 'car', 'painting',
    'sofa', 'shelf', 'mirror', 'armchair', 'seat', 'fence', 'desk', 'wardrobe', 'lamp', 'bathtub',
    'railing', 'cushion', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sink', 'fireplace',
    'refrigerator', 'stairs', 'case', 'pool table', 'pillow', 'screen door', 'bookcase', 'coffee table',
    'toilet', 'flower', 'book', 'bench', 'countertop', 'stove', 'palm', 'kitchen island', 'computer',
    'swivel chair', 'boat', 'arcade machine', 'bus', 'towel', 'light', 'truck', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'apparel', 'pole', 'bannister', 'ottoman',
    'bottle', 'van', 'ship', 'fountain', 'washer', 'plaything', 'stool', 'barrel', 'basket', 'bag',
    'minibike', 'oven', 'ball', 'food', 'step', 'trade name', 'microwave', 'pot', 'animal', 'bicycle',
    'dishwasher', 'screen', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'plate', 'monitor', 'bulletin board', 'radiator', 'glass', 'clock', 'flag',
)

# Preset fields per tfds dataset name (see `jaxseg.data.datasets.DatasetSpec`). They set no `open_builder`:
# jaxseg.data.datasets opens them as any tfds dataset, with tfds.builder(name).
PRESETS = {
    'oxford_iiit_pet': dict(
        num_classes=3,
        class_names=OXFORD_IIIT_PET_CLASS_NAMES,
        image_key='image',
        label_key='segmentation_mask',
        label_offset=-1,  # Trimap values 1..3 -> classes 0..2.
        ignore_values=(0,),  # Never in the trimaps; ignored rather than wrapped to -1.
        train_split='train',
        eval_split='test',  # No validation split: evaluate on the official test list.
    ),
    'scene_parse150': dict(
        num_classes=len(SCENE_PARSE150_CLASS_NAMES),
        class_names=SCENE_PARSE150_CLASS_NAMES,
        image_key='image',
        label_key='annotation',  # RGB png; the pipeline reads its first (red) channel: the category id.
        label_offset=-1,  # Category ids 1..100 -> classes 0..99.
        ignore_values=(0,),  # Stuff, other objects and unlabelled pixels.
        train_split='train',
        eval_split='test',  # tfds's 'test' holds the 2000 ADE20K validation images.
    ),
}


# The ADE20K benchmark's 150 classes (ADEChallengeData2016, objectInfo150.csv), in order: mask value v is class v - 1
# (0 is 'other', ignored). tools/ade20k_folder.py writes that benchmark as a folder dataset; the SegFormer and ViT
# recipes name its classes with this.
ADE20K_CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock',
    'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers',
    'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway',
    'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island',
    'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower',
    'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel',
    'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship',
    'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name',
    'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce',
    'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board',
    'shower', 'radiator', 'glass', 'clock', 'flag')
