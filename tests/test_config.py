"""`ModelConfig` (`qkv.config`) and the presets (`qkv.presets`): every preset builds with the
published parameter count, bad values are errors that name the field and the allowed values, and
configs survive dict/JSON round trips."""

from __future__ import annotations

import json

import pytest
import torch

from qkv.config import MLPS, NORMS, POSITIONS, ModelConfig
from qkv.models import build_model
from qkv.presets import PRESETS

# Published sizes (HF model cards / papers), counting tied embeddings once.
PUBLISHED_PARAMETERS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "smollm2-135m": 134_515_008,
    "bert-base": 109_482_240,  # BertModel, pooler included
    "roberta-base": 124_645_632,  # RobertaModel, pooler included
    "electra-small": 13_549_057,  # ElectraForPreTraining (discriminator)
    "all-minilm-l6-v2": 22_713_216,  # BertModel, pooler included
    "t5-small": 60_506_624,  # T5ForConditionalGeneration (tied head)
    "bart-base": 139_420_416,  # BartForConditionalGeneration
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.n_heads % cfg.n_kv_heads == 0 and cfg.head_dim * cfg.n_heads > 0
    with torch.device("meta"):  # shapes only: full-size presets allocate nothing
        model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if name in PUBLISHED_PARAMETERS:
        assert n_params == PUBLISHED_PARAMETERS[name]


def test_derived_fields():
    cfg = ModelConfig(d_model=96, n_heads=6, n_layers=3)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.n_decoder_layers) == (6, 16, 384, 3)
    # head_dim need not be d_model / n_heads when given (e.g. Gemma); then d_model need not divide
    assert ModelConfig(d_model=100, n_heads=3, head_dim=32).head_dim == 32


def test_from_name_applies_overrides_and_keeps_presets_untouched():
    before = json.dumps(PRESETS, sort_keys=True)
    cfg = ModelConfig.from_name("llama-3.1-8b", n_layers=2, rope_theta=1e4)
    assert (cfg.n_layers, cfg.rope_theta, cfg.n_kv_heads) == (2, 1e4, 8)
    assert cfg.rope_scaling["type"] == "llama3"
    assert json.dumps(PRESETS, sort_keys=True) == before


def test_unknown_preset_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown preset 'gpt-2'") as info:
        ModelConfig.from_name("gpt-2")
    for name in PRESETS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [("norm", "batchnorm", NORMS), ("mlp", "swish", MLPS), ("position", "rotary", POSITIONS)],
)
def test_bad_choice_names_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}='{value}' is not valid") as info:
        ModelConfig(**{field: value})
    for choice in allowed:
        assert choice in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 12, "n_kv_heads": 5}, r"n_heads=12 must be divisible by n_kv_heads=5"),
        ({"d_model": 100, "n_heads": 3}, r"d_model=100 is not divisible by n_heads=3; set head_dim"),
        ({"n_heads": 0}, r"ModelConfig\.n_heads=0 must be a positive integer"),
        ({"n_kv_heads": 0}, r"ModelConfig\.n_kv_heads=0 must be a positive integer"),
        ({"vocab_size": -1}, r"ModelConfig\.vocab_size=-1"),
        ({"head_dim": 0}, r"ModelConfig\.head_dim=0"),
        ({"dropout": 1.0}, r"ModelConfig\.dropout=1\.0 must be in \[0, 1\)"),
        ({"attn_dropout": -0.1}, r"ModelConfig\.attn_dropout=-0\.1"),
        ({"norm_eps": 0.0}, r"ModelConfig\.norm_eps=0\.0 must be > 0"),
        ({"sliding_window": 0}, r"ModelConfig\.sliding_window=0"),
        ({"family": "rnn"}, r"ModelConfig\.family='rnn'.*decoder, encoder, seq2seq, vit"),
        ({"attn_backend": "flash"}, r"ModelConfig\.attn_backend='flash'.*sdpa, eager"),
        ({"family": "vit"}, r"ModelConfig\.image_size=None must be a positive integer"),
        ({"position": "rope", "head_dim": 10, "partial_rotary_factor": 0.3}, r"rotary dimension.*must be even"),
    ],
)
def test_bad_values_are_errors_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


@pytest.mark.parametrize(
    ("rope_scaling", "message"),
    [
        ({"type": "ntk", "factor": 2.0}, r"rope_scaling\['type'\]='ntk' is not valid.*linear, dynamic, llama3, yarn"),
        ({"type": "linear"}, r"rope_scaling of type 'linear' needs factor"),
        ({"rope_type": "llama3", "factor": 8.0}, r"needs low_freq_factor, high_freq_factor, original_max"),
        ({"type": "linear", "factor": 0.5}, r"rope_scaling\['factor'\]=0\.5 must be >= 1"),
    ],
)
def test_bad_rope_scaling(rope_scaling, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(position="rope", rope_scaling=rope_scaling)


def test_rope_scaling_is_normalised_from_hf_spellings():
    cfg = ModelConfig(position="rope", max_seq_len=4096, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert ModelConfig(position="rope", rope_scaling={"rope_type": "default", "rope_theta": 1e4}).rope_scaling is None


def test_rope_scaling_without_a_type_is_an_error():
    with pytest.raises(ValueError, match=r"rope_scaling.*type"):
        ModelConfig(position="rope", rope_scaling={"factor": 4.0})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\): hidden_size, n_embd; known: .*d_model"):
        ModelConfig.from_dict({"d_model": 64, "n_heads": 4, "hidden_size": 64, "n_embd": 64})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_and_json_round_trip(name):
    cfg = ModelConfig.from_name(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_configs_are_frozen_and_replace_validates():
    cfg = ModelConfig.from_name("tiny-llama")
    with pytest.raises(AttributeError):
        cfg.n_layers = 3
    assert cfg.replace(n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="n_kv_heads"):
        cfg.replace(n_kv_heads=3)


def test_replace_rederives_fields_that_were_derived():
    cfg = ModelConfig.from_name("tiny-gpt2")  # MHA 4 heads, head_dim 16, d_ff 256
    wider = cfg.replace(n_heads=8)
    assert (wider.n_kv_heads, wider.head_dim) == (8, 8)  # not GQA 8/4 with 8*16 != d_model
    assert cfg.replace(d_model=128).d_ff == 512
    assert cfg.replace(n_heads=8) == ModelConfig.from_name("tiny-gpt2", n_heads=8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"relative_buckets": 31}, "relative_buckets=31 must be an even number >= 4"),
        ({"relative_buckets": 2}, "relative_buckets=2 must be an even number >= 4"),
        ({"relative_buckets": 32, "relative_max_distance": 8}, "relative_max_distance=8 must exceed"),
        ({"relative_max_distance": 0}, "relative_max_distance=0 must be a positive integer"),
    ],
)
def test_bad_t5_bucket_settings_are_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(position="t5", **overrides)
