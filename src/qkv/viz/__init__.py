"""Pictures people would rather see than read: attention maps and loss curves."""

from qkv.viz.attention import attention_maps, plot_attention
from qkv.viz.loss_curve import plot_loss_curve

__all__ = ["attention_maps", "plot_attention", "plot_loss_curve"]
