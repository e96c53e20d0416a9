"""Pictures people would rather see than read: attention maps, the attention explorer, loss curves."""

from qkv.viz.attention import attention_maps, plot_attention
from qkv.viz.explorer import write_attention_explorer
from qkv.viz.loss_curve import plot_loss_curve
from qkv.viz.rollout import attention_rollout, plot_image_attention

__all__ = [
    "attention_maps",
    "attention_rollout",
    "plot_attention",
    "plot_image_attention",
    "plot_loss_curve",
    "write_attention_explorer",
]
