"""Rule sets: which rule applies where.

A :class:`RuleSet` maps each autograd node to a rule. Keys, from most to least specific:

1. ``Module("features.0")`` -- the ops that use the parameters of modules whose qualified
   name matches (a glob pattern such as ``"layer1.*.conv1"`` works);
2. ``First("conv")`` -- the first op(s) of those op names, groups or kinds on the way from
   the requested inputs (the input layer);
3. ``Module(torch.nn.Conv2d)`` or ``Module(model.fc)`` -- by module type or instance;
4. an op name (``"ConvolutionBackward0"``), then an op group (``"conv"``, ``"dense"``,
   ``"batchnorm"``), then an op kind (``"linear"``, ``"sum"``, ``"product"``,
   ``"elementwise"``, ``"route"``), then the defaults of :mod:`dynlrp.rules`.

An op belongs to a module when it uses that module's parameters: a convolution node whose
saved weight is ``model.features[0].weight`` belongs to ``features.0`` (matched by storage,
so the model is never touched). Module keys need the model: ``rules.bind(model)``.

With ``canonize=True`` (the default of the presets) a convolution or dense op whose only
consumer is an eval-mode batch norm is explained as one affine map with that batch norm --
Zennit's batch-norm merging, done on the graph (:class:`dynlrp.rules.Folded`).

Presets are functions returning rule sets, with the meaning of Zennit's composites;
``rules=`` accepts a preset's name, a rule set or a mapping.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops
from . import rules as R
from .errors import LRPError
from .saved import leaf_variable


class Module:
    """Selects the ops that use a module's parameters.

    Parameters
    ----------
    which
        A qualified module name or glob pattern (``"features.0"``, ``"layer*.0.conv1"``), a
        module type (``torch.nn.Conv2d``; subclasses match) or a module instance.
    """

    def __init__(self, which: str | type | torch.nn.Module) -> None:
        if not isinstance(which, (str, type, torch.nn.Module)):
            raise TypeError(f"Module() takes a name, a module type or a module, not {type(which).__name__}")
        self.which = which

    @property
    def by_name(self) -> bool:
        return isinstance(self.which, str)

    def matches(self, name: str, module: torch.nn.Module) -> bool:
        if isinstance(self.which, str):
            return fnmatch.fnmatchcase(name, self.which)
        if isinstance(self.which, type):
            return isinstance(module, self.which)
        return module is self.which

    def _key(self) -> tuple:
        return (type(self), self.which if isinstance(self.which, (str, type)) else id(self.which))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Module) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if isinstance(self.which, str):
            return f"Module({self.which!r})"
        if isinstance(self.which, type):
            return f"Module({self.which.__name__})"
        return f"Module(<{type(self.which).__name__} at {id(self.which):#x}>)"


class First:
    """Selects the input layer: ops of the given op names, groups or kinds that no other such
    op separates from the requested inputs (Zennit's "first layer").

    Parameters
    ----------
    *keys
        Op names, groups or kinds, e.g. ``First("conv")`` or ``First("conv", "dense")``.
    """

    def __init__(self, *keys: str) -> None:
        if not keys or not all(isinstance(k, str) for k in keys):
            raise TypeError("First() takes one or more op names, groups or kinds")
        self.keys = tuple(keys)

    def selects(self, entry: ops.OpEntry) -> bool:
        return entry.name in self.keys or entry.group in self.keys or entry.kind in self.keys

    def __eq__(self, other: object) -> bool:
        return isinstance(other, First) and self.keys == other.keys

    def __hash__(self) -> int:
        return hash((First, self.keys))

    def __repr__(self) -> str:
        return f"First({', '.join(map(repr, self.keys))})"


Key = str | Module | First


@dataclass(eq=False)
class _GraphView:
    """What a rule set works out once per graph: input layers, folds, modules."""

    first: dict[First, set[int]] = field(default_factory=dict)
    folds: dict[int, int] = field(default_factory=dict)  # producer -> channel-wise consumer
    folded: set[int] = field(default_factory=set)
    modules: dict[int, tuple[str, torch.nn.Module] | None] = field(default_factory=dict)
    owners: dict[int, tuple[str, torch.nn.Module]] | None = None  # data_ptr -> module
    selectors: list | None = None  # the mapping's Module(...) / First(...) keys, last first
    by_name: dict[tuple[str, str], R.Rule | None] = field(default_factory=dict)  # rule_for, memo


_PASS = R.Pass()
_UNSET = object()


class RuleSet:
    """Which rule applies where: by module, input layer, op name, op group or op kind.

    Parameters
    ----------
    mapping
        ``{key: Rule}`` with keys as listed in the module docstring: strings (op name,
        group or kind), :class:`Module` and :class:`First` selectors.
    canonize
        Explain a convolution or dense op followed only by an eval-mode batch norm as one
        affine map (the batch norm then passes relevance unchanged).
    model
        The model whose parameters :class:`Module` keys refer to; see :meth:`bind`.
    """

    def __init__(self, mapping: Mapping[Key, R.Rule] | None = None, *, canonize: bool = False,
                 model: torch.nn.Module | None = None) -> None:
        self.mapping: dict[Key, R.Rule] = dict(mapping or {})
        for key, rule in self.mapping.items():
            if not isinstance(key, (str, Module, First)):
                raise TypeError(f"rule set keys are op names, groups, kinds, Module(...) or First(...), "
                                f"not {type(key).__name__}")
            if not isinstance(rule, R.Rule):
                raise TypeError(f"rules[{key!r}] is a {type(rule).__name__}, not a dynlrp Rule")
        self.canonize = bool(canonize)
        self.model = model
        self._views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._last: tuple | None = None  # (weak reference to a graph, its view)

    # -- building ---------------------------------------------------------------------------
    def override(self, mapping: Mapping[Key, R.Rule] | None = None, *,
                 canonize: bool | None = None) -> RuleSet:
        """A new rule set with ``mapping`` layered over this one (same model binding)."""
        return type(self)({**self.mapping, **(mapping or {})},
                          canonize=self.canonize if canonize is None else canonize, model=self.model)

    def bind(self, model: torch.nn.Module) -> RuleSet:
        """A copy of this rule set whose :class:`Module` keys refer to ``model``'s modules.

        The model is only read (its modules' names and parameters), never changed.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"bind() takes a torch.nn.Module, not {type(model).__name__}")
        return type(self)(self.mapping, canonize=self.canonize, model=model)

    # -- lookup -----------------------------------------------------------------------------
    def rule_for(self, name: str, kind: str, node: Any = None) -> R.Rule | None:
        """The rule by op name, then op group, then kind, then the defaults."""
        entry = ops.lookup(name)
        group = entry.group if entry is not None else ""
        for key in (name, group, kind):
            if key and key in self.mapping:
                return self.mapping[key]
        return R.default_rule(kind)

    def rule_at(self, graph: Any, gn: Any, entry: ops.OpEntry) -> R.Rule:
        """The rule of node ``gn`` of ``graph`` (what the engine asks)."""
        view = self._view(graph)
        if gn.index in view.folded:
            return _PASS
        rule = self._select(view, graph, gn, entry)
        if rule is None:
            raise LRPError(f"no rule for {gn.name} (kind {entry.kind!r}); add one to the rule set, "
                           f"e.g. rules={{{gn.name!r}: dynlrp.rules.Epsilon()}}")
        if gn.index in view.folds:
            rule = R.Folded(rule, view.folds[gn.index])
        return rule

    def _select(self, view: _GraphView, graph: Any, gn: Any, entry: ops.OpEntry) -> R.Rule | None:
        selectors = view.selectors
        if selectors is None:
            selectors = view.selectors = [(k, r) for k, r in reversed(self.mapping.items())
                                          if not isinstance(k, str)]
        if not selectors:  # by op name, group or kind only: the same for every node of a type
            key = (gn.name, entry.kind)
            rule = view.by_name.get(key, _UNSET)
            if rule is _UNSET:
                rule = view.by_name[key] = self.rule_for(gn.name, entry.kind, gn.fn)
            return rule
        module = None
        if any(isinstance(k, Module) for k, _ in selectors):
            module = self._module_of(view, graph, gn, entry)
        if module is not None:
            for key, rule in selectors:
                if isinstance(key, Module) and key.by_name and key.matches(*module):
                    return rule
        for key, rule in selectors:
            if isinstance(key, First) and gn.index in self._first(view, graph, key):
                return rule
        if module is not None:
            for key, rule in selectors:
                if isinstance(key, Module) and not key.by_name and key.matches(*module):
                    return rule
        return self.rule_for(gn.name, entry.kind, gn.fn)

    def folds(self, graph: Any) -> dict[int, int]:
        """The batch norms (or other channel-wise maps) folded into the node before them:
        ``{producer: channel-wise consumer}``, the nodes whose rules read a consumer's output."""
        return self._view(graph).folds

    # -- per-graph work -----------------------------------------------------------------------
    def _view(self, graph: Any) -> _GraphView:
        last = self._last  # (the graph of the call in progress: asked once per node)
        if last is not None and last[0]() is graph:
            return last[1]
        view = self._views.get(graph)
        if view is None:
            view = _GraphView()
            if self.canonize:
                _find_folds(graph, view)
            self._views[graph] = view
        self._last = (weakref.ref(graph), view)
        return view

    def _first(self, view: _GraphView, graph: Any, key: First) -> set[int]:
        if key not in view.first:
            view.first[key] = _input_layer(graph, key)
        return view.first[key]

    def _module_of(self, view: _GraphView, graph: Any, gn: Any, entry: ops.OpEntry):
        if self.model is None:
            raise LRPError("this rule set has Module(...) keys but no model: use `rules.bind(model)`")
        if gn.index not in view.modules:
            if view.owners is None:
                view.owners = _owners(self.model)
            view.modules[gn.index] = _module_of(view.owners, graph, gn, entry)
        return view.modules[gn.index]

    def __repr__(self) -> str:
        extra = f", canonize={self.canonize}" if self.canonize else ""
        if self.model is not None:
            extra += f", model={type(self.model).__name__}"
        return f"RuleSet({self.mapping!r}{extra})"


def _reaching_slots(graph: Any, gn: Any) -> tuple[int, ...]:
    return tuple(s for s, e in enumerate(gn.inputs) if e is not None and graph.nodes[e[0]].reaches)


def _entry_of(gn: Any) -> ops.OpEntry | None:
    return None if gn.is_leaf else ops.lookup(gn.name)


def _input_layer(graph: Any, key: First) -> set[int]:
    """Nodes ``key`` selects with no other selected node between them and the requested inputs."""
    selected: dict[int, bool] = {}
    behind: dict[int, bool] = {}  # a selected node lies between this node and the inputs
    for i in reversed(graph.order):  # inputs first
        gn = graph.nodes[i]
        entry = _entry_of(gn)
        selected[i] = entry is not None and key.selects(entry)
        behind[i] = any(selected.get(e[0], False) or behind.get(e[0], False)
                        for e in gn.inputs if e is not None)
    return {i for i in graph.order if selected[i] and not behind[i]}


def _find_folds(graph: Any, view: _GraphView) -> None:
    """Graph-level batch-norm merging: an op with weights whose only consumer is a channel-wise
    affine op (an eval batch norm) is explained together with it."""
    targets = set(graph.targets)
    for i in reversed(graph.order):  # producers first, so a folded batch norm folds nothing
        gn = graph.nodes[i]
        entry = _entry_of(gn)
        if entry is None or entry.affine is None or i in view.folded or len(gn.consumers) != 1:
            continue
        j, slot = gn.consumers[0]
        bn = graph.nodes[j]
        bn_entry = _entry_of(bn)
        reaching = _reaching_slots(graph, gn)
        if (slot != 0 or (i, 0) in targets or bn_entry is None or bn_entry.affine is None
                or len(reaching) != 1 or _reaching_slots(graph, bn) != (0,)):
            continue
        channel = bn.affine(0)
        own = entry.affine(gn.fn, reaching[0])
        if channel is None or not channel.channelwise or own is None or own.scale_out is None:
            continue
        view.folds[i] = j
        view.folded.add(j)


def _owners(model: torch.nn.Module) -> dict[int, tuple[str, torch.nn.Module]]:
    """Storage address of every parameter and buffer -> (qualified name, module)."""
    owners: dict[int, tuple[str, torch.nn.Module]] = {}
    for name, module in model.named_modules():
        for _, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None and tensor.numel() > 0:
                owners.setdefault(tensor.data_ptr(), (name, module))
    return owners


def _module_of(owners: dict, graph: Any, gn: Any, entry: ops.OpEntry):
    """The module whose parameters node ``gn`` uses: its weight view's params, then leaf inputs."""
    tensors: list[torch.Tensor] = []
    reaching = _reaching_slots(graph, gn)
    if entry.affine is not None and len(reaching) == 1:
        view = entry.affine(gn.fn, reaching[0])
        if view is not None:
            tensors += list(view.params)
    for e in gn.inputs:
        if e is not None and graph.nodes[e[0]].is_leaf:
            tensors.append(leaf_variable(graph.nodes[e[0]].fn))
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0 and t.data_ptr() in owners:
            return owners[t.data_ptr()]
    return None


# -- presets: Zennit's composites -------------------------------------------------------------

def _composite(layers: Mapping[Key, R.Rule], stabilizer: float, canonize: bool) -> RuleSet:
    """Zennit's ``layer_map_base``: activations pass relevance, sums and average pools share it
    proportionally (``Norm``), batch norms pass it; then the composite's layer rules."""
    base: dict[Key, R.Rule] = {"elementwise": R.Pass(), "sum": R.Norm(stabilizer), "batchnorm": R.Pass()}
    return RuleSet({**base, **layers}, canonize=canonize)


def epsilon(*, epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True) -> RuleSet:
    """Epsilon on every convolution and dense layer (and any other linear map).

    Parameters
    ----------
    epsilon
        The epsilon of :class:`~dynlrp.rules.Epsilon`.
    stabilizer
        The stabiliser of the other rules (``Norm`` on sums and average pools).
    canonize
        Fold eval batch norms into the op before them.
    """
    return _composite({"linear": R.Epsilon(epsilon), "conv": R.Epsilon(epsilon),
                       "dense": R.Epsilon(epsilon)}, stabilizer, canonize)


def epsilon_plus(*, epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True) -> RuleSet:
    """Zennit's ``EpsilonPlus``: z+ on convolutions, epsilon on dense layers.

    Parameters are those of :func:`epsilon`.
    """
    return _composite({"linear": R.Epsilon(epsilon), "conv": R.ZPlus(stabilizer),
                       "dense": R.Epsilon(epsilon)}, stabilizer, canonize)


def epsilon_plus_flat(*, epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True) -> RuleSet:
    """Zennit's ``EpsilonPlusFlat``: :func:`epsilon_plus` with flat on the input layer
    (the first convolution or dense layer).

    Parameters are those of :func:`epsilon`.
    """
    return epsilon_plus(epsilon=epsilon, stabilizer=stabilizer, canonize=canonize).override(
        {First("conv", "dense"): R.Flat(stabilizer)})


def epsilon_gamma_box(*, low: float | torch.Tensor = -3.0, high: float | torch.Tensor = 3.0,
                      epsilon: float = 1e-6, gamma: float = 0.25, stabilizer: float = 1e-6,
                      canonize: bool = True) -> RuleSet:
    """Zennit's ``EpsilonGammaBox``: z^B on the first convolution, gamma on the others,
    epsilon on dense layers.

    Parameters
    ----------
    low, high
        The input domain of :class:`~dynlrp.rules.ZBox` (scalars or per-channel tensors
        shaped ``(1, C, 1, 1)``).
    gamma
        The gamma of :class:`~dynlrp.rules.Gamma`.
    epsilon, stabilizer, canonize
        As in :func:`epsilon`.
    """
    return _composite({"linear": R.Epsilon(epsilon), "conv": R.Gamma(gamma, stabilizer),
                       "dense": R.Epsilon(epsilon), First("conv"): R.ZBox(low, high, stabilizer)},
                      stabilizer, canonize)


def epsilon_alpha2_beta1(*, epsilon: float = 1e-6, stabilizer: float = 1e-6,
                         canonize: bool = True) -> RuleSet:
    """Zennit's ``EpsilonAlpha2Beta1``: alpha-beta (2, 1) on convolutions, epsilon on dense layers.

    Parameters are those of :func:`epsilon`.
    """
    return _composite({"linear": R.Epsilon(epsilon), "conv": R.AlphaBeta(2.0, 1.0, stabilizer),
                       "dense": R.Epsilon(epsilon)}, stabilizer, canonize)


def epsilon_alpha2_beta1_flat(*, epsilon: float = 1e-6, stabilizer: float = 1e-6,
                              canonize: bool = True) -> RuleSet:
    """Zennit's ``EpsilonAlpha2Beta1Flat``: :func:`epsilon_alpha2_beta1` with flat on the input layer.

    Parameters are those of :func:`epsilon`.
    """
    return epsilon_alpha2_beta1(epsilon=epsilon, stabilizer=stabilizer, canonize=canonize).override(
        {First("conv", "dense"): R.Flat(stabilizer)})


PRESETS: dict[str, Callable[..., RuleSet]] = {
    "epsilon": epsilon,
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_gamma_box": epsilon_gamma_box,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": epsilon_alpha2_beta1_flat,
}


# -- presets: transformers (AttnLRP, CP-LRP) --------------------------------------------------

def attnlrp(*, epsilon: float = 0.0) -> RuleSet:
    """AttnLRP (Achtibat et al. 2024) as LxT's efficient implementation applies it.

    Epsilon on linear maps and convolutions; sums share relevance in proportion, constants
    (masks, position tables, biases added on their own) keeping their share as a bias does
    (:class:`~dynlrp.rules.SumWithConstants`); the uniform rule on products of two activations
    (attention's ``q k^T`` and ``P v`` -- :class:`~dynlrp.rules.Epsilon` splits ``1/n`` -- and
    gated MLPs), with normalising denominators and activation gates as constants
    (:class:`~dynlrp.rules.UniformProduct`); the softmax rule
    (:class:`~dynlrp.rules.SoftmaxDT`); fused attention as both
    (:class:`~dynlrp.rules.AttnLRPAttention`); layer, group and batch norms with their
    denominator constant (:class:`~dynlrp.rules.ConstantDenominator`); identity on
    activations; proportional sums.

    Parameters
    ----------
    epsilon
        The stabiliser of the epsilon rules. 0 (the default) is what LxT computes: its input x
        gradient has no stabiliser, and every AttnLRP rule keeps relevance proportional to
        ``z * gradient``, so ``R / z`` stays bounded (an exact zero is divided by 1). With
        ``epsilon=1e-6`` the results move by up to ~1e-2 of the largest relevance on tiny
        random models (docs/transformers.md).
    """
    return RuleSet({
        "linear": R.Epsilon(epsilon), "sum": R.SumWithConstants(), "elementwise": R.Identity(),
        "route": R.Route(), "product": R.UniformProduct(), "softmax": R.SoftmaxDT(),
        "attention": R.AttnLRPAttention(epsilon),
        "norm": R.ConstantDenominator(epsilon), "batchnorm": R.ConstantDenominator(epsilon),
    })


def cp_lrp(*, epsilon: float = 0.0) -> RuleSet:
    """CP-LRP (Ali et al. 2022) in the DynamicLRP paper's ViT setting: epsilon on linear maps
    and convolutions, relevance only through the attention's value path (the final matmul,
    :class:`~dynlrp.rules.ValuePathEpsilon`, :class:`~dynlrp.rules.CPAttention`), the softmax
    skipped (:class:`~dynlrp.rules.StopRelevance`); gates of gated MLPs, normalising
    denominators and activation gates as constants; sums and norms as in :func:`attnlrp`.

    Parameters
    ----------
    epsilon
        The stabiliser of the epsilon rules (0, as LxT's ``cp_LRP``; see :func:`attnlrp`).
    """
    return RuleSet({
        "linear": R.ValuePathEpsilon(epsilon), "sum": R.SumWithConstants(), "elementwise": R.Identity(),
        "route": R.Route(), "product": R.UniformProduct(activation_gates=True), "softmax": R.StopRelevance(),
        "attention": R.CPAttention(epsilon), "norm": R.ConstantDenominator(epsilon),
        "batchnorm": R.ConstantDenominator(epsilon),
    })


PRESETS.update({"attnlrp": attnlrp, "cp_lrp": cp_lrp})


def resolve(rules: Any) -> RuleSet:
    """Turn a ``rules=`` argument (None, preset name, mapping or RuleSet) into a RuleSet."""
    if rules is None:
        return RuleSet()
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown preset {rules!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[rules]()
    if isinstance(rules, Mapping):
        return RuleSet(rules)
    raise TypeError(f"rules= takes a preset name, a mapping or a RuleSet, not {type(rules).__name__}")
