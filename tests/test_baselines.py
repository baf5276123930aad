"""dynlrp.baselines: every method on models whose exact attribution is known.

On a bias-free linear model ``y = W x`` the explained logit is ``w_t . x``: gradient x input,
Integrated Gradients and GradientSHAP (zero baseline) and LRP all give ``w_t * x``; Saliency and
SmoothGrad give ``|w_t|``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynlrp import baselines, metrics

pytest.importorskip("captum")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def linear():
    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=False).eval()
    x = torch.randn(4, 6)
    return model, x


def _exact(model: nn.Linear, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return model.weight.detach()[target] * x


def test_gradient_methods_on_a_linear_model(linear):
    model, x = linear
    t = torch.tensor([0, 1, 2, 1])
    exact = _exact(model, x, t)
    assert torch.allclose(baselines.attribute("input_x_gradient", model, x, t), exact, atol=1e-6)
    assert torch.allclose(baselines.attribute("integrated_gradients", model, x, t), exact, atol=1e-5)
    assert torch.allclose(baselines.attribute("gradient_shap", model, x, t, samples=4), exact, atol=1e-5)
    w = model.weight.detach()[t].abs()
    assert torch.allclose(baselines.attribute("saliency", model, x, t), w, atol=1e-6)
    assert torch.allclose(baselines.attribute("smoothgrad", model, x, t, samples=3), w, atol=1e-6)
    assert torch.allclose(baselines.attribute("ig", model, x, t, steps=4), exact, atol=1e-5)  # alias


def test_lrp_methods_on_a_linear_model(linear):
    model, x = linear
    t = torch.tensor([2, 2, 0, 1])
    exact = _exact(model, x, t)
    assert torch.allclose(baselines.attribute("dynlrp", model, x, t), exact, atol=1e-4)
    assert torch.allclose(baselines.attribute("dynlrp:epsilon", model, x, t), exact, atol=1e-4)
    pytest.importorskip("zennit")
    assert torch.allclose(baselines.attribute("zennit:epsilon_plus", model, x, t), exact, atol=1e-4)
    # a callable that is not a module works for dynlrp too
    assert torch.allclose(baselines.attribute("dynlrp", lambda v: model(v), x, t), exact, atol=1e-4)


def test_default_target_is_the_prediction(linear):
    model, x = linear
    pred = model(x).argmax(1)
    assert torch.allclose(baselines.attribute("input_x_gradient", model, x), _exact(model, x, pred))
    assert torch.allclose(baselines.attribute("input_x_gradient", model, x, 1),
                          _exact(model, x, torch.ones(4, dtype=torch.long)))


class Scaled(nn.Module):
    """``scale * (W x)``: a per-example keyword input the sampling methods must expand."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * scale[:, None]


def test_forward_kwargs_follow_the_batch(linear):
    model, x = linear
    scale = torch.tensor([1.0, 2.0, -1.0, 0.5])
    t = torch.tensor([0, 0, 1, 2])
    exact = _exact(model, x, t) * scale[:, None]
    wrapped = Scaled(model)
    for name in ("input_x_gradient", "integrated_gradients", "gradient_shap", "dynlrp"):
        got = baselines.attribute(name, wrapped, x, t, forward_kwargs={"scale": scale})
        assert torch.allclose(got, exact, atol=1e-4), name
    fn = baselines.method("integrated_gradients", wrapped, steps=8)
    assert torch.allclose(fn(x, t, scale=scale), exact, atol=1e-4)


def test_random_is_seeded_and_shaped(linear):
    _, x = linear
    a = baselines.attribute("random", None, x, seed=3)
    assert a.shape == x.shape and torch.equal(a, baselines.attribute("random", None, x, seed=3))


def test_errors_and_applicability(linear):
    model, x = linear
    with pytest.raises(ValueError, match="unknown method"):
        baselines.attribute("deeplift", model, x)
    with pytest.raises(TypeError, match="takes no options"):
        baselines.attribute("input_x_gradient", model, x, steps=3)
    with pytest.raises(baselines.NotApplicableError):
        baselines.attribute("lxt", model, x)
    assert not baselines.applies("lxt", model)
    assert baselines.applies("saliency", model) and baselines.applies("random", model)
    attention = nn.Sequential(nn.Linear(4, 4))
    attention.add_module("attn", nn.MultiheadAttention(4, 1))
    assert not baselines.applies("zennit", attention)


def test_all_methods_in_the_harness_on_the_digits_cnn():
    pytest.importorskip("zennit")
    from dynlrp.data import load_digits_cnn

    model, x, _ = load_digits_cnn()
    names = ["dynlrp:epsilon_plus", "zennit:epsilon_plus", "saliency", "input_x_gradient", "random"]
    methods = {n: baselines.method(n, model) for n in names}
    report = metrics.evaluate(model, x, methods, features=metrics.Pixels(step=8), occlusion="blur",
                              progress=False)
    rows = {r["method"]: r for r in report.rows()}
    assert all(r["error"] is None for r in rows.values()), rows
    for name in names[:-1]:
        assert rows[name]["abpc"] > rows["random"]["abpc"], name


# -- LxT on a Hugging Face BERT ---------------------------------------------------------------


class EmbeddingsClassifier(nn.Module):
    """A BERT called on embeddings, mean-pooled, with a linear head."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, 2)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def test_lxt_on_a_tiny_bert_matches_dynlrp_attnlrp_and_undoes_its_patches():
    pytest.importorskip("lxt")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    model = EmbeddingsClassifier(transformers.BertModel(config, add_pooling_layer=False)).eval()
    ids = torch.randint(5, 30, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    emb = model.bert.get_input_embeddings()(ids).detach()
    layer_norm_forward = nn.LayerNorm.forward
    before = model(emb, mask)

    lxt = baselines.attribute("lxt", model, emb, forward_kwargs={"attention_mask": mask})
    assert nn.LayerNorm.forward is layer_norm_forward and not hasattr(nn.LayerNorm, "original_forward")
    assert type(model.bert) is transformers.BertModel  # the user's model is untouched
    assert torch.equal(model(emb, mask), before)
    converted = baselines.lxt_model(model)
    assert type(converted.bert).__module__.startswith("lxt.") and baselines.lxt_model(model) is converted

    ours = baselines.attribute("dynlrp:attnlrp", model, emb, forward_kwargs={"attention_mask": mask})
    # the same numbers, not only the same ranking (seeds: LxT one-hot, dynlrp the logit)
    per_token_lxt, per_token_ours = lxt.sum(-1), ours.sum(-1)
    assert torch.allclose(per_token_ours, per_token_lxt, rtol=1e-3, atol=1e-5), (per_token_ours,
                                                                                per_token_lxt)
