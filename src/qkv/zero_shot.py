"""Zero-shot image classification with CLIP (Radford et al. 2021, §3.1.2): each label becomes a
caption, and an image's label is the caption its embedding is closest to. No classifier head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qkv.errors import UsageError
from qkv.image import preprocess
from qkv.tokenizer.batch import pad_batch


def encode_captions(model: Any, tokenizer: Any, captions: Sequence[str], truncate: bool = False) -> torch.Tensor:
    """Unit-norm text embeddings [N, P] of captions, padded on the right.

    A caption longer than the text tower's positions (77 for CLIP) is refused, or cut to fit (ending
    with the end-of-text token) with a warning when `truncate`.
    """
    import warnings

    if not captions:
        raise UsageError("no captions given; pass at least one label")
    limit = model.config.text.max_seq_len
    eos = model.config.text.eos_token_id
    rows = []
    for caption in captions:
        ids = tokenizer.encode(caption)
        if len(ids) > limit:
            if not truncate:
                raise UsageError(
                    f"caption {caption[:40]!r} is {len(ids)} tokens, longer than the text tower's {limit} positions; "
                    "shorten it or pass truncate=True (--truncate) to cut it"
                )
            warnings.warn(f"caption {caption[:40]!r} cut from {len(ids)} to {limit} tokens", stacklevel=2)
            ids = [*ids[: limit - 1], eos if isinstance(eos, int) else ids[-1]]
        rows.append(ids)
    input_ids, mask = pad_batch(rows, model.config.text.pad_token_id or 0, model.device)
    with torch.no_grad():
        return model.encode_text(input_ids, mask)


def zero_shot(
    model: Any, images: Any, labels: Sequence[str], template: str = "{}", truncate: bool = False
) -> torch.Tensor:
    """Probabilities [N_images, N_labels] that each image shows each label, from a CLIP model with
    a tokenizer and its image preprocessing; template turns a label into a caption ("a photo of {}")."""
    if model.tokenizer is None:
        raise UsageError("zero-shot classification needs the model's tokenizer to encode the labels")
    if "{}" not in template:
        raise UsageError(f"template {template!r} must contain {{}} where the label goes")
    text = encode_captions(model, model.tokenizer, [template.format(label) for label in labels], truncate)
    pixels = preprocess(images, model.preprocessing, model.config.vision.n_channels).to(model.device)
    with torch.no_grad():
        image = model.encode_image(pixels)
    return (model.logit_scale.exp() * image @ text.t()).softmax(dim=-1)
