"""Rule sets: which rule applies where.

A :class:`RuleSet` maps an autograd node to a rule: first by op name
(``"ConvolutionBackward0"``), then by op kind (``"linear"``, ``"sum"``, ``"product"``,
``"elementwise"``, ``"route"``), then the defaults of :mod:`dynlrp.rules`. Presets are
functions returning rule sets; ``rules=`` accepts a preset's name, a rule set or a mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import rules as R


class RuleSet:
    """Rules by op name or kind, falling back to the defaults.

    Parameters
    ----------
    mapping
        ``{op name or kind: Rule}``; op names win over kinds.
    """

    def __init__(self, mapping: Mapping[str, R.Rule] | None = None) -> None:
        self.mapping = dict(mapping or {})
        for key, rule in self.mapping.items():
            if not isinstance(rule, R.Rule):
                raise TypeError(f"rules[{key!r}] is a {type(rule).__name__}, not a dynlrp Rule")

    def rule_for(self, name: str, kind: str, node: Any = None) -> R.Rule | None:
        return self.mapping.get(name) or self.mapping.get(kind) or R.default_rule(kind)

    def override(self, mapping: Mapping[str, R.Rule]) -> RuleSet:
        """A new rule set with ``mapping`` layered over this one."""
        return type(self)({**self.mapping, **mapping})

    def __repr__(self) -> str:
        return f"RuleSet({self.mapping!r})"


def epsilon(eps: float = 1e-6) -> RuleSet:
    """Epsilon-LRP on every linear map; proportional sums; identity activations."""
    return RuleSet({"linear": R.Epsilon(eps)})


PRESETS: dict[str, Callable[..., RuleSet]] = {"epsilon": epsilon}


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
