"""Images in: reading (PIL images, numpy arrays, files) and the preprocessing ViT and CLIP expect.

`ImagePreprocessing` is the recipe of Hugging Face's `ViTImageProcessor` / `CLIPImageProcessor`
as data: resize (to an exact size, or the shortest edge to a size keeping the aspect ratio) with
PIL's resampling, centre-crop, rescale to [0, 1], normalise with the model's mean and std. It is
read from a checkpoint's `preprocessor_config.json`, so qkv's pixels equal HF's for the same image.
No torchvision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkv.errors import UsageError

# HF's names for PIL's filters (PILImageResampling values are PIL's integer codes).
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = "str | os.PathLike | np.ndarray | PIL.Image.Image"


class ImageError(UsageError):
    """An image file is missing, corrupt or truncated, or an array is not an image."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """size: an int resizes the shortest edge to it (aspect kept; CLIP), (height, width) resizes to
    exactly that (ViT); crop: a centre crop (height, width) after resizing, or None."""

    size: int | tuple[int, int] = (224, 224)
    crop: tuple[int, int] | None = None
    resample: str = "bilinear"
    rescale: float = 1 / 255
    mean: tuple[float, ...] = IMAGENET_STANDARD
    std: tuple[float, ...] = IMAGENET_STANDARD
    convert_rgb: bool = False  # convert to the model's mode (RGB, or grayscale "L" for 1 channel); else refuse

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE:
            raise UsageError(f"resample={self.resample!r} is not one of {', '.join(RESAMPLE)}")
        if len(self.mean) != len(self.std):
            raise UsageError(f"mean {self.mean} and std {self.std} must have one value per channel")

    @property
    def output_size(self) -> tuple[int, int]:
        """The (height, width) of the pixels this recipe produces."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.size, int):
            raise UsageError("a shortest-edge resize without a crop has no fixed output size")
        return self.size

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ImagePreprocessing:
        """From a `preprocessor_config.json` dict (ViTImageProcessor, CLIPImageProcessor)."""
        size = config.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size} if not config.get("do_center_crop") else {"height": size, "width": size}
        resized: int | tuple[int, int] = (
            int(size["shortest_edge"]) if "shortest_edge" in size else (int(size["height"]), int(size["width"]))
        )
        crop = None
        if config.get("do_center_crop"):
            c = config.get("crop_size", {"height": 224, "width": 224})
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        resample = {v: k for k, v in RESAMPLE.items()}.get(int(config.get("resample", 2)), "bilinear")
        return cls(
            size=resized if config.get("do_resize", True) else (0, 0),
            crop=crop,
            resample=resample,
            rescale=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0,
            mean=tuple(config.get("image_mean", IMAGENET_STANDARD)) if config.get("do_normalize", True) else (0.0,) * 3,
            std=tuple(config.get("image_std", IMAGENET_STANDARD)) if config.get("do_normalize", True) else (1.0,) * 3,
            convert_rgb=bool(config.get("do_convert_rgb", False)),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ImagePreprocessing | None:
        """The recipe in a checkpoint directory's preprocessor_config.json, or None without one."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return None
        from qkv.formats.jsonfile import read_json

        return cls.from_hf(read_json(file, "image preprocessing config"))

    def to_hf(self) -> dict[str, Any]:
        """The `preprocessor_config.json` dict that `from_hf` reads back."""
        size = {"shortest_edge": self.size} if isinstance(self.size, int) else dict(zip(("height", "width"), self.size))
        return {
            "do_resize": True, "size": size, "resample": RESAMPLE[self.resample],
            "do_center_crop": self.crop is not None,
            **({"crop_size": dict(zip(("height", "width"), self.crop))} if self.crop else {}),
            "do_rescale": True, "rescale_factor": self.rescale, "do_normalize": True,
            "image_mean": list(self.mean), "image_std": list(self.std), "do_convert_rgb": self.convert_rgb,
        }  # fmt: skip


def clip_preprocessing(image_size: int) -> ImagePreprocessing:
    """CLIP's recipe: shortest edge to image_size (bicubic), centre crop, OpenAI's mean and std."""
    return ImagePreprocessing(
        size=image_size, crop=(image_size, image_size), resample="bicubic", mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD, convert_rgb=True,
    )  # fmt: skip


def vit_preprocessing(image_size: int) -> ImagePreprocessing:
    """ViT's recipe: resize to image_size x image_size (bilinear), mean and std 0.5."""
    return ImagePreprocessing(size=(image_size, image_size))


def default_preprocessing(cfg: Any) -> ImagePreprocessing:
    """The recipe a model was most likely trained with when its checkpoint names none: CLIP's for a
    CLIP config (it has a vision tower), ViT's otherwise."""
    if hasattr(cfg, "vision"):
        return clip_preprocessing(cfg.vision.image_size)
    return vit_preprocessing(cfg.image_size)


def read_image(image: Any, convert_rgb: bool = False):
    """A PIL image from a path, a PIL image or a numpy array ([H, W], [H, W, C] of uint8, or
    floats in [0, 1] as HF rescales them); a clear `ImageError` for anything unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        try:
            with Image.open(path) as opened:
                opened.load()  # decode now: a truncated file fails here, not later
                pil = opened.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{path}: not a readable image ({exc}); is the file corrupt or truncated?") from None
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # channels first -> last
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ImageError(f"an image array must be [H, W], [H, W, 3|4] or [3|4, H, W], got shape {image.shape}")
        if array.dtype != np.uint8:
            if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
                raise ImageError("a float image array must hold values in [0, 1] (or pass uint8 values 0..255)")
            array = (array * 255).round().astype(np.uint8)
        pil = Image.fromarray(array)
    elif isinstance(image, Image.Image):
        pil = image
    else:
        raise ImageError(f"cannot read an image from {type(image).__name__}; give a path, a PIL image or an array")
    if convert_rgb and pil.mode != "RGB":
        pil = pil.convert("RGB")
    return pil


def preprocess(images: Sequence[Any] | Any, recipe: ImagePreprocessing, n_channels: int = 3) -> torch.Tensor:
    """Images -> pixel_values [B, C, H, W] (float32), as the HF processor of `recipe` makes them."""
    from PIL import Image

    if not isinstance(images, list | tuple):
        images = [images]
    if not images:
        raise ImageError("no images given")
    out = []
    for image in images:
        pil = read_image(image)
        mode = "RGB" if n_channels == 3 else "L"
        if recipe.convert_rgb and pil.mode != mode:
            pil = pil.convert(mode)
        if pil.mode not in ("RGB", "L"):
            raise ImageError(f"an image in mode {pil.mode} needs converting to RGB first (convert_rgb=True)")
        channels = 3 if pil.mode == "RGB" else 1
        if channels != n_channels:
            raise ImageError(
                f"the model takes {n_channels}-channel images, got a {channels}-channel ({pil.mode}) image; "
                + ("convert it to RGB (convert_rgb=True)" if channels == 1 else "give a grayscale image")
            )
        width, height = pil.size
        if isinstance(recipe.size, int):  # shortest edge to size, the long edge as HF rounds it
            short, long = sorted((height, width))
            new_short, new_long = recipe.size, int(recipe.size * long / short)
            height, width = (new_long, new_short) if width <= height else (new_short, new_long)
        elif recipe.size != (0, 0):
            height, width = recipe.size
        if (width, height) != pil.size:
            pil = pil.resize((width, height), resample=Image.Resampling(RESAMPLE[recipe.resample]))
        array = np.asarray(pil)
        array = array[..., None] if array.ndim == 2 else array  # [H, W, C]
        if recipe.crop is not None:
            array = _center_crop(array, recipe.crop)
        pixels = array.astype(np.float32) * np.float32(recipe.rescale)
        pixels = (pixels - np.asarray(recipe.mean[:channels], np.float32)) / np.asarray(
            recipe.std[:channels], np.float32
        )
        out.append(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
    return torch.stack(out)


def _center_crop(array: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """HF's centre crop: the top-left corner at ((H - h) // 2, (W - w) // 2), zero-padded when smaller."""
    H, W = array.shape[:2]
    h, w = crop
    if h > H or w > W:
        padded = np.zeros((max(h, H), max(w, W), array.shape[2]), array.dtype)
        top, left = -(-(padded.shape[0] - H) // 2), -(-(padded.shape[1] - W) // 2)
        padded[top : top + H, left : left + W] = array
        array, H, W = padded, padded.shape[0], padded.shape[1]
    top, left = (H - h) // 2, (W - w) // 2
    return array[top : top + h, left : left + w]


def save_preprocessing(recipe: ImagePreprocessing, path: str | os.PathLike) -> None:
    """Write preprocessor_config.json into a checkpoint directory (atomically)."""
    from qkv.atomic import atomic_write_text

    atomic_write_text(Path(path) / "preprocessor_config.json", json.dumps(recipe.to_hf(), indent=2) + "\n")
