"""dynlrp.viz: colour maps, PNG files, image heatmaps, token heatmaps, tables and curves."""

from __future__ import annotations

import pytest
import torch

from dynlrp import viz

PIL = pytest.importorskip("PIL.Image")


def read_png(path) -> torch.Tensor:
    with PIL.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        return torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).reshape(h, w, 3)


def test_signed_colormaps_are_centred_at_zero():
    rgb = viz.colorize(torch.tensor([-1.0, 0.0, 1.0]), "bwr")
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 3)
    assert rgb.tolist() == [[0, 0, 255], [255, 255, 255], [255, 0, 0]]
    for cmap in viz.COLORMAPS:
        out = viz.colorize(torch.linspace(-1, 1, 11).reshape(1, 11), cmap)
        assert out.shape == (1, 11, 3)
    hot = viz.colorize(torch.tensor([-1.0, 0.0, 1.0]), "coldnhot")
    assert hot[1].tolist() == [0, 0, 0] and hot[2, 0] > hot[2, 2] and hot[0, 2] > hot[0, 0]
    with pytest.raises(ValueError, match="unknown colour map"):
        viz.colorize(torch.zeros(2), "jet")


def test_normalize_is_symmetric():
    r = torch.tensor([[-2.0, 1.0], [0.0, 4.0]])
    v = viz.normalize(r)
    assert torch.allclose(v, r / 4)
    assert torch.equal(viz.normalize(torch.zeros(3)), torch.zeros(3))
    clipped = viz.normalize(torch.tensor([0.1, 0.2, 0.3, 100.0]), percentile=50)
    assert clipped.max() == 1.0 and clipped[0] < 1.0


def test_png_roundtrip(tmp_path):
    img = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    path = viz.write_png(tmp_path / "a.png", img)
    assert torch.equal(read_png(path), img)
    grey = torch.randint(0, 256, (4, 3), dtype=torch.uint8)
    assert torch.equal(read_png(viz.write_png(tmp_path / "g.png", grey))[..., 0], grey)
    back = viz.read_image(path)
    assert back.shape == (3, 5, 7) and torch.allclose(back * 255, img.permute(2, 0, 1).float())
    with pytest.raises(TypeError):
        viz.encode_png(img.float())
    with pytest.raises(FileNotFoundError):
        viz.read_image(tmp_path / "missing.png")


def test_heatmap_overlay_grid(tmp_path):
    rel = torch.zeros(3, 8, 8)
    rel[:, 2, 3] = 1.0
    rel[:, 5, 5] = -1.0
    h = viz.heatmap(rel)  # small image: scaled up to >= 128 px
    assert h.shape == (128, 128, 3)
    assert h[2 * 16, 3 * 16].tolist() == [255, 0, 0] and h[5 * 16, 5 * 16].tolist() == [0, 0, 255]
    assert h[0, 0].tolist() == [255, 255, 255]
    assert viz.heatmap(rel, scale=1).shape == (8, 8, 3)
    image = torch.rand(3, 8, 8)
    ov = viz.overlay(image, rel, scale=1)
    assert ov.shape == (8, 8, 3)
    grey = viz.image_rgb(image, scale=1).float().mean(-1)
    assert torch.allclose(ov[0, 0].float(), grey[0, 0].expand(3), atol=1)  # no relevance: the image
    assert ov[2, 3, 0] > ov[2, 3, 2]
    g = viz.grid([h, h, h], ncols=2, pad=2)
    assert g.shape == (2 * 128 + 3 * 2, 2 * 128 + 3 * 2, 3)
    batch = torch.randn(4, 1, 8, 8)
    path = viz.save_grid(batch, tmp_path / "grid.png", images=torch.rand(4, 1, 8, 8), ncols=2)
    assert read_png(path).shape[1] == 2 * 128 + 3 * 2
    assert read_png(viz.save_heatmap(rel, tmp_path / "h.png")).shape == (128, 128, 3)
    assert read_png(viz.save_overlay(image, rel, tmp_path / "o.png", scale=2)).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="relevance is"):
        viz.overlay(image, torch.zeros(4, 4))


def test_matplotlib_figure():
    pytest.importorskip("matplotlib")
    rel = torch.randn(2, 3, 6, 6)
    fig = viz.figure(rel, torch.rand(2, 3, 6, 6), titles=["cat", "dog"])
    assert len(fig.axes) == 2 * 3 + 1  # panels and a colour bar
    assert fig.axes[0].get_title() == "cat"
    assert len(viz.figure(rel[0]).axes) == 2
    cm = viz.mpl_colormap("bwr")
    assert cm.N == 256


def test_subword_schemes_and_merging():
    wp = ["[CLS]", "play", "##ing", "cats", "[SEP]"]
    assert viz.subword_scheme(wp) == "wordpiece"
    words, s = viz.merge_subwords(wp, torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0]))
    assert words == ["[CLS]", "playing", "cats", "[SEP]"] and s.tolist() == [0.5, 3.0, -1.0, 0.0]
    sp = ["<s>", "\u2581play", "ing", "\u2581cats", "</s>"]
    assert viz.subword_scheme(sp) == "sentencepiece"
    assert viz.merge_subwords(sp, [1, 2, 3, 4, 5])[0] == ["<s>", "playing", "cats", "</s>"]
    bpe = ["The", "\u0120play", "ing", "\u0120cats", "<|endoftext|>"]
    assert viz.subword_scheme(bpe) == "bpe"
    words, s = viz.merge_subwords(bpe, [1, 2, 3, 4, 5])
    assert words == ["The", "playing", "cats", "<|endoftext|>"] and s.tolist() == [1, 5, 4, 5]
    assert viz.word_pieces(["a", "b"]) == [("a", True), ("b", True)]


def test_text_html_is_self_contained_and_escaped(tmp_path):
    tokens = ["[CLS]", "<b>x</b>", "play", "##ing"]
    page = viz.text_html(tokens, torch.tensor([0.0, 1.0, -1.0, 0.5]), title="a & b")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "a &amp; b" in page
    assert "rgb(255,51,51)" in page and "rgb(51,51,255)" in page  # strongest red / blue (lightened)
    assert 'title="+1"' in page
    merged = viz.text_html(tokens, torch.tensor([0.0, 1.0, -1.0, 0.5]), merge=True)
    assert ">playing<" in merged and ">play<" not in merged
    scores = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    two = viz.save_text_html([["a", "b"], ["c"]], scores, tmp_path / "t.html",
                             labels=["first", "second"])
    text = two.read_text(encoding="utf-8")
    assert "first" in text and "second" in text
    assert "rgb(51,51,255)" in text and "rgb(255,153,153)" in text  # one shared scale for both rows


def test_text_ansi():
    out = viz.text_ansi(["the", "cat"], torch.tensor([1.0, -1.0]))
    assert "\x1b[48;2;255;51;51m" in out and "\x1b[48;2;51;51;255m" in out and out.count("\x1b[0m") == 2
    assert "the" in out and "cat" in out
    two = viz.text_ansi([["a"], ["b"]], torch.tensor([[1.0], [0.5]]), labels=["A", "B"])
    assert two.count("\n") == 1 and two.startswith("A: ")


def test_tables_and_curves(tmp_path):
    pytest.importorskip("matplotlib")
    import dynlrp

    y = torch.nn.Linear(3, 2)(torch.randn(1, 3, requires_grad=True))
    report = dynlrp.coverage(y)
    header, rows = viz.coverage_rows({"linear": report})
    assert header[:3] == ["Model", "Covered nodes", "Unique ops covered"] and rows[0][0] == "linear"
    paths = [
        viz.table_png(["a", "b"], [[1, 2], [3, 4]], tmp_path / "t.png", title="table"),
        viz.curve_png([0, 1, 2], {"x": [0, 1, 4], "y": [1, 1, 1]}, tmp_path / "c.png", xlabel="step"),
        viz.bars_png([0.5, -0.2, 0.1], tmp_path / "b.png"),
        viz.coverage_png({"linear": report}, tmp_path / "cov.png"),
        viz.stats_png({"nodes": 3, "promise_density": 0.25, "cached_plan": False}, tmp_path / "s.png"),
    ]
    for p in paths:
        assert read_png(p).shape[0] > 50
