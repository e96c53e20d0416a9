"""The attention explorer page: self-contained, and its data are the model's own weights (read back
from the page's inline JSON); long prompts keep chosen rows; every family gets its views.
The page in a real browser: test_explorer_browser.py."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from qkv.interpret import head_statistics
from qkv.viz import attention_maps, attention_rollout
from qkv.viz import explorer as explorer_module
from qkv.viz.explorer import check_output_path, write_attention_explorer
from tiny_models import random_ids, tiny_model

STEP = 1 / 255  # the page's uint8 weights: half a step of rounding, and float slack


def page_data(path) -> dict:
    """The JSON the page inlines (const DATA = ...;)."""
    match = re.search(r"const DATA = (.*?);\n", path.read_text(encoding="utf-8"))
    return json.loads(match.group(1))


def page_weights(view: dict, key: str = "weights") -> np.ndarray:
    """A view's uint8 weights back as floats [L, H, R, S] (rollout: [R, S])."""
    q = np.frombuffer(base64.b64decode(view[key]), dtype=np.uint8).astype(np.float64) / 255
    R, S = len(view["rows"]), view["n_keys"]
    return q.reshape(R, S) if key == "rollout" else q.reshape(len(view["layers"]), view["heads"], R, S)


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny-llama", n_layers=3)


def test_page_is_self_contained_and_holds_the_weights(model, tmp_path):
    ids = random_ids(512, 1, 12, seed=0)
    tokens = [f"t{i}" for i in ids[0].tolist()]
    page = write_attention_explorer(
        model, tmp_path / "a.html", ids, tokens, decode=lambda i: f"<{i}>", title="x</script>"
    )
    html = page.path.read_text(encoding="utf-8")
    assert page.size == len(html.encode()) and page.notes == []
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)  # nothing fetched from a network
    assert "<script src" not in html and "</script>" not in html.split("const DATA")[1].split(";\n")[0]
    data = page_data(page.path)
    assert data["title"] == "x</script>" and data["sequences"]["input"] == tokens
    (view,) = data["views"]
    full = attention_maps(model, ids)  # [3, 4, 12, 12]
    assert view["rows"] == list(range(12)) and view["layers"] == [0, 1, 2]
    assert np.abs(page_weights(view) - full.double().numpy()).max() <= STEP / 2 + 1e-6
    assert np.abs(page_weights(view, "rollout") - attention_rollout(full).double().numpy()).max() <= STEP / 2 + 1e-6
    stats = head_statistics(full)
    assert np.allclose(view["entropy"], stats.entropy.numpy(), atol=5e-4)
    assert np.allclose(view["distance"], stats.distance.numpy(), atol=5e-3)
    lens = data["lens"]
    assert lens["positions"] == list(range(12)) and len(lens["tokens"]) == 3
    assert lens["tokens"][-1][5][0] == f"<{model(ids).logits[0, 5].argmax().item()}>"  # the last layer: the model's


def test_layers_and_a_capped_page(model, tmp_path, monkeypatch):
    ids = random_ids(512, 1, 10, seed=1)
    monkeypatch.setattr(explorer_module, "MAX_CELLS", 2 * 4 * 10 * 3)  # room for 3 rows of 2 layers
    page = write_attention_explorer(model, tmp_path / "c.html", ids, ["x"] * 10, layers=[0, 2], rows=[1])
    (view,) = page_data(page.path)["views"]
    assert view["layers"] == [0, 2] and view["rows"] == [1, 8, 9]  # the chosen row, then the last ones
    assert "weights for 3 of 10 query rows" in page.notes[0]
    full = attention_maps(model, ids)
    assert np.abs(page_weights(view) - full[[0, 2]][:, :, [1, 8, 9]].double().numpy()).max() <= STEP / 2 + 1e-6


def test_long_prompt_takes_chosen_rows_from_the_fast_path(model, tmp_path, monkeypatch):
    monkeypatch.setattr(explorer_module, "FULL_WEIGHTS_LIMIT", 16)
    monkeypatch.setattr(explorer_module, "DEFAULT_LONG_ROWS", 4)
    ids = random_ids(512, 1, 40, seed=2)
    page = write_attention_explorer(model, tmp_path / "l.html", ids, ["x"] * 40, rows=[3, -10])
    (view,) = page_data(page.path)["views"]
    assert view["rows"] == [3, 30, 36, 37, 38, 39] and view["rollout"] is None
    assert "40-token prompt" in page.notes[0]
    full = attention_maps(model, ids)
    assert np.abs(page_weights(view) - full[:, :, view["rows"]].double().numpy()).max() <= STEP / 2 + 1e-6


def test_encoder_decoder_views(tmp_path):
    from qkv.config import ModelConfig
    from qkv.models.seq2seq import EncoderDecoder

    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig.from_name("tiny-t5")).eval()
    src, tgt = random_ids(model.config.vocab_size, 1, 7, seed=3), random_ids(model.config.vocab_size, 1, 5, seed=4)
    page = write_attention_explorer(model, tmp_path / "s.html", src, list("abcdefg"), tgt, list("vwxyz"))
    data = page_data(page.path)
    assert [v["name"] for v in data["views"]] == ["cross", "self", "encoder"]
    cross = data["views"][0]
    assert (cross["queries"], cross["keys"], cross["distance"], cross["rollout"]) == ("target", "source", None, None)
    ref = attention_maps(model, src, tgt, kind="cross")
    assert np.abs(page_weights(cross) - ref.double().numpy()).max() <= STEP / 2 + 1e-6
    assert data["views"][2]["n_keys"] == 7 and data["lens"] is None


def test_vit_page_embeds_the_image(tmp_path):
    from PIL import Image

    from qkv.config import ModelConfig
    from qkv.models import VisionTransformer

    torch.manual_seed(0)
    cfg = ModelConfig(family="vit", vocab_size=None, d_model=32, n_layers=2, n_heads=4, image_size=16, patch_size=4)
    model = VisionTransformer(cfg).eval()
    pixels = torch.randn(1, 3, 16, 16)
    image = np.random.default_rng(0).random((16, 16, 3))
    page = write_attention_explorer(model, tmp_path / "v.html", pixels, [], image=image)
    data = page_data(page.path)
    assert data["image"]["grid"] == [4, 4] and len(data["sequences"]["input"]) == 17
    png = base64.b64decode(data["image"]["src"].removeprefix("data:image/png;base64,"))
    with Image.open(__import__("io").BytesIO(png)) as img:
        assert img.size == (16, 16)
    ref = attention_maps(model, pixels)
    view = data["views"][0]
    assert np.abs(page_weights(view) - ref.double().numpy()).max() <= STEP / 2 + 1e-6
    # mean distance between patches on the 4 x 4 grid, from their attention among themselves
    patches = ref[:, :, 1:, 1:].double()
    patches = patches / patches.sum(-1, keepdim=True)
    rc = [(k // 4, k % 4) for k in range(16)]
    gap = torch.tensor([[((a - c) ** 2 + (b - d) ** 2) ** 0.5 for c, d in rc] for a, b in rc], dtype=torch.float64)
    assert view["distance_unit"] == "patches"
    assert np.allclose(view["distance"], (patches * gap).sum(-1).mean(-1).numpy(), atol=5e-3)
    with pytest.raises(ValueError, match="image"):
        write_attention_explorer(model, tmp_path / "v.html", pixels, [])


def test_capped_vit_page_keeps_the_cls_row(tmp_path, monkeypatch):
    from qkv.config import ModelConfig
    from qkv.models import VisionTransformer

    torch.manual_seed(0)
    cfg = ModelConfig(family="vit", vocab_size=None, d_model=32, n_layers=2, n_heads=4, image_size=16, patch_size=4)
    model = VisionTransformer(cfg).eval()
    pixels = torch.randn(1, 3, 16, 16)
    monkeypatch.setattr(explorer_module, "MAX_CELLS", 2 * 4 * 17 * 3)  # room for 3 of the 17 rows
    page = write_attention_explorer(model, tmp_path / "v.html", pixels, [], image=np.zeros((16, 16, 3)))
    view = page_data(page.path)["views"][0]
    assert view["rows"] == [0, 15, 16] and "3 of 17" in page.notes[0]
    patches = attention_maps(model, pixels)[:, :, [15, 16], 1:].double()  # patches 14 and 15: (3, 2), (3, 3)
    patches = patches / patches.sum(-1, keepdim=True)
    gap = torch.tensor(
        [[((r - a) ** 2 + (c - b) ** 2) ** 0.5 for a in range(4) for b in range(4)] for r, c in [(3, 2), (3, 3)]]
    )
    assert np.allclose(view["distance"], (patches * gap).sum(-1).mean(-1).numpy(), atol=5e-3)


def test_encoder_page_has_no_lens(tmp_path):
    from tiny_models import tiny_encoder_with_tokenizer

    model = tiny_encoder_with_tokenizer()
    ids = torch.tensor([model.tokenizer.encode("def main(): pass")])
    page = write_attention_explorer(model, tmp_path / "e.html", ids, ["x"] * ids.shape[1], decode=str)
    data = page_data(page.path)
    assert data["lens"] is None and data["views"][0]["rollout"] is not None
    assert np.abs(page_weights(data["views"][0]) - attention_maps(model, ids).double().numpy()).max() <= STEP / 2 + 1e-6


def test_unwritable_paths_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    for bad, match in [
        (tmp_path / "page.png", "ending in .html"),
        (tmp_path / "dir.html", "is a directory"),
        (tmp_path / "file" / "x.html", "not a writable directory"),
    ]:
        if bad.name == "dir.html":
            bad.mkdir()
        with pytest.raises(ValueError, match=match):
            check_output_path(bad)
    assert check_output_path(tmp_path / "new" / "deeper" / "p.html").name == "p.html"


def test_clip_needs_its_vision_tower(tmp_path):
    from qkv.config import ModelConfig
    from qkv.models.vision import CLIP, CLIPConfig

    text = ModelConfig(family="encoder", vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)
    vision = ModelConfig(family="vit", vocab_size=None, d_model=32, n_layers=1, n_heads=4, image_size=16, patch_size=4)
    model = CLIP(CLIPConfig(text=text, vision=vision, projection_dim=8)).eval()
    with pytest.raises(ValueError, match="vision tower"):
        write_attention_explorer(model, tmp_path / "c.html", torch.tensor([[3, 4]]), ["a", "b"])


def test_rows_out_of_range(model, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_attention_explorer(model, tmp_path / "r.html", random_ids(512, 1, 5, seed=0), ["x"] * 5, rows=[7])
