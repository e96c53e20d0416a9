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
from qkv.tokenizer.batch import pad_batch

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
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos
    return pad_batch([[*tokenizer.encode(c), eos] for c in captions], pad)


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


TASKS = ("image-classification", "clip")


def digits_preprocessing():
    """How a digits model reads an image file: 16 x 16 grayscale, scaled to [-1, 1] as in training."""
    from qkv.image import ImagePreprocessing

    return ImagePreprocessing(size=(16, 16), mean=(0.5,), std=(0.5,), convert_rgb=True)


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], path) -> str:
    """A confusion matrix as a PNG (rows: true class, columns: predicted), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from qkv.atomic import atomic_path

    fig = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(matrix.numpy(), cmap="Blues")
    n = len(class_names)
    ax.set_xticks(range(n), class_names, rotation=45, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")  # fmt: skip
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return str(path)


def train_digits(
    task: str,
    steps: int,
    out_dir: str | None = None,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train a ViT classifier or a CLIP model on the digits (80/20 stratified split) and evaluate
    it on the held-out fifth -> (model, metrics). With out_dir: metrics.jsonl, the loss curve, the
    checkpoint (with its tokenizer and image preprocessing) and, for the classifier, confusion.png."""
    import time
    from pathlib import Path

    from qkv.config import ModelConfig
    from qkv.models import CLIP, CLIPConfig, VisionTransformer
    from qkv.training import BlockLoader, Trainer, TrainingConfig

    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    torch.manual_seed(seed)
    train, test = split(load_digits_images(16), 0.2, seed)
    vit = dict(family="vit", vocab_size=None, d_model=64, n_layers=4, n_heads=4, d_ff=128, image_size=16,
               patch_size=4, n_channels=1)  # fmt: skip
    if task == "image-classification":
        from qkv.training.classification import LABELS_KEY

        cfg = ModelConfig(**vit, head="classification", classifier="first_token", num_labels=10, dropout=0.1,
                          extra={LABELS_KEY: list(DIGIT_NAMES)})  # fmt: skip
        model: torch.nn.Module = VisionTransformer(cfg)
        collate = ImageCollate((1, 16, 16), shift=1, seed=seed)
        lr = lr or 2e-3
    else:
        from qkv.tokenizer import train_tokenizer

        captions = [caption(y, t) for y in range(10) for t in CAPTION_TEMPLATES]
        tok = train_tokenizer(kind="bpe", texts=captions * 5, vocab_size=300, show_progress=False)
        text = ModelConfig(
            family="encoder",
            vocab_size=tok.vocab_size,
            d_model=64,
            n_layers=2,
            n_heads=4,
            d_ff=128,
            max_seq_len=32,
            mlp="quick_gelu",
            eos_token_id=tok.eos_token_id,
            tie_embeddings=False,
        )
        vision = ModelConfig(**{**vit, "n_layers": 3}, mlp="quick_gelu", embed_norm=True, norm_pooled_only=True,
                             patch_bias=False)  # fmt: skip
        model = CLIP(CLIPConfig(text=text, vision=vision, projection_dim=32))
        model.tokenizer = tok
        collate = CaptionCollate(tok, (1, 16, 16), shift=1, seed=seed)
        lr = lr or 1e-3
    model.preprocessing = digits_preprocessing()
    config = TrainingConfig(steps=steps, lr=lr, warmup_steps=min(100, steps // 10), weight_decay=0.05,
                            out_dir=out_dir, progress=progress)  # fmt: skip
    trainer = Trainer(model, config, BlockLoader(pack_images(train), batch_size, seed=seed), collate=collate)
    start = time.perf_counter()
    trainer.train()
    metrics: dict = {"task": task, "steps": steps, "train_images": len(train), "test_images": len(test),
                     "train_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    if task == "image-classification":
        metrics["accuracy"] = classification_accuracy(model, test)
        matrix = confusion_matrix(model, test)
        metrics["confusion"] = matrix.tolist()
        if out_dir:
            metrics["confusion_png"] = plot_confusion(matrix, train.class_names, Path(out_dir) / "confusion.png")
    else:
        metrics["zero_shot_accuracy"] = clip_zero_shot_accuracy(model, model.tokenizer, test)
        metrics["chance"] = 1 / len(test.class_names)
        metrics.update(clip_retrieval_recall(model, model.tokenizer, test))
    return model.eval(), metrics
