"""Image and mask files in and out: the one place jaxseg reads and writes pixels on disk.

Used by folder datasets (data/folder.py), --mode=predict and jaxseg.api.
Every reader raises DataError naming the file for a missing, unreadable or
unsuitable file.
"""

import numpy as np
from PIL import Image

from jaxseg.errors import DataError

IGNORE_COLOUR = (224, 224, 192)  # The colour of the ignore label (and any index past the palette) in pictures.
# Extensions (matched lower-cased) of the image files listed in a folder dataset's images/ folders and in a
# --mode=predict input folder: the common picture formats PIL reads.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')


def open_decoded(path: str, what: str) -> Image.Image:
  """Opens and fully decodes an image file, raising DataError if it fails.

  `.load()` is what decodes the pixel data; calling it here is what catches
  truncated files (PIL's `open` only parses the header).
  """
  try:
    img = Image.open(path)
    img.load()
  except FileNotFoundError as e:
    raise DataError(f'{what} file {path} does not exist.') from e
  except Exception as e:  # pylint: disable=broad-except
    # PIL reports corruption with OSError, SyntaxError, ValueError, zlib and
    # struct errors, depending on where the file breaks.
    raise DataError(
        f'{what} file {path} is unreadable or corrupt '
        f'({type(e).__name__}: {e}).'
    ) from e
  return img


def _sixteen_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
  """Scales 16-bit (or 32-bit int) gray pixel values to uint8 by range."""
  arr = arr.astype(np.int64)
  # 16-bit PNGs load as 'I;16' or 'I'; scale 0..65535 to 0..255. Data in
  # 0..255 stored as 16-bit is unlikely enough not to special-case.
  arr = np.clip(arr, 0, 65535)
  return ((arr * 255 + 32767) // 65535).astype(np.uint8)


# The channel counts image files can carry: grayscale, RGB, and 4 bands (RGBA PNG, 4-band TIFF).
CHANNEL_COUNTS = (1, 3, 4)
_SIXTEEN_BIT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


def check_channels(channels, field: str = 'channels') -> int:
  """`channels` if it is a count image files can carry (CHANNEL_COUNTS), else ValueError naming `field`."""
  if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels not in CHANNEL_COUNTS:
    raise ValueError(f'{field} must be one of {CHANNEL_COUNTS} (1: grayscale, 3: RGB, 4: e.g. RGB + near-infrared '
                     f'as a 4-band PNG/TIFF), got {channels!r}')
  return int(channels)


def read_image(path: str, channels: int = 3) -> np.ndarray:
  """Reads an image file as a uint8 array of `channels` bands (see `pil_to_array` for the conversions).

  EXIF orientation is not applied, so the pixels stay aligned with a mask
  drawn on the stored pixel grid.

  Args:
    path: Path of a png/jpg/tif (or any PIL-readable) image.
    channels: 1, 3 or 4 (config.model.in_channels).

  Returns:
    Array of shape (height, width, channels) and dtype uint8.

  Raises:
    DataError: The file is missing, unreadable or corrupt, or its bands
      cannot become `channels`; names the file.
  """
  return pil_to_array(open_decoded(path, 'Image'), channels, f'Image file {path}')


def pil_to_array(img: Image.Image, channels: int = 3, source: str = 'The image') -> np.ndarray:
  """A PIL image as uint8 [H, W, channels], the one conversion files and PIL images go through.

  channels=3 (RGB): grayscale, gray+alpha, RGBA, palette, CMYK and 16-bit
  images are converted to RGB; alpha is dropped (not composited).
  channels=1 (grayscale): single-band images are taken as they are (16-bit
  ones scaled to 0-255); colour ones are converted to luminance as PIL's
  `convert('L')` does (L = 0.299 R + 0.587 G + 0.114 B; alpha dropped).
  channels=4: the image must have 4 bands (an RGBA png, or a 4-band tif:
  RGBA or CMYK); the 4th band is data (e.g. near-infrared), not
  transparency, and is read as stored. No band is invented for fewer.

  Args:
    img: A decoded PIL image.
    channels: 1, 3 or 4.
    source: How error messages name the image (e.g. 'Image file PATH').

  Raises:
    DataError: The image's bands cannot become `channels`; names `source`,
      its mode and bands.
  """
  channels = check_channels(channels)
  want = {1: 'grayscale (1 band)', 3: 'RGB (3 bands)', 4: '4 bands'}[channels]
  if img.mode == 'F':
    raise DataError(f'{source} has floating-point pixels (mode F); save it as an 8-bit png/jpg/tif ({want}).')
  if img.mode in _SIXTEEN_BIT_MODES and channels != 4:
    gray = _sixteen_bit_to_uint8(np.asarray(img))[..., None]
    return np.ascontiguousarray(np.repeat(gray, channels, axis=-1))
  if channels == 4:
    # Only images that hold 4 bands: inventing one (an opaque alpha) would feed the model a constant.
    bands = img.getbands()
    if len(bands) != 4:
      raise DataError(f'{source} has mode {img.mode} ({len(bands)} band(s): {"".join(bands)}) but '
                      'config.model.in_channels=4 needs 4 bands per pixel (an RGBA png or a 4-band tif).')
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
  target = 'L' if channels == 1 else 'RGB'
  if img.mode != target:
    try:
      img = img.convert(target)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{source} has mode {img.mode}, which cannot be converted to {target}, {want}, for '
                      f'config.model.in_channels={channels} ({e}).') from e
  return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels))


def read_mask(path: str) -> np.ndarray:
  """Reads a segmentation mask as a 2-D uint8 array of class indices.

  Palette ("P") masks are read as their palette indices, not their colours;
  grayscale ("L") masks as their values. A mask whose three colour channels
  are identical is read as its first channel; an RGB colour mask (differing
  channels) is an error, since masks must hold class indices.

  Args:
    path: Path of the mask (a png for folder datasets).

  Returns:
    Array of shape (height, width) and dtype uint8.

  Raises:
    DataError: The file is missing, corrupt, a colour mask, or holds values
      outside 0..255; the message names the file.
  """
  img = open_decoded(path, 'Mask')
  mode = img.mode
  if mode in ('P', 'L', '1'):
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
  if mode in ('PA', 'LA'):
    # The alpha channel carries no class information.
    return np.ascontiguousarray(np.asarray(img)[..., 0].astype(np.uint8))
  if mode in _SIXTEEN_BIT_MODES:
    arr = np.asarray(img).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      bad = np.unique(arr[(arr < 0) | (arr > 255)])[:10].tolist()
      raise DataError(
          f'Mask file {path} is a {mode} image with values {bad} outside '
          '0..255; mask pixels must be class indices (255 = ignore).'
      )
    return np.ascontiguousarray(arr.astype(np.uint8))
  if mode in ('RGB', 'RGBA'):
    arr = np.asarray(img)[..., :3]
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(
        arr[..., 0], arr[..., 2]
    ):
      return np.ascontiguousarray(arr[..., 0].astype(np.uint8))
    raise DataError(
        f'Mask file {path} is an {mode} colour image with differing '
        'channels. Masks must hold class indices: one value per pixel '
        '(0..num_classes-1, 255 = ignore), saved as a single-channel (L) or '
        'palette (P) png. Convert colour-coded masks to index masks first.'
    )
  raise DataError(
      f'Mask file {path} has unsupported mode {mode}; save it as a '
      'single-channel (L) or palette (P) png of class indices.'
  )


def to_uint8(image, channels: int = 3) -> np.ndarray:
  """An image array as uint8 [H, W, channels], the way read_image reads files.

  channels=3: grey [H, W] / [H, W, 1] is repeated to RGB, RGBA loses its
  alpha. channels=1: [H, W] or [H, W, 1] only (colour arrays are not guessed
  into luminance; convert them first). channels=4: [H, W, 4] only.
  Floats in [0, 1] are taken as 0-1 intensities (scaled by 255); other
  values are rounded and clipped to 0..255.

  Raises:
    ValueError: the array's shape cannot become `channels` bands.
  """
  channels = check_channels(channels)
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  accepted = {1: (1,), 3: (1, 3, 4), 4: (4,)}[channels]
  if image.ndim != 3 or image.shape[-1] not in accepted:
    shapes = (['[H, W]'] if 1 in accepted else []) + [f'[H, W, {c}]' for c in accepted]
    raise ValueError(f'expected an image of shape {" or ".join(shapes)} for a model of {channels} input '
                     f'channel(s), got shape {image.shape}')
  if image.shape[-1] == 1 and channels == 3:
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :channels]
  if image.dtype != np.uint8:
    if np.issubdtype(image.dtype, np.floating) and image.size and float(np.nanmax(image)) <= 1.0:
      image = image * 255.0
    image = np.clip(np.round(np.nan_to_num(image)), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(image)


def to_rgb_uint8(image) -> np.ndarray:
  """Any grey [H, W] / [H, W, 1], RGB or RGBA (alpha dropped) array -> uint8 RGB [H, W, 3] (to_uint8, 3)."""
  return to_uint8(image, 3)


def mask_to_png(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
  """A class-index mask as a palette ('P') PNG image: pixel values are class indices, viewers show colours."""
  mask = np.asarray(mask)
  if mask.size and (mask.min() < 0 or mask.max() > 255):
    raise ValueError('class indices must be in [0, 255] to be stored as a PNG')
  img = Image.fromarray(mask.astype(np.uint8))
  table = np.tile(np.asarray(IGNORE_COLOUR, np.uint8), (256, 1))
  table[:len(palette)] = np.asarray(palette, np.uint8)[:256]
  img.putpalette(table.reshape(-1).tolist())
  return img
