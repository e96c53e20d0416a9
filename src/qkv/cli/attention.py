"""`qkv attention MODEL --prompt TEXT`: see where a model's attention goes.

--html PAGE.html writes the attention explorer, one self-contained page (layer x head overview,
each head's map, weights over the text on hover, rollout, logit lens for decoders); --out MAP.png
draws every layer/head as a PNG grid (the default when neither --html nor --ablate is given);
--ablate L.H prints the change in loss and logits when head H of layer L is zeroed.
For an encoder-decoder, --prompt (or --source) is the source and --target the decoder's text;
--kind chooses the PNG's attention (and the ablated one): the decoder's self-attention, the
encoder's, or the cross-attention (target rows x source columns, the default). For a ViT or CLIP
model, --image takes the picture: the [CLS] token's attention over the patches and the rollout.
"""

from __future__ import annotations

import argparse

from qkv.cli.args import add_model_argument
from qkv.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="attention maps, the HTML explorer, head ablation", description=__doc__)
    add_model_argument(p)
    p.add_argument("--prompt", "--source", dest="prompt", default=None, help="the text (an encoder-decoder's source)")
    p.add_argument("--image", default=None, help="an image file, for ViT and CLIP models")
    p.add_argument("--target", default=None, help="encoder-decoders: the decoder's text")
    p.add_argument("--kind", choices=("self", "encoder", "cross"), default=None,
                   help="encoder-decoders: which attention to draw or ablate (default: cross)")  # fmt: skip
    p.add_argument("--out", default=None, help="PNG file to write (default: attention.png unless --html/--ablate)")
    p.add_argument("--html", default=None, help="write the attention explorer, one self-contained HTML page")
    p.add_argument("--ablate", nargs="+", default=None, metavar="L.H",
                   help="zero head H of layer L (each on its own) and print the change in loss and logits")  # fmt: skip
    p.add_argument("--rows", type=int, nargs="+", default=(),
                   help="--html: query positions kept on a capped page (negative: from the end)")  # fmt: skip
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers to draw (default: all)")
    p.add_argument("--heads", type=int, nargs="*", default=None, help="PNG: heads to draw (default: all)")
    p.set_defaults(func=run)


def _ids(tok, text: str, flag: str) -> list[int]:
    ids = tok.encode(text)
    if not ids:
        raise UsageError(f"{flag} encodes to no tokens; give a non-empty {flag}")
    return ids


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.interpret import parse_head
    from qkv.loading import load
    from qkv.viz.explorer import check_output_path

    # Everything that can be checked without the model is checked before loading it.
    html = check_output_path(args.html) if args.html is not None else None
    heads = [parse_head(h) for h in args.ablate or []]
    png = args.out if args.out is not None else (None if html or heads else "attention.png")
    if args.heads is not None and png is None:
        raise UsageError("--heads picks the PNG's panels (--out); the explorer shows every head")
    if args.kind is not None and png is None and not heads:
        raise UsageError(
            "--kind picks the PNG's (--out) or the ablated (--ablate) attention; the explorer shows all three"
        )
    if args.rows and html is None:
        raise UsageError("--rows picks the query rows the HTML explorer keeps; give --html too")
    if args.image is None and args.prompt is None:
        raise UsageError("give --prompt (text models) or --image (ViT and CLIP models)")
    model = load(args.model).eval()
    if args.image is not None:
        return _image_attention(model, args, png, html, heads)
    if getattr(model, "vision", None) is not None:
        raise UsageError(f"{args.model} is a CLIP model: its attention is drawn over an image; give --image")
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{args.model} carries no tokenizer, so the prompt cannot be encoded")
    seq2seq = getattr(model, "is_encoder_decoder", False)
    if seq2seq and args.target is None:
        raise UsageError("this is an encoder-decoder model: give the decoder's text with --target")
    if not seq2seq and (args.target is not None or args.kind is not None):
        raise UsageError("--target and --kind apply to encoder-decoder models only")
    if seq2seq and args.rows:
        raise UsageError("--rows keeps rows of a long prompt on a decoder's or encoder's page; an encoder-decoder's "
                         "page holds every row")  # fmt: skip
    source = torch.tensor([_ids(tok, args.prompt, "--prompt")])
    target = None
    if seq2seq:
        target = torch.tensor([model.decoder_start_ids(1)[0].tolist() + _ids(tok, args.target, "--target")])
    labels = lambda ids: [tok.decode([i]) for i in ids[0].tolist()]  # noqa: E731
    kind = (args.kind or "cross") if seq2seq else "self"
    if heads:
        _print_ablation(model, source, target, heads, kind)
    if html is not None:
        from qkv.viz.explorer import write_attention_explorer

        page = write_attention_explorer(
            model, html, source, labels(source), target_ids=target, target_tokens=labels(target) if seq2seq else None,
            layers=args.layers, rows=args.rows, decode=lambda i: tok.decode([i]), title=args.prompt[:60],
        )  # fmt: skip
        _report_page(page)
    if png is not None:
        from qkv.viz import attention_maps, plot_attention

        weights = attention_maps(model, source, target, kind)
        pairs = {"self": (target, target), "encoder": (source, source), "cross": (target, source)}
        rows, cols = pairs[kind] if seq2seq else (source, source)
        path = plot_attention(
            weights, labels(rows), png, layers=args.layers, heads=args.heads, title=args.prompt[:60],
            key_tokens=labels(cols),
        )  # fmt: skip
        print(f"attention map ({weights.shape[0]} layers x {weights.shape[1]} heads) written to {path}")
    return 0


def _report_page(page) -> None:
    print(f"attention explorer written to {page.path} ({page.size / 1e6:.2f} MB)")
    for note in page.notes:
        print(f"  note: {note}")


def _print_ablation(model, inputs, target, heads: list[tuple[int, int]], kind: str) -> None:
    """One line per head: the change in the next-token loss (language models) and in the logits."""
    from qkv.interpret import ablate_heads

    lm = getattr(model, "is_encoder_decoder", False) or getattr(model.config, "family", None) == "decoder"
    logits = ablate_heads(model, inputs, heads, target_ids=target, kind=kind, measure="logits")
    loss = ablate_heads(model, inputs, heads, target_ids=target, kind=kind) if lm else None
    where = f" ({kind} attention)" if getattr(model, "is_encoder_decoder", False) else ""
    for i, (layer, head) in enumerate(heads):
        change = logits[i]
        text = f"head {layer}.{head}{where} zeroed:"
        if loss is not None:
            text += f" loss {loss[i].item():+.4f} (nats/token);"
        text += f" logits max |change| {change.abs().max().item():.4f}, mean |change| {change.abs().mean().item():.4f}"
        print(text)


def _image_attention(model, args: argparse.Namespace, png: str | None, html, heads) -> int:
    """A ViT (or CLIP's vision tower): rollout over the image and [CLS] maps per head (PNG), the
    patches over the image in the explorer, or head ablation on the class logits."""
    import torch

    from qkv.image import preprocess

    recipe = getattr(model, "preprocessing", None)
    vision = getattr(model, "vision", model)  # CLIP: its image tower
    if recipe is None or getattr(vision.config, "family", None) != "vit":
        raise UsageError(f"{args.model} is not an image model (ViT or CLIP); --image needs one")
    if args.rows:
        raise UsageError("--rows picks query rows of a text prompt; a ViT's rows are its patches, all shown")
    pixels = preprocess(args.image, recipe, vision.config.n_channels)
    mean, std = torch.tensor(recipe.mean)[:, None, None], torch.tensor(recipe.std)[:, None, None]
    shown = (pixels[0] * std[: pixels.shape[1]] + mean[: pixels.shape[1]]).permute(1, 2, 0).clamp(0, 1).numpy()
    grid = (pixels.shape[2] // vision.config.patch_size, pixels.shape[3] // vision.config.patch_size)
    if heads:
        _print_ablation(vision, pixels, None, heads, "self")
    if html is not None:
        from qkv.viz.explorer import write_attention_explorer

        page = write_attention_explorer(vision, html, pixels, [], image=shown, layers=args.layers,
                                        title=str(args.image)[-60:])  # fmt: skip
        _report_page(page)
    if png is not None:
        from qkv.viz import attention_maps, plot_image_attention

        weights = attention_maps(vision, pixels)
        path = plot_image_attention(weights, shown, grid, png, layers=args.layers, heads=args.heads,
                                    title=str(args.image)[-60:])  # fmt: skip
        print(f"attention over {grid[0]}x{grid[1]} patches ({weights.shape[0]} layers x {weights.shape[1]} heads) "
              f"and its rollout written to {path}")  # fmt: skip
    return 0
