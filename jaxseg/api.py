"""The Python API: a trained model as a function from images to masks.

  from jaxseg.api import Segmenter
  seg = Segmenter.from_workdir('workdirs/unet')      # best checkpoint
  mask = seg(image)                                   # uint8 [H, W, C] -> int32 [H, W]
  picture = seg.overlay(image, mask)                  # uint8 [H, W, 3]

A multi-label model (config.task='multilabel') gives K masks: `seg(image)` is
int32 [H, W, K] of 0 and 1 (class k where its sigmoid exceeds 0.5), and
`probabilities` the K sigmoids.

C is the model's config.model.in_channels (3: RGB; 1: grayscale; 4: e.g.
RGB + near-infrared); files and PIL images are read with that many bands, as
folder datasets read them (jaxseg.image_io.pil_to_array).

Inference settings (sliding window, TTA) come from the training config's
`inference` section and can be changed per Segmenter:
`Segmenter.from_workdir(workdir, flip=True, scales=(0.75, 1.0, 1.25))`.
"""

import os
from typing import Optional, Sequence, Union

import ml_collections
import numpy as np
from PIL import Image

from jaxseg import image_io
from jaxseg import inference
from jaxseg import startup
from jaxseg import viz

ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike]


def _read(image: ImageLike, channels: int) -> np.ndarray:
  """A file, PIL image or array as uint8 [H, W, channels], the model's input."""
  if isinstance(image, (str, os.PathLike)):
    return image_io.read_image(os.fspath(image), channels)
  if isinstance(image, Image.Image):
    return image_io.pil_to_array(image, channels)
  return image_io.to_uint8(image, channels)


class Segmenter:
  """A restored model with its class names and palette. Build it with `from_workdir` or `from_config`.

  Attributes:
    channels: the bands per pixel the model takes (config.model.in_channels).
    class_names: one name per class index.
    palette: uint8 [K, 3] colours used by `colorize` and `overlay`.
    step: the training step of the restored checkpoint.
    predictor: the underlying inference.Predictor.
  """

  def __init__(self, predictor: inference.Predictor, spec, step: int, config: ml_collections.ConfigDict):
    self.predictor = predictor
    self.spec = spec
    self.step = step
    self.config = config
    self.class_names = tuple(spec.class_names)
    self.num_classes = spec.num_classes
    self.channels = predictor.channels
    self.multilabel = spec.multilabel
    self.palette = viz.palette_for(spec.name, spec.num_classes, spec.multilabel)

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: str = 'best', **inference_options) -> 'Segmenter':
    """Restores the best (or 'latest') checkpoint of a training run, with the config it saved.

    Args:
      workdir: the training run's workdir (holds config.json and checkpoints/).
      checkpoint: 'best' (by validation mean IoU) or 'latest'.
      **inference_options: overrides of config.inference: mode, window, stride,
        flip, scales, batch_size, size_multiple.
    """
    return cls.from_config(startup.load_config(workdir), workdir, checkpoint=checkpoint, **inference_options)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str, checkpoint: str = 'best',
                  **inference_options) -> 'Segmenter':
    """Like from_workdir, with a config of your own (its model must be the one trained in `workdir`)."""
    predictor, spec, step = inference.load_predictor(config, os.path.expanduser(os.fspath(workdir)),
                                                     checkpoint=checkpoint, **inference_options)
    return cls(predictor, spec, step, config)

  def with_options(self, **inference_options) -> 'Segmenter':
    """The same model with other inference settings (e.g. flip=True); nothing is restored again."""
    return Segmenter(self.predictor.with_options(**inference_options), self.spec, self.step, self.config)

  def __call__(self, image: ImageLike) -> np.ndarray:
    """Segments one image (uint8 [H, W, C] array, PIL image or file path): int32 class indices [H, W]
    (multi-label: int32 [H, W, K] of 0 and 1)."""
    return self.predictor.predict(_read(image, self.channels)).astype(np.int32)

  def predict(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
    """Segments several images (any sizes), batching them together: int32 masks [H, W] ([H, W, K]) in order."""
    return [m.astype(np.int32) for m in self.predictor.iter_masks(_read(i, self.channels) for i in images)]

  def probabilities(self, image: ImageLike) -> np.ndarray:
    """Class probabilities float32 [H, W, K] (softmax of the logits; the mean over TTA views). Multi-label: each
    class's sigmoid (the mean over TTA views)."""
    scores = self.predictor.scores(_read(image, self.channels))
    if self.multilabel:
      return inference.sigmoid(scores).astype(np.float32)
    return scores if self.predictor.options.uses_tta else inference.softmax(scores)

  def colorize(self, mask: np.ndarray) -> np.ndarray:
    """A mask in the dataset's colours: uint8 [H, W, 3]."""
    return viz.colorize(mask, self.palette, ignore_label=self.spec.ignore_label)

  def overlay(self, image: ImageLike, mask: Optional[np.ndarray] = None, *, alpha: float = 0.5) -> np.ndarray:
    """The image with its classes coloured over it (background left as is): uint8 [H, W, 3].

    Without `mask`, the image is segmented first. A grayscale image is drawn
    in grey, a 4-band one by its first three bands.
    """
    image = _read(image, self.channels)
    if mask is None:
      mask = self(image)
    return viz.overlay(image, mask, self.palette, alpha=alpha, skip_classes=viz.background_classes(self.class_names),
                       ignore_label=self.spec.ignore_label)

  def legend(self) -> list[tuple[str, tuple[int, int, int]]]:
    """(class name, RGB colour) per class, e.g. for a plot legend."""
    return [(n, tuple(int(c) for c in self.palette[i])) for i, n in enumerate(self.class_names)]
