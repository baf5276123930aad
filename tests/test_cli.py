"""The dynlrp command: help, explain (images, text), coverage, demo, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dynlrp
from dynlrp import cli, viz

SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_module(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dynlrp", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory) -> Path:
    from dynlrp.data import load_digits_cnn

    _, samples, _ = load_digits_cnn()
    return viz.write_png(tmp_path_factory.mktemp("img") / "seven.png", viz.image_rgb(samples[7], scale=4))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                *"a the film was wonderful bad ##ly ##ing".split()]))
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_help_on_every_command(capsys):
    for argv in (["--help"], ["explain", "--help"], ["coverage", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
        assert "usage: dynlrp" in capsys.readouterr().out
    assert cli.main([]) == cli.EXIT_USAGE


def test_python_m_dynlrp_and_one_line_errors(tmp_path):
    bad = run_module("explain", str(tmp_path / "missing.png"), "--model", "demo", "--out", str(tmp_path))
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "no such image file" in bad.stderr
    with pytest.raises(cli.CLIError, match="no such image"):  # --debug: raised, with its traceback
        cli.main(["explain", str(tmp_path / "missing.png"), "--model", "demo", "--debug"])


def test_explain_images_with_the_demo_model(capsys, digit_png, tmp_path):
    code, out, err = run(capsys, "explain", str(digit_png), "--model", "demo", "--out", str(tmp_path),
                         "--save", str(tmp_path / "e.pt"))
    assert code == 0, err
    assert "class 7" in out
    for name in ("seven_heatmap.png", "seven_overlay.png", "e.pt"):
        assert (tmp_path / name).is_file()
    assert dynlrp.Explanation.load(tmp_path / "e.pt").relevance.shape == (1, 1, 8, 8)
    code, out, _ = run(capsys, "explain", str(digit_png), "--model", "demo", "--target", "3", "--out",
                       str(tmp_path), "--cmap", "coldnhot")
    assert code == 0 and "class 3" in out


def test_explain_torchvision_with_local_weights(capsys, digit_png, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), weights)
    code, out, err = run(capsys, "explain", str(digit_png), str(digit_png), "--model", "torchvision:resnet18",
                         "--weights", str(weights), "--size", "32", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "seven_2_heatmap.png", "seven_2_overlay.png", "seven_heatmap.png", "seven_overlay.png"]
    code, _, err = run(capsys, "explain", str(digit_png), "--model", "torchvision:squeezenet1_0", "--weights",
                       str(weights), "--size", "32")
    assert code == 1 and "do not fit torchvision:squeezenet1_0" in err and err.count("\n") == 1


def test_offline_errors_say_how_to_pass_local_weights(capsys, digit_png, monkeypatch):
    pytest.importorskip("torchvision")
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    code, out, err = run(capsys, "explain", str(digit_png), "--model", "torchvision:resnet18")
    assert code == 1 and err.count("\n") == 1
    assert "--weights FILE" in err and "Traceback" not in err
    transformers = pytest.importorskip("transformers")

    def no_hub(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    code, _, err = run(capsys, "explain", "--text", "hi", "--model", "hf:someone/some-model")
    assert code == 1 and err.count("\n") == 1 and "local model folder" in err


def test_usage_errors(capsys, digit_png):
    assert run(capsys, "explain", "--model", "demo")[0] == 1
    code, _, err = run(capsys, "explain", str(digit_png), "--model", "demo", "--target", "cat")
    assert code == 1 and "--target 'cat'" in err
    code, _, err = run(capsys, "explain", str(digit_png), "--model", "nosuchthing")
    assert code == 1 and "model spec" in err
    code, _, err = run(capsys, "explain", "--text", "hi", "--model", "demo")
    assert code == 1 and "Hugging Face" in err
    assert run(capsys, "coverage")[0] == 1


def test_explain_text_writes_html_and_terminal_heatmap(capsys, tiny_bert, tmp_path):
    code, out, err = run(capsys, "explain", "--text", "the film was wonderful", "--model", f"hf:{tiny_bert}",
                         "--target", "pos", "--merge-subwords", "--color", "always", "--out", str(tmp_path),
                         "--debug")
    assert code == 0, err
    assert "class 1 (pos)" in out and "\x1b[48;2;" in out
    page = (tmp_path / "text_heatmap.html").read_text(encoding="utf-8")
    assert ">wonderful<" in page and "pos" in page


def test_coverage_torchvision_json(capsys):
    pytest.importorskip("torchvision")
    code, out, err = run(capsys, "coverage", "torchvision:resnet18", "--size", "32", "--json", "--ops")
    assert code == 0, err
    row = json.loads(out)
    assert row["covered_nodes"] == row["total_nodes"] > 40 and row["uncovered"] == {}
    assert row["lrp_run"].startswith("ok") and "ConvolutionBackward0" in row["ops"]


def test_coverage_hf_arch_from_config_alone(capsys, tmp_path):
    pytest.importorskip("transformers")
    code, out, err = run(capsys, "coverage", "--arch", "llama", "--layers", "1",
                         "--png", str(tmp_path / "c.png"))
    assert code == 0, err
    assert out.splitlines()[0].split()[:4] == ["Model", "Covered", "nodes", "Unique"]
    assert "hf --arch llama" in out and (tmp_path / "c.png").is_file()
    code, _, err = run(capsys, "coverage", "--arch", "no-such-arch")
    assert code == 1 and "unknown Hugging Face architecture" in err


def test_coverage_local_hf_folder_and_factory(capsys, tiny_bert, monkeypatch):
    code, out, err = run(capsys, "coverage", f"hf:{tiny_bert}", "--no-run")
    assert code == 0, err
    assert "not run (--no-run)" in out
    monkeypatch.chdir(EXAMPLES)
    code, out, err = run(capsys, "coverage", "custom_residual:build")
    assert code == 0, err
    assert "custom_residual:build" in out and "Uncovered ops: none" in out and "ok:" in out


class _Opaque(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _Uncovered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(_Opaque.apply(x))


def uncovered_factory():
    return _Uncovered(), torch.randn(1, 4)


def test_coverage_reports_uncovered_ops_and_strict_exit(capsys):
    code, out, _ = run(capsys, "coverage", "test_cli:uncovered_factory")
    assert code == 0 and "_OpaqueBackward" in out and "not run: uncovered ops" in out
    assert run(capsys, "coverage", "test_cli:uncovered_factory", "--strict")[0] == 3


def test_demo(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--out", str(tmp_path), "--color", "never")
    assert code == 0, err
    for name in ("digits_heatmaps.png", "digit_0_overlay.png", "digits_conv3_channels.png",
                 "digits_table.png",
                 "digits_stats.png"):
        assert (tmp_path / name).is_file(), name
    assert str(tmp_path / "digits_heatmaps.png") in out and "predicted 10/10" in out
    if cli.minilm_dir() is not None:
        assert (tmp_path / "sentence_similarity.html").is_file() or "skipped: UnknownOpError" in out
