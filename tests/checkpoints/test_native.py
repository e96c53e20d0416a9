"""qkv's native checkpoint directory: round trip, tied weights, training state, atomic saves, bad input."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import qkv
from checkpoint_edits import edit_config, edit_weights
from qkv.checkpoints import native
from qkv.checkpoints.native import load_native, load_training_state, save_native
from qkv.errors import CheckpointError

TINY = dict(vocab_size=96, d_model=32, n_heads=4, n_layers=2, max_seq_len=32)


def tiny(preset: str = "tiny-gpt2", seed: int = 0) -> qkv.DecoderLM:
    torch.manual_seed(seed)
    cfg = qkv.ModelConfig.from_name(preset, **TINY, **({"n_kv_heads": 2} if preset != "tiny-gpt2" else {}))
    return qkv.DecoderLM(cfg).eval()


@pytest.fixture
def saved(tmp_path):
    model = tiny()
    return model, save_native(model, tmp_path / "ckpt")


IDS = torch.arange(20).view(2, 10) % 96


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-mistral"])
def test_round_trip_gives_identical_logits(preset, tmp_path):
    model = tiny(preset)
    loaded = load_native(save_native(model, tmp_path / "ckpt"))
    assert type(loaded) is qkv.DecoderLM and not loaded.training and loaded.config == model.config
    assert torch.equal(logits(loaded), logits(model))


def test_tied_weights_are_stored_once_and_tied_again(saved):
    _, path = saved
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "embed.tokens.weight" in names
    loaded = load_native(path)
    assert loaded.lm_head.weight is loaded.embed.tokens.weight


def test_config_json_schema(saved):
    model, path = saved
    data = json.loads((path / "config.json").read_text())
    assert data["format"] == "qkv" and data["format_version"] == 1
    assert qkv.ModelConfig.from_dict(data["config"]) == model.config


def test_dtype_casts_on_load(saved):
    loaded = load_native(saved[1], dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_tokenizer_travels_with_the_model(tmp_path):
    tokenizer_mod = pytest.importorskip("qkv.tokenizer")
    tok = tokenizer_mod.train_tokenizer(kind="bpe", vocab_size=300, texts=["hello world, hello qkv"] * 50,
                                        show_progress=False)  # fmt: skip
    model = tiny()
    model.tokenizer = tok
    loaded = load_native(save_native(model, tmp_path / "ckpt"))
    assert loaded.tokenizer.encode("hello qkv world") == tok.encode("hello qkv world")


def test_training_state_is_read_weights_only(saved, tmp_path):
    model, _ = saved
    state = {"step": 7, "rng": torch.get_rng_state(), "nested": {"a": [1, 2.5, (3, None)]}}
    path = save_native(model, tmp_path / "ckpt", training_state=state)
    back = load_training_state(path)
    assert back["step"] == 7 and torch.equal(back["rng"], state["rng"]) and back["nested"] == state["nested"]


class NotWeights:
    pass


def test_pickled_objects_in_the_training_state_are_refused(saved):
    _, path = saved
    torch.save({"evil": NotWeights()}, path / "training_state.pt")
    with pytest.raises(CheckpointError, match="training_state.pt is not a readable weights-only"):
        load_training_state(path)


def test_missing_training_state_explains(saved):
    with pytest.raises(CheckpointError, match="training_state.pt is missing.*cannot resume"):
        load_training_state(saved[1])


# -- atomic saves --------------------------------------------------------------------------------
def no_temp_dirs(path):
    return not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def test_a_crash_mid_save_keeps_the_previous_checkpoint(saved, monkeypatch):
    old, path = saved

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_native(tiny(seed=1), path)
    assert torch.equal(logits(load_native(path)), logits(old))
    assert no_temp_dirs(path)


def test_a_failed_swap_puts_the_previous_checkpoint_back(saved, monkeypatch):
    old, path = saved
    rename = os.rename

    def fail_second_rename(src, dst):
        if str(src).startswith(str(path.parent / f".{path.name}.tmp-")):
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(native.os, "rename", fail_second_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_native(tiny(seed=1), path)
    assert torch.equal(logits(load_native(path)), logits(old))
    assert no_temp_dirs(path)


def test_a_kill_between_the_renames_is_recoverable(saved):
    _, path = saved
    backup = path.with_name(f".{path.name}.previous")
    path.rename(backup)  # where a kill -9 between the two renames leaves things
    with pytest.raises(CheckpointError, match=r"intact at .*\.ckpt\.previous"):
        load_native(path)
    new = tiny(seed=1)
    save_native(new, path)
    assert torch.equal(logits(load_native(path)), logits(new)) and no_temp_dirs(path)


def test_saving_over_a_replaced_checkpoint(saved):
    _, path = saved
    new = tiny(seed=1)
    save_native(new, path)
    assert torch.equal(logits(load_native(path)), logits(new)) and no_temp_dirs(path)


def test_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a qkv checkpoint"):
        save_native(tiny(), tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# -- bad input -----------------------------------------------------------------------------------
BAD = {
    "no config": (lambda p: (p / "config.json").unlink(), r"config.json is missing"),
    "not json": (lambda p: (p / "config.json").write_text("{oops"), r"config.json is not valid JSON"),
    "HF config": (lambda p: (p / "config.json").write_text('{"model_type": "gpt2"}'), r"expected \"format\": \"qkv\""),
    "newer version": (lambda p: edit_config(p, lambda d: d.update(format_version=2)), r"newer qkv"),
    "bad field": (lambda p: edit_config(p, lambda d: d["config"].update(norm="batchnorm")),
                  r"invalid model config.*norm"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), r"model.safetensors is missing"),
    "truncated": (lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00"), r"model.safetensors.*truncated"),
    "missing tensor": (lambda p: edit_weights(p, lambda t: t.pop("norm.bias")), r"missing tensors: norm.bias"),
    "extra tensor": (lambda p: edit_weights(p, lambda t: t.update(extra=torch.zeros(1))), r"unexpected tensors: extra"),
    "wrong shape": (lambda p: edit_weights(p, lambda t: t.update({"norm.bias": torch.zeros(3)})),
                    r"norm.bias is \(3,\) in the file, the model needs \(32,\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_name_the_file_and_the_problem(saved, case):
    _, path = saved
    damage, message = BAD[case]
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_native(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_native(tmp_path / "nowhere")
