"""qkv's native checkpoint: a directory that `save_native` writes and `load_native` reads.

    run/checkpoint/
      config.json          {"format": "qkv", "format_version": 1, "config": ModelConfig.to_dict(),
                            "quantization": {module name: {"bits", "group_size"}}  (quantized models only)}
      model.safetensors    the state dict; a tied parameter is stored once, under its first name;
                           a quantized layer's stored form as it is (qweight uint8/int8, scales and
                           zeros float32: see `qkv.nn.quant`)
      tokenizer.json       when the model carries a tokenizer
      training_state.pt    optional: optimizer, schedule, RNG states, data position, step
                           (plain tensors and containers, read with torch.load(weights_only=True))

Saves are atomic: the files are written and fsynced in a temporary sibling directory, which is
then renamed into place. Replacing an existing checkpoint takes two renames (old -> backup,
new -> path); a process killed between them leaves no directory at `path` and the previous
checkpoint intact at `.<name>.previous` next to it, which `load_native` points to. Any other
failure (an exception mid-save) leaves the previous checkpoint where it was and no temp dir.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkv.atomic import atomic_directory, backup_path, check_replaceable
from qkv.checkpoints.fit import check_config_fits
from qkv.checkpoints.materialize import build_on_meta, materialize, resolve_dtype, tied_aliases
from qkv.config import ModelConfig
from qkv.errors import CheckpointError
from qkv.formats.jsonfile import parse_json, read_json
from qkv.formats.safetensors import SafetensorsFile, save_safetensors
from qkv.image import ImagePreprocessing, default_preprocessing, save_preprocessing
from qkv.models.vision import CLIPConfig
from qkv.nn.quant import QuantLinear, empty_quantized, quantized_modules

FORMAT = "qkv"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TRAINING_STATE_FILE = "training_state.pt"
# qkv's own names of a layer's tensors: blocks.{i}. in a decoder or encoder; encoder.blocks.{i}.
# and decoder.blocks.{j}. in an encoder-decoder (`checkpoints.fit` counts the layers by them).
LAYER_PATTERNS = ("blocks.{i}.", "encoder.blocks.{i}.", "decoder.blocks.{j}.")


# -- saving ------------------------------------------------------------------------------------
def save_native(model: nn.Module, path: str | os.PathLike, training_state: dict | None = None) -> Path:
    """Write `model` (its `config`, weights and `tokenizer`) as a native checkpoint directory, atomically.

    `training_state` (plain tensors/containers only) goes to training_state.pt. An existing
    checkpoint at `path` is replaced; a directory that is not a qkv checkpoint is never touched.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig | CLIPConfig):
        raise TypeError(f"save_native needs a model with a ModelConfig at .config, got {type(cfg).__name__}")
    path = Path(path)
    check_replaceable(path, is_native_checkpoint, "qkv checkpoint")
    with atomic_directory(path) as tmp:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict()}
        quantized = quantized_modules(model)
        if quantized:
            header["quantization"] = quantized
        (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        aliases = tied_aliases(model)
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in aliases}
        save_safetensors(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if getattr(model, "preprocessing", None) is not None:
            save_preprocessing(model.preprocessing, tmp)
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE_FILE)
    return path


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        (directory / TOKENIZER_FILE).write_text(tokenizer.to_str(), encoding="utf-8")
    else:
        tokenizer.save(directory)  # qkv.tokenizer.Tokenizer writes tokenizer.json into a directory


# -- loading -----------------------------------------------------------------------------------
def is_native_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` is a directory whose config.json says "format": "qkv" (nothing else is checked)."""
    file = Path(path) / CONFIG_FILE
    try:
        data = parse_json(file.read_bytes(), str(file))
    except (OSError, CheckpointError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_native_config(path: str | os.PathLike) -> ModelConfig | CLIPConfig:
    """The ModelConfig of a native checkpoint; CheckpointError says what is wrong with config.json."""
    return _config_from(_read_header(Path(path)), Path(path) / CONFIG_FILE)


def _read_header(path: Path) -> dict:
    """config.json of the checkpoint at `path`, its format and version checked."""
    _check_directory(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a qkv checkpoint: {file} is missing")
    data = read_json(file, "qkv checkpoint config", expect=object)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f'{file} is not a qkv checkpoint config: expected "format": "qkv", found {found!r}')
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"{file} has format_version {version!r}; this qkv reads version {FORMAT_VERSION}"
            + (" (it was written by a newer qkv: upgrade qkv)" if newer else "")
        )
    return data


def _config_from(data: dict, file: Path) -> ModelConfig | CLIPConfig:
    if not isinstance(data.get("config"), dict):
        raise CheckpointError(f'{file} has no "config" object with the model\'s hyper-parameters')
    try:
        if data["config"].get("family") == CLIPConfig.family:  # two towers, each a ModelConfig
            return CLIPConfig.from_dict(data["config"])
        return ModelConfig.from_dict(data["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{file} holds an invalid model config: {exc}") from None


def _quantization_from(data: dict, model: nn.Module, file: Path) -> dict[str, dict]:
    """The "quantization" entry of config.json, checked against `model` (built from the config):
    every named module is a linear layer of it, bits are 4 or 8, the group divides its inputs."""
    layout = data.get("quantization", {})
    if not isinstance(layout, dict):
        raise CheckpointError(f'{file}: "quantization" must be an object {{module name: {{"bits", "group_size"}}}}')
    modules = dict(model.named_modules())
    for name, spec in layout.items():
        where = f'{file}: "quantization" entry {name!r}'
        if not isinstance(modules.get(name), nn.Linear):
            found = "no such module" if name not in modules else f"it is a {type(modules[name]).__name__}"
            raise CheckpointError(f"{where} does not name a linear layer of the model ({found})")
        if not isinstance(spec, dict) or set(spec) != {"bits", "group_size"}:
            raise CheckpointError(f'{where} must be {{"bits": 4 or 8, "group_size": int or null}}, got {spec!r}')
        bits, group = spec["bits"], spec["group_size"]
        if type(bits) is not int or bits not in (4, 8):
            raise CheckpointError(f"{where} has bits={bits!r}; qkv stores 4 or 8")
        if group is None and bits == 4:
            raise CheckpointError(f"{where}: int4 needs a group_size, got null")
        in_features = modules[name].in_features
        if group is not None and (
            type(group) is not int or group <= 0 or in_features % group or (bits == 4 and group % 2)
        ):
            raise CheckpointError(
                f"{where} has group_size={group!r}, which does not divide in_features={in_features} "
                "into groups (a positive divisor, even for int4)"
            )
    return layout


def _check_directory(path: Path) -> None:
    if path.is_dir():
        return
    backup = backup_path(path)
    if backup.is_dir():
        raise CheckpointError(
            f"{path} does not exist: a save was interrupted after moving the previous checkpoint aside; "
            f"it is intact at {backup} (rename it back to {path.name})"
        )
    if path.exists():
        raise CheckpointError(f"{path} is a file; a qkv checkpoint is a directory")
    raise CheckpointError(f"checkpoint directory {path} does not exist")


def load_native(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a native checkpoint -> model in eval mode (with `.tokenizer` when the checkpoint has one).

    The model is built on the meta device and takes the file's tensors with
    `load_state_dict(assign=True)` (no random init, no second copy); `dtype` casts floating tensors.
    A quantized checkpoint (config.json's "quantization") loads as `QuantLinear`s holding the
    stored form; `dtype` casts the rest (and the activations), never qweight, scales or zeros.
    """
    path = Path(path)
    data = _read_header(path)
    cfg = _config_from(data, path / CONFIG_FILE)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint has no weights")
    weights = SafetensorsFile(file)  # header validated against the file before any tensor is read
    if isinstance(cfg, CLIPConfig):
        for name, tower in (("text", cfg.text), ("vision", cfg.vision)):
            check_config_fits(tower, weights.shapes(), (f"{name}.blocks.{{i}}.",), str(file))
    else:
        check_config_fits(cfg, weights.shapes(), LAYER_PATTERNS, str(file))
    meta = build_on_meta(cfg)
    quantized = _quantization_from(data, meta, path / CONFIG_FILE)
    empty_quantized(meta, quantized)
    aliases = tied_aliases(meta)
    expected = {k: v for k, v in meta.state_dict().items() if k not in aliases}
    _check_tensors(file, weights.header, {k: tuple(v.shape) for k, v in expected.items()})
    _check_stored_dtypes(file, weights.header, meta)
    state = {name: weights[name] for name in sorted(weights.names())}
    model = materialize(cfg, state, resolve_dtype(dtype), origin=str(file), quantized=quantized)
    if (path / TOKENIZER_FILE).is_file():
        model.tokenizer = _load_tokenizer(path)
    if isinstance(cfg, CLIPConfig) or cfg.family == "vit":
        model.preprocessing = ImagePreprocessing.from_dir(path) or default_preprocessing(cfg)
    return model


def _check_tensors(file: Path, header: dict[str, dict], expected: dict[str, tuple[int, ...]]) -> None:
    names = set(header)
    missing, unexpected = sorted(expected.keys() - names), sorted(names - expected.keys())
    if missing or unexpected:
        problems = [
            f"{what} tensors: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected))
            if items
        ]
        raise CheckpointError(f"{file} does not match the model its config.json describes: {'; '.join(problems)}")
    wrong = [
        f"{n} is {tuple(header[n]['shape'])} in the file, the model needs {expected[n]}"
        for n in sorted(names)
        if tuple(header[n]["shape"]) != expected[n]
    ]
    if wrong:
        raise CheckpointError(f"{file} has tensors of the wrong shape: {'; '.join(wrong[:5])}")


# safetensors names of the dtypes a quantized layer stores.
_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32"}


def _check_stored_dtypes(file: Path, header: dict[str, dict], model: nn.Module) -> None:
    """A quantized layer's tensors must have the exact dtypes it computes with (qweight's bits are
    its meaning: a cast would change the weights)."""
    wrong = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for key, tensor in module.named_buffers(recurse=False):
                stored, needed = header[f"{name}.{key}"]["dtype"], _SAFETENSORS_DTYPES[tensor.dtype]
                if stored != needed:
                    wrong.append(f"{name}.{key} is {stored} in the file, int{module.bits} stores {needed}")
    if wrong:
        raise CheckpointError(f"{file} has quantized tensors of the wrong dtype: {'; '.join(wrong[:5])}")


def _load_tokenizer(directory: Path) -> Any:
    try:
        from qkv.tokenizer import load_tokenizer
    except ImportError:  # qkv.tokenizer not importable: fall back to the `tokenizers` object
        from tokenizers import Tokenizer as HFTokenizer

        return HFTokenizer.from_file(str(directory / TOKENIZER_FILE))
    return load_tokenizer(directory)


def load_training_state(path: str | os.PathLike) -> dict:
    """The training_state.pt of a native checkpoint, unpickled with `weights_only=True`."""
    file = Path(path) / TRAINING_STATE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: {path} holds a model but no training state, so training cannot resume "
            "from it exactly (start a new run from its weights instead)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable weights-only torch file: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, expected a dict")
    return state
