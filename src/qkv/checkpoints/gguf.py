"""Load a llama.cpp GGUF file into a qkv `DecoderLM`, with the tokenizer it carries.

    model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")                    # packed int4, bfloat16
    model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dequantize=True)   # dense float32

The metadata becomes a `ModelConfig` through the `HPARAMS` table; tensor names map to qkv's
through `GGUF_KEYMAPS` (checkpoints/keymaps.py). Linear layers stored as Q4_0, Q4_1 or Q8_0 keep
their blocks' values and scales (`QuantLinear`, see `load_gguf`); every other tensor (F32, F16,
BF16, Q5_0/1, Q2_K..Q6_K, and all of them with dequantize=True) is dequantized straight into its
place in the model's tensors: Q, K and V into their rows of the fused `qkv_proj`, gate and up into
the fused `up`, with no intermediate copy (`qkv.formats.gguf.GGUFFile.tensor(name, out=...)`). The
model is built on the meta device and the tensors are assigned in place
(`checkpoints.materialize`), so loading never pays for a random initialisation.

RoPE layout: llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the
rows of each attention head of Q (with n_head) and K (with n_head_kv) from Hugging Face's
half-split layout to the interleaved pairs llama.cpp rotates; the loader writes them back through
`rope_rows_view` (`unpermute_rope_rows` does the same to a tensor).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qkv import kernels
from qkv.checkpoints.convert import expand_rules, to_qkv_state_dict
from qkv.checkpoints.fit import check_config_fits
from qkv.checkpoints.keymaps import GGUF_KEYMAPS, IGNORED_SUFFIXES
from qkv.checkpoints.materialize import build_on_meta, materialize, resolve_dtype
from qkv.config import ModelConfig
from qkv.errors import CheckpointError
from qkv.formats.gguf import PACKED_BITS, PACKED_GROUP, GGUFFile, TensorInfo, read_gguf
from qkv.models import DecoderLM
from qkv.nn.packed_embedding import TiedPackedEmbedding
from qkv.nn.position import rope_inv_freq
from qkv.threads import one_thread

__all__ = [
    "GGUFFile",
    "TensorInfo",
    "config_from_gguf",
    "is_gguf_file",
    "load_gguf",
    "read_gguf",
    "unpermute_rope_rows",
]

# qkv field <- GGUF key "{arch}.<suffix>", and whether llama.cpp's loader requires it.
HPARAMS: tuple[tuple[str, str, type, bool], ...] = (
    ("d_model", "embedding_length", int, True),
    ("n_layers", "block_count", int, True),
    ("n_heads", "attention.head_count", int, True),
    ("n_kv_heads", "attention.head_count_kv", int, False),
    ("d_ff", "feed_forward_length", int, True),
    ("max_seq_len", "context_length", int, True),
    ("norm_eps", "attention.layer_norm_rms_epsilon", float, True),
    ("rope_theta", "rope.freq_base", float, False),
    ("head_dim", "attention.key_length", int, False),
    ("vocab_size", "vocab_size", int, False),
)
SPECIAL_TOKENS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}

# Per `general.architecture`: the layer types it fixes, and which tensors the converter
# RoPE-permuted, with the config field holding the head count it permuted with. Biases and
# tying follow from which tensors the file holds.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {
        "fixed": dict(family="decoder", norm="rmsnorm", mlp="swiglu", position="rope"),
        "rope_permuted": {"attn_q": "n_heads", "attn_k": "n_kv_heads"},
    },
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style per-frequency RoPE divisors


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for a file named *.gguf or starting with the GGUF magic (for `qkv.load`'s format table)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's `permute(w, n_head, n_head_kv)` on a Q or K weight [n_heads * hd, ...] (or bias).

    The converter maps each head's rows (first half, second half) to interleaved pairs:
    `w.reshape(n_heads, 2, hd // 2, ...).swapaxes(1, 2)`; this writes them back through that view.
    """
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    view = rope_rows_view(out, n_heads)
    view.copy_(weight.reshape(view.shape))
    return out


def rope_rows_view(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """`weight` [n_heads * hd, ...] (Hugging Face row order) seen in llama.cpp's permuted order, as
    [n_heads, hd // 2, 2, ...]: the file's rows written through this view land un-permuted."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads of an even size")
    return weight.view(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2)


def _number(metadata: dict[str, Any], key: str, kind: type, origin: str, required: bool) -> Any:
    if key not in metadata:
        if required:
            raise CheckpointError(f"{origin}: missing required metadata key {key!r}")
        return None
    value = metadata[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not (is_int or (kind is float and isinstance(value, float))):
        expected = "a number" if kind is float else "an integer"
        raise CheckpointError(f"{origin}: metadata {key}={value!r} should be {expected}")
    return kind(value)


def _llama3_scaling(factors: np.ndarray, values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Llama 3.1/3.2 GGUFs carry RoPE scaling only as the divisors `rope_freqs.weight`, which the
    converter computes from factor, low/high_freq_factor and the original context. Recover Meta's
    published parameters (factor = the largest divisor; 1, 4, 8192) and check they reproduce it.
    """
    scaling = {"type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    problem = (
        f"{origin}: {ROPE_FREQS} holds RoPE frequency factors that match no Llama 3 scaling qkv can express "
        "(factor >= 1, low_freq_factor=1, high_freq_factor=4, original context 8192)"
    )
    head_dim = values.get("head_dim") or values["d_model"] // max(values["n_heads"], 1)
    if factors.shape != (head_dim // 2,):  # compared first: computing the frequencies costs head_dim
        raise CheckpointError(f"{problem}: {factors.size} factors; the head size {head_dim} needs {head_dim // 2}")
    try:
        cfg = ModelConfig(**values, rope_scaling=scaling)
    except ValueError as exc:
        raise CheckpointError(f"{problem}: {exc}") from None
    implied = rope_inv_freq(cfg.replace(rope_scaling=None))[0] / rope_inv_freq(cfg)[0]
    if implied.shape != factors.shape or not np.allclose(implied.numpy(), factors, rtol=1e-4):
        raise CheckpointError(problem)
    return scaling


def _rope_scaling(file: GGUFFile, arch: str, values: dict[str, Any], origin: str) -> dict[str, Any] | None:
    md = file.metadata
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    if ROPE_FREQS in file.tensors:
        if kind != "none":
            raise CheckpointError(f"{origin}: both {ROPE_FREQS} and rope.scaling.type={kind!r}; expected one")
        return _llama3_scaling(file.dequantize(ROPE_FREQS), values, origin)
    if kind == "none":
        return None
    factor = _number(md, f"{arch}.rope.scaling.factor", float, origin, required=True)
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        # llama.cpp's attn_factor multiplies YaRN's default temperature, unlike HF's attention_factor.
        for extra in ("attn_factor", "yarn_attn_factor", "yarn_log_multiplier"):
            if f"{arch}.rope.scaling.{extra}" in md:
                raise CheckpointError(f"{origin}: YaRN with rope.scaling.{extra} is not supported")
        scaling = {"type": "yarn", "factor": factor}
        for ours, theirs, kind_ in (
            ("original_max_position_embeddings", "original_context_length", int),
            ("beta_fast", "yarn_beta_fast", float),
            ("beta_slow", "yarn_beta_slow", float),
        ):
            value = _number(md, f"{arch}.rope.scaling.{theirs}", kind_, origin, required=False)
            if value is not None:
                scaling[ours] = value
        return scaling
    raise CheckpointError(f"{origin}: rope.scaling.type={kind!r} is not supported (supported: none, linear, yarn)")


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    """The `ModelConfig` a GGUF file describes (metadata, plus which optional tensors it holds)."""
    origin, md = str(file.path), file.metadata
    arch = md.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{origin}: missing required metadata key 'general.architecture'")
    if arch not in ARCHITECTURES or arch not in GGUF_KEYMAPS:
        raise CheckpointError(
            f"{origin}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    values: dict[str, Any] = dict(ARCHITECTURES[arch]["fixed"])
    for ours, suffix, kind, required in HPARAMS:
        value = _number(md, f"{arch}.{suffix}", kind, origin, required)
        if value is not None:
            values[ours] = value
    if "vocab_size" not in values:
        tokens = md.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            values["vocab_size"] = len(tokens)
        elif "token_embd.weight" in file.tensors:
            values["vocab_size"] = file.tensors["token_embd.weight"].shape[0]
        else:
            raise CheckpointError(f"{origin}: no {arch}.vocab_size, tokenizer.ggml.tokens or token_embd.weight")
    rope_dims = _number(md, f"{arch}.rope.dimension_count", int, origin, required=False)
    head_dim = values.get("head_dim") or values["d_model"] // max(values["n_heads"], 1)
    if rope_dims is not None and rope_dims != head_dim:
        raise CheckpointError(
            f"{origin}: {arch}.rope.dimension_count={rope_dims} differs from the head size {head_dim}; "
            f"llama.cpp's {arch} rotates whole heads"
        )
    value_length = _number(md, f"{arch}.attention.value_length", int, origin, required=False)
    if value_length is not None and value_length != head_dim:
        raise CheckpointError(f"{origin}: attention.value_length={value_length} differs from key_length={head_dim}")
    for ours, key in SPECIAL_TOKENS.items():
        token_id = _number(md, key, int, origin, required=False)
        if token_id is not None:
            values[ours] = token_id
    has = file.tensors.__contains__
    values.update(
        qkv_bias=has("blk.0.attn_q.bias"),
        attn_out_bias=has("blk.0.attn_output.bias"),
        mlp_bias=has("blk.0.ffn_up.bias"),
        tie_embeddings=not has("output.weight"),
        extra={"gguf_architecture": arch, "name": md.get("general.name")},
    )
    scaling = _rope_scaling(file, arch, {k: v for k, v in values.items() if k != "extra"}, origin)
    try:
        return ModelConfig(**values, rope_scaling=scaling)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{origin}: {exc}") from exc


def _tokenizer(file: GGUFFile) -> Any:
    """The tokenizer stored in the metadata, or None when there is none (or qkv's reader is absent)."""
    if "tokenizer.ggml.model" not in file.metadata:
        return None
    try:
        from qkv.tokenizer.gguf_vocab import tokenizer_from_gguf_fields
    except ImportError:
        return None
    fields = {k: v for k, v in file.metadata.items() if k.startswith("tokenizer.")}
    return tokenizer_from_gguf_fields(fields, source=str(file.path))


def _plan(file: GGUFFile, cfg: ModelConfig, expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """qkv tensor name -> the GGUF tensors stacked along dim 0 to make it, all names and shapes checked.

    Nothing is read. A file that does not fit the configuration is reported by `to_qkv_state_dict`
    (on meta stand-ins), so its errors read the same as every other format's.
    """
    rules = GGUF_KEYMAPS[cfg.extra["gguf_architecture"]]
    tied = ("lm_head.weight",) if cfg.tie_embeddings else ()
    names = set(file.tensors) - {ROPE_FREQS}
    by_target = {rule.target: rule for rule in expand_rules(rules, cfg.n_layers)}
    plan = {t: by_target[t].sources for t in expected if t in by_target and set(by_target[t].sources) <= names}

    def fits(target: str) -> bool:
        shapes = [file.tensors[name].shape for name in plan[target]]
        stacked = (sum(s[0] for s in shapes), *shapes[0][1:])
        return (
            by_target[target].transform == "none"
            and all(s[1:] == shapes[0][1:] for s in shapes)
            and stacked == tuple(expected[target])
        )

    used = {name for sources in plan.values() for name in sources}
    unused = {name for name in names - used if not name.endswith(IGNORED_SUFFIXES)}
    if set(expected) - set(tied) <= set(plan) and not unused and all(map(fits, plan)):
        return plan
    stand_in = lambda name: torch.empty(file.tensors[name].shape, device="meta")  # noqa: E731
    to_qkv_state_dict(stand_in, names, rules, expected, cfg.n_layers, origin=str(file.path), tied=tied)
    raise CheckpointError(f"{file.path}: the tensors do not match the model's configuration")  # not reached


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | str | None = None, dequantize: bool = False) -> DecoderLM:
    """The model in the GGUF file at `path`, in eval mode.

    By default the weights stay as the file stores them, as llama.cpp keeps them: every linear
    layer whose tensors are Q4_0/Q4_1 (int4) or Q8_0 (int8) becomes a `qkv.nn.quant.QuantLinear`
    holding the file's own values and scales, and the rest (norms, the embedding lookup, other
    tensor types such as the K-quants) is dequantized to `dtype` (default bfloat16, the dtype the
    packed kernels compute in). A tied output head is one packed layer, and the embedding lookup
    dequantizes the rows it needs from it (`TiedPackedEmbedding`): the table is held once, packed,
    as llama.cpp holds it. `dequantize=True` dequantizes everything to `dtype` (default float32):
    the dense model the Hugging Face parity tests use.

    `model.tokenizer` is the file's tokenizer (with its chat template) when it carries one.
    Raises CheckpointError naming the file for a malformed file, missing metadata or tensors, or
    an architecture or tensor type qkv does not support.
    """
    dtype = resolve_dtype(dtype) or (torch.float32 if dequantize else torch.bfloat16)
    file = read_gguf(path)
    cfg = config_from_gguf(file)
    origin = str(file.path)
    arch = cfg.extra["gguf_architecture"]
    shapes = {name: info.shape for name, info in file.tensors.items()}
    check_config_fits(cfg, shapes, (name for rule in GGUF_KEYMAPS[arch] for name in rule.sources), origin)
    permuted = {kind: getattr(cfg, field) for kind, field in ARCHITECTURES[arch]["rope_permuted"].items()}
    meta = build_on_meta(cfg)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    linears = {f"{name}.weight": name for name, m in meta.named_modules() if isinstance(m, nn.Linear)}
    plan = _plan(file, cfg, expected)
    # A tied head reads the embeddings' packed blocks itself, and the embedding lookup reads the
    # head's values (`TiedPackedEmbedding`): the table is never held dense.
    head_packed = False
    if cfg.tie_embeddings and not dequantize:
        plan["lm_head.weight"] = plan["embed.tokens.weight"]
        head_packed = all(PACKED_BITS.get(file.tensors[name].qtype) for name in plan["lm_head.weight"])
    state: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    forms: dict[str, dict[str, torch.Tensor]] = {}  # modules whose kernel form comes straight from the file
    threads = torch.get_num_threads()  # for the packing kernel: one parallel region a layer
    with one_thread():  # see qkv.threads.one_thread
        for target, sources in plan.items():
            bits = {PACKED_BITS.get(file.tensors[name].qtype) for name in sources}
            if not dequantize and target in linears and len(bits) == 1 and None not in bits:
                module = linears[target]
                layout[module] = {"bits": bits.pop(), "group_size": PACKED_GROUP}
                form = kernel_form(file, sources, permuted, origin, threads) if dtype == torch.bfloat16 else None
                if form is not None:
                    forms[module] = form
                    state.update({f"{module}.{key}": form[key] for key in ("scales", "zeros") if key in form})
                    rows, K = form["scales"].shape[0], form["scales"].shape[1] * PACKED_GROUP
                    shape, qdtype = (
                        ((rows, K // 2), torch.uint8) if form.get("zeros") is not None else ((rows, K), torch.int8)
                    )
                    state[f"{module}.qweight"] = torch.empty(shape, dtype=qdtype, device="meta")  # see adopt_kernel
                else:
                    state.update(_packed(file, module, sources, layout[module]["bits"], permuted, origin))
            elif target == "embed.tokens.weight" and head_packed:  # looked up from the head's values
                state[target] = torch.empty(expected[target], dtype=dtype, device="meta")
            elif target != "lm_head.weight" or not cfg.tie_embeddings:
                state[target] = _dense(file, sources, expected[target], dtype, permuted, origin)
            if target != "embed.tokens.weight" or dequantize or not cfg.tie_embeddings:  # read twice if tied
                for name in sources:
                    file.release(name)
    # fresh: `_packed` allocated the stored tensors, which nothing else holds
    model = materialize(cfg, state, origin=origin, quantized=layout, meta=meta, fresh=True)
    for module, form in forms.items():
        model.get_submodule(module).adopt_kernel(form)
    if head_packed:
        model.embed.tokens = TiedPackedEmbedding(model.lm_head, dtype)
    model.tokenizer = _tokenizer(file)
    return model


def _kind(name: str) -> str | None:
    return name.split(".")[2] if name.startswith("blk.") else None  # blk.{i}.attn_q.weight -> attn_q


def _source_rows(
    file: GGUFFile, sources: tuple[str, ...], permuted: dict, origin: str, *fused: torch.Tensor
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """For each source tensor, in order: (its name, its rows of each `fused` tensor, seen in the
    file's row order), so that writing the file's rows through them fills Q, K and V (or gate and
    up) side by side, RoPE rows un-permuted."""
    row = 0
    for name in sources:
        n = file.tensors[name].shape[0]
        parts = [tensor[row : row + n] for tensor in fused]
        row += n
        if _kind(name) in permuted:
            try:
                parts = [rope_rows_view(part, permuted[_kind(name)]) for part in parts]
            except ValueError as exc:
                raise CheckpointError(f"{origin}: tensor {name} of shape {tuple(parts[0].shape)}: {exc}") from None
        yield name, parts


def _dense(
    file: GGUFFile, sources: tuple[str, ...], shape: tuple[int, ...], dtype: torch.dtype, permuted: dict, origin: str
) -> torch.Tensor:
    """The sources dequantized straight into their rows of one (fused) tensor: Q, K and V into
    `qkv_proj`, gate and up into `up`, with no intermediate copies and no concatenation."""
    weight = torch.empty(shape, dtype=dtype)
    for name, (part,) in _source_rows(file, sources, permuted, origin, weight):
        file.tensor(name, out=part)
    return weight


def _packed(
    file: GGUFFile, module: str, sources: tuple[str, ...], bits: int, permuted: dict, origin: str
) -> dict[str, torch.Tensor]:
    """A `QuantLinear`'s stored tensors ({module}.qweight/scales/zeros), the sources' blocks written
    straight into their rows (RoPE rows un-permuted: each row's groups move with it). Fresh
    tensors: the model never points into the file's map."""
    rows, K = sum(file.tensors[name].shape[0] for name in sources), file.tensors[sources[0]].shape[1]
    qweight = torch.empty(rows, K // 2, dtype=torch.uint8) if bits == 4 else torch.empty(rows, K, dtype=torch.int8)
    out = {"qweight": qweight, "scales": torch.empty(rows, K // PACKED_GROUP)}
    if bits == 4:
        out["zeros"] = torch.empty(rows, K // PACKED_GROUP)
    for name, parts in _source_rows(file, sources, permuted, origin, *out.values()):
        file.quantized(name, out=dict(zip(out, parts)))
    return {f"{module}.{key}": tensor for key, tensor in out.items()}


_PACK_ARGS = (ctypes.c_void_p,) * 2 + (ctypes.c_int64,) * 2 + (ctypes.c_void_p,) * 4 + (ctypes.c_int,)
_ROW_TYPES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}


def kernel_form(
    file: GGUFFile, sources: tuple[str, ...], permuted: dict, origin: str, threads: int = 1
) -> dict[str, torch.Tensor] | None:
    """The sources' blocks (rows in the model's order: fused, RoPE rows un-permuted) written
    straight into the packed int4 kernel form a bfloat16 `QuantLinear` computes with, by
    `qkv/kernels/gguf_int4.c`, in one pass with no stored copy in between: {"packed" [N, kk / 2]
    uint8, "scales_and_zeros" [kk / 32, N, 2] bfloat16, "scales" (and Q4 "zeros") [N, K / 32]
    float32}, equal to what `QuantLinear.prepare` builds from the stored form (kk = 2K for Q8_0,
    whose values run as two int4 halves). None where the kernel is not built here or the rows are
    not whole 64-row blocks of the layout; the caller then takes the stored form (`_packed`)."""
    from qkv.nn.quant import int4_layout_known

    rows, K = sum(file.tensors[name].shape[0] for name in sources), file.tensors[sources[0]].shape[1]
    types = {file.tensors[name].qtype.name for name in sources}
    if not int4_layout_known(rows) or not types <= _ROW_TYPES.keys() or ("Q8_0" in types and len(types) > 1):
        return None
    fn = kernels.function("gguf_int4", "qkv_gguf_int4pack", _PACK_ARGS)
    if fn is None:
        return None
    addresses, row_types = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.int8)
    for name, (part, types_part) in _source_rows(file, sources, permuted, origin, addresses, row_types):
        types_part.fill_(_ROW_TYPES[file.tensors[name].qtype.name])
        part.copy_(file.row_addresses(name).view(part.shape))
    q8 = types == {"Q8_0"}
    kk, groups = (2 * K if q8 else K), K // PACKED_GROUP
    out = {
        "packed": torch.empty(rows // 64, kk, 32, dtype=torch.uint8),
        "scales_and_zeros": torch.empty(kk // PACKED_GROUP, rows, 2, dtype=torch.bfloat16),
        "scales": torch.empty(rows, groups),
    }
    if not q8:
        out["zeros"] = torch.empty(rows, groups)
    status = fn(addresses.data_ptr(), row_types.data_ptr(), rows, K, out["packed"].data_ptr(),
                out["scales_and_zeros"].data_ptr(), out["scales"].data_ptr(),
                out["zeros"].data_ptr() if not q8 else None, threads)  # fmt: skip
    if status != 0:
        raise CheckpointError(f"{origin}: packing {', '.join(sources)} failed (kernel status {status})")
    out["packed"] = out["packed"].view(rows, kk // 2)
    return out
