"""Hugging Face checkpoint directories: `config.json` + safetensors (single or sharded), in and out.

Reading goes through the data in `hf_config` (config translation) and `keymaps` (tensor names),
so supporting another decoder family is a table entry. Nothing from the directory is executed:
`auto_map` remote code is never run, and `.bin` pickles are read only with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from qkv.atomic import atomic_directory, check_replaceable
from qkv.checkpoints.convert import from_qkv_state_dict, to_qkv_state_dict
from qkv.checkpoints.fit import check_config_fits
from qkv.checkpoints.hf_config import (
    HF_FAMILIES,
    config_from_hf,
    config_to_hf,
    hf_encoder_architecture,
    hf_tensor_prefix,
)
from qkv.checkpoints.keymaps import HF_KEYMAPS, T5_GATED, KeyRule, encoder_keymap, with_prefix
from qkv.checkpoints.materialize import build_on_meta, materialize, resolve_dtype, tied_aliases
from qkv.config import ModelConfig
from qkv.errors import CheckpointError, UsageError
from qkv.formats.jsonfile import parse_json, read_json
from qkv.formats.safetensors import SafetensorsFile, save_safetensors
from qkv.image import ImagePreprocessing, default_preprocessing, save_preprocessing
from qkv.models.vision import CLIPConfig
from qkv.nn.quant import quantized_modules


def is_hf_dir(path: Path) -> bool:
    """A directory with a config.json that names a `model_type` (as HF's do)."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        data = parse_json(cfg.read_bytes(), str(cfg))
    except (OSError, CheckpointError):
        return True  # let `read_hf_config` report the broken file
    return isinstance(data, dict) and "model_type" in data


def read_hf_config(path: Path) -> tuple[dict, ModelConfig]:
    """The raw config.json dict and its `ModelConfig`.

    A config.json with `auto_map` names Python files of its own; qkv never imports or runs them. It
    is refused when its model_type is not one qkv implements, and loaded with a warning otherwise.
    """
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint directory needs one")
    raw = read_json(file, "Hugging Face config")
    auto_map = raw.get("auto_map")
    if auto_map:
        code = ", ".join(sorted(map(str, auto_map))) if isinstance(auto_map, dict) else "custom code"
        if raw.get("model_type") not in HF_FAMILIES:
            raise CheckpointError(
                f"{file}: this checkpoint needs its own Python code (auto_map: {code}); qkv never runs code "
                f"from a model directory. Supported model types: {', '.join(sorted(HF_FAMILIES))}"
            )
        warnings.warn(
            f"{file}: auto_map names custom Python code ({code}); qkv does not run it and loads the weights "
            f"with its own {raw['model_type']} implementation (outputs differ if that code changes the model)",
            stacklevel=3,
        )
    return raw, config_from_hf(raw, origin=str(file))


class _TensorSource:
    """All tensors of a checkpoint directory, across shards, read lazily by name."""

    def __init__(self, path: Path) -> None:
        self.files: dict[str, SafetensorsFile | dict[str, torch.Tensor]] = {}
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f'safetensors index {index} needs a "weight_map" object of tensor -> shard file')
            for name, shard in weight_map.items():
                shard_path = (path / shard).resolve()
                if shard_path.parent != path.resolve():
                    raise CheckpointError(f"{index}: shard {shard!r} points outside the checkpoint directory")
                if not shard_path.is_file():
                    raise CheckpointError(f"{index}: shard {shard} is missing")
                if shard not in self.files:
                    self.files[shard] = SafetensorsFile(shard_path)
                shard_shapes = self.files[shard].shapes()
                if name not in shard_shapes:
                    raise CheckpointError(f"{index}: {name} is not in shard {shard}")
                self.where[name], self.shapes[name] = shard, shard_shapes[name]
        elif single.is_file():
            self.files["model.safetensors"] = f = SafetensorsFile(single)
            self.shapes = f.shapes()
            self.where = dict.fromkeys(self.shapes, "model.safetensors")
        elif (path / "pytorch_model.bin").is_file():
            state = _load_weights_only(path / "pytorch_model.bin")
            self.files["pytorch_model.bin"] = state
            self.shapes = {name: tuple(t.shape) for name, t in state.items()}
            self.where = dict.fromkeys(state, "pytorch_model.bin")
        else:
            raise CheckpointError(
                f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found"
            )

    def names(self) -> set[str]:
        return set(self.where)

    def __call__(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]][name]


def hf_keymap(cfg: ModelConfig, model_type: str, architecture: str | None = None) -> tuple[KeyRule, ...]:
    """The key map between `cfg`'s model and HF tensor names for `model_type` (and, for BERT-family
    encoders, the `architecture`, which fixes the head and the body's prefix)."""
    if isinstance(cfg, CLIPConfig):
        return HF_KEYMAPS["clip"]
    if HF_FAMILIES[model_type].get("heads_by_architecture"):
        architecture = architecture or hf_encoder_architecture(cfg, model_type)
        prefix = hf_tensor_prefix(architecture, model_type)
        if model_type == "vit":
            return with_prefix(HF_KEYMAPS["vit"], prefix)
        return encoder_keymap(model_type, cfg.head, prefix)
    if model_type == "t5" and cfg.gated_mlp:
        return T5_GATED
    return HF_KEYMAPS[model_type]


def _load_weights_only(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state dict, unpickled as data only: `weights_only=True` refuses every
    object that is not a tensor or a plain container, so no code in the file runs. Zip files (what
    torch.save writes since 1.6) are memory-mapped; older ones, a bare pickle stream, are read whole."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as exc:  # the unpickler's refusals and torch's format errors alike
        raise CheckpointError(
            f"{file}: refused or unreadable as weights-only data ({_why(exc)}); qkv never unpickles arbitrary "
            "objects — convert the checkpoint to safetensors"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict of named tensors")
    return state


def _why(exc: Exception) -> str:
    """The sentence of torch.load's many-line message that says what was wrong with the file."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    line = next((line for line in lines if line.startswith("WeightsUnpickler error: ")), lines[0] if lines else "")
    return line.removeprefix("WeightsUnpickler error: ").split(". ")[0] or type(exc).__name__


def load_hf(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a Hugging Face checkpoint directory into the matching qkv model (fp32 unless `dtype`)."""
    path = Path(path)
    raw, cfg = read_hf_config(path)
    source = _TensorSource(path)
    if getattr(cfg, "pooler", False) and not any(name.endswith("pooler.dense.weight") for name in source.names()):
        cfg = cfg.replace(pooler=False)  # e.g. BertModel(add_pooling_layer=False)
    if raw["model_type"] == "t5" and not cfg.tie_embeddings and "lm_head.weight" not in source.names():
        cfg = cfg.replace(tie_embeddings=True)  # transformers 5 always ties T5's head (and saves none)
    rules = hf_keymap(cfg, raw["model_type"], getattr(cfg, "extra", {}).get("hf_architecture"))
    for tower, layer_key in _towers(cfg):  # every stack's depth and sizes against the file
        patterns = (name.replace(layer_key, "{i}") for rule in rules for name in rule.sources)
        check_config_fits(tower, source.shapes, patterns, str(path))
    meta = build_on_meta(cfg)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    tied = tuple(tied_aliases(meta))
    n_i, n_j = _depths(cfg)
    state = to_qkv_state_dict(
        source, source.names(), rules, expected, n_i, origin=str(path), tied=tied, n_decoder_layers=n_j
    )
    dtype = resolve_dtype(dtype) or torch.float32
    state = {k: v.to(dtype) for k, v in state.items()}
    model = materialize(cfg, state, origin=str(path))
    model.tokenizer = _tokenizer_if_present(path)
    if not isinstance(cfg, CLIPConfig) and cfg.family == "encoder":  # sentence-transformers' settings, if any
        from qkv.embedding.config import read_sentence_config

        model.sentence_config = read_sentence_config(path)
    if isinstance(cfg, CLIPConfig) or cfg.family == "vit":  # how images become pixel_values
        model.preprocessing = ImagePreprocessing.from_dir(path) or default_preprocessing(cfg)
    return model


def _tokenizer_if_present(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
        return None
    try:
        from qkv.tokenizer import load_tokenizer
    except ImportError:
        return None
    return load_tokenizer(path)


def _stacks(cfg: ModelConfig | CLIPConfig) -> dict[str, ModelConfig]:
    """The config of each stack, by its name prefix in qkv's state dict."""
    if isinstance(cfg, CLIPConfig):
        return {"text.": cfg.text, "vision.": cfg.vision}
    if cfg.family == "seq2seq":
        return {"encoder.": cfg, "decoder.": cfg}
    return {"": cfg}


def _towers(cfg: ModelConfig | CLIPConfig) -> list[tuple[ModelConfig, str]]:
    """(config, the key map's layer placeholder) for each separately sized stack, for the fit check."""
    if isinstance(cfg, CLIPConfig):
        return [(cfg.text, "{i}"), (cfg.vision, "{j}")]
    return [(cfg, "{i}")]  # a seq2seq config counts its decoder's {j} itself


def _depths(cfg: ModelConfig | CLIPConfig) -> tuple[int, int]:
    """The layer counts that `{i}` and `{j}` range over."""
    if isinstance(cfg, CLIPConfig):
        return cfg.text.n_layers, cfg.vision.n_layers
    return cfg.n_layers, cfg.n_decoder_layers


def _split_sizes(cfg: ModelConfig | CLIPConfig) -> dict[str, tuple[int, ...]]:
    """How export splits fused tensors (and unflattens patch projections), per stack."""
    sizes: dict[str, tuple[int, ...]] = {}
    for prefix, c in _stacks(cfg).items():
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        for kind in ("weight", "bias"):
            sizes[f"{prefix}attn.qkv_proj.{kind}"] = (q, kv, kv)
            sizes[f"{prefix}cross_attn.kv_proj.{kind}"] = (kv, kv)
            sizes[f"{prefix}mlp.up.{kind}"] = (c.d_ff, c.d_ff)
        if c.family == "vit":
            sizes[f"{prefix}embed.project.weight"] = (c.n_channels, c.patch_size, c.patch_size)
    return sizes


def export_hf(model: nn.Module, out: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors [+ tokenizer.json]).

    The directory appears complete or not at all: files are written to a temporary sibling that
    is renamed into place; an existing HF checkpoint (or empty directory) at `out` is replaced only
    after that succeeds, and any other existing path is refused. A quantized model is refused:
    a Hugging Face directory holds dense weights.
    """
    quantized = quantized_modules(model)
    if quantized:
        raise UsageError(
            f"cannot export a quantized model to Hugging Face format ({len(quantized)} quantized layers, "
            f"e.g. {next(iter(quantized))}): dequantize it first with qkv.nn.quant.dequantize_model(model), "
            "or load it with qkv.load(..., dequantize=True)"
        )
    cfg: ModelConfig | CLIPConfig = model.config
    hf = config_to_hf(cfg)
    aliases = tied_aliases(model)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k not in aliases}
    rules = hf_keymap(cfg, hf["model_type"], hf["architectures"][0])
    n_i, n_j = _depths(cfg)
    tensors = from_qkv_state_dict(state, rules, n_i, _split_sizes(cfg), n_j)
    out = Path(out)
    check_replaceable(out, is_hf_dir, "Hugging Face checkpoint")
    with atomic_directory(out) as tmp:
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save(tmp)
        if getattr(model, "preprocessing", None) is not None:
            save_preprocessing(model.preprocessing, tmp)
    return out
