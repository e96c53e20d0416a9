"""Looking inside a model: per-head attention statistics, the logit lens, and head ablation."""

from qkv.interpret.ablation import ablate_heads, attention_modules, heads_zeroed, parse_head
from qkv.interpret.head_stats import HeadStatistics, head_statistics
from qkv.interpret.logit_lens import LogitLens, lens_of_hidden_states, logit_lens

__all__ = [
    "HeadStatistics",
    "LogitLens",
    "ablate_heads",
    "attention_modules",
    "head_statistics",
    "heads_zeroed",
    "lens_of_hidden_states",
    "logit_lens",
    "parse_head",
]
