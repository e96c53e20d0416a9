"""Does a configuration fit the tensors a file holds? Checked from names and shapes, before building.

A config is a handful of numbers that size everything else. `build_on_meta` makes one Python
module per layer (no memory for weights, but ~1 ms each), so a config.json claiming 10^9 layers,
or a GGUF whose block_count is 2^32 - 1, would spend days building a skeleton before any tensor
shape is compared. `check_config_fits` first compares the config with the file's tensor table:

- the layer count with the layer indices in the file's tensor names (the `{i}` of the key map, and
  for an encoder-decoder the decoder's `{j}`);
- every size (vocab_size, d_model, d_ff, head counts, head_dim, heads x head_dim) with the largest
  dimension of a non-empty tensor in the file. Each of those sizes is a dimension of some weight,
  so one larger than all of them cannot describe this file (and an empty tensor, such as one of
  shape [0, 2^62], holds no weights to vouch for a size).

A config that passes builds in time proportional to the file; `to_qkv_state_dict` then compares
every tensor's exact shape, with the same messages for every format.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from qkv.config import ModelConfig
from qkv.errors import CheckpointError

SIZE_FIELDS = ("vocab_size", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim")


def check_config_fits(
    cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], layer_patterns: Iterable[str], origin: str
) -> None:
    """CheckpointError naming `origin` unless `cfg`'s layer count and sizes fit the file's tensors.

    shapes: {tensor name: shape} as the file's header lists them (nothing is read);
    layer_patterns: tensor names with ``{i}`` for the layer index, ``{j}`` for a decoder layer of an
    encoder-decoder (a key map's sources, or qkv's own names for a native checkpoint).
    """
    patterns = list(layer_patterns)
    depths = [("i", "layers", cfg.n_layers)]
    if cfg.family == "seq2seq":
        depths.append(("j", "decoder layers", cfg.n_decoder_layers))
    for key, what, wanted in depths:
        layers = layer_indices(shapes, patterns, key)
        if wanted > len(layers):
            raise CheckpointError(
                f"{origin}: the configuration asks for {wanted} {what} but the file holds tensors for "
                f"{len(layers)}; the configuration does not describe these weights (is it from another model?)"
            )
    largest = max((max(shape) for shape in shapes.values() if shape and math.prod(shape)), default=1)
    sizes = {name: getattr(cfg, name) for name in SIZE_FIELDS}
    sizes["n_heads * head_dim"] = cfg.n_heads * cfg.head_dim
    too_big = [f"{name}={value}" for name, value in sizes.items() if value is not None and value > largest]
    if too_big:
        raise CheckpointError(
            f"{origin}: the configuration's {', '.join(too_big)} exceeds every dimension of every tensor in "
            f"the file (the largest is {largest}); the configuration does not describe these weights"
        )


def layer_indices(names: Iterable[str], layer_patterns: Iterable[str], key: str = "i") -> set[int]:
    """The layer indices that tensor names hold, for name patterns such as ``model.layers.{i}.mlp.up.weight``
    (``key`` names the placeholder: ``i``, or ``j`` for decoder layers)."""
    slot = "{" + key + "}"
    prefixes = sorted({p.split(slot)[0] for p in layer_patterns if slot in p}, key=len, reverse=True)
    if not prefixes:
        return set()
    # At most 9 digits: an index is small, and int() of a huge digit string is slow (or refused).
    pattern = re.compile(f"(?:{'|'.join(map(re.escape, prefixes))})(\\d{{1,9}})\\.")
    return {int(m.group(1)) for name in names if (m := pattern.match(name))}
