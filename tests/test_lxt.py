"""Agreement with LxT 2.1 (AttnLRP, Achtibat et al. 2024) on the architectures both support.

LxT's efficient mode computes AttnLRP as input x gradient after monkey-patching a model file
(``lxt.efficient.monkey_patch``): identity on activations, ``1/2`` after elementwise and
attention products (``q``, ``k`` by 4, ``v`` by 2), the normalising denominators of layer and
RMS norms detached. Its patches are process-wide (they replace ``torch.nn.LayerNorm.forward``,
``torch.nn.Dropout.forward`` and whole transformers modules), so LxT runs in a subprocess
(this file, run as a script): the test process builds each model (random weights, frozen,
batch 2), writes weights, inputs and targets to a temporary file, the subprocess patches,
loads them into LxT's classes and writes ``inputs_embeds * grad`` back.

Compared per example: ``max |ours - lxt| / max |lxt|`` on the input embeddings (pixels for the
ViT) with ``rules="attnlrp"`` (whose epsilon is 0, as LxT's gradient formulation), and pinned
with ``epsilon=1e-6``, a stabiliser that makes the difference measurable on tiny random models
(docs/transformers.md has the numbers). torchvision's ViT is compared with CP-LRP (LxT 2.1
patches it with ``cp_LRP`` only), and so is Llama (``cp_LRP`` exists for it too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("lxt")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

B, L = 2, 6
TOL = 1e-3  # of the max |relevance| per example
EPS = 1e-6
EPS_TOL = 1e-2  # epsilon=1e-6 on these tiny random models: measured up to 6.3e-3 (torchvision ViT)


@dataclass(frozen=True)
class Case:
    """One model for both libraries: ``module`` is the transformers module LxT patches."""

    id: str
    module: str
    cls: str
    config: str
    config_kwargs: tuple
    impl: str
    ours: str = "attnlrp"
    lxt: str = "attnLRP"
    kind: str = "lm"  # "lm": next-token logit; "cls": class logit; "vit": torchvision ViT


SMALL = (("num_hidden_layers", 2), ("hidden_size", 32), ("intermediate_size", 64), ("vocab_size", 50),
         ("max_position_embeddings", 32))
DECODER = SMALL + (("num_attention_heads", 4), ("num_key_value_heads", 2))
ENCODER = SMALL + (("num_attention_heads", 2), ("num_labels", 3))
GPT2 = (("n_layer", 2), ("n_embd", 32), ("n_head", 2), ("vocab_size", 50), ("n_positions", 32))
MODELS = "transformers.models"
CASES = [
    *(Case(f"llama-{i}", f"{MODELS}.llama.modeling_llama", "LlamaForCausalLM", "LlamaConfig", DECODER, i)
      for i in ("sdpa", "eager")),
    Case("llama-cp", f"{MODELS}.llama.modeling_llama", "LlamaForCausalLM", "LlamaConfig", DECODER, "sdpa",
         "cp_lrp", "cp_LRP"),
    *(Case(f"qwen2-{i}", f"{MODELS}.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2Config", DECODER, i)
      for i in ("sdpa", "eager")),
    *(Case(f"qwen3-{i}", f"{MODELS}.qwen3.modeling_qwen3", "Qwen3ForCausalLM", "Qwen3Config",
           DECODER + (("head_dim", 8),), i) for i in ("sdpa", "eager")),
    *(Case(f"gpt2-{i}", f"{MODELS}.gpt2.modeling_gpt2", "GPT2LMHeadModel", "GPT2Config", GPT2, i)
      for i in ("sdpa", "eager")),
    *(Case(f"bert-{i}", f"{MODELS}.bert.modeling_bert", "BertForSequenceClassification", "BertConfig",
           ENCODER, i, kind="cls") for i in ("sdpa", "eager")),
    Case("vit-torchvision", "torchvision.models.vision_transformer", "VisionTransformer", "", (), "sdpa",
         "cp_lrp", "cp_LRP", "vit"),
]


def _config(case: Case):
    return getattr(transformers, case.config)(attn_implementation=case.impl, **dict(case.config_kwargs))


def _vit_kwargs():
    return {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32,
            "mlp_dim": 64, "num_classes": 5}


def build(case: Case, cls=None) -> torch.nn.Module:
    """The model of ``case`` (random weights from seed 0 unless a state dict is loaded later)."""
    import importlib

    torch.manual_seed(0)
    module = importlib.import_module(case.module)
    cls = cls or getattr(module, case.cls)
    model = cls(**_vit_kwargs()) if case.kind == "vit" else cls(_config(case))
    if case.kind == "vit":
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    return model.eval().requires_grad_(False)


def inputs(case: Case, model: torch.nn.Module) -> torch.Tensor:
    """The explained input: input embeddings (text) or pixels."""
    gen = torch.Generator().manual_seed(1)
    if case.kind == "vit":
        return torch.randn(B, 3, 32, 32, generator=gen)
    ids = torch.randint(3, 50, (B, L), generator=gen)
    return model.get_input_embeddings()(ids).detach()


def forward(case: Case, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits: ``(B, V)`` at the last position for LMs, ``(B, C)`` for classifiers."""
    if case.kind == "vit":
        return model(x)
    logits = model(inputs_embeds=x).logits
    return logits[:, -1] if case.kind == "lm" else logits


# -- LxT's side (the subprocess) ---------------------------------------------------------------------
def lxt_relevance(case: Case, state: dict, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Input x gradient of the target logits after LxT's monkey patch (call in a subprocess)."""
    import importlib

    from lxt.efficient import monkey_patch
    from lxt.efficient.models import DEFAULT_MAP, gpt2, llama, qwen2, qwen3, vit_torch

    module = importlib.import_module(case.module)
    maps = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gpt2": gpt2, "vision_transformer": vit_torch}
    family = module.__name__.rsplit(".", 1)[-1].replace("modeling_", "")
    patch_map = getattr(maps[family], case.lxt) if family in maps else DEFAULT_MAP[module]
    done = getattr(module, "_dynlrp_test_patched", None)
    if done is None:  # patches cannot be undone: one variant per module and process
        monkey_patch(module, patch_map)
        module._dynlrp_test_patched = case.lxt
    assert module._dynlrp_test_patched == case.lxt, "AttnLRP and CP-LRP patches in one process"
    model = build(case, getattr(module, case.cls))
    model.load_state_dict(state)
    x = x.clone().requires_grad_(True)
    y = forward(case, model, x)
    y[torch.arange(B), target].sum().backward()
    return (x * x.grad).detach()


def _lxt_main(path_in: str, path_out: str) -> None:  # pragma: no cover - runs in the subprocess
    import warnings

    warnings.simplefilter("ignore")
    jobs = torch.load(path_in, weights_only=False)
    out = {case_id: lxt_relevance(job["case"], job["state"], job["x"], job["target"])
           for case_id, job in jobs.items()}
    torch.save(out, path_out)


# -- our side -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lxt_results():
    """Build every case here, run LxT on them in one subprocess, return both sides."""
    import dynlrp

    jobs, ours, ours_eps = {}, {}, {}
    for case in CASES:
        model = build(case)
        x = inputs(case, model)
        with torch.no_grad():
            target = forward(case, model, x).argmax(-1)
        jobs[case.id] = {"case": case, "state": model.state_dict(), "x": x, "target": target}
        if case.kind == "vit":  # nn.MultiheadAttention's frozen in-projection bias: keep biases in the graph
            for name, p in model.named_parameters():
                p.requires_grad_(name.endswith("bias"))
        xr = x.clone().requires_grad_(True)
        with dynlrp.record() as tape:
            y = forward(case, model, xr)
        seed = torch.zeros_like(y)
        seed[torch.arange(B), target] = y.detach()[torch.arange(B), target]
        preset = getattr(dynlrp.presets, case.ours)
        (ours[case.id],) = dynlrp.lrp(y, xr, seed, rules=case.ours, tape=tape, retain_graph=True)  # y again
        (ours_eps[case.id],) = dynlrp.lrp(y, xr, seed, rules=preset(epsilon=EPS), tape=tape)
    theirs = {}
    for variant in sorted({job["case"].lxt for job in jobs.values()}):  # one process per LxT variant
        batch = {k: job for k, job in jobs.items() if job["case"].lxt == variant}
        with tempfile.TemporaryDirectory() as tmp:
            path_in, path_out = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
            torch.save(batch, path_in)
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            done = subprocess.run([sys.executable, __file__, path_in, path_out], env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            theirs.update(torch.load(path_out, weights_only=False))
    return ours, ours_eps, theirs


def per_example_difference(ours: torch.Tensor, theirs: torch.Tensor) -> list[float]:
    """``max |ours - theirs| / max |theirs|`` for each example."""
    return [float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_agrees_with_lxt(lxt_results, case):
    ours, ours_eps, theirs = lxt_results
    diff = per_example_difference(ours[case.id], theirs[case.id])
    assert max(diff) < TOL, diff
    diff_eps = per_example_difference(ours_eps[case.id], theirs[case.id])
    assert max(diff_eps) < EPS_TOL, diff_eps


def test_lxt_patches_stay_in_the_subprocess():
    """LxT's monkey patches replace torch.nn.LayerNorm.forward process-wide; here they never ran."""
    assert torch.nn.LayerNorm.forward.__module__.startswith("torch.")
    assert torch.nn.Dropout.forward.__module__.startswith("torch.")


def report() -> str:  # pragma: no cover - documentation helper
    """The per-example differences as a Markdown table (docs/transformers.md)."""
    gen = lxt_results.__wrapped__()
    ours, ours_eps, theirs = gen
    lines = ["| model | rules | max diff / max abs R, per example | same with epsilon=1e-6 |",
             "|---|---|---:|---:|"]
    for case in CASES:
        d0 = per_example_difference(ours[case.id], theirs[case.id])
        d1 = per_example_difference(ours_eps[case.id], theirs[case.id])
        lines.append(f"| {case.id} | {case.ours} vs {case.lxt} | {', '.join(f'{d:.1e}' for d in d0)} "
                     f"| {', '.join(f'{d:.1e}' for d in d1)} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3:
        _lxt_main(sys.argv[1], sys.argv[2])
    else:
        print(report())
