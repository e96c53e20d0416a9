"""The attention explorer in a real browser: headless Chromium from Debian's package, driven by
Playwright (no browser download). Values are read back from the DOM and compared with the weights
computed in Python. One browser for the module, one page load per model kind.

`make test` installs Chromium where it can (root with apt-get); elsewhere these tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.viz import attention_maps, attention_rollout
from qkv.viz.explorer import write_attention_explorer
from tiny_models import random_ids, tiny_model

CHROMIUM = Path(os.environ.get("QKV_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# The red channel at each cell's centre of the head map [n x n], read off the canvas.
READ_MAP_RED = """n => { const c = document.getElementById('map'), d = c.dataset, size = +d.cell;
  const ctx = c.getContext('2d'), at = (i) => i * size + size / 2;
  return [...Array(n).keys()].map(r => [...Array(n).keys()].map(
    s => ctx.getImageData(+d.left + at(s), +d.top + at(r), 1, 1).data[0])); }"""
TOLERANCE = 0.5 / 255 + 0.0005 + 1e-6  # uint8 on the page, then 3 decimals in the DOM

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"Chromium is absent ({CHROMIUM}): `apt-get install chromium` (as root; `make test` does it where it can)",
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, path: Path):
    """Load the page offline; every console error and page error lands in page.errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page


@pytest.fixture(scope="module")
def decoder(browser, tmp_path_factory):
    model = tiny_model("tiny-llama", n_layers=3)
    ids = random_ids(512, 1, 10, seed=0)
    path = tmp_path_factory.mktemp("explorer") / "decoder.html"
    write_attention_explorer(model, path, ids, [f" w{i}" for i in range(10)], decode=lambda i: f"<{i}>")
    page = open_page(browser, path)
    yield page, attention_maps(model, ids).double().numpy()
    page.context.close()


def dom_values(page, selector: str, attribute: str) -> np.ndarray:
    return np.array(page.eval_on_selector_all(selector, f"ts => ts.map(t => parseFloat(t.dataset.{attribute}))"))


def test_page_loads_without_console_errors(decoder):
    page, _ = decoder
    assert page.errors == []
    assert page.locator("#grid-entropy .hc").count() == 3 * 4
    assert page.locator("#lens tr").count() == 1 + 3  # header + one row per layer


def test_hovering_a_token_shows_its_row_and_column(decoder):
    page, weights = decoder
    page.hover("#strips .tok[data-pos='6']")
    to = dom_values(page, "#strips .tok", "to")
    frm = dom_values(page, "#strips .tok", "from")
    assert np.abs(to - weights[0, 0, 6]).max() <= TOLERANCE  # layer 0 head 0 is selected first
    assert np.abs(frm - weights[0, 0, :, 6]).max() <= TOLERANCE
    assert to[7:].max() == 0 and to[:7].sum() == pytest.approx(1, abs=0.02)  # causal: nothing ahead


def test_clicking_a_head_shows_its_map(decoder):
    page, weights = decoder
    page.click("#grid-entropy .hc[data-layer='2'][data-head='3']")
    canvas = page.eval_on_selector("#map", "c => ({...c.dataset})")
    assert (canvas["layer"], canvas["head"]) == ("2", "3")
    assert "layer 2 · head 3" in page.text_content("#map-title")
    red = np.array(page.evaluate(READ_MAP_RED, 10))
    assert np.abs((255 - red) / 247 - weights[2, 3]).max() <= 0.01  # the page's white-to-blue ramp, inverted
    page.hover("#strips .tok[data-pos='9']")
    assert np.abs(dom_values(page, "#strips .tok", "to") - weights[2, 3, 9]).max() <= TOLERANCE


def test_rollout_on_the_text(decoder):
    page, weights = decoder
    page.click("#rollout-btn")
    page.hover("#strips .tok[data-pos='8']")
    rollout = attention_rollout(torch.from_numpy(weights)).double().numpy()
    assert np.abs(dom_values(page, "#strips .tok", "to") - rollout[8]).max() <= TOLERANCE
    assert "rollout" in page.text_content("#map-title")


def test_encoder_decoder_cross_attention_over_source(browser, tmp_path):
    from qkv.config import ModelConfig
    from qkv.models.seq2seq import EncoderDecoder

    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig.from_name("tiny-t5")).eval()
    src, tgt = random_ids(512, 1, 7, seed=3), random_ids(512, 1, 5, seed=4)
    write_attention_explorer(model, tmp_path / "s.html", src, list("abcdefg"), tgt, list("vwxyz"))
    page = open_page(browser, tmp_path / "s.html")
    cross = attention_maps(model, src, tgt, kind="cross").double().numpy()
    page.click("#tabs button[data-view='cross']")
    page.hover("#strip-target .tok[data-pos='3']")
    assert np.abs(dom_values(page, "#strip-source .tok", "to") - cross[0, 0, 3]).max() <= TOLERANCE
    page.hover("#strip-source .tok[data-pos='2']")  # what in the target attends to source token 2
    assert np.abs(dom_values(page, "#strip-target .tok", "from") - cross[0, 0, :, 2]).max() <= TOLERANCE
    assert page.errors == []
    page.context.close()


def test_vit_patches_over_the_image(browser, tmp_path):
    from qkv.config import ModelConfig
    from qkv.models import VisionTransformer

    torch.manual_seed(0)
    cfg = ModelConfig(family="vit", vocab_size=None, d_model=32, n_layers=2, n_heads=4, image_size=16, patch_size=4)
    model = VisionTransformer(cfg).eval()
    pixels = torch.randn(1, 3, 16, 16)
    write_attention_explorer(model, tmp_path / "v.html", pixels, [], image=np.random.default_rng(0).random((16, 16, 3)))
    page = open_page(browser, tmp_path / "v.html")
    weights = attention_maps(model, pixels).double().numpy()
    cls_row = dom_values(page, "#patches .patch", "to")  # shown before any hover: the [CLS] token's row
    assert np.abs(cls_row - weights[0, 0, 0, 1:]).max() <= TOLERANCE
    page.hover("#patches .patch[data-pos='6']")
    assert np.abs(dom_values(page, "#patches .patch", "to") - weights[0, 0, 6, 1:]).max() <= TOLERANCE
    assert page.evaluate("document.getElementById('image').naturalWidth") == 16  # the data: URI image decoded
    assert page.errors == []
    page.context.close()


def test_screenshot(decoder, tmp_path):
    from PIL import Image

    page, _ = decoder
    path = tmp_path / "explorer.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] == 1280 and img.size[1] >= 600
    assert path.stat().st_size > 20_000
    assert page.errors == []  # nothing went wrong through all the clicking and hovering


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_screenshot_for_the_readme(browser, tmp_path):
    """The README's picture: SmolLM2-135M-Instruct on a prompt that repeats itself, head 17.5 (an
    induction head: the second " of" looks at what followed the first, " France") and the hovered
    " of". `QKV_WRITE_DOCS=1 pytest -m slow -k readme tests/viz` writes docs/attention_explorer.png."""
    import qkv

    model = qkv.load("smollm2-135m-instruct").eval()
    tok = model.tokenizer
    prompt = "The capital of France is Paris. The capital of Germany is"
    ids = torch.tensor([tok.encode(prompt)])
    tokens = [tok.decode([i]) for i in ids[0].tolist()]
    write_attention_explorer(model, tmp_path / "smollm2.html", ids, tokens, decode=lambda i: tok.decode([i]),
                             title=f"SmolLM2-135M-Instruct: {prompt!r}")  # fmt: skip
    page = open_page(browser, tmp_path / "smollm2.html")
    page.click("#grid-entropy .hc[data-layer='17'][data-head='5']")
    page.hover("#strips .tok[data-pos='9']")  # the second " of"
    to = dom_values(page, "#strips .tok", "to")
    weights = attention_maps(model, ids).double().numpy()
    assert np.abs(to - weights[17, 5, 9]).max() <= TOLERANCE
    assert tokens[int(to.argmax())] == " France"
    out = Path("docs/attention_explorer.png") if os.environ.get("QKV_WRITE_DOCS") == "1" else tmp_path / "shot.png"
    page.screenshot(path=str(out), full_page=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and page.errors == []
    page.context.close()
