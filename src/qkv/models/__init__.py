"""Model families built from `qkv.nn` parts."""

from qkv.models.decoder import DecoderLM
from qkv.models.output import ModelOutput

__all__ = ["DecoderLM", "ModelOutput"]
