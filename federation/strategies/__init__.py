"""Aggregation strategies, one module each, all built on Flower's aggregation functions.

`STRATEGIES` is the table a federation descriptor's strategy name is looked up in; `make_strategy` builds one
with checked parameters; `allowed_in_mode` says which strategies a privacy mode permits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from federation.strategies.base import Aggregate, AggregationError, Strategy, Update
from federation.strategies.bulyan import Bulyan
from federation.strategies.dp_wrapper import ServerSideGaussian
from federation.strategies.fedavg import FedAvg
from federation.strategies.fedmedian import FedMedian
from federation.strategies.krum import Krum
from federation.strategies.trimmed_mean import FedTrimmedAvg

__all__ = [
    "MODES",
    "STRATEGIES",
    "Aggregate",
    "AggregationError",
    "Bulyan",
    "FedAvg",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "Param",
    "ServerSideGaussian",
    "Strategy",
    "StrategyEntry",
    "Update",
    "allowed_in_mode",
    "make_strategy",
]

_REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """One constructor parameter of a strategy: its type, its default (none: required), what it means."""

    type: type
    help: str
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        """Whether the parameter has no default."""
        return self.default is _REQUIRED


@dataclass(frozen=True)
class StrategyEntry:
    """A row of `STRATEGIES`: the factory, its parameters, whether it only needs sums (so works under HE)."""

    factory: Callable[..., Strategy]
    summary: str
    params: Mapping[str, Param] = field(default_factory=dict)
    sum_only: bool = False


_F = Param(int, "number of Byzantine members tolerated")

STRATEGIES: Mapping[str, StrategyEntry] = {
    "fedavg": StrategyEntry(FedAvg, "example-weighted mean (McMahan et al. 2017)", sum_only=True),
    "fedmedian": StrategyEntry(FedMedian, "coordinate-wise median (Yin et al. 2018)"),
    "fedtrimmedavg": StrategyEntry(
        FedTrimmedAvg,
        "coordinate-wise trimmed mean (Yin et al. 2018)",
        {"beta": Param(float, "fraction cut at each end, 0 ≤ beta < 0.5", 0.2)},
    ),
    "krum": StrategyEntry(
        Krum,
        "(multi-)Krum, n ≥ 2f+3 (Blanchard et al. 2017)",
        {"f": _F, "m": Param(int, "updates kept and averaged (1: Krum)", 1)},
    ),
    "bulyan": StrategyEntry(Bulyan, "Bulyan over Krum, n ≥ 4f+3 (El Mhamdi et al. 2018)", {"f": _F}),
}

# Privacy mode → whether a strategy that needs the clear updates (not only their sum) can run.
MODES: Mapping[str, bool] = {"dp": True, "he": False, "he+dp": False, "dp-user": True, "he+dp-user": False}


def _spec(name: str) -> StrategyEntry:
    """The table row for `name`, or an AggregationError listing the known names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise AggregationError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build the strategy `name` from `STRATEGIES` with `params` checked against its declared parameters."""
    spec = _spec(name)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        accepted = ", ".join(spec.params) or "none"
        raise AggregationError(f"{name}: unknown parameter(s) {', '.join(unknown)}; accepted: {accepted}")
    kwargs: dict[str, Any] = {}
    for pname, param in spec.params.items():
        if pname not in params:
            if param.required:
                raise AggregationError(f"{name}: missing required parameter {pname!r} ({param.help})")
            continue
        value = params[pname]
        ok = (
            isinstance(value, int | float) if param.type is float else isinstance(value, param.type)
        ) and not isinstance(value, bool)
        if not ok:
            raise AggregationError(
                f"{name}: parameter {pname!r} must be {param.type.__name__} ({param.help}), got {value!r}"
            )
        kwargs[pname] = value
    return spec.factory(**kwargs)


def allowed_in_mode(name: str, mode: str) -> bool:
    """Whether strategy `name` can run under privacy mode `mode`: under HE (`he`, `he+dp`) only sums, so only fedavg."""
    spec = _spec(name)
    try:
        clear_updates = MODES[mode]
    except KeyError:
        raise AggregationError(f"unknown privacy mode {mode!r}; known: {', '.join(MODES)}") from None
    return clear_updates or spec.sum_only
