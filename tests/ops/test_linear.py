"""Brute-force tests of the linear op entries (src/dynlrp/ops/linear.py).

Matrix products and convolutions against the epsilon rule written out:
``R_x[b, i] = sum_j x[b, i] W[j, i] R[b, j] / (z[b, j] + eps * sign(z[b, j]))`` with ``z``
including the bias; convolutions as dense matrices built with loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dynlrp

from .helpers import (
    DT,
    Case,
    case_tests,
    constants,
    conv_matrix,
    covered,
    epsilon_dense,
    epsilon_mm,
    randn,
    stab,
)

EPS = 1e-10  # negligible: the "bias" contract is exact for zero bias
RULES = {"linear": dynlrp.rules.Epsilon(EPS)}
BIG_EPS = 0.3  # a visible stabiliser, to check its sign convention
# rules.stabilize rounds eps to float32 (see test_stabiliser_keeps_float64_precision)
BIG_EPS_TOL = 1e-5
B = 3


_const = constants(7)


# -- mm --------------------------------------------------------------------------------------

W45 = _const(4, 5)
C54 = _const(5, 4)


def _mm_cases() -> list[Case]:
    cases = [
        Case("mm-const-weight", ("MmBackward0",), lambda x: x @ W45, lambda: [randn(B, 4)],
             lambda v, r: [epsilon_mm(v[0], W45, r, EPS)], rules=RULES),
        Case("mm-big-eps", ("MmBackward0",), lambda x: x @ W45, lambda: [randn(B, 4)],
             lambda v, r: [epsilon_mm(v[0], W45, r, BIG_EPS)],
             rules={"linear": dynlrp.rules.Epsilon(BIG_EPS)}, conserve=False, replay="skip", tol=BIG_EPS_TOL),
        # x on the right: z[j, b] = sum_i C[j, i] x[i, b]; the batch is axis 1.
        Case("mm-const-first", ("MmBackward0",), lambda x: C54 @ x, lambda: [randn(4, B)],
             lambda v, r: [v[0] * (C54.T @ (r / stab(C54 @ v[0], EPS)))],
             rules=RULES, in_axes=(1,), out_axis=1, replay="skip"),
        # activation x activation: AttnLRP's uniform split, each operand gets half.
        Case("mm-two-activations", ("MmBackward0",), lambda x, y: x @ y, lambda: [randn(B, 4), randn(4, 5)],
             lambda v, r: [epsilon_mm(v[0], v[1], r, EPS) / 2,
                           v[1] * (v[0].T @ (r / stab(v[0] @ v[1], EPS))) / 2],
             requested=(0, 1), rules=RULES, in_axes=(0, None)),
        # 3-d input: view -> mm -> unsafe view.
        Case("matmul-3d", ("UnsafeViewBackward0", "MmBackward0", "ViewBackward0"), lambda x: x @ W45,
             lambda: [randn(B, 2, 4)],
             lambda v, r: [epsilon_mm(v[0].reshape(-1, 4), W45, r.reshape(-1, 5), EPS).reshape(B, 2, 4)],
             rules=RULES, op="MmBackward0"),
    ]
    for trainable in (False, True):
        cases.append(Case(
            f"mm-weight-{'trainable' if trainable else 'frozen'}", ("MmBackward0",),
            lambda x, w: x @ w, lambda t=trainable: [randn(B, 4), randn(4, 5, grad=t)],
            lambda v, r: [epsilon_mm(v[0], v[1], r, EPS)], rules=RULES, in_axes=(0, None)))
    return cases


# -- addmm -----------------------------------------------------------------------------------

C5 = _const(5)


def _linear_ref(v, r, eps=EPS):
    x, w, b = v
    return [epsilon_mm(x, w.T, r, eps, b)]


def _addmm_cases() -> list[Case]:
    cases = []
    for trainable in (False, True):
        tag = "trainable" if trainable else "frozen"
        # F.linear with bias: addmm(b, x, W^T); with a frozen bias promise mode cannot
        # rebuild the output once a frozen layer follows (documented: use record()).
        cases.append(Case(
            f"linear-bias-{tag}", ("AddmmBackward0",), lambda x, w, b: F.linear(x, w, b),
            lambda t=trainable: [randn(B, 4), randn(5, 4, grad=t), randn(5, grad=t)], _linear_ref,
            rules=RULES, conserve=False, in_axes=(0, None, None),
            replay="ok" if trainable else "unrecoverable"))
        cases.append(Case(
            f"linear-zero-bias-{tag}", ("AddmmBackward0",), lambda x, w, b: F.linear(x, w, b),
            lambda t=trainable: [randn(B, 4), randn(5, 4, grad=t), torch.zeros(5, dtype=DT, requires_grad=t)],
            _linear_ref, rules=RULES, in_axes=(0, None, None), replay="ok" if trainable else "unrecoverable"))
        cases.append(Case(
            f"linear-bias-big-eps-{tag}", ("AddmmBackward0",), lambda x, w, b: F.linear(x, w, b),
            lambda t=trainable: [randn(B, 4), randn(5, 4, grad=t), randn(5, grad=t)],
            lambda v, r: _linear_ref(v, r, BIG_EPS), rules={"AddmmBackward0": dynlrp.rules.Epsilon(BIG_EPS)},
            conserve=False, in_axes=(0, None, None), replay="skip", tol=BIG_EPS_TOL))
    cases += [
        # beta * c + alpha * x @ W with a constant c (not in the graph).
        Case("addmm-alpha-beta-const-bias", ("AddmmBackward0",),
             lambda x: torch.addmm(C5, x, W45, beta=0.5, alpha=2.0), lambda: [randn(B, 4)],
             lambda v, r: [v[0] * ((r / stab(0.5 * C5 + 2.0 * v[0] @ W45, EPS)) @ (2.0 * W45).T)],
             rules=RULES, conserve=False, replay="unrecoverable"),
        # beta = 0: "addmm without bias" (the bias operand is ignored).
        Case("addmm-beta-zero", ("AddmmBackward0",),
             lambda x: torch.addmm(C5, x, W45, beta=0, alpha=2.0), lambda: [randn(B, 4)],
             lambda v, r: [v[0] * ((r / stab(2.0 * v[0] @ W45, EPS)) @ (2.0 * W45).T)], rules=RULES),
        # two activations and a zero constant bias: half each.
        Case("addmm-two-activations", ("AddmmBackward0",),
             lambda x, y: torch.addmm(torch.zeros(5, dtype=DT), x, y), lambda: [randn(B, 4), randn(4, 5)],
             lambda v, r: [epsilon_mm(v[0], v[1], r, EPS) / 2,
                           v[1] * (v[0].T @ (r / stab(v[0] @ v[1], EPS))) / 2],
             requested=(0, 1), rules=RULES, in_axes=(0, None), replay="unrecoverable"),
        # the Linear module on 3-d input: view -> addmm -> view.
        Case("linear-3d", ("ViewBackward0", "AddmmBackward0", "ViewBackward0"),
             lambda x, w, b: F.linear(x, w, b), lambda: [randn(B, 2, 4), randn(5, 4), randn(5)],
             lambda v, r: [epsilon_mm(v[0].reshape(-1, 4), v[1].T, r.reshape(-1, 5), EPS,
                                      v[2]).reshape(B, 2, 4)],
             rules=RULES, conserve=False, in_axes=(0, None, None), op="AddmmBackward0"),
    ]
    return cases


# -- bmm, mv ---------------------------------------------------------------------------------

WB = _const(B, 4, 5)
CB = _const(B, 2, 4)


def _bmm_ref(x, w, r, eps):
    z = torch.einsum("bni,bij->bnj", x, w)
    return torch.einsum("bni,bij,bnj->bni", x, w, r / stab(z, eps))


def _bmm_cases() -> list[Case]:
    return [
        Case("bmm-const-second", ("BmmBackward0",), lambda x: torch.bmm(x, WB), lambda: [randn(B, 2, 4)],
             lambda v, r: [_bmm_ref(v[0], WB, r, EPS)], rules=RULES),
        Case("bmm-const-first", ("BmmBackward0",), lambda x: torch.bmm(CB, x), lambda: [randn(B, 4, 5)],
             lambda v, r: [torch.einsum("bni,bij,bnj->bij", CB, v[0], r / stab(torch.bmm(CB, v[0]), EPS))],
             rules=RULES),
        Case("bmm-two-activations", ("BmmBackward0",), lambda x, y: torch.bmm(x, y),
             lambda: [randn(B, 2, 4), randn(B, 4, 5)],
             lambda v, r: [_bmm_ref(v[0], v[1], r, EPS) / 2,
                           torch.einsum("bni,bij,bnj->bij", v[0], v[1],
                                        r / stab(torch.bmm(v[0], v[1]), EPS)) / 2],
             requested=(0, 1), rules=RULES, in_axes=(0, 0)),
        Case("bmm-big-eps", ("BmmBackward0",), lambda x: torch.bmm(x, WB), lambda: [randn(B, 2, 4)],
             lambda v, r: [_bmm_ref(v[0], WB, r, BIG_EPS)], rules={"linear": dynlrp.rules.Epsilon(BIG_EPS)},
             conserve=False, replay="skip", tol=BIG_EPS_TOL),
    ]


V4 = _const(4)


def _mv_cases() -> list[Case]:
    def ref(v, r):
        x, vec = v
        z = x @ vec
        return [x * vec[None, :] * (r / stab(z, EPS))[:, None]]

    return [
        Case("mv-const-vector", ("MvBackward0",), lambda x: torch.mv(x, V4), lambda: [randn(B, 4)],
             lambda v, r: ref([v[0], V4], r), rules=RULES),
        Case("mv-trainable-vector", ("MvBackward0",), lambda x, vec: torch.mv(x, vec),
             lambda: [randn(B, 4), randn(4)], ref, rules=RULES, in_axes=(0, None)),
    ]


MATMUL_CASES = _mm_cases() + _addmm_cases() + _bmm_cases() + _mv_cases()


# -- convolutions ----------------------------------------------------------------------------

# (id, dims, c_in, c_out, size, kernel, stride, padding, dilation, groups, transposed, output_padding)
CONVS = [
    ("1d", 1, 2, 3, (7,), 3, 1, 0, 1, 1, False, 0),
    ("1d-stride2-pad1-dil2", 1, 2, 3, (8,), 3, 2, 1, 2, 1, False, 0),
    ("1d-groups2", 1, 4, 6, (6,), 2, 1, 1, 1, 2, False, 0),
    ("2d-stride2-even-pad1", 2, 2, 3, (6, 6), 3, 2, 1, 1, 1, False, 0),
    ("2d-dil2-groups2", 2, 2, 4, (6, 5), 2, 1, 1, 2, 2, False, 0),
    ("2d-depthwise", 2, 3, 3, (4, 4), 3, 1, 1, 1, 3, False, 0),
    ("3d-stride2-even", 3, 2, 2, (4, 4, 4), 2, 2, 0, 1, 1, False, 0),
    ("3d-pad1", 3, 1, 2, (3, 3, 2), 2, 1, 1, 1, 1, False, 0),
    # pointwise (kernel 1, no padding): the entry's own vjp, a matrix product (_conv_vjp)
    ("1d-pointwise", 1, 3, 4, (5,), 1, 1, 0, 1, 1, False, 0),
    ("2d-pointwise-stride2-odd", 2, 3, 4, (5, 7), 1, 2, 0, 1, 1, False, 0),
    ("2d-pointwise-dil2", 2, 2, 3, (4, 4), 1, 1, 0, 2, 1, False, 0),
    ("3d-pointwise-stride3", 3, 2, 3, (4, 5, 3), 1, 3, 0, 1, 1, False, 0),
    ("2d-pointwise-groups2", 2, 4, 2, (3, 3), 1, 1, 0, 1, 2, False, 0),
    ("transposed-1d-stride2-outpad1", 1, 2, 3, (4,), 3, 2, 1, 1, 1, True, 1),
    ("transposed-2d-groups2-outpad1", 2, 2, 4, (3, 3), 3, 2, 1, 1, 2, True, 1),
    ("transposed-2d-dil2", 2, 2, 2, (3, 4), 2, 1, 1, 2, 1, True, 0),
    ("transposed-3d-stride2", 3, 2, 1, (2, 2, 2), 2, 2, 0, 1, 1, True, 0),
]


def _conv_case(spec, bias: str, trainable: bool) -> Case:
    cid, dims, c_in, c_out, size, k, s, p, d, g, transposed, op = spec
    if transposed:
        fn_ = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        w_shape = (c_in, c_out // g) + (k,) * dims
    else:
        fn_ = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        w_shape = (c_out, c_in // g) + (k,) * dims

    def fn(x, w, b):
        if transposed:
            return fn_(x, w, b, stride=s, padding=p, output_padding=op, groups=g, dilation=d)
        return fn_(x, w, b, stride=s, padding=p, dilation=d, groups=g)

    def make():
        x = randn(B, c_in, *size)
        w = randn(*w_shape, grad=trainable)
        b = {"none": None, "zero": torch.zeros(c_out, dtype=DT), "random": torch.randn(c_out, dtype=DT)}[bias]
        if b is not None:
            b.requires_grad_(trainable)
        return [x, w, b]

    def reference(v, r):
        x, w, b = v
        if transposed:
            # the transposed convolution is the adjoint of the convolution with the same
            # weight that maps the output grid back onto the input grid.
            out_size = list(r.shape[2:])
            m, back = conv_matrix(w, out_size, (s,) * dims, (p,) * dims, (d,) * dims, g)
            assert back == list(size)
            m = m.T
        else:
            m, out_size = conv_matrix(w, size, (s,) * dims, (p,) * dims, (d,) * dims, g)
            assert out_size == list(r.shape[2:])
        n_pos = r[0, 0].numel()
        bias_flat = 0.0 if b is None else b.repeat_interleave(n_pos)
        rel = epsilon_dense(m, x.reshape(B, -1), bias_flat, r.reshape(B, -1), EPS)
        return [rel.reshape(x.shape)]

    # a frozen bias is an operand autograd never saw: promise mode cannot rebuild the output
    replay = "unrecoverable" if bias != "none" and not trainable else "ok"
    return Case(f"conv-{cid}-bias_{bias}-{'trainable' if trainable else 'frozen'}", ("ConvolutionBackward0",),
                fn, make, reference, rules=RULES, conserve=bias != "random", in_axes=(0, None, None),
                replay=replay)


# conv3d with trainable parameters is slow on CPU (~50 ms a call): one 3-d trainable variant.
CONV_CASES = [_conv_case(spec, bias, trainable) for spec in CONVS
              for bias, trainable in (("random", False), ("random", True), ("none", False), ("zero", True))
              if spec[1] < 3 or not trainable or spec[0] == "3d-stride2-even"]
CONV_CASES.append(Case(
    "conv-2d-padding-same", ("ConvolutionBackward0",),
    lambda x, w: F.conv2d(x, w, padding="same"), lambda: [randn(B, 2, 5, 5), randn(3, 2, 3, 3)],
    lambda v, r: [epsilon_dense(conv_matrix(v[1], (5, 5), (1, 1), (1, 1), (1, 1), 1)[0], v[0].reshape(B, -1),
                                0.0, r.reshape(B, -1), EPS).reshape(v[0].shape)],
    rules=RULES, in_axes=(0, None)))

CASES = MATMUL_CASES + CONV_CASES


test_relevance, test_replay_before_frozen_layer = case_tests(CASES)


def test_contracts():
    for name in ("MmBackward0", "AddmmBackward0", "BmmBackward0", "MvBackward0", "ConvolutionBackward0"):
        entry = dynlrp.ops.lookup(name)
        assert (entry.kind, entry.contract) == ("linear", "bias"), name


def test_default_rule_is_epsilon_1e_6():
    x = randn(B, 4)
    (r,) = dynlrp.lrp(x @ W45, x, torch.ones(B, 5, dtype=DT))
    torch.testing.assert_close(r, epsilon_mm(x.detach(), W45, torch.ones(B, 5, dtype=DT), 1e-6))


def test_stabiliser_keeps_float64_precision():
    z = torch.tensor([1.0, -1.0], dtype=DT)
    x = randn(1, 2)
    w = torch.eye(2, dtype=DT)
    # exact in float64: z + 0.1 * sign(z)
    assert torch.equal(dynlrp.rules.stabilize(z, 0.1), torch.tensor([1.1, -1.1], dtype=DT))
    y = x @ w
    (r,) = dynlrp.lrp(y, x, torch.ones_like(y), rules={"linear": dynlrp.rules.Epsilon(0.1)})
    torch.testing.assert_close(r, x.detach() / stab(x.detach(), 0.1), rtol=1e-14, atol=0)


def test_float32_relevance_dtype():
    x = randn(B, 4, dtype=torch.float32)
    w = randn(5, 4, dtype=torch.float32)
    y = F.linear(x, w)
    (rx,) = dynlrp.lrp(y, x, torch.ones_like(y), rules=RULES)
    assert rx.dtype == torch.float32 and rx.shape == x.shape
    ref = epsilon_mm(x.detach().double(), w.detach().double().T, torch.ones(B, 5, dtype=DT), EPS)
    torch.testing.assert_close(rx.double(), ref, rtol=1e-4, atol=1e-5)


COVERED = covered(CASES)


# -- the pointwise convolution's own vjp (ops.linear._conv_vjp) -------------------------------

def _pointwise_node(x, weight, **kw):
    fn = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return fn(x.requires_grad_(True), weight, **kw).grad_fn


POINTWISE = [  # (input shape, weight shape, conv kwargs): kernel 1, no padding, one group
    ((2, 3, 5), (4, 3, 1), {}),
    ((1, 3, 6, 6), (5, 3, 1, 1), {}),
    ((3, 4, 7, 5), (2, 4, 1, 1), {"stride": 2}),
    ((2, 2, 5, 6), (3, 2, 1, 1), {"stride": (3, 2), "dilation": 2}),
    ((2, 2, 4, 5, 3), (3, 2, 1, 1, 1), {"stride": 2}),
]


def test_pointwise_conv_vjp_is_the_nodes_backward():
    """Every pointwise case: the entry's vjp gives the node's own backward, to rounding, for the
    data input only (a trainable weight included: its grad is not asked for)."""
    vjp = dynlrp.ops.lookup("ConvolutionBackward0").vjp
    for x_shape, w_shape, kw in POINTWISE:
        for trainable in (False, True):
            x, w = randn(*x_shape, grad=False), randn(*w_shape, grad=trainable)
            node = _pointwise_node(x, w, **kw)
            g = randn(*node._input_metadata[0].shape, grad=False)
            found = vjp(node, [g], (0,))
            assert found is not None and set(found) == {0}, (x_shape, kw)
            torch.testing.assert_close(found[0], node(g)[0], rtol=1e-12, atol=1e-12)
            assert found[0].shape == x.shape


def test_pointwise_conv_vjp_declines_other_convolutions():
    """None (the node's backward runs) for padding, groups, a kernel over 1, a transposed
    convolution, a non-contiguous grad or a request for the weight's grad."""
    vjp = dynlrp.ops.lookup("ConvolutionBackward0").vjp
    x = randn(2, 4, 5, 5, grad=False)
    declined = [
        (_pointwise_node(x.clone(), randn(3, 4, 1, 1), padding=1), (0,), False),
        (_pointwise_node(x.clone(), randn(2, 2, 1, 1), groups=2), (0,), False),
        (_pointwise_node(x.clone(), randn(3, 4, 3, 3)), (0,), False),
        (F.conv_transpose2d(x.clone().requires_grad_(True), randn(4, 3, 1, 1)).grad_fn, (0,), False),
        (_pointwise_node(x.clone(), randn(3, 4, 1, 1)), (0,), True),
        (_pointwise_node(x.clone(), randn(3, 4, 1, 1, grad=True)), (0, 1), False),
    ]
    for node, slots, strided in declined:
        g = randn(*node._input_metadata[0].shape, grad=False)
        if strided:
            g = randn(*reversed(g.shape), grad=False).permute(*reversed(range(g.dim())))
            assert not g.is_contiguous()
        assert vjp(node, [g], slots) is None


def test_engine_takes_the_pointwise_vjp(monkeypatch):
    """The engine asks the entry's vjp at a pointwise convolution (stride 2, as ResNet's
    downsampling) and gets the relevance the node's backward gives."""
    import dataclasses

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 6, 1, stride=2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(6 * 9, 2)).double().eval()
    x = randn(2, 3, 5, 5, grad=False)
    monkeypatch.setattr(dynlrp.gradform, "ENABLED", False)  # (the Python traversal asks the vjp)
    entry = dynlrp.ops.lookup("ConvolutionBackward0")
    calls = []

    def counted(node, grads, slots):
        found = entry.vjp(node, grads, slots)
        calls.append(found is not None)
        return found

    def explain():
        xi = x.clone().requires_grad_(True)
        return dynlrp.LRP("epsilon")(model(xi), xi, model=model)[0]

    monkeypatch.setitem(dynlrp.ops._REGISTRY, "ConvolutionBackward0", dataclasses.replace(entry, vjp=counted))
    fast = explain()
    assert sorted(calls) == [False, True]  # the 1x1 convolution took it, the 3x3 one declined
    monkeypatch.setitem(dynlrp.ops._REGISTRY, "ConvolutionBackward0", dataclasses.replace(entry, vjp=None))
    torch.testing.assert_close(fast, explain(), rtol=1e-10, atol=1e-12)
