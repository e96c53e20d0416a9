"""Pictures people would rather see than read: attention maps (and, in training, loss curves)."""

from qkv.viz.attention import attention_maps, plot_attention

__all__ = ["attention_maps", "plot_attention"]
