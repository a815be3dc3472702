"""The p schedule: the probability of the original caption as a pure function of the training samples seen.

``{kind: constant|linear|cosine|step, start, end, total_samples, milestones, values}``: ``constant`` is ``start``;
``linear``/``cosine`` go from ``start`` to ``end`` over ``total_samples`` and stay at ``end`` after; ``step`` is
``start`` before ``milestones[0]`` and ``values[i]`` from ``milestones[i]`` samples on. The loader evaluates it at
each batch's global training index (``samples = index x batch x world``), so p is the same under any worker count
and after a resume.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from datamodules.checks import ConfigError

KINDS = ("constant", "linear", "cosine", "step")
_FIELDS = ("kind", "start", "end", "total_samples", "milestones", "values")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _probability(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(key, value, "must be a number in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class PSchedule:
    kind: str
    start: float = 1.0
    end: float = 1.0
    total_samples: int = 1
    milestones: tuple[int, ...] = ()
    values: tuple[float, ...] = ()

    @classmethod
    def parse(cls, cfg: Any, key: str = "p_schedule") -> PSchedule:
        """Validate ``cfg`` (the YAML mapping); a bad field raises :class:`ConfigError` naming ``key.field``."""
        if not isinstance(cfg, dict):
            raise ConfigError(key, cfg, "must be a mapping {kind: constant|linear|cosine|step, start: ..., ...}")
        unknown = sorted(set(cfg) - set(_FIELDS))
        if unknown:
            raise ConfigError(key, cfg, f"has unknown fields {unknown} (fields: {list(_FIELDS)})")
        kind = cfg.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{key}.kind", kind, f"must be one of {list(KINDS)}")
        start = _probability(f"{key}.start", cfg.get("start", 1.0))
        if kind == "constant":
            return cls(kind, start, start)
        if kind == "step":
            milestones, values = cfg.get("milestones"), cfg.get("values")
            if not isinstance(milestones, list) or not milestones or not all(map(_is_count, milestones)):
                raise ConfigError(f"{key}.milestones", milestones, "must be a non-empty list of sample counts >= 1")
            if milestones != sorted(set(milestones)):
                raise ConfigError(f"{key}.milestones", milestones, "must be strictly increasing")
            if not isinstance(values, list) or len(values) != len(milestones):
                raise ConfigError(f"{key}.values", values, f"must be a list of {len(milestones)} p values")
            vals = tuple(_probability(f"{key}.values[{i}]", v) for i, v in enumerate(values))
            return cls(kind, start, vals[-1], milestones=tuple(milestones), values=vals)
        total = cfg.get("total_samples")
        if not _is_count(total):
            raise ConfigError(f"{key}.total_samples", total, f"a {kind} schedule needs an integer >= 1")
        if "end" not in cfg:
            raise ConfigError(f"{key}.end", None, f"a {kind} schedule needs its final p")
        return cls(kind, start, _probability(f"{key}.end", cfg["end"]), total_samples=total)

    def __call__(self, samples: int) -> float:
        if self.kind == "constant":
            return self.start
        if self.kind == "step":
            return (self.start, *self.values)[bisect.bisect_right(self.milestones, samples)]
        t = min(max(samples, 0) / self.total_samples, 1.0)
        if self.kind == "cosine":
            t = (1.0 - math.cos(math.pi * t)) / 2.0
        return self.start + (self.end - self.start) * t
