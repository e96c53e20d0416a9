"""Model families built from `qkv.nn` parts over one shared `TransformerStack`."""

from qkv.models.decoder import DecoderLM, early_exit_draft
from qkv.models.output import ModelOutput
from qkv.models.stack import TransformerStack

__all__ = ["DecoderLM", "ModelOutput", "TransformerStack", "early_exit_draft"]
