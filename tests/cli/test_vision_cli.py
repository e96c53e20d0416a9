"""`qkv zero-shot` and `qkv attention --image` on tiny CLIP and ViT checkpoints saved by transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qkv
from qkv.cli.main import main
from qkv.tokenizer import train_tokenizer
from qkv.zero_shot import zero_shot

transformers = pytest.importorskip("transformers")
LABELS = ["a red square", "a green square", "a blue circle"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tok = train_tokenizer(kind="bpe", texts=LABELS * 20, vocab_size=280, show_progress=False)
    text = dict(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=12,
        eos_token_id=2,
        pad_token_id=1,
    )
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    hf.save_pretrained(root / "clip")
    tok.save(root / "clip")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor.save_pretrained(root / "clip")
    images = []
    for i, color in enumerate([(220, 30, 30), (30, 200, 40), (20, 40, 230)]):
        path = root / f"img{i}.png"
        Image.fromarray(np.full((24, 30, 3), color, dtype=np.uint8)).save(path)
        images.append(path)
    return root / "clip", hf.eval(), tok, processor, images


def test_zero_shot_equals_hf(clip_dir):
    path, hf, tok, processor, images = clip_dir
    model = qkv.load(path)
    probs = zero_shot(model, images, LABELS)
    ids = [tok.encode(label) for label in LABELS]
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [1] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    pixels = processor(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits_per_image.softmax(-1)
    assert probs.shape == (3, 3) and (probs - ref).abs().max().item() <= 1e-5


def test_zero_shot_cli_prints_ranked_labels(clip_dir, capsys):
    path, _, _, _, images = clip_dir
    assert main(["zero-shot", str(path), *map(str, images), "--labels", ",".join(LABELS)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(str(img)) for line, img in zip(lines, images, strict=True))
    assert all(sum(float(x.rsplit(" ", 1)[1]) for x in line.split(": ", 1)[1].split(", ")) == pytest.approx(1, abs=2e-3)
               for line in lines)  # fmt: skip


def test_zero_shot_bad_input(clip_dir, capsys, tmp_path):
    path, _, _, _, images = clip_dir
    long_label = "a red square " * 10
    assert main(["zero-shot", str(path), str(images[0]), "--labels", f"{long_label},x"]) == 2
    assert "longer than the text tower's 12 positions" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(images[0].read_bytes()[:60])
    assert main(["zero-shot", str(path), str(broken), "--labels", "a,b"]) == 2
    assert "broken.png: not a readable image" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="cut from"):
        zero_shot(qkv.load(path), images[:1], [long_label, "x"], truncate=True)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_attention_over_an_image(clip_dir, tmp_path, capsys, kind):
    path, _, _, _, images = clip_dir
    if kind == "vit":
        torch.manual_seed(0)
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=48, image_size=16, patch_size=4)  # fmt: skip
        transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
        path = tmp_path / "vit"
    out = tmp_path / f"{kind}.png"
    assert main(["attention", str(path), "--image", str(images[0]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4x4 patches (2 layers x 4 heads)" in capsys.readouterr().out


def test_classify_an_image_with_a_vit(clip_dir, tmp_path, capsys):
    """`qkv classify` reads image files with the checkpoint's own preprocessing and names the labels."""
    from qkv.checkpoints import save_native
    from qkv.config import ModelConfig
    from qkv.image import ImagePreprocessing, preprocess
    from qkv.models import VisionTransformer

    _, _, _, _, images = clip_dir
    torch.manual_seed(0)
    cfg = ModelConfig(family="vit", vocab_size=None, d_model=32, n_layers=2, n_heads=4, image_size=16, patch_size=4,
                      head="classification", classifier="first_token", num_labels=3,
                      extra={"labels": ["red", "green", "blue"]})  # fmt: skip
    model = VisionTransformer(cfg).eval()
    model.preprocessing = ImagePreprocessing(size=(16, 16), convert_rgb=True)
    path = save_native(model, tmp_path / "vit")
    assert main(["classify", str(path), *map(str, images), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with torch.no_grad():
        probs = model(preprocess(images, model.preprocessing)).logits.softmax(-1)
    for row, p in zip(rows, probs, strict=True):
        assert row["label"] == ["red", "green", "blue"][int(p.argmax())]
        assert abs(row["probability"] - float(p.max())) <= 1e-5
