"""Reproduce the DynamicLRP paper's Table 1: attribution accuracy for extractive QA on SQuAD v2.

RoBERTa-large and Flan-T5-large fine-tuned on SQuAD v2 (``deepset/roberta-large-squad2``,
``sjrhuschlee/flan-t5-large-squad2`` from the Hugging Face hub) explain their predicted
answer span on the answerable SQuAD v2 validation questions (``datasets`` library). Needs the
weights, the data and the ``datasets`` package, ideally a GPU; it cannot run offline.
``--tiny`` runs the same pipeline on small random models from configs and synthetic token
sequences instead (what the test suite does).

Per question: the model's start and end logits are explained together (one-hot seeds at
the predicted start and end, scaled by their logits, as the paper did), relevance summed over
the embedding axis gives one number per token (Flan-T5: encoder plus decoder input
embeddings, the decoder's shifted back by one position), and
:func:`dynlrp.metrics.qa_metrics` scores the top tokens among the context tokens. Questions
whose predicted start lies after the predicted end are skipped, and those over 512 tokens are
left out, as in the paper.

Examples::

    python scripts/reproduce_paper_qa.py --model roberta --limit 500 --out out/qa
    python scripts/reproduce_paper_qa.py --model t5 --rules paper --dtype bfloat16
    python scripts/reproduce_paper_qa.py --model t5 --tiny        # offline smoke run
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import shlex
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dynlrp
from dynlrp import metrics, presets
from dynlrp import rules as R
from dynlrp.errors import UnrecoverableValueError

MODELS = {"roberta": "deepset/roberta-large-squad2", "t5": "sjrhuschlee/flan-t5-large-squad2"}


@dataclass
class QAExample:
    """One tokenised question with its context mask and ground truth."""

    input_ids: torch.Tensor          # (T,)
    context_mask: torch.Tensor       # (T,) bool: tokens an answer may use
    gold_spans: list[tuple[int, int]]
    answers: list[str] | None = None
    context: str | None = None
    offsets: list[tuple[int, int]] | None = None


def paper_rules(kind: str) -> presets.RuleSet:
    """The paper's QA rules: gamma 0.001 on dense layers; AttnLRP rules only for Flan-T5.

    (The paper's notebooks left gamma at its default of 1.0; pass ``--gamma 1`` for that.)
    """
    return paper_rules_with(kind, 0.001)


def paper_rules_with(kind: str, gamma: float) -> presets.RuleSet:
    base = presets.attnlrp() if kind == "t5" else presets.epsilon()
    return base.override({"dense": R.Gamma(gamma)})


# -- data ------------------------------------------------------------------------------------


def squad_examples(tokenizer: Any, limit: int | None, max_length: int = 512) -> tuple[list[QAExample], int]:
    """Answerable SQuAD v2 validation questions, tokenised as question + context pairs."""
    from datasets import load_dataset

    data = load_dataset("squad_v2", split="validation")
    out: list[QAExample] = []
    too_long = 0
    for row in data:
        if not row["answers"]["text"]:
            continue
        if limit and len(out) >= limit:
            break
        enc = tokenizer(row["question"], row["context"], return_offsets_mapping=True)
        if len(enc["input_ids"]) > max_length:
            too_long += 1
            continue
        seq = enc.sequence_ids()
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        ctx = torch.tensor([s == 1 for s in seq])
        spans = []
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            end = start + len(text)
            toks = [i for i, (a, b) in enumerate(offsets) if seq[i] == 1 and b > start and a < end]
            if toks:
                spans.append((toks[0], toks[-1]))
        out.append(QAExample(torch.tensor(enc["input_ids"]), ctx, spans, list(row["answers"]["text"]),
                             row["context"], offsets))
    return out, too_long


def tiny_examples(n: int, vocab: int, seed: int = 0) -> list[QAExample]:
    """Synthetic sequences ``[CLS] question [SEP] [SEP] context [SEP]`` with random answer spans."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        q = int(torch.randint(3, 6, (1,), generator=gen))
        c = int(torch.randint(6, 12, (1,), generator=gen))
        question = torch.randint(5, vocab, (q,), generator=gen)
        context = torch.randint(5, vocab, (c,), generator=gen)
        ids = torch.cat([torch.tensor([0]), question, torch.tensor([2, 2]), context, torch.tensor([2])])
        ctx = torch.zeros(len(ids), dtype=torch.bool)
        ctx[q + 3:q + 3 + c] = True
        s = q + 3 + int(torch.randint(0, c - 2, (1,), generator=gen))
        out.append(QAExample(ids, ctx, [(s, s + int(torch.randint(0, 3, (1,), generator=gen)))]))
    return out


def tiny_model(kind: str, vocab: int = 64) -> nn.Module:
    """A small random question-answering model of the same family, from a config."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "t5":
        cfg = T.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                         num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                         pad_token_id=0)
        return T.T5ForQuestionAnswering(cfg).eval()
    cfg = T.RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64)
    return T.RobertaForQuestionAnswering(cfg).eval()


# -- answer quality (SQuAD's exact match and F1) --------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, articles and extra white space (the SQuAD convention)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_and_f1(prediction: str, answers: list[str]) -> tuple[float, float]:
    """Best exact match and token F1 of a predicted answer against the reference answers."""
    pred = normalize_answer(prediction).split()
    best_em = best_f1 = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        best_em = max(best_em, float(pred == gold))
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best_f1 = max(best_f1, 2 * p * r / (p + r))
    return best_em, best_f1


def span_exact_and_f1(start: int, end: int, spans: list[tuple[int, int]]) -> tuple[float, float]:
    """Exact match and token-overlap F1 of token spans (for data without answer texts)."""
    best_em = best_f1 = 0.0
    for a, b in spans:
        best_em = max(best_em, float((a, b) == (start, end)))
        common = max(0, min(end, b) - max(start, a) + 1)
        if common:
            p, r = common / (end - start + 1), common / (b - a + 1)
            best_f1 = max(best_f1, 2 * p * r / (p + r))
    return best_em, best_f1


# -- explaining one answer -----------------------------------------------------------------------


def explain_answer(model: nn.Module, ex: QAExample, engine: dynlrp.LRP, is_t5: bool, mode: str,
                   device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Relevance per token for the predicted span, and the span ``(start, end)``."""
    ids = ex.input_ids[None].to(device)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        emb = embed(ids)
        dec = embed(model._shift_right(ids)) if is_t5 else None
    leaves = [emb.detach().requires_grad_(True)]
    kwargs: dict[str, Any] = {"inputs_embeds": leaves[0], "attention_mask": torch.ones_like(ids)}
    if dec is not None:
        leaves.append(dec.detach().requires_grad_(True))
        kwargs["decoder_inputs_embeds"] = leaves[1]

    def run(recorded: bool) -> tuple[torch.Tensor, int, int]:
        tape = dynlrp.record() if recorded else None
        with torch.enable_grad(), tape if tape is not None else contextlib.nullcontext():
            out = model(**kwargs)
        s_logits, e_logits = out.start_logits, out.end_logits
        start, end = metrics.predicted_spans(s_logits.detach(), e_logits.detach(), ex.context_mask[None])
        seeds = []
        for logits, idx in ((s_logits, start), (e_logits, end)):
            seed = torch.zeros_like(logits)
            seed[0, idx] = logits.detach()[0, idx]
            seeds.append(seed)
        rels = engine((s_logits, e_logits), leaves, seeds, tape=tape)
        token = rels[0][0].sum(-1).float()
        if len(rels) > 1:  # decoder position t reads token t - 1
            token[:-1] += rels[1][0].sum(-1).float()[1:]
        return token.detach().cpu(), int(start), int(end)

    if mode == "record":
        return run(True)
    try:
        return run(False)
    except UnrecoverableValueError:
        if mode == "promise":
            raise
        return run(True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="roberta", help="roberta, t5, or a Hugging Face id / folder")
    ap.add_argument("--kind", choices=("roberta", "t5"), default=None, help="model family (default: guessed)")
    ap.add_argument("--limit", type=int, default=None, help="questions (default: all answerable ones)")
    ap.add_argument("--rules", default="paper", help="'paper' or a dynlrp preset name")
    ap.add_argument("--gamma", type=float, default=0.001, help="gamma of the paper rules")
    ap.add_argument("--mode", default="auto", choices=("auto", "promise", "record"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small random models and synthetic data (offline)")
    ap.add_argument("--out", default=None, help="folder for the JSON and table")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    kind = args.kind or ("t5" if "t5" in args.model.lower() else "roberta")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    too_long = 0
    if args.tiny:
        model = tiny_model(kind)
        examples = tiny_examples(args.limit or 6, model.config.vocab_size)
    else:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        name = MODELS.get(args.model, args.model)
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForQuestionAnswering.from_pretrained(name)
        examples, too_long = squad_examples(tokenizer, args.limit)
    model = model.to(device=device, dtype=dtype).eval()
    ruleset = paper_rules_with(kind, args.gamma) if args.rules == "paper" else presets.resolve(args.rules)
    engine = dynlrp.LRP(ruleset)

    relevance, starts, ends, ems, f1s = [], [], [], [], []
    iterator: Any = examples
    if not args.no_progress:
        with contextlib.suppress(ImportError):
            from tqdm.auto import tqdm
            iterator = tqdm(examples, desc="explaining answers")
    t0 = time.perf_counter()
    for ex in iterator:
        rel, s, e = explain_answer(model, ex, engine, kind == "t5", args.mode, device)
        relevance.append(rel)
        starts.append(s)
        ends.append(e)
        if s <= e:
            if ex.answers is not None and ex.offsets is not None and ex.context is not None:
                em, f1 = exact_and_f1(ex.context[ex.offsets[s][0]:ex.offsets[e][1]], ex.answers)
            else:
                em, f1 = span_exact_and_f1(s, e, ex.gold_spans)
            ems.append(em)
            f1s.append(f1)
    seconds = time.perf_counter() - t0
    m = metrics.qa_metrics(relevance, starts, ends, [ex.gold_spans for ex in examples],
                           mask=[ex.context_mask for ex in examples], k=2)
    row = {"Model": args.model + (" (tiny, random)" if args.tiny else ""),
           "EM": f"{100 * sum(ems) / max(1, len(ems)):.2f}", "F1": f"{100 * sum(f1s) / max(1, len(f1s)):.2f}",
           **m.table_row()}
    header = list(row)
    table = ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| "
             + " | ".join(row.values()) + " |")
    given = sys.argv[1:] if argv is None else argv
    result = {"row": row, "metrics": m.as_dict(), "too_long": too_long, "seconds": seconds,
              "it_per_s": len(examples) / seconds if seconds else None, "rules": args.rules,
              "command": "python scripts/reproduce_paper_qa.py " + " ".join(map(shlex.quote, given))}
    print(f"{table}\n\n{len(examples)} questions in {seconds:.0f} s; {too_long} over 512 tokens left out")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"qa_{kind}.json").write_text(json.dumps(result, indent=1))
        (out / f"qa_{kind}.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
