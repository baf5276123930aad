"""Architecture sweep: every transformer (and state-space) model we claim runs, runs.

Each model is tiny (2 layers, hidden size 32, random weights, built from a config -- nothing
is downloaded), frozen (``requires_grad_(False)``), in ``eval()`` mode, with a batch of 2.
For every architecture and attention implementation (``sdpa`` and ``eager`` where the model
has both):

* ``dynlrp.coverage`` finds no uncovered node;
* the ``attnlrp``, ``cp_lrp`` and default rule sets give finite relevance, shaped like the
  explained inputs (the input embeddings, pixels or audio);
* promise mode equals recorded mode on the frozen model, its frozen biases read through
  ``model=``, under ``attnlrp`` and ``cp_lrp`` -- eager attention masks, position tables and
  class tokens included (relevance per unit of value, see docs/transformers.md); under the
  default rules too, except where a constant the graph never saw changes the result (eager
  masks), where promise mode must raise :class:`dynlrp.UnrecoverableValueError`. Without
  ``model=`` promise mode equals recorded mode or raises, pointing to ``model=``. The same
  again with biases, norms and position tables trainable (weights stay frozen, so Linear
  layers still keep no input and the Promise System still does the work), without ``model=``;
* the share of the seed that reaches the explained inputs is reported
  (``python tests/test_transformers.py`` prints the table of docs/transformers.md) and, for
  bias-free models under the conserving ``cp_lrp`` rules, checked to be close to 1.
* nothing is mutated: parameters, buffers, ``.grad``, ``requires_grad``, train/eval mode,
  the inputs, the seed and the outputs are as they were (:class:`models.Untouched`).

Also here: padding gets exactly zero relevance, positional embeddings as a separate input,
and the seed helpers of :mod:`dynlrp.targets`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

import dynlrp  # noqa: E402
from dynlrp import targets  # noqa: E402
from models import Untouched  # noqa: E402

pytestmark = pytest.mark.slow

B, L = 2, 6
T = transformers
PRESETS = ("attnlrp", "cp_lrp", None)


def _ids(model: torch.nn.Module, length: int = L, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size if hasattr(model.config, "vocab_size") else 50,
                         (B, length), generator=gen)


def _embeds(model: torch.nn.Module, ids: torch.Tensor, decoder: bool = False) -> torch.Tensor:
    table = model.get_decoder().embed_tokens if decoder and hasattr(model, "get_decoder") else None
    table = table or model.get_input_embeddings()
    return table(ids).detach().requires_grad_(True)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


@dataclass
class Arch:
    """One architecture of the sweep.

    Attributes
    ----------
    name, modality
        As in the coverage table.
    build
        ``build(attn_implementation) -> model`` (random weights, eval mode).
    inputs
        ``inputs(model) -> {forward kwarg: tensor}``; the tensors named in ``explain``
        require grad.
    explain
        The forward kwargs whose relevance is computed ("input embeddings").
    seed
        ``seed(output) -> relevance seed`` (a :mod:`dynlrp.targets` helper).
    impls
        Attention implementations to sweep.
    default
        Whether the default rule set runs in promise mode on the frozen model (``"promise"``:
        promise == recorded) or needs the tape (``"record"``: promise mode raises, because a
        constant the graph never saw -- an eager attention mask -- changes the result), or
        neither (``"none"``: the tape does not see inside ``F.multi_head_attention_forward``,
        and SigLIP's pooling head adds frozen biases there). A dict gives one per attention
        implementation.
    bias_free
        No bias, position table or other constant added on the path of the values (T5's position
        bias only enters attention scores): the conserving ``cp_lrp`` rules keep the seed.
    output
        ``output(model output) -> the explained tensor``.
    """

    name: str
    modality: str
    build: Callable[[str], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict[str, torch.Tensor]]
    explain: tuple[str, ...]
    seed: Callable[[torch.Tensor], torch.Tensor]
    impls: tuple[str, ...] = ("sdpa", "eager")
    default: str | dict[str, str] = "promise"
    bias_free: bool = False
    output: Callable[[Any], torch.Tensor] = field(default=lambda out: out.logits)
    positional: bool = False


def _lm_inputs(model):
    return {"inputs_embeds": _embeds(model, _ids(model))}


def _seq2seq_inputs(model):
    return {"inputs_embeds": _embeds(model, _ids(model)),
            "decoder_inputs_embeds": _embeds(model, _ids(model, 4, seed=1), decoder=True)}


def _text(cls, config_cls, **kw):
    def build(impl):
        return cls(config_cls(attn_implementation=impl, **kw)).eval()
    return build


SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
         "vocab_size": 50, "max_position_embeddings": 32}
DECODER = {**SMALL, "num_key_value_heads": 2, "head_dim": 8}
ENCODER = {**SMALL, "num_attention_heads": 2, "num_labels": 3}


def _whisper(impl):
    cfg = T.WhisperConfig(encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                          max_source_positions=8, max_target_positions=16, vocab_size=50, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, attn_implementation=impl)
    return T.WhisperForConditionalGeneration(cfg).eval()


def _wav2vec2(impl):
    cfg = T.Wav2Vec2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                           num_feat_extract_layers=2, num_conv_pos_embeddings=4,
                           num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=8,
                           attn_implementation=impl)
    return T.Wav2Vec2ForSequenceClassification(cfg).eval()


def _pix2struct(impl):
    vision = {"num_hidden_layers": 2, "hidden_size": 32, "d_ff": 64, "num_attention_heads": 2, "d_kv": 16,
              "patch_embed_hidden_size": 12, "seq_len": 16}
    text = {"num_layers": 2, "hidden_size": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16, "vocab_size": 50}
    config = T.Pix2StructConfig(vision_config=vision, text_config=text)
    return T.Pix2StructForConditionalGeneration(config).eval()


def _pix2struct_inputs(model):
    n = 9
    rows, cols = torch.arange(n) // 3 + 1, torch.arange(n) % 3 + 1
    coords = torch.stack([rows, cols], -1).float().expand(B, n, 2)
    patches = torch.cat([coords, torch.randn(B, n, 12, generator=torch.Generator().manual_seed(0))], -1)
    return {"flattened_patches": patches.requires_grad_(True), "attention_mask": torch.ones(B, n),
            "decoder_inputs_embeds": _embeds(model, _ids(model, 4, seed=1), decoder=True)}


def _mamba(impl):
    cfg = T.MambaConfig(num_hidden_layers=2, hidden_size=32, state_size=4, expand=2, conv_kernel=3,
                        vocab_size=50, use_mambapy=False)
    return T.MambaForCausalLM(cfg).eval()


def _tv_vit(impl):
    model = torchvision.models.vit_b_16(image_size=32).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes the head: no signal
    return model


def _pixels(size=16, seed=0):
    return lambda model: {"pixel_values": _rand(B, 3, size, size, seed=seed)}


#: Eager attention adds its mask (and T5 its position bias) as a constant autograd never saw: the
#: softmax's input is then not in the graph. The presets' rules do not depend on it (relevance
#: per unit of value); the default rules do, and promise mode needs the tape for them.
SDPA_ONLY = {"sdpa": "promise", "eager": "record"}
ARCHS = [
    Arch("GPT-2", "Language", _text(T.GPT2LMHeadModel, T.GPT2Config, n_layer=2, n_embd=32, n_head=2,
                                    vocab_size=50, n_positions=32),
         _lm_inputs, ("inputs_embeds",), targets.next_token, default=SDPA_ONLY),
    Arch("BERT", "Language", _text(T.BertForSequenceClassification, T.BertConfig, **ENCODER),
         _lm_inputs, ("inputs_embeds",), targets.class_logit, default=SDPA_ONLY),
    Arch("RoBERTa", "Language", _text(T.RobertaForSequenceClassification, T.RobertaConfig, **ENCODER),
         _lm_inputs, ("inputs_embeds",), targets.class_logit, default=SDPA_ONLY),
    Arch("Llama", "Language", _text(T.LlamaForCausalLM, T.LlamaConfig, **DECODER),
         _lm_inputs, ("inputs_embeds",), targets.next_token, default=SDPA_ONLY,
         bias_free=True),
    Arch("Qwen3", "Language", _text(T.Qwen3ForCausalLM, T.Qwen3Config, **DECODER),
         _lm_inputs, ("inputs_embeds",), targets.next_token, default=SDPA_ONLY,
         bias_free=True),
    Arch("Gemma-3 (text)", "Language",
         _text(T.Gemma3ForCausalLM, T.Gemma3TextConfig, sliding_window=4, **DECODER),
         _lm_inputs, ("inputs_embeds",), targets.next_token, default=SDPA_ONLY,
         bias_free=True),
    Arch("T5", "Language", _text(T.T5ForConditionalGeneration, T.T5Config, num_layers=2, num_decoder_layers=2,
                                 d_model=32, d_kv=8, d_ff=64, num_heads=4, vocab_size=50),
         _seq2seq_inputs, ("inputs_embeds", "decoder_inputs_embeds"), targets.decoder_token, impls=("eager",),
         default="record", bias_free=True),
    Arch("ViT", "Vision", _text(T.ViTForImageClassification, T.ViTConfig, num_hidden_layers=2, hidden_size=32,
                                intermediate_size=64, num_attention_heads=2, image_size=16, patch_size=4,
                                num_labels=3),
         _pixels(), ("pixel_values",), targets.class_logit),
    Arch("SigLIP (vision)", "Vision", _text(T.SiglipVisionModel, T.SiglipVisionConfig, num_hidden_layers=2,
                                            hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                            image_size=16, patch_size=4),
         _pixels(), ("pixel_values",), lambda y: y.detach().clone(), default="none",
         output=lambda out: out.pooler_output),
    Arch("Wav2Vec2", "Audio", _wav2vec2, lambda m: {"input_values": _rand(B, 200)}, ("input_values",),
         targets.class_logit),
    Arch("Whisper", "Audio", _whisper,
         lambda m: {"input_features": _rand(B, 8, 16), "decoder_inputs_embeds": _embeds(m, _ids(m, 4), True)},
         ("input_features", "decoder_inputs_embeds"), targets.decoder_token, default=SDPA_ONLY),
    Arch("Pix2Struct", "Vision/Language", _pix2struct, _pix2struct_inputs,
         ("flattened_patches", "decoder_inputs_embeds"), targets.decoder_token, impls=("eager",),
         default="record"),
    Arch("Mamba", "State Space", _mamba, _lm_inputs, ("inputs_embeds",), targets.next_token, impls=("slow",)),
    Arch("torchvision vit_b_16", "Vision", _tv_vit, _pixels(32), ("pixel_values",), targets.class_logit,
         impls=("sdpa",), output=lambda out: out, positional=True),
]
CASES = [pytest.param(a, impl, id=f"{a.name.split()[0]}-{impl}") for a in ARCHS for impl in a.impls]


def _mode(value: str | dict[str, str], impl: str) -> str:
    return value if isinstance(value, str) else value[impl]


@functools.cache
def _model(name: str, impl: str) -> torch.nn.Module:
    arch = next(a for a in ARCHS if a.name == name)
    torch.manual_seed(0)
    return arch.build(impl)


def trainable_non_weights(model: torch.nn.Module, on: bool = True) -> None:
    """Freeze everything, then (``on``) make trainable what is not the weight matrix of a
    linear map or convolution: biases, norm parameters, position tables, class tokens."""
    model.requires_grad_(False)
    if not on:
        return
    maps = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, T.pytorch_utils.Conv1D)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, maps)}
    weights |= {id(m.in_proj_weight) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    for p in model.parameters():
        if id(p) not in weights:
            p.requires_grad_(True)


def run(arch: Arch, impl: str, trainable: bool = False, tape: bool = False):
    """Forward pass: ``(model, output, explained inputs, forward kwargs, tape or None)``."""
    model = _model(arch.name, impl)
    trainable_non_weights(model, trainable)
    kwargs = arch.inputs(model)
    call = (lambda: model(*kwargs.values())) if arch.positional else (lambda: model(**kwargs))
    rec = dynlrp.record() if tape else None
    if rec is not None:
        with rec:
            y = arch.output(call())
    else:
        y = arch.output(call())
    return model, y, [kwargs[k] for k in arch.explain], kwargs, rec


def share(rels, seed) -> float:
    return float(sum(r.double().sum() for r in rels) / seed.double().sum())


#: promise vs recorded, of the largest relevance: float32 values replayed by the Promise System
#: differ from the recorded ones in the last bits, and epsilon 0 lets R / z magnify that where z
#: is tiny (measured up to 2.4e-4 on vit_b_16, 2e-5 on the others).
RTOL = 1e-3


def _close(a, b, rtol):
    for x, y in zip(a, b):
        scale = float(y.abs().max())
        assert float((x - y).abs().max()) <= rtol * scale + 1e-12, (float((x - y).abs().max()), scale)


@pytest.mark.parametrize("arch,impl", CASES)
def test_architecture(arch: Arch, impl: str):
    model, y, xs, _, tape = run(arch, impl, tape=True)
    report = dynlrp.coverage(y)
    assert report.complete, str(report)
    seed = arch.seed(y)
    untouched = Untouched(model, y, seed, *xs)  # the model and the caller's tensors, checked below
    recorded = {}
    default = _mode(arch.default, impl)
    presets = PRESETS if default != "none" else PRESETS[:-1]
    for k, rules in enumerate(presets):  # the last call frees y's graph
        rels = dynlrp.lrp(y, xs, seed, rules=rules, tape=tape, model=model, retain_graph=k < len(presets) - 1)
        assert all(r.shape == x.shape and torch.isfinite(r).all() for r, x in zip(rels, xs))
        recorded[rules] = rels
    # promise == recorded on the frozen model, its frozen biases read through model=
    _, y2, xs2, _, _ = run(arch, impl)
    for rules in PRESETS:  # y2 is explained again below: keep its graph
        if rules is None and default != "promise":
            with pytest.raises(dynlrp.UnrecoverableValueError, match="record"):
                dynlrp.lrp(y2, xs2, seed, rules=rules, model=model, retain_graph=True)
        else:
            got = dynlrp.lrp(y2, xs2, seed, rules=rules, model=model, retain_graph=True)
            _close(got, recorded[rules], RTOL)
    # without model=: the same relevance, or an error that points to model=
    try:
        got = dynlrp.lrp(y2, xs2, seed, rules="attnlrp")
    except dynlrp.UnrecoverableValueError as exc:
        assert "model=" in str(exc)
    else:
        _close(got, recorded["attnlrp"], RTOL)
    untouched.check()
    # promise == recorded with biases, norms and position tables trainable (weights frozen)
    _, y, xs, _, tape = run(arch, impl, trainable=True, tape=True)
    _, y2, xs2, _, _ = run(arch, impl, trainable=True)
    untouched = Untouched(model, y, y2, seed, *xs, *xs2)
    for rules in ("attnlrp", "cp_lrp"):  # the last call on each graph frees it
        keep = rules != "cp_lrp"
        rec = dynlrp.lrp(y, xs, seed, rules=rules, tape=tape, retain_graph=keep)
        assert all(torch.isfinite(r).all() for r in rec)
        _close(dynlrp.lrp(y2, xs2, seed, rules=rules, retain_graph=keep), rec, RTOL)
    untouched.check()
    if arch.bias_free:
        assert abs(share(recorded["cp_lrp"], seed) - 1) < 0.02


# -- padding, positions, seeds ------------------------------------------------------------------
def _padded(model, left: bool):
    ids = _ids(model)
    mask = torch.ones(B, L, dtype=torch.long)
    if left:
        mask[0, :2] = 0
    else:
        mask[0, -2:] = 0
    return _embeds(model, ids), mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name,left", [("Llama", True), ("Llama", False), ("BERT", False)])
def test_padding_gets_zero_relevance(name, left, impl):
    arch = next(a for a in ARCHS if a.name == name)
    model = _model(name, impl)
    trainable_non_weights(model, False)
    emb, mask = _padded(model, left)
    with dynlrp.record() as tape:
        y = model(inputs_embeds=emb, attention_mask=mask).logits
    if name == "BERT":
        seed = targets.class_logit(y)
    else:
        seed = targets.next_token(y, attention_mask=mask)
        assert seed[0, 3 if not left else L - 1].abs().sum() > 0  # the last real token of example 0
    (r,) = dynlrp.lrp(y, emb, seed, rules="attnlrp", tape=tape)
    pad = mask == 0
    assert float(r[pad].abs().max()) == 0.0
    assert float(r[~pad].abs().max()) > 0
    per_token = targets.token_relevance(r, mask)
    assert per_token.shape == (B, L) and float(per_token[pad].abs().max()) == 0.0
    del arch


def test_learned_positions_as_a_separate_input():
    """GPT-2's learned positions: a hook makes ``wpe``'s output a leaf of the graph, and with
    per-example ``position_ids`` it is explained next to ``inputs_embeds``. Token and position
    relevance together keep the seed under the conserving cp_lrp rules (GPT-2's random init has
    zero biases)."""
    model = _model("GPT-2", "sdpa")
    trainable_non_weights(model, False)
    kept = {}

    def keep(module, args, out):
        kept["pos"] = out.detach().requires_grad_(True)
        return kept["pos"]

    handle = model.transformer.wpe.register_forward_hook(keep)
    try:
        emb = _embeds(model, _ids(model))
        pos_ids = torch.arange(L).expand(B, L)
        with dynlrp.record() as tape:  # GPT-2's frozen biases: promise mode needs the tape
            y = model(inputs_embeds=emb, position_ids=pos_ids).logits
    finally:
        handle.remove()
    seed = targets.next_token(y)
    r_tok, r_pos = dynlrp.lrp(y, [emb, kept["pos"]], seed, rules="cp_lrp", tape=tape)
    assert r_pos.shape == (B, L, 32) and float(r_pos.abs().sum()) > 0
    assert abs(share([r_tok, r_pos], seed) - 1) < 0.02


def test_rotary_positions_as_a_separate_input():
    """Llama's rotary embedding: the hooked ``cos`` and ``sin`` become graph inputs and the
    rotation's products are then products of two activations (uniform rule): under attnlrp
    positions get relevance through the queries and keys. (CP-LRP passes none through queries
    and keys, so none reaches rotary positions; as constants, cos and sin pass everything on.)"""
    model = _model("Llama", "sdpa")
    trainable_non_weights(model, False)
    kept = {}

    def keep(module, args, out):
        kept["cos"], kept["sin"] = (t.detach().requires_grad_(True) for t in out)
        return kept["cos"], kept["sin"]

    handle = model.model.rotary_emb.register_forward_hook(keep)
    try:
        emb = _embeds(model, _ids(model))
        y = model(inputs_embeds=emb).logits
    finally:
        handle.remove()
    seed = targets.next_token(y)
    # y is explained again below (cp_lrp): keep its graph
    rels = dynlrp.lrp(y, [emb, kept["cos"], kept["sin"]], seed, rules="attnlrp", retain_graph=True)
    assert all(torch.isfinite(r).all() for r in rels)
    assert float(rels[1].abs().sum()) > 0 and float(rels[2].abs().sum()) > 0
    cp = dynlrp.lrp(y, [emb, kept["cos"], kept["sin"]], seed, rules="cp_lrp")
    assert float(cp[1].abs().sum() + cp[2].abs().sum()) == 0
    assert abs(share(cp, seed) - 1) < 0.02


def test_vit_positions_and_class_token_as_inputs():
    model = _model("ViT", "sdpa")
    trainable_non_weights(model, False)
    emb = model.vit.embeddings
    emb.position_embeddings.requires_grad_(True)
    emb.cls_token.requires_grad_(True)
    x = _pixels()(model)["pixel_values"]
    with dynlrp.record() as tape:
        y = model(pixel_values=x).logits
    seed = targets.class_logit(y)
    rels = dynlrp.lrp(y, [x, emb.position_embeddings, emb.cls_token], seed, rules="cp_lrp", tape=tape)
    trainable_non_weights(model, False)
    assert all(torch.isfinite(r).all() for r in rels)
    assert abs(share(rels, seed) - 1) < 0.02


def test_targets_qa_span_and_decoder_token():
    cfg = T.BertConfig(**{**ENCODER, "num_labels": 2})
    torch.manual_seed(0)
    model = T.BertForQuestionAnswering(cfg).eval().requires_grad_(False)
    emb = _embeds(model, _ids(model))
    with dynlrp.record() as tape:
        out = model(inputs_embeds=emb)
    seeds = targets.qa_span(out.start_logits, out.end_logits)
    start, end = (s.ne(0).float().argmax(-1) for s in seeds)
    assert (end >= start).all() and all(int(s.ne(0).sum()) == B for s in seeds)
    (r,) = dynlrp.lrp((out.start_logits, out.end_logits), emb, seeds, rules="attnlrp", tape=tape)
    assert torch.isfinite(r).all() and r.shape == emb.shape
    logits = torch.randn(B, 4, 7)
    seed = targets.decoder_token(logits, position=1, token=torch.tensor([2, 5]))
    assert seed.nonzero().tolist() == [[0, 1, 2], [1, 1, 5]]
    assert targets.class_logit(torch.randn(B, 3), 1, value="one").sum() == B
    with pytest.raises(ValueError):
        targets.last_positions(torch.zeros(1, 3))


# -- the table of docs/transformers.md -------------------------------------------------------------
def report() -> str:  # pragma: no cover - documentation helper
    """Coverage (paper Table 6 columns) and seed shares of every case, as Markdown."""
    coverage, modality, rows = {}, {}, []
    for arch in ARCHS:
        for impl in arch.impls:
            name = f"{arch.name} ({impl})"
            model, y, xs, _, tape = run(arch, impl, tape=True)
            coverage[name], modality[name] = dynlrp.coverage(y), arch.modality
            seed = arch.seed(y)
            shares = [share(dynlrp.lrp(y, xs, seed, rules=r, tape=tape, model=model, retain_graph=True), seed)
                      for r in PRESETS[:-1]]  # y is explained once more below
            if _mode(arch.default, impl) == "none":  # measured with trainable biases
                _, y, xs, _, tape = run(arch, impl, trainable=True, tape=True)
            shares.append(share(dynlrp.lrp(y, xs, seed, tape=tape, model=model), seed))
            cells = [name, "promise", _mode(arch.default, impl), "yes" if arch.bias_free else "no"]
            rows.append("| " + " | ".join(cells + [f"{s:.3f}" for s in shares]) + " |")
    head = ["| Model (attention) | presets | default rules | bias-free | attnlrp | cp_lrp | default |",
            "|---|---|---|---|---:|---:|---:|"]
    return dynlrp.CoverageReport.table(coverage, modality) + "\n\n" + "\n".join(head + rows)


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, "src")
    print(report())
