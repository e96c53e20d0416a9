"""`qkv attention MODEL --prompt TEXT --out map.png`: draw the attention weights of every layer/head.

For an encoder-decoder, --prompt is the source and --target the decoder's text; --kind chooses
the decoder's self-attention, the encoder's, or the cross-attention (target rows x source columns).
For a ViT or CLIP model, --image draws the [CLS] token's attention over the patches per layer and
head, and the attention rollout laid over the image.
"""

from __future__ import annotations

import argparse

from qkv.cli.args import add_model_argument
from qkv.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="draw attention maps for a prompt", description=__doc__)
    add_model_argument(p)
    p.add_argument("--prompt", default=None, help="the text (an encoder-decoder's source)")
    p.add_argument("--image", default=None, help="an image file, for ViT and CLIP models")
    p.add_argument("--target", default=None, help="encoder-decoders: the decoder's text")
    p.add_argument("--kind", choices=("self", "encoder", "cross"), default=None,
                   help="encoder-decoders: which attention to draw (default: cross)")  # fmt: skip
    p.add_argument("--out", default="attention.png", help="PNG file to write (default: attention.png)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers to draw (default: all)")
    p.add_argument("--heads", type=int, nargs="*", default=None, help="heads to draw (default: all)")
    p.set_defaults(func=run)


def _ids(tok, text: str, flag: str) -> list[int]:
    ids = tok.encode(text)
    if not ids:
        raise UsageError(f"{flag} encodes to no tokens; give a non-empty {flag}")
    return ids


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.loading import load
    from qkv.viz import attention_maps, plot_attention

    model = load(args.model).eval()
    if args.image is not None:
        return _image_attention(model, args)
    if args.prompt is None:
        raise UsageError("give --prompt (text models) or --image (ViT and CLIP models)")
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{args.model} carries no tokenizer, so the prompt cannot be encoded")
    seq2seq = getattr(model, "is_encoder_decoder", False)
    if seq2seq and args.target is None:
        raise UsageError("this is an encoder-decoder model: give the decoder's text with --target")
    if not seq2seq and (args.target is not None or args.kind is not None):
        raise UsageError("--target and --kind apply to encoder-decoder models only")
    source = _ids(tok, args.prompt, "--prompt")
    labels = lambda ids: [tok.decode([i]) for i in ids]  # noqa: E731
    if seq2seq:
        kind = args.kind or "cross"
        target = model.decoder_start_ids(1)[0].tolist() + _ids(tok, args.target, "--target")
        weights = attention_maps(model, torch.tensor([source]), torch.tensor([target]), kind)
        rows, cols = {"self": (target, target), "encoder": (source, source), "cross": (target, source)}[kind]
    else:
        weights = attention_maps(model, torch.tensor([source]))
        rows = cols = source
    path = plot_attention(
        weights, labels(rows), args.out, layers=args.layers, heads=args.heads, title=args.prompt[:60],
        key_tokens=labels(cols),
    )  # fmt: skip
    print(f"attention map ({weights.shape[0]} layers x {weights.shape[1]} heads) written to {path}")
    return 0


def _image_attention(model, args: argparse.Namespace) -> int:
    """The picture for a ViT (or CLIP's vision tower): rollout over the image, [CLS] maps per head."""
    import torch

    from qkv.image import preprocess
    from qkv.viz import attention_maps, plot_image_attention

    recipe = getattr(model, "preprocessing", None)
    vision = getattr(model, "vision", model)  # CLIP: its image tower
    if recipe is None or getattr(vision.config, "family", None) != "vit":
        raise UsageError(f"{args.model} is not an image model (ViT or CLIP); --image needs one")
    pixels = preprocess(args.image, recipe, vision.config.n_channels)
    weights = attention_maps(vision, pixels)
    mean, std = torch.tensor(recipe.mean)[:, None, None], torch.tensor(recipe.std)[:, None, None]
    shown = (pixels[0] * std[: pixels.shape[1]] + mean[: pixels.shape[1]]).permute(1, 2, 0).clamp(0, 1).numpy()
    grid = (pixels.shape[2] // vision.config.patch_size, pixels.shape[3] // vision.config.patch_size)
    path = plot_image_attention(weights, shown, grid, args.out, layers=args.layers, heads=args.heads,
                                title=str(args.image)[-60:])  # fmt: skip
    print(f"attention over {grid[0]}x{grid[1]} patches ({weights.shape[0]} layers x {weights.shape[1]} heads) "
          f"and its rollout written to {path}")  # fmt: skip
    return 0
