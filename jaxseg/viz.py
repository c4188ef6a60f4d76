"""Pictures: colour palettes, coloured masks, overlays, side-by-side panels and confusion-matrix images.

Everything here is numpy + PIL (no matplotlib), works on the host and returns
uint8 RGB arrays [H, W, 3], ready for PNG files, TensorBoard or `plt.imshow`.
"""

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxseg.image_io import IGNORE_COLOUR, to_rgb_uint8

# Colour of pixels whose label is the ignore label (or not a class at all): the
# Pascal VOC "void" cream, so they stand out from every class colour.

# Fixed palettes for well-known datasets, one RGB triple per class in class order.
FIXED_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    # background, disc, square, triangle.
    'jaxseg_shapes': ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200)),
    # pet, background, border (the trimap's uncertain band).
    'oxford_iiit_pet': ((220, 20, 60), (0, 0, 0), (255, 215, 0)),
}


def voc_palette(num_classes: int) -> np.ndarray:
  """The Pascal VOC palette generator (bit-interleaved class index): [K, 3] uint8; class 0 is black.

  Distinct, stable colours for any number of classes up to 256.
  """
  palette = np.zeros((num_classes, 3), np.uint8)
  for k in range(num_classes):
    c, r, g, b = k, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette[k] = (r, g, b)
  return palette


def palette_for(dataset_name: Optional[str], num_classes: int, multilabel: bool = False) -> np.ndarray:
  """The palette of a dataset: its fixed one when known and long enough, else the VOC generator. [K, 3] uint8.

  Multi-label classes have no background: they take VOC's colours 1..K (colour 0 is black).
  """
  if multilabel:
    return voc_palette(num_classes + 1)[1:]
  fixed = FIXED_PALETTES.get(dataset_name or '')
  if fixed is not None and len(fixed) >= num_classes:
    return np.asarray(fixed[:num_classes], np.uint8)
  return voc_palette(num_classes)


def background_classes(class_names: Sequence[str]) -> tuple[int, ...]:
  """Indices of classes named 'background' (left uncoloured in overlays so the picture shows through)."""
  return tuple(i for i, n in enumerate(class_names) if n.strip().lower() == 'background')


def colorize(mask: np.ndarray, palette: np.ndarray, *, ignore_label: int = 255) -> np.ndarray:
  """Class-index mask [H, W] -> RGB [H, W, 3] uint8; the ignore label (and any value >= K) in IGNORE_COLOUR.

  Multi-label masks [H, W, K] (0 / 1 / ignore_label): a pixel takes the mean colour of its classes, black
  with none, IGNORE_COLOUR where every class is ignored.
  """
  mask = np.asarray(mask)
  if mask.ndim == 3:
    on = mask == 1
    count = on.sum(axis=-1, keepdims=True)
    mean = on.astype(np.float32) @ np.asarray(palette, np.float32) / np.maximum(count, 1)
    out = np.where(count > 0, np.round(mean), 0.0)
    out = np.where(np.all(mask == ignore_label, axis=-1, keepdims=True), np.asarray(IGNORE_COLOUR, np.float32), out)
    return out.astype(np.uint8)
  mask = mask.astype(np.int64)
  palette = np.asarray(palette, np.uint8)
  table = np.tile(np.asarray(IGNORE_COLOUR, np.uint8), (256, 1))
  table[:len(palette)] = palette[:256]
  del ignore_label  # Values outside the palette already take the ignore colour.
  return table[np.clip(mask, 0, 255)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, *, alpha: float = 0.5,
            skip_classes: Sequence[int] = (), ignore_label: int = 255) -> np.ndarray:
  """Alpha-blends class colours over an image.

  Args:
    image: uint8 [H, W, 3].
    mask: class indices [H, W].
    palette: [K, 3] uint8.
    alpha: weight of the class colour (0: image only, 1: colours only).
    skip_classes: classes left uncoloured (e.g. background).
    ignore_label: left uncoloured too.

  Returns:
    uint8 [H, W, 3].
  """
  image = to_rgb_uint8(image)
  mask = np.asarray(mask)
  if mask.ndim == 3:
    return _overlay_multilabel(image, mask, palette, alpha)
  mask = mask.astype(np.int64)
  if image.shape[:2] != mask.shape:
    raise ValueError(f'image {image.shape[:2]} and mask {mask.shape} differ in size')
  colours = colorize(mask, palette, ignore_label=ignore_label).astype(np.float32)
  blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
  keep = (mask == ignore_label) | (mask < 0) | (mask >= len(palette))
  for k in skip_classes:
    keep |= mask == k
  out = np.where(keep[..., None], image.astype(np.float32), blended)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _overlay_multilabel(image: np.ndarray, masks: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
  """Multi-label overlay: each pixel blended with the mean colour of its classes, then every class's outline
  drawn in its own colour, so where classes overlap each one's extent stays visible."""
  if image.shape[:2] != masks.shape[:2]:
    raise ValueError(f'image {image.shape[:2]} and masks {masks.shape[:2]} differ in size')
  palette = np.asarray(palette, np.float32)
  on = masks == 1
  count = on.sum(axis=-1, keepdims=True)
  mean = on.astype(np.float32) @ palette / np.maximum(count, 1)
  out = np.where(count > 0, (1.0 - alpha) * image.astype(np.float32) + alpha * mean, image.astype(np.float32))
  padded = np.pad(on, ((1, 1), (1, 1), (0, 0)))
  inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
  for k in range(masks.shape[-1]):
    out[on[..., k] & ~inner[..., k]] = palette[k]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def side_by_side(images: Sequence[np.ndarray], *, gap: int = 2, gap_colour=(255, 255, 255)) -> np.ndarray:
  """RGB images left to right with a gap between them; shorter ones are padded at the bottom. uint8 [H, W', 3]."""
  images = [to_rgb_uint8(im) for im in images]
  height = max(im.shape[0] for im in images)
  parts = []
  for i, im in enumerate(images):
    if im.shape[0] < height:
      pad = np.empty((height - im.shape[0], im.shape[1], 3), np.uint8)
      pad[:] = gap_colour
      im = np.concatenate([im, pad], axis=0)
    if i:
      sep = np.empty((height, gap, 3), np.uint8)
      sep[:] = gap_colour
      parts.append(sep)
    parts.append(im)
  return np.concatenate(parts, axis=1)


def comparison_panel(image: np.ndarray, label: Optional[np.ndarray], pred: np.ndarray, palette: np.ndarray, *,
                     ignore_label: int = 255) -> np.ndarray:
  """image | ground truth | prediction (masks coloured by `palette`; without a label: image | prediction)."""
  parts = [image]
  if label is not None:
    parts.append(colorize(label, palette, ignore_label=ignore_label))
  parts.append(colorize(pred, palette, ignore_label=ignore_label))
  return side_by_side(parts)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: one fixed-size bitmap font.
    return ImageFont.load_default()


def _heat_colour(v: np.ndarray) -> np.ndarray:
  """[0, 1] -> a white-to-dark-blue ramp, uint8 [..., 3] (readable when printed in grey too)."""
  v = np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0)[..., None]
  low = np.asarray([255, 255, 255], np.float32)
  high = np.asarray([8, 48, 107], np.float32)
  return np.round(low + (high - low) * v).astype(np.uint8)


def confusion_matrix_image(confusion: np.ndarray, class_names: Optional[Sequence[str]] = None, *,
                           max_size: int = 640) -> np.ndarray:
  """A row-normalised confusion matrix as a heat map: uint8 [H, W, 3].

  Rows are ground truth, columns predictions; each cell's shade is the fraction
  of the row's pixels (so the diagonal is per-class accuracy). Rows are labelled
  `index name`, columns by index; percentages are printed in the cells when
  they are large enough to read. Rows without pixels stay white.
  """
  cm = np.asarray(confusion, np.float64)
  k = cm.shape[0]
  names = list(class_names) if class_names is not None else [f'class_{i}' for i in range(k)]
  rows = cm.sum(axis=1, keepdims=True)
  norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  cell = int(np.clip(max_size // max(k, 1), 4, 48))
  font_size = int(np.clip(cell * 0.4, 8, 14))
  font = _font(font_size)
  labels = [f'{i} {n}' for i, n in enumerate(names)]
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength
  title = 'rows: ground truth, columns: prediction (% of row)'
  label_w = 0
  if cell >= 8:
    label_w = max(int(measure(s, font=font)) for s in labels) + 8
  top = font_size + 6 if cell >= 8 else 0
  title_h = font_size + 6
  grid = np.repeat(np.repeat(_heat_colour(norm), cell, axis=0), cell, axis=1)
  width = max(label_w + k * cell + 1, int(measure(title, font=font)) + 4)
  canvas = Image.new('RGB', (width, title_h + top + k * cell + 1), (255, 255, 255))
  canvas.paste(Image.fromarray(grid), (label_w, title_h + top))
  draw = ImageDraw.Draw(canvas)
  draw.text((2, 2), title, fill=(0, 0, 0), font=font)
  if cell >= 8:
    for i, s in enumerate(labels):
      y = title_h + top + i * cell + (cell - font_size) // 2
      draw.text((2, y), s, fill=(0, 0, 0), font=font)
      draw.text((label_w + i * cell + 2, title_h + 2), str(i), fill=(0, 0, 0), font=font)
  if cell >= 28:
    for i in range(k):
      for j in range(k):
        if rows[i, 0] > 0:
          colour = (255, 255, 255) if norm[i, j] > 0.5 else (0, 0, 0)
          draw.text((label_w + j * cell + 2, title_h + top + i * cell + (cell - font_size) // 2),
                    f'{100 * norm[i, j]:.0f}', fill=colour, font=font)
  return np.asarray(canvas)


