"""Explain a causal language model's next token: which earlier tokens made it likely?

A small Llama built from its config (random weights, no download) over a word-level toy
vocabulary. For ``(batch, tokens, vocab)`` logits, :func:`dynlrp.explain` explains the last
position -- the next token. Run: ``python examples/causal_lm_next_token.py [OUT_DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dynlrp
from dynlrp import viz

VOCAB = "<s> the cat dog sat on mat rug a and ran".split()


def main(out_dir: str = "out/causal_lm", prompt: str = "the cat sat on the",
         layers: int = 2) -> dynlrp.Explanation:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config)
    words = ["<s>", *prompt.split()]
    input_ids = torch.tensor([[VOCAB.index(w) for w in words]])

    e = dynlrp.explain(model, input_ids)  # target=None: the most likely next token

    next_word = VOCAB[int(e.target[0])]
    print(viz.text_ansi(words, e.relevance[0]) + f"  -> {next_word!r}")
    page = viz.save_text_html(words, e.relevance[0], Path(out_dir) / "next_token.html",
                                     title=f"next token {next_word!r}")
    print(f"next token {next_word!r} (logit {float(e.score[0]):.4f}), "
          f"delta {float(e.delta[0]):.2e}; wrote {page}")
    return e


if __name__ == "__main__":
    main(*sys.argv[1:2])
