"""The examples run (at small size), and a fresh clone works as a new user would use it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dynlrp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(tmp_path, capsys):
    path = load_example("quickstart").main(str(tmp_path))
    assert path.is_file() and "wrote" in capsys.readouterr().out


def test_torchvision_cnn(tmp_path):
    pytest.importorskip("torchvision")
    e = load_example("torchvision_cnn").main(str(tmp_path), size=32)
    assert e.relevance.shape == (2, 3, 32, 32) and e.latent["layer3"].shape[:2] == (2, 256)
    assert (tmp_path / "heatmaps.png").is_file()


def test_custom_residual(tmp_path):
    e = load_example("custom_residual").main(str(tmp_path), batch=3)
    assert e.relevance.shape == (3, 12) and e.latent["block"].shape == (3, 32)
    assert torch.equal(dynlrp.Explanation.load(tmp_path / "custom_residual.pt").relevance, e.relevance)


def test_hf_text_classifier(tmp_path):
    pytest.importorskip("transformers")
    e = load_example("hf_text_classifier").main(str(tmp_path))
    assert e.relevance.shape == (1, 7)  # [CLS] + 5 words + [SEP]
    assert (tmp_path / "tokens.html").is_file()


def test_causal_lm_next_token(tmp_path):
    pytest.importorskip("transformers")
    e = load_example("causal_lm_next_token").main(str(tmp_path), layers=1)
    assert e.relevance.shape == (1, 6) and e.output.shape[:2] == (1, 6)
    assert (tmp_path / "next_token.html").is_file()


def test_vit(tmp_path):
    pytest.importorskip("transformers")
    e = load_example("vit").main(str(tmp_path), size=32, layers=1)
    assert e.relevance.shape == (2, 3, 32, 32) and e.latent["layer0"].shape == (2, 5, 64)
    assert (tmp_path / "vit_heatmaps.png").is_file()


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _lay_working_tree_over(clone: Path) -> None:
    """Copy this checkout's uncommitted changes into the clone. In CI the checkout is a clean
    clone and this does nothing; on a developer's machine it lets the test see work not yet
    committed (a file missing from git is still caught by CI)."""
    changed = _git("diff", "--name-only", "HEAD", cwd=ROOT).split("\n")
    untracked = _git("ls-files", "--others", "--exclude-standard", cwd=ROOT).split("\n")
    for rel in filter(None, changed + untracked):
        src, dst = ROOT / rel, clone / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif dst.exists() and not src.exists():
            dst.unlink()


@pytest.mark.slow
def test_fresh_clone_as_a_new_user(tmp_path):
    """git clone, `bash scripts/quickstart.sh OUT`, then `dynlrp demo` and `dynlrp explain` on a PNG."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path / "dynlrp"
    _git("clone", "--quiet", str(ROOT), str(clone), cwd=tmp_path)
    _lay_working_tree_over(clone)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "out"

    def sh(*cmd: str, extra: dict | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), cwd=tmp_path, env={**env, **(extra or {})}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    try:
        quick = sh("bash", str(clone / "scripts" / "quickstart.sh"), str(out))
        assert (out / "quickstart_relevance.pt").is_file() and "wrote" in quick.stdout
        venv = Path(sh("bash", str(clone / "scripts" / "venv.sh")).stdout.strip().splitlines()[-1])
        command = str(venv / "bin" / "dynlrp")
        # The venv now points at the clone (a .pth); other checkouts may re-point it concurrently,
        # so name the clone's sources explicitly.
        clone_src = {"PYTHONPATH": str(clone / "src")}
        demo = sh(command, "demo", "--out", str(out / "demo"), extra=clone_src)
        assert (out / "demo" / "digits_heatmaps.png").is_file() and "demo done" in demo.stdout
        assert str(out / "demo" / "digits_heatmaps.png") in demo.stdout
        png = out / "demo" / "digit_3_overlay.png"
        explained = sh(command, "explain", str(png), "--model", "demo", "--out", str(out / "explain"),
                       extra=clone_src)
        assert (out / "explain" / "digit_3_overlay_heatmap.png").is_file()
        assert "class" in explained.stdout
    finally:
        # venv.sh pointed the shared venv at the (temporary) clone; point it back at this checkout.
        subprocess.run(["bash", str(ROOT / "scripts" / "venv.sh")], capture_output=True, timeout=600, env=env)
