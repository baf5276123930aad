"""Small models and independent LRP references shared by the tests.

The models are tiny, built from plain ``torch.nn`` layers, and come with helpers to freeze
them and to give biases and batch-norm statistics random values (library inits set them to
zero / identity, which hides mistakes).

The reference functions compute LRP by hand from the textbook formulas, without autograd
and without dynlrp: a linear layer with explicit matrices, a convolution through
``unfold`` / ``fold`` (the patches of the input, so no transposed convolution is involved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dynlrp

# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


def stabilized(z: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``; with ``eps = 0``, zeros become ones.

    Parameters
    ----------
    z
        Pre-activations (the denominators of an epsilon rule).
    eps
        The stabiliser.

    Returns
    -------
    torch.Tensor
        The stabilised denominators.
    """
    if eps == 0:
        return torch.where(z == 0, torch.ones_like(z), z)
    return z + eps * torch.where(z >= 0, 1.0, -1.0)


def linear_lrp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rel: torch.Tensor,
               eps: float = 0.0) -> torch.Tensor:
    """Epsilon-LRP through ``z = x W^T + b`` for 2-d ``x``: ``R_i = sum_j x_i w_ji R_j / z_j``.

    Parameters
    ----------
    x
        Input, shape ``(N, I)``.
    weight
        Weight, shape ``(J, I)``.
    bias
        Bias, shape ``(J,)``, or ``None``.
    rel
        Output relevance, shape ``(N, J)``.
    eps
        The stabiliser.

    Returns
    -------
    torch.Tensor
        Input relevance, shape ``(N, I)``.
    """
    x, weight, rel = x.detach().double(), weight.detach().double(), rel.detach().double()
    z = torch.einsum("ni,ji->nj", x, weight)
    if bias is not None:
        z = z + bias.detach().double()
    contrib = torch.einsum("ni,ji->nji", x, weight)  # z_nj = sum_i contrib_nji (+ b_j)
    return torch.einsum("nji,nj->ni", contrib, rel / stabilized(z, eps)).float()


def conv2d_lrp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rel: torch.Tensor,
               stride: int = 1, padding: int = 0, eps: float = 0.0) -> torch.Tensor:
    """Epsilon-LRP through a 2-d convolution, from the input's patches (``unfold``).

    Every output position ``p`` of channel ``o`` is ``z = sum_q w_oq u_qp (+ b_o)`` over the
    patch ``u`` of the input; each patch entry gets ``w_oq u_qp R_op / z_op`` and ``fold``
    adds the shares of overlapping patches back onto the input pixels.

    Parameters
    ----------
    x
        Input, shape ``(N, C, H, W)``.
    weight
        Weight, shape ``(O, C, kh, kw)``.
    bias
        Bias, shape ``(O,)``, or ``None``.
    rel
        Output relevance, shaped like the convolution's output.
    stride, padding
        As in ``torch.nn.functional.conv2d`` (one int for both spatial dims).
    eps
        The stabiliser.

    Returns
    -------
    torch.Tensor
        Input relevance, shaped like ``x``.
    """
    x, weight, rel = x.detach().double(), weight.detach().double(), rel.detach().double()
    n, o = x.shape[0], weight.shape[0]
    kernel = tuple(weight.shape[2:])
    patches = F.unfold(x, kernel, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    w = weight.reshape(o, -1)  # (O, C*kh*kw)
    z = torch.einsum("oq,nql->nol", w, patches)
    if bias is not None:
        z = z + bias.detach().double()[None, :, None]
    s = rel.reshape(n, o, -1) / stabilized(z, eps)
    shares = patches * torch.einsum("oq,nol->nql", w, s)
    return F.fold(shares, tuple(x.shape[2:]), kernel, padding=padding, stride=stride).float()


def affine_lrp(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, rel: torch.Tensor,
               eps: float = 0.0) -> torch.Tensor:
    """Epsilon-LRP through a per-channel affine map ``z = scale * x + shift`` (inference
    batch norm): ``R_x = scale * x * R / z``.

    Parameters
    ----------
    x
        Input, shape ``(N, C, ...)``.
    scale, shift
        Per-channel factors, shape ``(C,)``.
    rel
        Output relevance, shaped like ``x``.
    eps
        The stabiliser.

    Returns
    -------
    torch.Tensor
        Input relevance, shaped like ``x``.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x, rel = x.detach().double(), rel.detach().double()
    a = scale.detach().double().reshape(shape)
    z = a * x + shift.detach().double().reshape(shape)
    return (a * x * rel / stabilized(z, eps)).float()


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(scale, shift)`` of an eval-mode batch norm: ``y = scale * x + shift``.

    Parameters
    ----------
    bn
        A batch-norm layer in eval mode.

    Returns
    -------
    tuple of torch.Tensor
        Per-channel scale and shift.
    """
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


def sequential_lrp(layers: nn.Sequential, x: torch.Tensor, seed: torch.Tensor,
                   eps: float = 0.0) -> torch.Tensor:
    """LRP by hand through a stack of Linear, Conv2d (stride 1 or 2, int padding), ReLU
    (identity rule), MaxPool2d (winner takes all), AdaptiveAvgPool2d(1) (each pixel in
    proportion to its value) and Flatten layers.

    Parameters
    ----------
    layers
        The stack.
    x
        Its input.
    seed
        Relevance of the output.
    eps
        The stabiliser of the linear layers.

    Returns
    -------
    torch.Tensor
        Input relevance, shaped like ``x``.
    """
    acts = [x.detach()]
    with torch.no_grad():
        for layer in layers:
            acts.append(layer(acts[-1]))
    rel = seed.detach()
    for layer, a in zip(reversed(list(layers)), reversed(acts[:-1])):
        if isinstance(layer, nn.Linear):
            rel = linear_lrp(a, layer.weight, layer.bias, rel, eps)
        elif isinstance(layer, nn.Conv2d):
            rel = conv2d_lrp(a, layer.weight, layer.bias, rel, layer.stride[0], layer.padding[0], eps)
        elif isinstance(layer, nn.MaxPool2d):
            _, idx = F.max_pool2d(a, layer.kernel_size, layer.stride, return_indices=True)
            flat = torch.zeros_like(a).flatten(2)
            rel = flat.scatter_add(2, idx.flatten(2), rel.flatten(2)).view_as(a)
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            assert layer.output_size in (1, (1, 1))
            rel = a * rel / stabilized(a.sum((2, 3), keepdim=True))
        elif isinstance(layer, nn.Flatten):
            rel = rel.reshape(a.shape)
        elif not isinstance(layer, nn.ReLU):
            raise TypeError(f"no reference rule for {type(layer).__name__}")
    return rel


# --------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter (the usual LRP setting).

    Parameters
    ----------
    model
        The model, changed in place.

    Returns
    -------
    nn.Module
        The same model.
    """
    return model.eval().requires_grad_(False)


@torch.no_grad()
def randomize_affine(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give biases and batch-norm weights / running statistics random values.

    Parameters
    ----------
    model
        The model, changed in place.
    generator
        Random generator; ``None`` uses torch's global one.

    Returns
    -------
    nn.Module
        The same model.
    """
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0.0, 0.2, generator=generator)
            mod.running_var.uniform_(0.5, 2.0, generator=generator)
            if mod.weight is not None:
                mod.weight.uniform_(0.5, 1.5, generator=generator)
                mod.bias.normal_(0.0, 0.2, generator=generator)
        elif isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
            mod.bias.normal_(0.0, 0.2, generator=generator)
    return model


def state_snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Copies of every parameter and buffer with its ``requires_grad`` flag.

    Parameters
    ----------
    model
        The model.

    Returns
    -------
    dict
        ``{name: (tensor copy, requires_grad)}``.
    """
    snap = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    snap.update({name: (b.detach().clone(), False) for name, b in model.named_buffers()})
    return snap


def assert_unchanged(model: nn.Module, before: dict[str, tuple[torch.Tensor, bool]]) -> None:
    """Assert that ``model`` still matches a :func:`state_snapshot` and has no ``.grad``.

    Parameters
    ----------
    model
        The model.
    before
        The snapshot taken earlier.
    """
    after = state_snapshot(model)
    assert after.keys() == before.keys()
    for name, (value, flag) in before.items():
        assert torch.equal(after[name][0], value), f"{name} changed"
        assert after[name][1] == flag, f"{name}.requires_grad changed"
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}.grad was written"


def _fingerprint(t: torch.Tensor) -> tuple:
    """What identifies a tensor's state cheaply: storage, version counter (bumped by every in-place
    op, under ``no_grad`` too), ``requires_grad``, ``.grad``, and a checksum of the values (which
    catches writes through ``.data``, invisible to the version counter)."""
    grad = None if not t.is_leaf or t.grad is None else (t.grad.data_ptr(), t.grad._version)
    values = t.detach()
    checksum = float(values.sum()) if values.is_floating_point() else int(values.sum())
    return t.data_ptr(), t._version, t.requires_grad, grad, checksum


class Untouched:
    """The state of a model and of the caller's tensors, to check later that nothing changed:
    parameters, buffers, their ``.grad`` and ``requires_grad``, every module's train/eval mode,
    and the tensors (inputs, seeds, outputs). No copies are made, so it is cheap for whole
    torchvision models. Use :meth:`check`, or ``with Untouched(model, x, seed): ...``.

    Parameters
    ----------
    model
        The model, or ``None`` for tensors only.
    tensors
        The caller's tensors (``None`` entries are skipped).
    """

    def __init__(self, model: nn.Module | None, *tensors: torch.Tensor | None) -> None:
        self.model = model
        self.tensors = [t for t in tensors if t is not None]
        self.before = self._state()

    def _state(self) -> tuple[dict, list]:
        model = self.model
        named = [] if model is None else [*model.named_parameters(), *model.named_buffers()]
        modes = [] if model is None else [(name, m.training) for name, m in model.named_modules()]
        own = [(f"tensor {i}", t) for i, t in enumerate(self.tensors)]
        return {name: _fingerprint(t) for name, t in named + own}, modes

    def check(self) -> None:
        """Assert that nothing changed since construction."""
        (values, modes), (before, modes_before) = self._state(), self.before
        changed = [name for name, value in before.items() if values.get(name) != value]
        assert not changed and values.keys() == before.keys(), f"changed: {changed}"
        assert modes == modes_before, "a module's train/eval mode changed"

    def __enter__(self) -> Untouched:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.check()


def tiny_llama():
    """A 2-layer Llama (hidden size 32, random weights, frozen, eval) and a batch of 2 x 6 input
    embeddings: ``(model, x, forward(model, x) -> last-token logits, "attnlrp")``."""
    import transformers

    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=50,
                                   max_position_embeddings=32, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)
    x = model.get_input_embeddings()(torch.randint(3, 50, (2, 6))).detach()
    return model, x, lambda m, xi: m(inputs_embeds=xi).logits[:, -1], "attnlrp"


def per_row_seed(y: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """A seed selecting one logit per row: ``y[n, targets[n]]`` there, zero elsewhere.

    Parameters
    ----------
    y
        Logits, shape ``(N, C)``.
    targets
        One class index per row.

    Returns
    -------
    torch.Tensor
        The seed, shaped like ``y``.
    """
    seed = torch.zeros_like(y.detach())
    rows = torch.arange(y.shape[0])
    seed[rows, targets] = y.detach()[rows, targets]
    return seed


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


class Unregistered(torch.autograd.Function):
    """``2 * x`` as a custom autograd Function: its node, ``UnregisteredBackward``, has no
    op entry (an unknown op for the engine)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


class MLP(nn.Sequential):
    """Linear-ReLU-Linear-ReLU-Linear on ``(N, 6)`` inputs, 4 logits."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__(nn.Linear(6, 8, bias=bias), nn.ReLU(), nn.Linear(8, 8, bias=bias), nn.ReLU(),
                         nn.Linear(8, 4, bias=bias))


class CNN(nn.Sequential):
    """Conv-ReLU-MaxPool-Conv-ReLU-AvgPool-Linear on ``(N, 3, 8, 8)`` inputs, 5 logits."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(6, 5, bias=bias),
        )


class ResidualCNN(nn.Module):
    """A stem convolution, one residual block ``relu(conv(relu(conv(h))) + h)`` and a
    pooled linear head, on ``(N, 3, 8, 8)`` inputs, 5 logits."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.head = nn.Linear(4, 5, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.conv2(torch.relu(self.conv1(h))) + h)
        return self.head(h.mean((2, 3)))


class ConvBNBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``: a ResNet basic block without
    downsampling (bias-free convolutions, batch norms with their own shift)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class DownsampleBlock(ConvBNBlock):
    """A ResNet basic block whose shortcut is a strided 1x1 convolution and a batch norm:
    the add sums the outputs of two batch norms."""

    def __init__(self, channels: int = 3, out_channels: int = 4) -> None:
        super().__init__(channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.down = nn.Conv2d(channels, out_channels, 1, stride=2, bias=False)
        self.bn_down = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.bn_down(self.down(x)))


LRP0 = {"linear": dynlrp.rules.Epsilon(0.0)}
"""Epsilon 0 on linear maps: LRP-0, which conserves relevance exactly on bias-free models."""


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """``assert_close`` in float32 precision, with tolerances scaled to the largest value.

    Parameters
    ----------
    actual, expected
        Tensors of the same shape.
    rel
        Absolute tolerance as a fraction of ``max |expected|`` (at least of 1).
    """
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=rel * max(scale, 1.0))
