"""ViT and CLIP against Hugging Face `transformers`, loaded through `qkv.load`.

Tiny random `ViTModel`, `ViTForImageClassification` and `CLIPModel` (a text tower narrower and
shallower than the vision tower, both end-of-text rules) saved by `save_pretrained` load through
qkv's own loader; logits, embeddings, hidden states and the pooled outputs equal HF's, position
interpolation for another image size too, and export round-trips.
"""

from __future__ import annotations

import functools

import pytest
import torch

import qkv
from qkv.checkpoints import export_hf
from qkv.models import CLIP, VisionTransformer
from qkv.models.vision import clip_loss

transformers = pytest.importorskip("transformers")

TOL = 1e-4
_VIT = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=80, image_size=20,
            patch_size=4, num_labels=3)  # fmt: skip
_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=16, eos_token_id=98, bos_token_id=97, pad_token_id=1)  # fmt: skip
_VISION = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6, image_size=20,
               patch_size=5)  # fmt: skip
CASES = {
    "vit": ("ViTModel", lambda: transformers.ViTConfig(**_VIT)),
    "vit-classifier": ("ViTForImageClassification", lambda: transformers.ViTConfig(**_VIT)),
    "clip": ("CLIPModel", lambda: transformers.CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=24)),
    "clip-legacy-eos": ("CLIPModel", lambda: transformers.CLIPConfig(
        text_config={**_TEXT, "eos_token_id": 2}, vision_config=_VISION, projection_dim=24)),
}  # fmt: skip


@functools.cache
def _pair(case: str, root: str) -> tuple:
    cls, config = CASES[case]
    torch.manual_seed(0)
    cfg = config()
    cfg._attn_implementation = "eager"  # returns attention weights
    hf = getattr(transformers, cls)(cfg).eval()
    path = f"{root}/{case}"
    hf.save_pretrained(path)
    return hf, qkv.load(path), path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vision"))


def _pixels(batch: int = 2, size: int = 20) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _texts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three texts ending in the end-of-text token (98), one of them right-padded."""
    ids = torch.randint(3, 90, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[:, 8] = 98
    ids[1, 5], ids[1, 6:], mask[1, 6:] = 98, 1, 0
    return ids, mask


@pytest.mark.parametrize("case", ["vit", "vit-classifier"])
def test_vit_equals_hf(case, root):
    hf, model, _ = _pair(case, root)
    assert type(model) is VisionTransformer
    pixels = _pixels()
    with torch.no_grad():
        ref = hf(pixels, output_hidden_states=True, output_attentions=True)
        ours = model(pixels, output_hidden_states=True, output_attentions=True)
    # HF's ViT lists the last layer's output before the final LayerNorm; qkv's last hidden state is
    # last_hidden_state (after it), as for every family. The rest are equal one for one.
    pairs = [*zip(ours.hidden_states[:-1], ref.hidden_states[:-1], strict=True), *zip(ours.attentions, ref.attentions)]
    for a, b in pairs:
        assert (a - b).abs().max().item() <= TOL
    assert torch.equal(ours.hidden_states[-1], ours.last_hidden_state)
    if case == "vit":
        assert (ours.last_hidden_state - ref.last_hidden_state).abs().max().item() <= TOL
        assert (ours.pooler_output - ref.pooler_output).abs().max().item() <= TOL
    else:
        assert (ours.logits - ref.logits).abs().max().item() <= TOL
        labels = torch.tensor([0, 2])
        assert abs(model(pixels, labels=labels).loss.item() - hf(pixels, labels=labels).loss.item()) <= TOL


def test_vit_interpolates_positions_for_another_size_as_hf(root):
    hf, model, _ = _pair("vit-classifier", root)
    pixels = _pixels(size=28)  # a 7 x 7 grid for a model trained on 5 x 5
    with torch.no_grad():
        ref = hf(pixels, interpolate_pos_encoding=True).logits
        ours = model(pixels, interpolate_pos_encoding=True).logits
    assert (ours - ref).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="differs from the model's 20x20.*interpolate_pos_encoding=True"):
        model(pixels)


@pytest.mark.parametrize("case", ["clip", "clip-legacy-eos"])
def test_clip_equals_hf(case, root):
    hf, model, _ = _pair(case, root)
    assert type(model) is CLIP
    ids, mask = _texts()
    pixels = _pixels(batch=3)  # the i-th text belongs with the i-th image
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True)
        ours = model(ids, pixels, attention_mask=mask, return_loss=True)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert (getattr(ours, name) - getattr(ref, name)).abs().max().item() <= TOL, name
    with torch.no_grad():  # the towers' pooled outputs, before the projections
        ref_vision, ref_text = hf.vision_model(pixels).pooler_output, hf.text_model(ids, mask).pooler_output
    assert (ours.vision_output.pooler_output - ref_vision).abs().max().item() <= TOL
    assert (ours.text_output.pooler_output - ref_text).abs().max().item() <= TOL
    assert (model.encode_image(pixels) - ref.image_embeds).abs().max().item() <= TOL
    assert (model.encode_text(ids, mask) - ref.text_embeds).abs().max().item() <= TOL
    assert abs(ours.loss.item() - ref.loss.item()) <= TOL


def test_infonce_is_symmetric_and_equals_a_direct_computation():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    log_text = logits.log_softmax(dim=1).diagonal()  # each text against every image
    log_image = logits.log_softmax(dim=0).diagonal()  # each image against every text
    direct = -(log_text.mean() + log_image.mean()) / 2
    assert torch.allclose(clip_loss(logits), direct, atol=1e-6)
    assert torch.allclose(clip_loss(logits), clip_loss(logits.t()), atol=1e-6)


@pytest.mark.parametrize("case", ["vit", "vit-classifier", "clip"])
def test_export_round_trips_through_transformers(case, root, tmp_path):
    hf, model, _ = _pair(case, root)
    again = getattr(transformers, CASES[case][0]).from_pretrained(export_hf(model, tmp_path / "out")).eval()
    pixels = _pixels()
    with torch.no_grad():
        if case == "clip":
            ids, mask = _texts()
            pixels = _pixels(batch=3)
            a = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_text
            b = again(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_text
        else:
            a, b = hf(pixels)[0], again(pixels)[0]
    assert (a - b).abs().max().item() <= TOL


def test_bad_images_are_clear_errors(root):
    _, model, _ = _pair("vit", root)
    with pytest.raises(ValueError, match="takes 3-channel images, got 1 channels; convert grayscale images to RGB"):
        model(torch.randn(1, 1, 20, 20))
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model(torch.randn(1, 3, 22, 22), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"pixel_values must be a float tensor \[batch, channels, height, width\]"):
        model(torch.randn(3, 20, 20))


@pytest.mark.parametrize("case", ["vit-classifier", "clip"])
def test_native_checkpoints_keep_weights_and_preprocessing(case, root, tmp_path):
    from qkv.checkpoints import save_native

    _, model, _ = _pair(case, root)
    again = qkv.load(save_native(model, tmp_path / "native"))
    assert type(again) is type(model) and again.preprocessing == model.preprocessing
    pixels = _pixels(batch=3)
    with torch.no_grad():
        if case == "clip":
            ids, mask = _texts()
            a, b = model(ids, pixels, mask).logits_per_text, again(ids, pixels, mask).logits_per_text
        else:
            a, b = model(pixels).logits, again(pixels).logits
    assert torch.equal(a, b)
