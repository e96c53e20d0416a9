"""Every malformed checkpoint fails fast with a CheckpointError naming the file and the problem."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch

from oracle import make_hf_model
from qkv.checkpoints.hf import load_hf
from qkv.errors import CheckpointError
from qkv.formats.safetensors import read_header


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_model("llama-gqa-6-2").save_pretrained(path)
    return path


def _copy(saved, tmp_path):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def _header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path, header, body, header_len=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", header_len if header_len is not None else len(raw)) + raw + body)


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _lie_offsets_past_end(h, body):
    h[_first_tensor(h)]["data_offsets"] = [0, len(body) + 4096]
    return h, body


def _lie_overlap(h, body):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = h[names[0]], h[names[1]]
    size_b = b["data_offsets"][1] - b["data_offsets"][0]
    if size_b <= a["data_offsets"][1] - a["data_offsets"][0]:
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size_b]
    else:
        a["data_offsets"] = [b["data_offsets"][0], b["data_offsets"][0] + a["data_offsets"][1] - a["data_offsets"][0]]
    return h, body


def _lie_shape(h, body):
    h[_first_tensor(h)]["shape"][0] += 1
    return h, body


def _lie_dtype(h, body):
    h[_first_tensor(h)]["dtype"] = "F99"
    return h, body


@pytest.mark.parametrize(
    ("lie", "match"),
    [
        (_lie_offsets_past_end, "outside"),
        (_lie_overlap, "overlap"),
        (_lie_shape, "needs .* bytes"),
        (_lie_dtype, "unknown dtype"),
    ],
)
def test_lying_header(saved, tmp_path, lie, match):
    path = _copy(saved, tmp_path) / "model.safetensors"
    header, body = _header(path)
    _write(path, *lie(header, body))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=match) as err:
        load_hf(tmp_path)
    assert "model.safetensors" in str(err.value)
    assert path.read_bytes() == before  # nothing on disk changed


def test_header_length_larger_than_file(saved, tmp_path):
    path = _copy(saved, tmp_path) / "model.safetensors"
    header, body = _header(path)
    _write(path, header, body, header_len=2**63)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="larger than the file"):
        read_header(path)
    assert time.perf_counter() - start < 1.0


def test_header_not_json(saved, tmp_path):
    path = _copy(saved, tmp_path) / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_hf(tmp_path)


def test_truncated_file(saved, tmp_path):
    path = _copy(saved, tmp_path) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="outside|truncated"):
        load_hf(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(tmp_path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: "{not json", "not valid JSON"),
        (lambda c: json.dumps({k: v for k, v in c.items() if k != "hidden_size"}), "hidden_size"),
        (lambda c: json.dumps({**c, "num_attention_heads": 0}), "n_heads"),
        (lambda c: json.dumps({**c, "num_key_value_heads": 4}), "divisible"),
        (lambda c: json.dumps({**c, "model_type": "whisper"}), "not supported.*gpt2"),
        (lambda c: json.dumps({**c, "model_type": "custom", "auto_map": {"AutoModel": "x.Y"}}), "never runs code"),
        (lambda c: json.dumps({**c, "hidden_act": "tanh"}), "activation"),
    ],
)
def test_bad_config(saved, tmp_path, edit, match):
    _copy(saved, tmp_path)
    cfg = tmp_path / "config.json"
    cfg.write_text(edit(json.loads(cfg.read_text())))
    with pytest.raises(CheckpointError, match=match) as err:
        load_hf(tmp_path)
    assert "config.json" in str(err.value)


def test_auto_map_of_a_supported_model_type_warns_and_runs_no_code(saved, tmp_path):
    """A llama checkpoint that names custom code: qkv loads it with its own llama, says that it does not
    run the code, and the code (which would leave a marker file if imported) never runs."""
    _copy(saved, tmp_path)
    marker = tmp_path / "code-ran.txt"
    (tmp_path / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = tmp_path / "config.json"
    auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "auto_map": auto_map}))
    said = r"auto_map names custom Python code \(AutoModelForCausalLM\); qkv does not run it"
    with pytest.warns(UserWarning, match=said):
        model = load_hf(tmp_path)
    assert model.config.n_layers == 2 and not marker.exists()


def test_wrong_shapes(saved, tmp_path):
    _copy(saved, tmp_path)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "intermediate_size": 81}))
    with pytest.raises(CheckpointError, match="shape"):
        load_hf(tmp_path)


def test_missing_and_extra_tensors(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _copy(saved, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    missing = {k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}
    save_file(missing, path)
    with pytest.raises(CheckpointError, match="missing tensor.*down_proj"):
        load_hf(tmp_path)
    save_file({**tensors, "model.layers.9.extra.weight": tensors["model.norm.weight"].clone()}, path)
    with pytest.raises(CheckpointError, match="unexpected tensor.*layers.9"):
        load_hf(tmp_path)


class Evil:
    """Unpickling this runs `exec`, which writes `marker` (a stand-in for any payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_pickle_bin_that_runs_code_is_refused_and_nothing_runs(saved, tmp_path, zip_format):
    """A real torch.save file whose unpickling runs code: qkv refuses it and the code does not run.
    The last lines show the file is a working exploit, so the test would fail without weights_only."""
    (tmp_path / "config.json").write_bytes((saved / "config.json").read_bytes())
    marker = tmp_path / "code-ran.txt"
    weights = tmp_path / "pytorch_model.bin"
    torch.save({"model.embed_tokens.weight": Evil(marker)}, weights, _use_new_zipfile_serialization=zip_format)
    start = time.perf_counter()
    refused = r"pytorch_model\.bin: refused or unreadable as weights-only data \(Unsupported global: GLOBAL exec "
    with pytest.raises(CheckpointError, match=refused):
        load_hf(tmp_path)
    assert time.perf_counter() - start < 1.0
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # what qkv must never do
    assert marker.read_text() == "ran"


def test_bin_holding_something_else_than_a_state_dict(saved, tmp_path):
    (tmp_path / "config.json").write_bytes((saved / "config.json").read_bytes())
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin holds a list, not a state dict of named tensors"):
        load_hf(tmp_path)


def test_no_weights(saved, tmp_path):
    (tmp_path / "config.json").write_bytes((saved / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(tmp_path)
