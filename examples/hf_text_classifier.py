"""Explain a Hugging Face text classifier: relevance per token, as HTML and in the terminal.

The classifier is a small BERT built from its config (random weights, no download), with a
WordPiece tokenizer over a tiny vocabulary. With a trained model, load both with
``from_pretrained(folder)`` instead. Run: ``python examples/hf_text_classifier.py [OUT_DIR]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

import dynlrp
from dynlrp import viz

WORDS = "a the film was truly wonderful bad boring story acting great ##ly ##ing".split()


def main(out_dir: str = "out/hf_text_classifier",
         text: str = "the film was truly wonderful") -> dynlrp.Explanation:
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
        tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config)

    inputs = tokenizer(text, return_tensors="pt")
    e = dynlrp.explain(model, inputs, target=1)  # explain the "positive" logit; relevance per token

    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    print(viz.text_ansi(tokens, e.relevance[0], merge=True))
    page = viz.save_text_html(tokens, e.relevance[0], Path(out_dir) / "tokens.html", merge=True,
                                     title=f"positive logit {float(e.score[0]):.3f}")
    print(f"positive logit {float(e.score[0]):.4f}, "
          f"relevance sum {float(e.relevance[0].sum()):.4f}; wrote {page}")
    return e


if __name__ == "__main__":
    main(*sys.argv[1:2])
