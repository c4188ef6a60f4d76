"""The models' input contract: uint8 RGB images in, normalised floats to the first layer.

Images travel as uint8 from the pipeline to the device (a quarter of the
bytes of float32) and are normalised inside the jitted step, the predictor
and the exported function alike.
"""

import jax.numpy as jnp

# ImageNet statistics in 0-255 units (RGB), the same values as mmsegmentation and torchvision.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def normalize_images(images: jnp.ndarray, dtype, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jnp.ndarray:
  """uint8 [.., H, W, C] -> (images - mean) / std in `dtype`, computed in float32.

  mean, std: per channel in 0-255 units (config.model.input_mean / input_std through
  jaxseg/settings.py; ImageNet's by default, the statistics most pretrained encoders expect).
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
