"""Training on images through the same `Trainer`: ViT classification and CLIP's contrastive
objective, on data that installs offline (scikit-learn's 1,797 handwritten digits, Alpaydin &
Kaynak 1998, bundled with the package).

Images and labels travel as rows of one float tensor ([label, pixels...]) so that `BlockLoader`
shuffles and resumes them like token blocks; the collates turn rows back into `pixel_values`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qkv.errors import UsageError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates for CLIP training; zero-shot evaluation uses the first one only.
CAPTION_TEMPLATES = ("the digit {n}", "a handwritten {name}", "a photo of the number {name}", "{name}",
                     "a drawing of a {n}", "the number {n}, written by hand")  # fmt: skip


@dataclass
class ImageSet:
    """Images [N, C, H, W] in [0, 1] with integer labels [N] and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names)


def load_digits_images(size: int = 16) -> ImageSet:
    """scikit-learn's digits (8 x 8, 17 grey levels), scaled to [0, 1] and resized to size x size."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError(
            "the digits data set ships with scikit-learn: pip install scikit-learn (make test installs it)"
        ) from None
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return ImageSet(images, torch.tensor(data.target, dtype=torch.long), DIGIT_NAMES)


def split(data: ImageSet, test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A stratified (train, test) split: each class keeps the same share in both, seeded."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(len(data.class_names)):
        members = (data.labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return data.subset(torch.cat(train)), data.subset(torch.cat(test))


def pack_images(data: ImageSet) -> torch.Tensor:
    """One row per image, [label, pixels...], for `BlockLoader`."""
    return torch.cat((data.labels[:, None].float(), data.images.flatten(1)), dim=1)


class ImageCollate:
    """Rows of `pack_images` -> {"pixel_values" normalised with mean/std, "labels"}; optional random
    shifts of up to `shift` pixels (augmentation, drawn from a generator saved with the run)."""

    def __init__(self, shape: Sequence[int], mean: float = 0.5, std: float = 0.5, shift: int = 0, seed: int = 0):
        self.shape, self.mean, self.std, self.shift = tuple(shape), mean, std, shift
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def pixels(self, rows: torch.Tensor) -> torch.Tensor:
        images = rows[:, 1:].reshape(len(rows), *self.shape)
        if self.shift:
            s = self.shift
            padded = F.pad(images, (s, s, s, s))
            dy, dx = torch.randint(0, 2 * s + 1, (2, len(rows)), generator=self.generator).tolist()
            H, W = self.shape[1:]
            images = torch.stack([padded[i, :, y : y + H, x : x + W] for i, (y, x) in enumerate(zip(dy, dx))])
        return (images - self.mean) / self.std

    def __call__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels(rows), "labels": rows[:, 0].long()}


def classification_accuracy(model: torch.nn.Module, data: ImageSet, mean: float = 0.5, std: float = 0.5) -> float:
    """Top-1 accuracy of an image classifier on `data`."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model((data.images[i : i + 256] - mean) / std).logits for i in range(0, len(data), 256)])
    return float((logits.argmax(-1) == data.labels).float().mean())


def confusion_matrix(model: torch.nn.Module, data: ImageSet, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """[n_classes, n_classes] counts: row = true class, column = predicted."""
    model.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [model((data.images[i : i + 256] - mean) / std).logits.argmax(-1) for i in range(0, len(data), 256)]
        )
    n = len(data.class_names)
    return torch.bincount(data.labels * n + predicted, minlength=n * n).reshape(n, n)


def caption(label: int, template: str) -> str:
    return template.format(n=label, name=DIGIT_NAMES[label])


class CaptionCollate(ImageCollate):
    """Rows of `pack_images` -> a CLIP batch: pixels and a caption per image, its template drawn at
    random from `templates` (the i-th caption belongs with the i-th image)."""

    def __init__(self, tokenizer, shape: Sequence[int], templates: Sequence[str] = CAPTION_TEMPLATES, **kw):
        super().__init__(shape, **kw)
        self.tokenizer, self.templates = tokenizer, list(templates)

    def __call__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = rows[:, 0].long().tolist()
        picks = torch.randint(0, len(self.templates), (len(labels),), generator=self.generator).tolist()
        ids, mask = caption_batch(self.tokenizer, [caption(y, self.templates[t]) for y, t in zip(labels, picks)])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": self.pixels(rows)}


def caption_batch(tokenizer, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> right-padded ids and mask; each ends with the tokenizer's end-of-text token."""
    eos = tokenizer.eos_token_id
    rows = [[*tokenizer.encode(c), eos] for c in captions]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def clip_zero_shot_accuracy(model, tokenizer, data: ImageSet, template: str = CAPTION_TEMPLATES[0]) -> float:
    """Top-1 accuracy of choosing, for each image, the class whose caption embeds closest: no
    classifier head, only the 10 captions."""
    model.eval()
    with torch.no_grad():
        ids, mask = caption_batch(tokenizer, [caption(c, template) for c in range(len(data.class_names))])
        text = model.encode_text(ids, mask)
        image = model.encode_image((data.images - 0.5) / 0.5)
    return float(((image @ text.t()).argmax(-1) == data.labels).float().mean())


def clip_retrieval_recall(model, tokenizer, data: ImageSet, ks: Sequence[int] = (1, 5), seed: int = 0) -> dict:
    """Text -> image retrieval: each image gets a caption of its digit (a random template); a query
    succeeds at k when an image of the caption's digit is among the k images ranked highest."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(CAPTION_TEMPLATES), (len(data),), generator=g).tolist()
    with torch.no_grad():
        ids, mask = caption_batch(
            tokenizer, [caption(int(y), CAPTION_TEMPLATES[t]) for y, t in zip(data.labels, picks)]
        )
        scores = model.encode_text(ids, mask) @ model.encode_image((data.images - 0.5) / 0.5).t()
    ranked = scores.argsort(dim=-1, descending=True)
    hits = data.labels[ranked] == data.labels[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(-1).float().mean()) for k in ks}
