"""--mode=predict: segments image files with a trained model; writes masks and overlays.

Files in (an image, a folder or a glob), `inference.load_predictor` for the model, palette PNG masks and
overlays out. Files are read with the model's channel count (config.model.in_channels, as folder datasets read
them: jaxseg.image_io.read_image); overlays draw a grayscale image in grey and a 4-band one by its first three
bands. Training never imports this module.
"""

import collections
import glob
import logging
import os
import sys
from typing import Optional, Sequence

import jax
from PIL import Image

from jaxseg import image_io
from jaxseg import inference
from jaxseg import viz
from jaxseg.errors import ConfigError, DataError

log = logging.getLogger('jaxseg')


def list_inputs(path: str) -> list[str]:
  """An image file, a folder (its image files, not recursive) or a glob -> sorted file paths."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if not n.startswith('.')
                   and os.path.isfile(os.path.join(path, n)) and n.lower().endswith(image_io.IMAGE_EXTENSIONS))
    files = [os.path.join(path, n) for n in names]
    if not files:
      raise DataError(f'--input folder {path} holds no images ({", ".join(image_io.IMAGE_EXTENSIONS)})')
    return files
  files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
  if not files:
    what = 'pattern matches no file' if glob.has_magic(path) else 'does not exist'
    raise DataError(f'--input {path} {what}')
  return files


def output_names(paths: Sequence[str]) -> dict[str, str]:
  """path -> output stem: the file stem, or stem_ext where two inputs share a stem (a.png, a.jpg)."""
  stems = collections.Counter(os.path.splitext(os.path.basename(p))[0] for p in paths)
  names = {}
  for p in paths:
    stem, ext = os.path.splitext(os.path.basename(p))
    names[p] = stem if stems[stem] == 1 else f'{stem}_{ext.lstrip(".").lower()}'
  return names


def _size_or_none(path: str) -> Optional[tuple[int, int]]:
  """(height, width) from the file header (cheap), or None when it cannot be opened."""
  try:
    with Image.open(path) as img:
      return img.size[1], img.size[0]
  except Exception:  # pylint: disable=broad-except  # Reported when the file is decoded.
    return None


def predict(config, workdir: str, input_path: str, output_dir: Optional[str] = None, *,
            checkpoint: str = 'best', alpha: float = 0.5) -> dict:
  """--mode=predict: segments every image of `input_path`; writes DIR/<stem>.png and DIR/<stem>_overlay.png.

  Masks are palette PNGs whose pixel values are class indices, at each
  input's own size. Multi-label: one mask per class, DIR/<class name>/<stem>.png of 0 and 1 (the layout of a
  multi-label folder's masks), and the overlay outlines every class, so overlaps show. Images are ordered by size so that equal sizes batch
  together; an unreadable file is skipped with a warning naming it. With
  several processes each one handles every process_count-th file.

  Returns:
    {'written': [output mask paths], 'skipped': [input paths], 'step': checkpoint step}.
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  output_dir = os.path.abspath(output_dir or os.path.join(workdir, 'predictions'))
  paths = list_inputs(input_path)
  names = output_names(paths)
  predictor, spec, step = inference.load_predictor(config, workdir, checkpoint=checkpoint)
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--output {output_dir} cannot be created: {e.strerror or e}') from None
  palette = viz.palette_for(spec.name, spec.num_classes, spec.multilabel)
  skip = viz.background_classes(spec.class_names)
  if spec.multilabel:
    for name in spec.class_names:
      os.makedirs(os.path.join(output_dir, name), exist_ok=True)
  is_primary = jax.process_index() == 0
  if is_primary:
    log.info('Predicting %d image(s) with the %s checkpoint (step %d), %s; writing to %s', len(paths), checkpoint,
             step, predictor.options.describe(), output_dir)

  skipped = []
  sizes = {}
  for p in paths:
    size = _size_or_none(p)
    if size is None:
      log.warning('Skipping %s: not a readable image.', p)
      skipped.append(p)
    else:
      sizes[p] = size
  # Equal padded sizes (rounded up to size_multiple) next to each other share batches and compiled programs.
  m = predictor.options.size_multiple
  ordered = sorted(sizes, key=lambda p: (-(-sizes[p][0] // m), -(-sizes[p][1] // m), p))
  mine = ordered[jax.process_index()::jax.process_count()]

  if not sizes:
    raise DataError(f'none of the {len(paths)} input file(s) could be read: ' + ', '.join(skipped[:5]))
  decoded = collections.deque()  # (path, image) handed to the predictor, awaiting their masks.
  written = []
  with tqdm.tqdm(total=len(mine), desc='Predicting', unit='img', file=sys.stderr, disable=not is_primary) as bar:

    def images():
      for p in mine:
        try:
          image = image_io.read_image(p, predictor.channels)
        except DataError as e:
          log.warning('Skipping %s: %s', p, e)
          skipped.append(p)
          bar.update(1)
          continue
        decoded.append((p, image))
        yield image

    for mask in predictor.iter_masks(images()):
      p, image = decoded.popleft()
      stem = os.path.join(output_dir, names[p])
      if spec.multilabel:
        for k, name in enumerate(spec.class_names):
          path = os.path.join(output_dir, name, names[p] + '.png')
          Image.fromarray(mask[..., k]).save(path)
          written.append(path)
      else:
        image_io.mask_to_png(mask, palette).save(stem + '.png')
        written.append(stem + '.png')
      Image.fromarray(viz.overlay(image, mask, palette, alpha=alpha, skip_classes=skip,
                                  ignore_label=spec.ignore_label)).save(stem + '_overlay.png')
      bar.update(1)
  if mine and not written:
    raise DataError(f'none of the {len(paths)} input file(s) could be read: ' + ', '.join(skipped[:5]))
  if is_primary:
    print(f'Wrote {len(written)} mask(s) and {len(mine) - len(skipped)} overlay(s) to {output_dir}'
          + (f'; skipped {len(skipped)} unreadable file(s): {", ".join(skipped)}' if skipped else ''), flush=True)
  return {'written': written, 'skipped': skipped, 'step': step}
