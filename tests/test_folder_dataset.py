"""Tests for jaxseg.data.folder: user image folders as a tfds dataset."""

import logging
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxseg import image_io
from jaxseg.data import folder
from jaxseg.errors import DataError

H, W = 20, 24
NUM_CLASSES = 3


def _rng(seed):
  return np.random.default_rng(seed)


def _mask_values(seed):
  """A mask using every class plus some 255 (ignore) pixels."""
  m = _rng(seed).integers(0, NUM_CLASSES, size=(H, W)).astype(np.uint8)
  m[0, :3] = 255
  return m


def _palette_image(indices):
  img = Image.fromarray(indices, mode='P')
  # Colours unrelated to the indices, so reading colours would be caught.
  palette = [0, 0, 0, 200, 10, 10, 10, 200, 10] + [7, 7, 7] * 253
  img.putpalette(palette)
  return img


def make_folder(root, *, val_count=2):
  """Writes a small valid folder dataset; returns {rel image path: arrays}.

  Train holds an RGB png, a grayscale png, an RGBA png, a palette png, a jpg
  (upper-case extension) and one image whose mask is a palette png.
  """
  expected = {}
  for split in ('train', 'val'):
    (root / split / 'images').mkdir(parents=True)
    (root / split / 'masks').mkdir(parents=True)

  def add(split, name, img, mask_img, mask, rgb):
    img.save(root / split / 'images' / name)
    stem = os.path.splitext(name)[0]
    mask_img.save(root / split / 'masks' / (stem + '.png'))
    if rgb is None:  # A JPEG is lossy: what PIL decodes from the written file is what must be stored.
      with Image.open(root / split / 'images' / name) as written:
        rgb = np.asarray(written.convert('RGB'))
    expected[f'{split}/images/{name}'] = (rgb, mask)

  rgb = _rng(1).integers(0, 256, size=(H, W, 3)).astype(np.uint8)
  m = _mask_values(1)
  add('train', 'rgb.png', Image.fromarray(rgb), Image.fromarray(m), m, rgb)

  gray = _rng(2).integers(0, 256, size=(H, W)).astype(np.uint8)
  m = _mask_values(2)
  add('train', 'gray.png', Image.fromarray(gray, mode='L'),
      Image.fromarray(m, mode='L'), m, np.stack([gray] * 3, axis=-1))

  rgba = _rng(3).integers(0, 256, size=(H, W, 4)).astype(np.uint8)
  m = _mask_values(3)
  add('train', 'rgba.png', Image.fromarray(rgba, mode='RGBA'),
      Image.fromarray(m), m, rgba[..., :3])

  idx = _rng(4).integers(0, 3, size=(H, W)).astype(np.uint8)
  pal_img = _palette_image(idx)
  m = _mask_values(4)
  add('train', 'pal.png', pal_img, Image.fromarray(m), m,
      np.asarray(pal_img.convert('RGB')))

  # Lossy jpg: only shape and dtype are checked for it.
  m = _mask_values(5)
  add('train', 'photo.JPG', Image.fromarray(rgb), Image.fromarray(m), m, None)

  # A palette mask must be read as its indices, not its colours.
  m = _mask_values(6)
  m[m == 255] = 0  # Keep indices within the palette built below.
  add('train', 'palmask.png', Image.fromarray(rgb), _palette_image(m), m, rgb)

  for i in range(val_count):
    v = _rng(10 + i).integers(0, 256, size=(H, W, 3)).astype(np.uint8)
    m = _mask_values(10 + i)
    add('val', f'v{i}.jpeg', Image.fromarray(v), Image.fromarray(m), m, None)
  return expected


def load_split(builder, split):
  return {
      ex['file_name'].decode(): ex for ex in builder.as_data_source(split)
  }


def assert_nothing_prepared(data_dir):
  """Nothing at all (no dataset, no incomplete dir) is left in data_dir."""
  if data_dir.exists():
    assert sorted(data_dir.rglob('*')) == []


def prepare(root, data_dir, **kwargs):
  kwargs.setdefault('num_classes', NUM_CLASSES)
  return folder.prepare_folder_dataset(
      str(root), data_dir=str(data_dir), **kwargs
  )


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  base = tmp_path_factory.mktemp('prepared')
  expected = make_folder(base / 'ds')
  builder = prepare(base / 'ds', base / 'tfds')
  return base, expected, builder


# --- happy path -------------------------------------------------------------


def test_prepares_and_loads(prepared):
  _, expected, builder = prepared
  assert builder.name == 'jaxseg_folder'
  assert builder.is_prepared()
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert builder.info.splits['train'].num_examples == 6
  assert builder.info.splits['validation'].num_examples == 2
  got = {**load_split(builder, 'train'), **load_split(builder, 'validation')}
  assert set(got) == set(expected)
  for name, (rgb, mask) in expected.items():
    ex = got[name]
    assert ex['image'].shape == (H, W, 3) and ex['image'].dtype == np.uint8
    assert ex['segmentation_mask'].shape == (H, W, 1)
    assert ex['segmentation_mask'].dtype == np.uint8
    # Masks are stored losslessly, 255 (ignore) included.
    np.testing.assert_array_equal(ex['segmentation_mask'][..., 0], mask)
    np.testing.assert_array_equal(ex['image'], rgb)  # gray/RGBA/palette became RGB; a JPEG as PIL decodes it.
  assert 255 in got['train/images/rgb.png']['segmentation_mask']


def test_features_and_split_names(prepared):
  _, _, builder = prepared
  features = builder.info.features
  assert set(features.keys()) == {'image', 'segmentation_mask', 'file_name'}
  assert features['image'].shape == (None, None, 3)
  assert features['segmentation_mask'].shape == (None, None, 1)
  assert features['image'].encoding_format == 'png'
  assert features['segmentation_mask'].encoding_format == 'png'
  assert set(builder.info.splits.keys()) == {'train', 'validation'}
  assert builder.builder_config.name == folder.folder_fingerprint(
      builder.builder_config.path, NUM_CLASSES, 255
  )


def test_second_call_reuses_prepared_data(prepared, monkeypatch):
  base, _, builder = prepared
  marker = os.path.join(builder.data_dir, 'dataset_info.json')
  mtime = os.stat(marker).st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError('must not validate or regenerate a prepared folder')

  monkeypatch.setattr(folder, 'validate_folder', fail)
  monkeypatch.setattr(folder.JaxsegFolder, '_generate_examples', fail)
  again = prepare(base / 'ds', base / 'tfds')
  assert again.data_dir == builder.data_dir
  assert again.is_prepared()
  assert os.stat(marker).st_mtime_ns == mtime
  # A fresh builder with the same fingerprint sees the prepared data too.
  fresh = folder.JaxsegFolder(
      config=builder.builder_config, data_dir=str(base / 'tfds')
  )
  assert fresh.is_prepared()
  assert fresh.info.splits['train'].num_examples == 6


def test_changed_contents_are_prepared_again(tmp_path):
  root, data_dir = tmp_path / 'ds', tmp_path / 'tfds'
  make_folder(root, val_count=1)
  first = prepare(root, data_dir)
  new_mask = np.full((H, W), 2, np.uint8)
  Image.fromarray(new_mask).save(root / 'val' / 'masks' / 'v0.png')
  second = prepare(root, data_dir)
  assert second.builder_config.name != first.builder_config.name
  assert second.data_dir != first.data_dir
  got = load_split(second, 'validation')
  np.testing.assert_array_equal(
      got['val/images/v0.jpeg']['segmentation_mask'][..., 0], new_mask
  )
  # Other settings are part of the fingerprint too.
  assert folder.folder_fingerprint(root, 3, 255) != folder.folder_fingerprint(
      root, 4, 255
  )


# --- readers ----------------------------------------------------------------


def test_read_mask_modes(tmp_path):
  idx = _mask_values(7)
  idx[idx == 255] = 1
  _palette_image(idx).save(tmp_path / 'p.png')
  np.testing.assert_array_equal(image_io.read_mask(str(tmp_path / 'p.png')), idx)
  Image.fromarray(np.stack([idx] * 3, -1)).save(tmp_path / 'rgb_gray.png')
  np.testing.assert_array_equal(
      image_io.read_mask(str(tmp_path / 'rgb_gray.png')), idx
  )


def test_read_image_sixteen_bit_and_la(tmp_path):
  g16 = np.full((H, W), 65535, np.uint16)
  g16[0, 0] = 0
  Image.fromarray(g16).save(tmp_path / 'g16.png')
  img = image_io.read_image(str(tmp_path / 'g16.png'))
  assert img.shape == (H, W, 3) and img.dtype == np.uint8
  assert img[0, 0].tolist() == [0, 0, 0] and img[1, 1].tolist() == [255] * 3
  la = np.zeros((H, W, 2), np.uint8)
  la[..., 0] = 9
  Image.fromarray(la, mode='LA').save(tmp_path / 'la.png')
  assert image_io.read_image(str(tmp_path / 'la.png'))[0, 0].tolist() == [9] * 3


def test_images_of_every_listed_format_are_paired(tmp_path, caplog):
  """bmp, gif, webp and tiff images (any case) pair with their masks; a file of another extension is skipped."""
  root = tmp_path / 'ds'
  make_folder(root, val_count=1)
  rgb = _rng(20).integers(0, 256, size=(H, W, 3)).astype(np.uint8)
  m = _mask_values(20)
  added = ['b.bmp', 'g.gif', 'w.webp', 't.TIFF']
  for name in added:
    Image.fromarray(rgb).save(root / 'train' / 'images' / name)
    Image.fromarray(m).save(root / 'train' / 'masks' / (os.path.splitext(name)[0] + '.png'))
  (root / 'train' / 'images' / 'notes.txt').write_text('not an image')
  with caplog.at_level(logging.WARNING):
    pairs = folder.validate_folder(str(root), num_classes=NUM_CLASSES)
  made = ['rgb.png', 'gray.png', 'rgba.png', 'pal.png', 'photo.JPG', 'palmask.png']  # By make_folder.
  assert {p.file_name for p in pairs['train']} == {f'train/images/{n}' for n in made + added}
  assert 'notes.txt' in caplog.text
  # bmp and tiff are lossless: the pixels read are those written.
  for name in ('b.bmp', 't.TIFF'):
    np.testing.assert_array_equal(image_io.read_image(str(root / 'train' / 'images' / name)), rgb)


def test_orphan_mask_is_ignored_with_warning(tmp_path, caplog):
  root = tmp_path / 'ds'
  make_folder(root, val_count=1)
  Image.fromarray(np.zeros((H, W), np.uint8)).save(
      root / 'val' / 'masks' / 'lonely.png'
  )
  with caplog.at_level(logging.WARNING):
    pairs = folder.validate_folder(str(root), num_classes=NUM_CLASSES)
  assert len(pairs['validation']) == 1
  assert 'lonely.png' in caplog.text


# --- bad input: DataError naming the file, nothing left under data_dir -----


def _expect_error(root, data_dir, *fragments, **kwargs):
  with pytest.raises(DataError) as info:
    prepare(root, data_dir, **kwargs)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message
  assert_nothing_prepared(data_dir)
  return message


def test_folder_does_not_exist(tmp_path):
  missing = tmp_path / 'nope'
  _expect_error(missing, tmp_path / 'tfds', str(missing), 'does not exist')


def test_missing_subfolder(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root)
  (root / 'val' / 'masks' / 'v0.png').unlink()
  (root / 'val' / 'masks' / 'v1.png').unlink()
  (root / 'val' / 'masks').rmdir()
  _expect_error(root, tmp_path / 'tfds', str(root / 'val' / 'masks'))


def test_empty_split(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root)
  for p in (root / 'val' / 'images').iterdir():
    p.unlink()
  _expect_error(root, tmp_path / 'tfds', str(root / 'val' / 'images'),
                'no images')


def test_corrupt_image_garbage_bytes(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root)
  bad = root / 'train' / 'images' / 'rgb.png'
  bad.write_bytes(b'this is not a png at all' * 10)
  _expect_error(root, tmp_path / 'tfds', str(bad), 'corrupt')


def test_truncated_image(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root)
  bad = root / 'train' / 'images' / 'rgb.png'
  data = bad.read_bytes()
  bad.write_bytes(data[: len(data) // 2])
  _expect_error(root, tmp_path / 'tfds', str(bad), 'corrupt')


def test_missing_mask(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root)
  (root / 'train' / 'masks' / 'gray.png').unlink()
  _expect_error(
      root, tmp_path / 'tfds',
      str(root / 'train' / 'images' / 'gray.png'),
      str(root / 'train' / 'masks' / 'gray.png'),
  )


def test_size_mismatch(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root)
  bad = root / 'val' / 'masks' / 'v1.png'
  Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(bad)
  _expect_error(root, tmp_path / 'tfds', str(bad), f'{W}x{H}', f'{W}x{H + 1}')


def test_mask_value_out_of_range(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root)
  bad = root / 'train' / 'masks' / 'rgba.png'
  m = _mask_values(3)  # Already holds 255, which is fine.
  m[5, 5] = NUM_CLASSES
  m[6, 6] = 17
  Image.fromarray(m).save(bad)
  message = _expect_error(
      root, tmp_path / 'tfds', str(bad), '[3, 17]',
      f'num_classes={NUM_CLASSES}', '255 means ignore',
  )
  assert '255,' not in message and '255]' not in message


def test_ignore_label_is_accepted(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root, val_count=1)
  all_ignore = np.full((H, W), 255, np.uint8)
  Image.fromarray(all_ignore).save(root / 'val' / 'masks' / 'v0.png')
  pairs = folder.validate_folder(str(root), num_classes=NUM_CLASSES)
  assert [p.file_name for p in pairs['validation']] == ['val/images/v0.jpeg']


def test_rgb_colour_mask(tmp_path):
  root = tmp_path / 'ds'
  make_folder(root)
  bad = root / 'train' / 'masks' / 'pal.png'
  colour = np.zeros((H, W, 3), np.uint8)
  colour[..., 0] = 1  # Channels differ.
  Image.fromarray(colour).save(bad)
  _expect_error(root, tmp_path / 'tfds', str(bad), 'class indices')


@pytest.mark.parametrize('num_classes', [1, 256])
def test_num_classes_out_of_range(tmp_path, num_classes):
  root = tmp_path / 'ds'
  make_folder(root, val_count=1)
  with pytest.raises(ValueError, match='dataset.num_classes'):
    prepare(root, tmp_path / 'tfds', num_classes=num_classes)
  assert_nothing_prepared(tmp_path / 'tfds')


def test_file_disappearing_during_generation_leaves_nothing(
    tmp_path, monkeypatch
):
  root = tmp_path / 'ds'
  make_folder(root)
  gone = root / 'val' / 'images' / 'v1.jpeg'
  validate = folder.JaxsegFolder.validate

  def validate_then_delete(self):
    pairs = validate(self)
    # Train is written first, so generation fails midway (at val).
    gone.unlink(missing_ok=True)
    return pairs

  read_image = folder.read_image
  decoded = []

  def counting_read_image(path, *args):
    decoded.append(path)
    return read_image(path, *args)

  monkeypatch.setattr(folder.JaxsegFolder, 'validate', validate_then_delete)
  monkeypatch.setattr(folder, 'read_image', counting_read_image)
  with pytest.raises(DataError, match='v1.jpeg') as info:
    prepare(root, tmp_path / 'tfds')
  assert str(gone) in str(info.value) and 'does not exist' in str(info.value)
  assert len(decoded) >= 6  # All of train was generated before the failure.
  assert_nothing_prepared(tmp_path / 'tfds')
