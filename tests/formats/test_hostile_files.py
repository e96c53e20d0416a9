"""Hostile files fail fast, with little memory, and with a qkv error that names the file.

Each case is a file (or directory) built to make a naive reader hang, recurse or allocate without
bound: a config claiming 10^9 layers, a safetensors shape with 10^6 dimensions, sizes of 2^63 next
to a zero, a GGUF vocabulary with a token of 10^6 characters or one that makes merge
reconstruction quadratic, JSON nested 10^5 deep. (A pickle that runs code is refused in
tests/checkpoints/test_hf_bad_input.py, next to the other .bin tests.) `qkv.load` or
`qkv.load_tokenizer` must raise CheckpointError or TokenizerError within 1 s, with the resident
set growing by less than 100 MiB.

What is measured: all cases run in one child process (tests/formats/hostile_child.py), after a
warm-up that loads a valid file of each format, so one interpreter start-up serves them all and
import costs are not charged to a case. Per case, the child times the call and reads the peak RSS
(VmHWM, reset before the call through /proc/self/clear_refs) minus the RSS just before it: real
memory, including what numpy, torch and the Rust libraries allocate, which tracemalloc misses.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv import DecoderLM, ModelConfig
from qkv.checkpoints.hf import export_hf
from qkv.checkpoints.native import save_native
from qkv.tokenizer import train_tokenizer

gguf = pytest.importorskip("gguf")

MAX_SECONDS = 1.0
MAX_RSS_GROWTH_MIB = 100
DEEP = 100_000  # nesting depth of the deep-JSON cases


# -- writers for the valid files the cases start from ---------------------------------------------
def tiny_model() -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=270, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = DecoderLM(cfg).eval()
    model.tokenizer = train_tokenizer(kind="bpe", texts=["hello world, hostile files"] * 8, vocab_size=270,
                                      show_progress=False)  # fmt: skip
    return model


_GGUF_HPARAMS = {
    "context_length": 64, "embedding_length": 32, "block_count": 1, "feed_forward_length": 64,
    "attention.head_count": 2, "attention.head_count_kv": 1, "attention.layer_norm_rms_epsilon": 1e-5,
    "vocab_size": 16,
}  # fmt: skip
_GGUF_TENSORS = {
    "token_embd.weight": (16, 32), "output_norm.weight": (32,), "output.weight": (16, 32),
    "blk.0.attn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32),
    "blk.0.attn_v.weight": (16, 32), "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_norm.weight": (32,),
    "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64),
}  # fmt: skip


def write_gguf(path: Path, hparams: dict | None = None, vocab: dict | None = None, tensors: bool = True) -> Path:
    """A one-layer llama GGUF (F32 tensors) with `hparams` overriding the defaults, and optionally a
    vocabulary: {"model": "llama" | "gpt2", "tokens": [...], "merges": [...]}."""
    w = gguf.GGUFWriter(path, "llama")
    for key, value in {**_GGUF_HPARAMS, **(hparams or {})}.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"llama.{key}", value)
    if vocab is not None:
        w.add_tokenizer_model(vocab["model"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types([1] * len(vocab["tokens"]))
        if vocab["model"] == "llama":
            w.add_token_scores([-float(i) for i in range(len(vocab["tokens"]))])
        else:
            w.add_token_merges(vocab.get("merges", []))
    rng = np.random.default_rng(0)
    for name, shape in _GGUF_TENSORS.items() if tensors else ():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensor_dims_at(data: bytes, name: str) -> int:
    """Byte position of the first dimension in `name`'s record of a GGUF tensor table."""
    encoded = name.encode()
    return data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded) + 4


def write_safetensors(path: Path, header: dict | str, data: bytes = b"") -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def deep_json(depth: int = DEEP) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


# -- the cases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    call: str  # "load" or "load_tokenizer"
    build: Callable[[Path, dict[str, Path]], Path]  # (an empty directory, valid sources) -> the path to load
    error: str  # CheckpointError or TokenizerError
    pattern: str  # what the message must say


def _copy(source: Path, to: Path) -> Path:
    for f in source.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def _hf(change: Callable[[dict], None]) -> Callable[[Path, dict], Path]:
    def build(d: Path, valid: dict) -> Path:
        edit_json(_copy(valid["hf"], d) / "config.json", change)
        return d

    return build


def _native(change: Callable[[dict], None]) -> Callable[[Path, dict], Path]:
    def build(d: Path, valid: dict) -> Path:
        edit_json(_copy(valid["native"], d) / "config.json", lambda c: change(c["config"]))
        return d

    return build


def _hf_weights(header: dict | str, data: bytes = b"") -> Callable[[Path, dict], Path]:
    def build(d: Path, valid: dict) -> Path:
        _copy(valid["hf"], d)
        write_safetensors(d / "model.safetensors", header, data)
        return d

    return build


def _hf_tensor_shape(name: str, shape: list[int]) -> Callable[[Path, dict], Path]:
    """The valid HF directory with tensor `name` claiming `shape` and holding no bytes (the file is
    re-packed so that every byte still belongs to a tensor, as the format requires)."""

    def build(d: Path, valid: dict) -> Path:
        _copy(valid["hf"], d)
        data = (d / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header, body, packed = json.loads(data[8 : 8 + n]), data[8 + n :], bytearray()
        for key in sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]):
            begin, end = header[key]["data_offsets"]
            chunk = b"" if key == name else body[begin:end]
            header[key]["data_offsets"] = [len(packed), len(packed) + len(chunk)]
            packed += chunk
        header[name]["shape"] = shape
        write_safetensors(d / "model.safetensors", header, bytes(packed))
        return d

    return build


def _gguf(**kwargs) -> Callable[[Path, dict], Path]:
    return lambda d, valid: write_gguf(d / "model.gguf", **kwargs)


def _gguf_zero_and_huge(d: Path, valid: dict) -> Path:
    path = write_gguf(d / "model.gguf")
    data = bytearray(path.read_bytes())
    struct.pack_into("<QQ", data, _tensor_dims_at(data, "output.weight"), 0, 2**63)  # ne = [0, 2^63]
    path.write_bytes(bytes(data))
    return path


def _in_file(name: str, text: str | Callable[[], str], base: str | None = None) -> Callable[[Path, dict], Path]:
    """A directory holding the files of `valid[base]` (if given) and `name` with `text`."""

    def build(d: Path, valid: dict) -> Path:
        if base is not None:
            _copy(valid[base], d)
        (d / name).write_text(text() if callable(text) else text)
        return d

    return build


def _gpt2_vocab_deep(d: Path, valid: dict) -> Path:
    (d / "vocab.json").write_text(deep_json())
    (d / "merges.txt").write_text("#version: 0.2\n")
    return d


def _tiktoken_quadratic(d: Path, valid: dict) -> Path:
    tokens = [bytes([b]) for b in range(256)] + [b"a" * n for n in range(2, 1001)]
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (d / "cl100k_base.tiktoken").write_text("\n".join(lines) + "\n")
    return d / "cl100k_base.tiktoken"


_DEEP = "nests JSON arrays or objects too deeply"
_HUGE_LAYERS = r"asks for 1000000000 layers but the file holds tensors for [12]\b"
CASES = [
    Case("hf-num-hidden-layers-1e9", "load", _hf(lambda c: c.update(num_hidden_layers=10**9)),
         "CheckpointError", _HUGE_LAYERS),
    Case("native-n-layers-1e9", "load", _native(lambda c: c.update(n_layers=10**9)), "CheckpointError", _HUGE_LAYERS),
    Case("gguf-block-count-2^32-1", "load", _gguf(hparams={"block_count": 2**32 - 1}), "CheckpointError",
         r"asks for 4294967295 layers but the file holds tensors for 1\b"),
    Case("hf-vocab-size-2^40", "load", _hf(lambda c: c.update(vocab_size=2**40)), "CheckpointError",
         r"vocab_size=1099511627776 exceeds every dimension"),
    Case("native-d-model-2^40", "load", _native(lambda c: c.update(d_model=2**40, head_dim=None)), "CheckpointError",
         r"d_model=1099511627776.* exceeds every dimension"),
    Case("gguf-head-count-2^30", "load", _gguf(hparams={"attention.head_count": 2**30, "attention.key_length": 16}),
         "CheckpointError", r"n_heads=1073741824.* exceeds every dimension"),
    Case("safetensors-rank-1e6", "load", _hf_weights({"w": {"dtype": "F32", "shape": [2] * 10**6,
                                                              "data_offsets": [0, 4]}}, b"\0" * 4),
         "CheckpointError", r"shape has 1000000 dimensions; qkv reads tensors of at most 8"),
    Case("safetensors-zero-and-2^63", "load", _hf_tensor_shape("model.norm.weight", [0, 2**63]),
         "CheckpointError", r"shape \[0, 9223372036854775808\] must be .* below 2\^63"),
    Case("gguf-zero-and-2^63", "load", _gguf_zero_and_huge, "CheckpointError",
         r"'output\.weight' at byte \d+ has dimensions \[0, 9223372036854775808\]"),
    Case("gguf-token-of-1e6-characters", "load_tokenizer",
         _gguf(vocab={"model": "gpt2", "tokens": ["a", "b", "ab", "c" * 10**6], "merges": ["a b"]}, tensors=False),
         "TokenizerError", r"a token is 1000000 characters long; qkv reads tokens of at most 1024"),
    Case("gguf-quadratic-merges-a-aa-aaa", "load_tokenizer",
         _gguf(vocab={"model": "llama", "tokens": ["a" * n for n in range(1, 1001)]}, tensors=False),
         "TokenizerError", r"the 1000 tokens average \d+ characters"),
    Case("tiktoken-quadratic-merges", "load_tokenizer", _tiktoken_quadratic, "TokenizerError",
         r"the 1255 tokens average \d+ characters"),
    Case("deep-json-hf-config", "load", _in_file("config.json", deep_json, base="hf"), "CheckpointError", _DEEP),
    Case("deep-json-native-config", "load", _in_file("config.json", deep_json, base="native"), "CheckpointError",
         _DEEP),
    Case("deep-json-safetensors-header", "load", _hf_weights(deep_json()), "CheckpointError", _DEEP),
    Case("deep-json-safetensors-index", "load", _in_file("model.safetensors.index.json", deep_json, base="hf"),
         "CheckpointError", _DEEP),
    Case("deep-json-tokenizer.json", "load_tokenizer", _in_file("tokenizer.json", deep_json), "TokenizerError", _DEEP),
    Case("deep-json-tokenizer_config.json", "load_tokenizer",
         _in_file("tokenizer_config.json", deep_json, base="tokenizer"), "TokenizerError", _DEEP),
    Case("deep-json-special_tokens_map.json", "load_tokenizer",
         _in_file("special_tokens_map.json", deep_json, base="tokenizer"), "TokenizerError", _DEEP),
    Case("deep-json-vocab.json", "load_tokenizer", _gpt2_vocab_deep, "TokenizerError", _DEEP),
]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """Build every case, run them all in one child process, return {case id: its measurements}."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("measures memory through /proc (Linux)")
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_model()
    valid = {"native": save_native(model, root / "valid-native"), "hf": export_hf(model, root / "valid-hf"),
             "gguf": write_gguf(root / "valid.gguf"), "tokenizer": root / "valid-tokenizer"}  # fmt: skip
    model.tokenizer.save(valid["tokenizer"])
    for case in CASES:
        (root / case.id).mkdir()
    paths = {case.id: case.build(root / case.id, valid) for case in CASES}
    spec = {
        "warm_up": [["load", str(valid["native"])], ["load", str(valid["hf"])], ["load", str(valid["gguf"])],
                    ["load_tokenizer", str(valid["tokenizer"])]],
        "cases": [{"id": case.id, "call": case.call, "path": str(paths[case.id])} for case in CASES],
    }  # fmt: skip
    (root / "cases.json").write_text(json.dumps(spec))
    child = Path(__file__).with_name("hostile_child.py")
    proc = subprocess.run([sys.executable, str(child), str(root / "cases.json")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = {r["id"]: {**r, "path": paths[r["id"]]} for r in map(json.loads, proc.stdout.splitlines())}
    assert set(measured) == {case.id for case in CASES}
    print(
        "\n".join(
            f"{r['id']:<36} {r['seconds'] * 1000:7.1f} ms {r['rss_growth_mib']:7.1f} MiB"
            f"{'' if r['peak_reset'] else ' (peak not reset: an upper bound)'}"
            for r in measured.values()
        )
    )  # fmt: skip  (shown with pytest -s)
    return measured


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_file_fails_fast_with_a_clear_error(results, case):
    r = results[case.id]
    assert case.error in r["mro"], r
    assert str(r["path"]) in r["message"], r["message"]
    assert re.search(case.pattern, r["message"]), r["message"]
    assert r["seconds"] < MAX_SECONDS, r
    assert r["rss_growth_mib"] < MAX_RSS_GROWTH_MIB, r
