"""Necks: name -> the Flax module between an encoder and a decoder (a ViT's blocks reassembled into a pyramid).

The contract is base.py; a new neck is one module here and one line below.
"""

from jaxseg.models.necks.base import Neck  # noqa: F401
from jaxseg.models.necks.reassemble import ReassembleNeck

NECKS: dict[str, type[Neck]] = {
    'reassemble': ReassembleNeck,
}
