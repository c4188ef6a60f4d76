"""Decoders: name -> the Flax module that turns an encoder's maps (by stride) into a map the head classifies.

The contract is base.py; a new decoder is one module here and one line below.
"""

from jaxseg.models.decoders.base import Decoder  # noqa: F401
from jaxseg.models.decoders.deeplabv3plus import DeepLabV3PlusDecoder
from jaxseg.models.decoders.dpt import DPTDecoder
from jaxseg.models.decoders.fcn import FCNDecoder
from jaxseg.models.decoders.fpn import FPNDecoder
from jaxseg.models.decoders.linear import LinearDecoder
from jaxseg.models.decoders.segformer import SegFormerDecoder
from jaxseg.models.decoders.unet import UNetDecoder
from jaxseg.models.decoders.upernet import UPerNetDecoder

DECODERS: dict[str, type[Decoder]] = {
    'unet': UNetDecoder,
    'fpn': FPNDecoder,
    'upernet': UPerNetDecoder,
    'deeplabv3plus': DeepLabV3PlusDecoder,
    'fcn': FCNDecoder,
    'segformer': SegFormerDecoder,
    'dpt': DPTDecoder,
    'linear': LinearDecoder,
}
