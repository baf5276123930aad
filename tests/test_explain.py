"""dynlrp.explain: targets, seeds and deltas, model state, modes, latents, HF inputs, batches, files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp
from dynlrp import Explanation, explain, explain_batches


class BiasFree(nn.Module):
    """Bias-free ReLU MLP: epsilon-LRP conserves exactly (up to eps), so delta ~ 0."""

    def __init__(self, d: int = 6, h: int = 8, c: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=False)
        self.fc2 = nn.Linear(h, h, bias=False)
        self.head = nn.Linear(h, c, bias=False)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = self.drop(torch.relu(self.fc2(h)))
        return self.head(h)


class DownsampleBlock(nn.Module):
    """A ResNet downsample add: both branches end in a batch norm (frozen biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(2, 4, 1, bias=False)
        self.bn_down = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        for bn in (self.bn, self.bn_down):
            bn.bias.data.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)) + self.bn_down(self.down(x)))
        return self.fc(h.mean((2, 3)))


class TinyTextModel(nn.Module):
    """Hugging Face-like: keyword inputs, get_input_embeddings(), a ModelOutput with logits."""

    def __init__(self, vocab: int = 20, d: int = 8, c: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, c, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return SequenceClassifierOutput(logits=self.fc(torch.relu(h)).sum(1))


class PixelModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, pixel_values=None, scale=1.0):
        return {"logits": self.fc(pixel_values.flatten(1)) * scale}


def manual(model: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    xr = x.clone().requires_grad_(True)
    y = model(xr)
    seed = torch.zeros_like(y)
    seed[range(len(y)), idx] = y.detach()[range(len(y)), idx]
    return dynlrp.lrp(y, xr, relevance=seed)[0]


@pytest.fixture
def net() -> BiasFree:
    return BiasFree().eval()


def test_default_target_is_argmax_and_matches_lrp(net):
    x = torch.randn(5, 6)
    e = explain(net, x)
    y = net(x)
    assert torch.equal(e.target, y.argmax(1))
    assert torch.allclose(e.output, y)
    assert e.relevance.shape == x.shape
    assert torch.allclose(e.relevance, manual(net, x, e.target), atol=1e-6)
    assert torch.allclose(e.score, y.max(1).values)
    assert e.delta.shape == (5,)
    assert e.delta.abs().max() < 1e-4  # bias-free: conservation up to epsilon
    assert torch.equal(e.inputs, x)
    assert e.mode == "promise" and e.stats["nodes"] > 0


def test_int_and_tensor_targets(net):
    x = torch.randn(3, 6)
    assert torch.equal(explain(net, x, target=2).target, torch.tensor([2, 2, 2]))
    idx = torch.tensor([0, 3, 1])
    e = explain(net, x, target=idx)
    assert torch.equal(e.target, idx)
    assert torch.allclose(e.relevance, manual(net, x, idx), atol=1e-6)
    assert torch.allclose(e.score, net(x).detach()[range(3), idx])
    assert torch.equal(explain(net, x, target=torch.tensor(1)).target, torch.tensor([1, 1, 1]))


def test_callable_target_per_example_and_scalar(net):
    x = torch.randn(4, 6)
    e = explain(net, x, target=lambda y: y[:, 0] - y[:, 1])
    y = net(x).detach()
    assert e.target is None
    assert torch.allclose(e.score, y[:, 0] - y[:, 1])
    assert e.delta.shape == (4,) and e.delta.abs().max() < 1e-4
    total = explain(net, x, target=lambda y: y[:, 2].sum())
    assert total.delta.dim() == 0
    assert torch.allclose(total.score, y[:, 2].sum())
    assert torch.allclose(total.relevance.sum(), y[:, 2].sum(), atol=1e-4)


def test_target_errors(net):
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match="3 examples"):
        explain(net, x, target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        explain(net, x, target=7)
    with pytest.raises(ValueError, match="class indices"):
        explain(net, x, target=torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="no class axis"):
        explain(lambda_model(lambda t: t.sum(1)), x, target=1)
    with pytest.raises(dynlrp.GraphError, match="grad_fn"):
        explain(net, x, target=lambda y: torch.ones(3))
    with pytest.raises(ValueError, match="mode"):
        explain(net, x, mode="fast")


class lambda_model(nn.Module):  # noqa: N801 - reads like a function in the tests
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(6, 6, bias=False)

    def forward(self, x):
        return self.fn(self.lin(x))


def test_one_value_per_example_output_is_explained_as_is():
    model = lambda_model(lambda t: t.sum(1))
    x = torch.randn(3, 6)
    e = explain(model, x)
    assert e.target is None
    assert torch.allclose(e.score, model(x).detach())


def test_leaves_model_and_inputs_as_found(net):
    net.train()
    net.fc1.requires_grad_(False)
    grad = torch.ones_like(net.fc2.weight)
    net.fc2.weight.grad = grad
    x = torch.randn(4, 6)
    e1, e2 = explain(net, x), explain(net, x)
    assert torch.equal(e1.relevance, e2.relevance)  # eval mode inside: dropout off
    assert net.training and all(m.training for m in net.modules())
    assert not net.fc1.weight.requires_grad and net.fc2.weight.requires_grad
    assert net.fc2.weight.grad is grad and torch.equal(grad, torch.ones_like(grad))
    assert net.fc1.weight.grad is None and net.head.weight.grad is None
    assert not x.requires_grad and x.grad is None
    explain(net, x, at={"fc2": net.fc2})
    assert all(not m._forward_hooks for m in net.modules())


def test_under_no_grad(net):
    with torch.no_grad():
        e = explain(net, torch.randn(2, 6))
    assert e.relevance.abs().sum() > 0


def test_frozen_downsample_promise_reads_biases_from_the_model():
    model = DownsampleBlock().eval().requires_grad_(False)
    x = torch.randn(2, 2, 5, 5)
    auto = explain(model, x)
    rec = explain(model, x, mode="record")
    assert auto.mode == "promise" and rec.mode == "record"
    assert torch.allclose(auto.relevance, rec.relevance, atol=1e-5)


def test_auto_falls_back_to_record_where_promise_mode_cannot_rebuild():
    class ConstantShift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
            self.register_buffer("shift", torch.randn(4))

        def forward(self, x):
            return self.b(self.a(x) + self.shift)  # a constant tensor: autograd keeps no copy

    model = ConstantShift().eval().requires_grad_(False)
    x = torch.randn(2, 4)
    with pytest.raises(dynlrp.UnrecoverableValueError):
        explain(model, x, mode="promise")
    auto, rec = explain(model, x), explain(model, x, mode="record")
    assert auto.mode == "record"
    assert torch.allclose(auto.relevance, rec.relevance)
    # with trainable parameters the biases are in the graph: promise mode works, same answer
    model.requires_grad_(True)
    prom = explain(model, x)
    assert prom.mode == "promise"
    assert torch.allclose(prom.relevance, rec.relevance, atol=1e-5)
    assert not any(p.requires_grad is False for p in model.parameters())


def test_latent_relevance_by_module_name_and_callable(net):
    x = torch.randn(3, 6)
    captured = {}
    net.fc2.register_forward_hook(lambda m, a, out: captured.__setitem__("fc2", out))
    e = explain(net, x, at={"mod": net.fc1, "name": "fc2", "fn": lambda out: captured["fc2"]})
    assert e.latent["mod"].shape == (3, 8)
    assert torch.allclose(e.latent["name"], e.latent["fn"])
    # bias-free: every layer's relevance sums to the explained score
    assert torch.allclose(e.latent["mod"].sum(1), e.score, atol=1e-4)
    assert torch.allclose(e.relevance, explain(net, x).relevance)


def test_latent_module_called_twice_is_summed():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)
            self.head = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.head(torch.relu(self.lin(torch.relu(self.lin(x)))))

    model = Twice()
    e = explain(model, torch.randn(2, 4), at={"lin": model.lin})
    assert e.latent["lin"].shape == (2, 4)
    assert torch.allclose(e.latent["lin"].sum(1), 2 * e.score, atol=1e-4)  # two layers, each conserves


def test_latent_errors(net):
    with pytest.raises(dynlrp.GraphError, match="did not run"):
        explain(net, torch.randn(2, 6), at={"x": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="module"):
        explain(net, torch.randn(2, 6), at={"x": 3})


def test_token_ids_through_the_embedding():
    model = TinyTextModel()
    ids = torch.randint(0, 20, (2, 5))
    e = explain(model, ids)
    assert e.relevance.shape == (2, 5)
    assert e.embedding_relevance.shape == (2, 5, 8)
    assert torch.allclose(e.relevance, e.embedding_relevance.sum(-1))
    assert torch.equal(e.inputs, ids)
    assert torch.allclose(e.output, model(ids).logits.detach())
    assert e.delta.abs().max() < 1e-4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = explain(model, {"input_ids": ids, "attention_mask": mask})
    assert torch.all(masked.relevance[0, 3:] == 0)
    embeds = model.embed(ids).detach()
    by_embeds = explain(model, {"inputs_embeds": embeds})
    assert by_embeds.relevance.shape == (2, 5, 8)
    assert torch.allclose(by_embeds.relevance, e.embedding_relevance, atol=1e-6)


def test_keyword_inputs_and_forward_kwargs():
    model = PixelModel()
    px = torch.randn(3, 3, 2, 2)
    e = explain(model, {"pixel_values": px}, scale=2.0)
    assert e.relevance.shape == px.shape
    assert torch.allclose(e.output, model(pixel_values=px, scale=2.0)["logits"].detach())
    with pytest.raises(ValueError, match="nothing to explain"):
        explain(model, {"images": px})
    with pytest.raises(TypeError, match="get_input_embeddings"):
        explain(BiasFree(), torch.randint(0, 3, (2, 6)))


def test_sequence_logits_explain_the_last_position():
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.fc = nn.Linear(6, 10, bias=False)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, inputs_embeds, attention_mask=None):
            h = inputs_embeds if attention_mask is None else inputs_embeds * attention_mask[..., None]
            return self.fc(torch.relu(h.cumsum(1)))

    model = LM()
    ids = torch.randint(0, 10, (2, 4))
    e = explain(model, ids)
    y = e.output
    assert y.shape == (2, 4, 10)
    assert torch.equal(e.target, y[:, -1].argmax(-1))
    assert torch.allclose(e.score, y[:, -1].max(-1).values)
    # padded batch: each example's last real token (right padding for row 0, left for row 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    padded = explain(model, {"input_ids": ids, "attention_mask": mask})
    last = padded.output[torch.arange(2), torch.tensor([1, 3])]
    assert torch.equal(padded.target, last.argmax(-1))
    assert torch.allclose(padded.score, last.max(-1).values)
    assert torch.all(padded.relevance[0, 2:] == 0) and torch.all(padded.relevance[1, 0] == 0)


def test_batches_match_one_call(net, capsys):
    x = torch.randn(7, 6)
    whole = explain(net, x)
    chunked = explain(net, x, batch_size=3, progress=True)
    assert "dynlrp" in capsys.readouterr().err  # the tqdm bar
    assert torch.allclose(chunked.relevance, whole.relevance, atol=1e-6)
    assert torch.equal(chunked.target, whole.target)
    assert chunked.delta.shape == (7,)
    assert chunked.stats["batches"] == 3 and chunked.stats["examples"] == 7
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    sliced = explain_batches(net, list(x.split(2)), target=idx, progress=False)
    assert torch.equal(sliced.target, idx)
    labelled = explain_batches(net, ((x[i:i + 3], idx[i:i + 3]) for i in range(0, 7, 3)), target="labels",
                               progress=False)
    assert torch.equal(labelled.target, idx)
    assert torch.allclose(labelled.relevance, sliced.relevance, atol=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        explain_batches(net, [], progress=False)


def test_an_engine_can_be_passed_and_reused(net):
    engine = dynlrp.LRP("epsilon")
    x = torch.randn(4, 6)
    first = explain(net, x, rules=engine)
    second = explain(net, x, rules=engine)
    assert torch.allclose(first.relevance, second.relevance)
    assert torch.allclose(first.relevance, explain(net, x, rules="epsilon").relevance)
    if "cached_plan" in second.stats:  # the engine's plan cache serves the second call
        assert second.stats["cached_plan"]


def test_batches_of_different_lengths_are_padded():
    model = TinyTextModel()
    batches = [torch.randint(0, 20, (2, 3)), torch.randint(0, 20, (1, 5))]
    e = explain_batches(model, batches, progress=False)
    assert e.relevance.shape == (3, 5)
    assert torch.all(e.relevance[:2, 3:] == 0)
    assert e.inputs.shape == (3, 5)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_save_and_load(net, tmp_path, suffix):
    x = torch.randn(3, 6)
    e = explain(net, x, at={"fc1": net.fc1})
    e.meta["model"] = "BiasFree"
    path = e.save(tmp_path / f"e{suffix}")
    back = Explanation.load(path)
    for name, t in e.tensors().items():
        got = back.tensors()[name]
        assert torch.equal(got, t), name
    assert back.latent.keys() == {"fc1"}
    assert back.mode == e.mode and back.meta == {"model": "BiasFree"}
    assert back.stats["nodes"] == e.stats["nodes"]
    with pytest.raises(ValueError, match="suffix|use"):
        e.save(tmp_path / "e.txt")
