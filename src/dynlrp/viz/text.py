"""Token heatmaps: self-contained HTML and coloured terminal text (ANSI), with sub-words merged.

Tokens come as the tokenizer prints them (``tokenizer.convert_ids_to_tokens``); the
sub-word scheme is recognised from its markers: WordPiece (``##ing`` continues a word),
SentencePiece (``▁the`` starts one) and byte-level BPE (``Ġthe`` starts one). Special
tokens (``[CLS]``, ``<s>``, ``<|endoftext|>``) are words of their own.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .colors import colorize, normalize

_SPECIAL = re.compile(r"^(\[[A-Za-z_]+\]|<[^<>\s]+>|<\|[^|]+\|>)$")
_SP, _BPE, _BPE_NL = "\u2581", "\u0120", "\u010a"  # "▁", "Ġ", "Ċ"

Tokens = Sequence[str]


def subword_scheme(tokens: Tokens) -> str:
    """``"wordpiece"``, ``"sentencepiece"``, ``"bpe"`` or ``"none"``, from the tokens' markers."""
    if any(t.startswith("##") and len(t) > 2 for t in tokens):
        return "wordpiece"
    if any(_SP in t for t in tokens):
        return "sentencepiece"
    if any(t.startswith(_BPE) or t.startswith(_BPE_NL) for t in tokens):
        return "bpe"
    return "none"


def word_pieces(tokens: Tokens, scheme: str = "auto") -> list[tuple[str, bool]]:
    """Each token as ``(display text, starts a new word)``, markers removed."""
    scheme = subword_scheme(tokens) if scheme == "auto" else scheme
    out: list[tuple[str, bool]] = []
    after_special = True
    for t in tokens:
        if _SPECIAL.match(t):
            out.append((t, True))
            after_special = True
            continue
        if scheme == "wordpiece":
            text, starts = (t[2:], False) if t.startswith("##") else (t, True)
        elif scheme == "sentencepiece":
            text, starts = (t.lstrip(_SP), True) if t.startswith(_SP) else (t, False)
        elif scheme == "bpe":
            text, starts = (t[1:], True) if t[:1] in (_BPE, _BPE_NL) else (t, False)
        else:
            text, starts = t, True
        out.append((text, starts or after_special))
        after_special = False
    return out


def merge_subwords(tokens: Tokens, scores: torch.Tensor | Sequence[float],
                   scheme: str = "auto") -> tuple[list[str], torch.Tensor]:
    """Merge sub-word tokens into words; a word's score is the sum of its tokens' scores.

    Parameters
    ----------
    tokens
        Tokens as the tokenizer prints them.
    scores
        One score per token (e.g. ``explanation.relevance[b]``).
    scheme
        ``"auto"`` (from the markers), ``"wordpiece"``, ``"sentencepiece"``, ``"bpe"`` or ``"none"``.

    Returns
    -------
    words : list of str
    word_scores : torch.Tensor
    """
    s = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)[:len(tokens)]
    words: list[str] = []
    merged: list[float] = []
    for (text, starts), v in zip(word_pieces(tokens, scheme), s.tolist()):
        if starts or not words:
            words.append(text)
            merged.append(v)
        else:
            words[-1] += text
            merged[-1] += v
    return words, torch.tensor(merged)


def _rows(tokens: Tokens | Sequence[Tokens], scores: torch.Tensor | Sequence) -> list:
    s = torch.as_tensor(scores).detach().float().cpu()
    if tokens and isinstance(tokens[0], str):
        return [(list(tokens), s.reshape(-1)[:len(tokens)])]  # type: ignore[arg-type]
    if s.dim() != 2:
        raise ValueError("several token rows need scores of shape (rows, tokens)")
    return [(list(t), s[i, :len(t)]) for i, t in enumerate(tokens)]  # type: ignore[arg-type]


def _lighter(rgb: torch.Tensor) -> torch.Tensor:
    """Blend colours 20% towards white, so that black text on them stays readable."""
    return (255.0 - (255.0 - rgb.float()) * 0.8).round().to(torch.uint8)


def _prepared(tokens, scores, merge: bool, percentile: float | None, cmap: str):
    rows = _rows(tokens, scores)
    pieces = []
    for toks, s in rows:
        if merge:
            words, ws = merge_subwords(toks, s)
            pieces.append(([(w, True) for w in words], ws))
        else:
            pieces.append((word_pieces(toks), s))
    allv = torch.cat([s for _, s in pieces]) if pieces else torch.zeros(0)
    scale = normalize(allv, percentile)  # one scale for all rows: they are comparable
    out, k = [], 0
    for parts, s in pieces:
        v = scale[k:k + len(s)]
        k += len(s)
        rgb = _lighter(colorize(v, cmap))
        out.append([(text, starts, float(raw), tuple(int(c) for c in col))
                    for (text, starts), raw, col in zip(parts, s.tolist(), rgb)])
    return out


def text_html(tokens: Tokens | Sequence[Tokens], scores: torch.Tensor | Sequence, *, merge: bool = False,
              title: str | None = None, labels: Sequence[str] | None = None, cmap: str = "bwr",
              percentile: float | None = None) -> str:
    """A self-contained HTML page (inline CSS, no scripts) with the tokens coloured by score.

    Parameters
    ----------
    tokens
        One list of tokens, or a list of them (several rows, e.g. two sentences).
    scores
        One score per token: ``(T,)`` or ``(rows, T)`` (longer rows are cut to their tokens).
    merge
        Merge sub-word tokens into words (scores summed).
    title
        A heading.
    labels
        One label per row.
    cmap, percentile
        As for the image heatmaps; all rows share one scale.

    Returns
    -------
    str
        The page; hover a token for its score.
    """
    rows = _prepared(tokens, scores, merge, percentile, cmap)
    body = []
    for i, row in enumerate(rows):
        spans = []
        for j, (text, starts, raw, (r, g, b)) in enumerate(row):
            gap = " " if starts and j else ""
            spans.append(f'{gap}<span class="tok" style="background:rgb({r},{g},{b})" '
                         f'title="{raw:+.4g}">{html.escape(text)}</span>')
        label = f'<div class="label">{html.escape(labels[i])}</div>' if labels else ""
        body.append(f'<div class="row">{label}<div class="text">{"".join(spans)}</div></div>')
    heading = f"<h2>{html.escape(title)}</h2>" if title else ""
    legend_cells = "".join(
        f'<span style="background:rgb{tuple(int(c) for c in col)}">&nbsp;&nbsp;</span>'
        for col in _lighter(colorize(torch.linspace(-1, 1, 21), cmap))
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
        f"{html.escape(title or 'dynlrp token relevance')}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
        ".row{margin:1em 0}.label{color:#555;font-size:.85em;margin-bottom:.2em}"
        ".text{font-size:1.15em;line-height:2}.tok{padding:.15em .1em;border-radius:.2em}"
        ".legend{font-size:.8em;color:#555}</style></head><body>\n"
        f"{heading}\n" + "\n".join(body) +
        f'\n<p class="legend">negative {legend_cells} positive (relevance; hover a token for its value)</p>'
        "\n</body></html>\n"
    )


def save_text_html(tokens: Tokens | Sequence[Tokens], scores: torch.Tensor | Sequence, path: str | Path,
                   **kwargs) -> Path:
    """Write :func:`text_html` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_html(tokens, scores, **kwargs), encoding="utf-8")
    return path


def text_ansi(tokens: Tokens | Sequence[Tokens], scores: torch.Tensor | Sequence, *, merge: bool = False,
              labels: Sequence[str] | None = None, cmap: str = "bwr", percentile: float | None = None) -> str:
    """The tokens with 24-bit ANSI background colours, for a terminal; one line per row.

    Parameters are those of :func:`text_html`.
    """
    lines = []
    for i, row in enumerate(_prepared(tokens, scores, merge, percentile, cmap)):
        parts = [f"{labels[i]}: "] if labels else []
        for j, (text, starts, _, (r, g, b)) in enumerate(row):
            gap = " " if starts and j else ""
            parts.append(f"{gap}\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m")
        lines.append("".join(parts))
    return "\n".join(lines)
