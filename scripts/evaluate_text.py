"""Faithfulness of dynlrp and the baselines on a transformer text classifier (offline, a few minutes).

The classifier is all-MiniLM-L6-v2 with a trained last layer and head
(``scripts/train_text_classifier.py``; trained here first when ``--model`` does not exist).
It is scored on fresh templated sentences (another seed than its training and test data).
Every method explains the predicted class through the token embeddings (relevance summed
over the embedding axis, one number per token); the curves replace tokens with ``[MASK]``,
most / least relevant first, one token per step, and record the target logit. ``[CLS]``,
``[SEP]`` and padding are never occluded.

Run::

    PYTHONPATH=src HF_HUB_OFFLINE=1 python scripts/evaluate_text.py [--out out/faithfulness/text]

Writes ``text.md`` (tables), ``text.json`` and ``text.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynlrp import baselines, metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_text_classifier as ttc  # noqa: E402

DEFAULT_METHODS = ("dynlrp:attnlrp", "dynlrp:cp_lrp", "dynlrp:epsilon", "lxt", "saliency", "input_x_gradient",
                   "smoothgrad", "integrated_gradients", "gradient_shap", "random")


class EmbeddingForward(nn.Module):
    """The classifier called on token embeddings: ``forward(inputs_embeds, attention_mask)``."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, inputs_embeds: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(inputs_embeds=inputs_embeds, attention_mask=attention_mask)


def token_method(name: str, wrapper: EmbeddingForward, embeddings: nn.Module, **kw: object
                 ) -> Callable[..., torch.Tensor]:
    """``fn(ids, target, attention_mask)``: relevance per token by ``name`` through the embeddings."""
    attribute = baselines.method(name, wrapper, **kw)

    def fn(ids: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            emb = embeddings(ids)
        return attribute(emb, target, attention_mask=attention_mask).sum(-1)

    return fn


def sentiment_ids(tokenizer: object) -> set[int]:
    """Token ids of the sentiment adjectives (all their word pieces)."""
    ids: set[int] = set()
    for word in (*ttc.POSITIVE, *ttc.NEGATIVE):
        ids.update(tokenizer(word, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    return ids


def top1_hits(relevance: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, targets: set[int]) -> float:
    """Share of sentences whose most relevant token is (a piece of) the sentiment adjective."""
    top = relevance.masked_fill(~valid, float("-inf")).argmax(1)
    hits = [int(ids[i, t]) in targets for i, t in enumerate(top.tolist())]
    return sum(hits) / len(hits)


def main(argv: list[str] | None = None) -> metrics.FaithfulnessReport:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ttc.DEFAULT_OUT), help="trained classifier (trained if missing)")
    ap.add_argument("--out", default="out/faithfulness/text")
    ap.add_argument("--examples", type=int, default=96, help="sentences to score")
    ap.add_argument("--seed", type=int, default=7, help="seed of the scored sentences")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--score", default="logit", choices=metrics.SCORES)
    ap.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass of the curves")
    ap.add_argument("--attr-batch-size", type=int, default=1, help="sentences per attribution call")
    ap.add_argument("--samples", type=int, default=16, help="samples of SmoothGrad and GradientSHAP")
    ap.add_argument("--ig-steps", type=int, default=32, help="steps of Integrated Gradients")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not Path(args.model).exists():
        print(f"{args.model} not found: training it (scripts/train_text_classifier.py)")
        ttc.train(Path(args.model))
    tokenizer, clf, meta = ttc.load_classifier(args.model)
    sentences = ttc.make_sentences(args.examples, args.seed)
    enc = tokenizer([t for t, _ in sentences], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = torch.tensor([y for _, y in sentences])
    with torch.no_grad():
        accuracy = float((clf(ids, attention_mask=mask).argmax(1) == labels).float().mean())

    wrapper = EmbeddingForward(clf).eval()
    emb = clf.get_input_embeddings()
    options = {"smoothgrad": {"samples": args.samples}, "gradient_shap": {"samples": args.samples},
               "integrated_gradients": {"steps": args.ig_steps}}
    names = [m for m in args.methods.split(",") if m]
    methods = {m: token_method(m, wrapper, emb, **options.get(m, {})) for m in names}
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    features = metrics.Tokens(special_ids=special)
    occlusion = metrics.TokenReplace(tokenizer.mask_token_id)

    start = time.perf_counter()
    targets = metrics.predict_targets(clf, ids, model_kwargs={"attention_mask": mask})
    torch.manual_seed(0)
    np.random.seed(0)  # Captum's GradientSHAP draws its alphas with NumPy
    attributions = metrics.attribute_all(methods, ids, targets, model_kwargs={"attention_mask": mask},
                                         batch_size=args.attr_batch_size, progress=not args.no_progress)
    print(f"attributions: {time.perf_counter() - start:.0f} s")
    given = sys.argv[1:] if argv is None else argv
    command = ("PYTHONPATH=src HF_HUB_OFFLINE=1 python scripts/evaluate_text.py "
               + " ".join(map(shlex.quote, given)))
    report = metrics.score_attributions(
        clf, ids, attributions, targets, labels=labels, model_kwargs={"attention_mask": mask},
        features=features, occlusion=occlusion, step=1, score=args.score, batch_size=args.batch_size,
        progress=not args.no_progress,
        settings={"title": f"MiniLM sentiment classifier, {len(ids)} sentences, [MASK] replacement",
                  "model": f"all-MiniLM-L6-v2 + trained last layer and head (test accuracy "
                           f"{meta.get('test_accuracy')}; {accuracy:.3f} on these sentences)",
                  "speed": f"sentences/s with {args.attr_batch_size} sentence(s) per attribution call",
                  "command": command, "torch": torch.__version__})

    valid = features.valid(ids, {"attention_mask": mask})
    assert valid is not None
    words = sentiment_ids(tokenizer)
    extra = ["| Method | top-1 token is the sentiment word | Pearson r with lxt (per sentence, mean) |",
             "|---|---|---|"]
    ref = attributions.get("lxt")
    for name, a in attributions.items():
        if a.relevance is None:
            extra.append(f"| {name} | failed | |")
            continue
        corr = ""
        if ref is not None and ref.relevance is not None and name != "lxt":
            rs = []
            for i in range(len(ids)):
                v = valid[i]
                pair = torch.stack([a.relevance[i][v], ref.relevance[i][v]]).double()
                rs.append(float(torch.corrcoef(pair)[0, 1]))
            corr = f"{sum(rs) / len(rs):.4f}"
        extra.append(f"| {name} | {top1_hits(a.relevance, ids, valid, words):.3f} | {corr} |")
    paired = ["| pair | ABPC difference, same sentences |", "|---|---|"]
    done = {r.name for r in report.results if r.curves is not None}
    pairs = [("dynlrp:attnlrp", "lxt"), ("dynlrp:cp_lrp", "lxt"), ("dynlrp:epsilon", "lxt"),
             ("dynlrp:attnlrp", "integrated_gradients"), ("dynlrp:attnlrp", "gradient_shap"),
             ("dynlrp:attnlrp", "saliency")]
    for a_name, b_name in pairs:
        if a_name in done and b_name in done:
            mean, sem = report.paired(a_name, b_name)
            paired.append(f"| {a_name} - {b_name} | {mean:+.4f} ± {sem:.4f} |")

    out = Path(args.out)
    report.save_json(out / "text.json")
    report.save_plot(out / "text.png")
    text = "\n\n".join([report.markdown(), "\n".join(extra), "\n".join(paired)])
    (out / "text.md").write_text(f"{report.settings['title']}; {report.settings['features']}, 1 token per "
                                 f"step, score: {args.score}; {report.settings['speed']}\n\n{text}\n")
    print(f"\n## {report.settings['title']}\n\n{text}\n\nwrote {out}/text.md/.json/.png")
    return report


if __name__ == "__main__":
    main()
