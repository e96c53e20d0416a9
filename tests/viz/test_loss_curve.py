"""Loss curves: a PNG with both series, written atomically."""

from __future__ import annotations

from PIL import Image

from qkv.viz import plot_loss_curve


def test_png_written_atomically(tmp_path):
    records = [{"step": s, "loss": 5.0 / s} for s in range(1, 21)] + [{"step": 10, "eval_loss": 0.9}]
    path = plot_loss_curve(records, tmp_path / "curve.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]


def test_replaces_previous_curve(tmp_path):
    path = tmp_path / "curve.png"
    path.write_bytes(b"old")
    plot_loss_curve([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], path)
    assert path.read_bytes()[:4] == b"\x89PNG"
