"""Native knobs: each knob's type and range, checked before any work starts.

A knob given on the command line (``--option KEY=VALUE``, VALUE read as JSON) must have exactly
the type its rule asks for: no silent ``"maybe"`` → true, ``2.5`` → 2 or ``null`` → default.
Knobs without a rule here are held to the type of the method's default value.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from gkp.errors import UsageError

Rule = Callable[[str, Any], Any]


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(name: str, value: Any, want: str) -> UsageError:
    return UsageError(f"option {name}={_shown(value)}: {want}")


def integer(low: int | None = 1) -> Rule:
    """An int (JSON 8, not 8.5, "8", true or [8]) of at least ``low``."""

    def rule(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(name, value, "must be an integer")
        if low is not None and value < low:
            raise _fail(name, value, f"must be at least {low}")
        return int(value)

    return rule


def real(low: float | None = None, high: float | None = None, open_ends: bool = False) -> Rule:
    """A finite number in [low, high] (or (low, high) with ``open_ends``)."""

    def rule(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _fail(name, value, "must be a number")
        v = float(value)
        below = low is not None and (v <= low if open_ends else v < low)
        above = high is not None and (v >= high if open_ends else v > high)
        if not math.isfinite(v) or below or above:
            lo, hi = ("(", ")") if open_ends else ("[", "]")
            ends = ["-inf" if low is None else f"{low:g}", "inf" if high is None else f"{high:g}"]
            raise _fail(name, value, f"is outside {lo}{ends[0]}, {ends[1]}{hi}")
        return value

    return rule


def flag(name: str, value: Any) -> bool:
    """JSON true or false."""
    if not isinstance(value, bool):
        raise _fail(name, value, "must be true or false")
    return value


def choice(*options: str) -> Rule:
    def rule(name: str, value: Any) -> str:
        if value not in options:
            raise _fail(name, value, f"must be one of {', '.join(options)}")
        return value

    return rule


def auto_or_number(name: str, value: Any) -> Any:
    """``"auto"`` or a number >= 0 (the cost balancer λ)."""
    return value if value == "auto" else real(0.0)(name, value)


def epoch_window(name: str, value: Any) -> list[int] | None:
    """``null`` or ``[first, last]`` epochs, 1 <= first <= last."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if ok:
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    if not ok or not 1 <= value[0] <= value[1]:
        raise _fail(name, value, "must be [first, last] epochs with 1 <= first <= last")
    return [int(v) for v in value]


def layer_names(name: str, value: Any) -> list[str] | None:
    """``null`` or a non-empty list of module names (checked against the model later)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(name, value, 'must be a list of conv names, e.g. ["layer1.0.conv1"]')
    return value


RULES: dict[str, Rule] = {
    "rate": real(0.0, 1.0, open_ends=True),
    "groups": integer(1),
    "all_bottleneck_convs": flag,
    "cost_balancer": auto_or_number,
    "snapshot_window": epoch_window,
    "equal_size": choice("exact", "heuristic"),
    "beam_width": integer(1),
    "rerank_every": integer(1),
    "layers": layer_names,
    "positions": integer(1),
    "kd_alpha": real(0.0, 1.0),
    "kd_temperature": real(0.0, None, open_ends=True),
    "step": real(0.0, 1.0, open_ends=True),
    "restarts": integer(1),
    "fc_cap": real(0.0, 1.0, open_ends=True),
    "local_share": real(0.0, 1.0, open_ends=True),
}


def _rule_from_default(default: Any) -> Rule | None:
    if isinstance(default, bool):
        return flag
    if isinstance(default, numbers.Integral):
        return integer(None)
    if isinstance(default, numbers.Real):
        return real()
    return None


def check_knobs(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` checked knob by knob; unknown names raise UsageError listing the known ones.

    ``layers`` (explicit target convs) is accepted by every method.
    """
    known = {*defaults, "layers"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(n[:40] for n in unknown)}; this method accepts "
            f"{', '.join(sorted(known))}"
        )
    out = {}
    for name, value in values.items():
        rule = RULES.get(name) or _rule_from_default(defaults.get(name))
        out[name] = rule(name, value) if rule is not None else value
    return out
