"""Image reading and preprocessing against Hugging Face's ViT and CLIP image processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qkv.image import (
    ImageError,
    ImagePreprocessing,
    clip_preprocessing,
    preprocess,
    read_image,
    vit_preprocessing,
)

transformers = pytest.importorskip("transformers")

SIZES = [(37, 53), (64, 64), (120, 41), (17, 30)]  # (height, width): wide, square, tall, smaller than the crop


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # smooth structure as well as noise, so resampling filters differ
    gradient = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    return Image.fromarray((base * 0.3 + gradient * 0.7).astype(np.uint8))


PROCESSORS = {
    "clip": (lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
             lambda: clip_preprocessing(32)),
    "vit": (lambda: transformers.ViTImageProcessor(size={"height": 24, "width": 24}), lambda: vit_preprocessing(24)),
}  # fmt: skip


@pytest.mark.parametrize("name", PROCESSORS)
@pytest.mark.parametrize(("h", "w"), SIZES)
def test_pixels_equal_hf_processor(name, h, w):
    hf_proc, recipe = PROCESSORS[name][0](), PROCESSORS[name][1]()
    image = _image(h, w, h * w)
    ref = torch.from_numpy(np.asarray(hf_proc(images=image, return_tensors="np")["pixel_values"]))
    ours = preprocess(image, recipe)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", PROCESSORS)
def test_recipe_round_trips_through_preprocessor_config(name, tmp_path):
    hf_proc = PROCESSORS[name][0]()
    hf_proc.save_pretrained(tmp_path)
    recipe = ImagePreprocessing.from_dir(tmp_path)
    assert recipe == PROCESSORS[name][1]()
    assert ImagePreprocessing.from_hf(recipe.to_hf()) == recipe


def test_paths_arrays_and_pil_give_the_same_pixels(tmp_path):
    image = _image(40, 50, 1)
    image.save(tmp_path / "x.png")
    recipe = clip_preprocessing(32)
    from_pil = preprocess(image, recipe)
    assert torch.equal(preprocess(tmp_path / "x.png", recipe), from_pil)
    assert torch.equal(preprocess(np.asarray(image), recipe), from_pil)
    assert torch.equal(preprocess(np.asarray(image).transpose(2, 0, 1), recipe), from_pil)  # channels first
    assert torch.equal(preprocess(np.asarray(image) / 255.0, recipe), from_pil)  # floats in [0, 1]
    assert preprocess([image, image], recipe).shape == (2, 3, 32, 32)


def test_grayscale_is_refused_unless_converted(tmp_path):
    gray = _image(30, 30, 2).convert("L")
    with pytest.raises(ImageError, match="3-channel images, got a 1-channel.*convert_rgb=True"):
        preprocess(gray, vit_preprocessing(24))
    assert preprocess(gray, ImagePreprocessing(size=(24, 24), convert_rgb=True)).shape == (1, 3, 24, 24)
    assert preprocess(gray, ImagePreprocessing(size=(24, 24), mean=(0.5,), std=(0.5,)), n_channels=1).shape[1] == 1


def test_bad_files_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    _image(64, 64, 3).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage):
        with pytest.raises(ImageError, match=f"{path.name}: not a readable image"):
            read_image(path)
    with pytest.raises(ImageError, match="missing.png: no such image file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="values in"):
        read_image(np.full((4, 4, 3), 7.0))
