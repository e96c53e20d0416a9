"""Model families built from `qkv.nn` parts over one shared `TransformerStack`."""

from torch import nn

from qkv.config import ModelConfig
from qkv.models.decoder import DecoderLM, early_exit_draft
from qkv.models.encoder import Encoder
from qkv.models.output import ModelOutput
from qkv.models.seq2seq import EncoderDecoder
from qkv.models.stack import TransformerStack, set_grad_checkpointing
from qkv.models.vision import CLIP, CLIPConfig, VisionTransformer

# ModelConfig.family -> the class that builds it.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "decoder": DecoderLM,
    "encoder": Encoder,
    "seq2seq": EncoderDecoder,
    "vit": VisionTransformer,
    "clip": CLIP,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model that `cfg.family` names, randomly initialised (on the current default device)."""
    if cfg.family not in MODEL_CLASSES:
        raise ValueError(f"no model class for family {cfg.family!r} yet; built: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[cfg.family](cfg)


__all__ = [
    "CLIP",
    "MODEL_CLASSES",
    "CLIPConfig",
    "DecoderLM",
    "Encoder",
    "EncoderDecoder",
    "ModelOutput",
    "TransformerStack",
    "VisionTransformer",
    "build_model",
    "early_exit_draft",
    "set_grad_checkpointing",
]
