"""The search space of a study, declared as strings in the config (``tune.space``).

An entry reads ``section.key=KIND:ARGS``::

    train.learning_rate=log:1e-4:1e-2     log-uniform float in [1e-4, 1e-2]
    model.dropout=float:0:0.3[:0.1]       uniform float (optionally stepped)
    model.filters=int:8:32:8              integer from 8 to 32 in steps of 8
    model.normalization=cat:instance|batch   one of the choices

Each parameter is named after its config key, so a trial's params are config overrides.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medseg.config import Config, ConfigError

KINDS = ("log", "float", "int", "cat")


@dataclass(frozen=True)
class SearchParam:
    """One searched config key and its distribution."""

    key: str
    kind: str  # one of KINDS
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        """Draw this parameter from an Optuna ``trial``."""
        if self.kind == "cat":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step))
        return trial.suggest_float(
            self.key, self.low, self.high, log=self.kind == "log", step=self.step
        )


def _number(text: str, entry: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"tune.space entry {entry!r}: {text!r} is not a number") from None


def _choice(text: str) -> Any:
    """A categorical choice as JSON where it parses (numbers, true/false), else a string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, bool | int | float | str) or value is None else text


def parse_param(entry: str) -> SearchParam:
    """Parse one ``section.key=KIND:ARGS`` entry (see the module docstring).

    Raises
    ------
    ConfigError
        Naming the entry, when its form, kind, bounds or key are wrong.
    """
    key, sep, spec = entry.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or ":" not in spec:
        raise ConfigError(f"tune.space entry {entry!r} is not of the form section.key=KIND:ARGS")
    kind, _, args = spec.partition(":")
    if key.startswith("tune.") or key.startswith("tracking."):
        raise ConfigError(f"tune.space entry {entry!r}: {key} cannot be searched")
    if kind == "cat":
        choices = tuple(_choice(c.strip()) for c in args.split("|" if "|" in args else ","))
        if not args or any(c == "" for c in choices):
            raise ConfigError(f"tune.space entry {entry!r}: empty choice")
        param = SearchParam(key, kind, choices=choices)
    elif kind in ("log", "float", "int"):
        parts = args.split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(f"tune.space entry {entry!r}: expected {kind}:LOW:HIGH[:STEP]")
        low, high = (_number(p, entry) for p in parts[:2])
        step = _number(parts[2], entry) if len(parts) == 3 else None
        if kind == "log" and step is not None:
            raise ConfigError(f"tune.space entry {entry!r}: log ranges take no step")
        if not low < high:
            raise ConfigError(f"tune.space entry {entry!r}: LOW must be below HIGH")
        if kind == "log" and low <= 0:
            raise ConfigError(f"tune.space entry {entry!r}: log ranges need LOW > 0")
        if kind == "int":
            if not (low.is_integer() and high.is_integer() and float(step or 1).is_integer()):
                raise ConfigError(f"tune.space entry {entry!r}: int bounds must be integers")
            step = step or 1
        if step is not None and step <= 0:
            raise ConfigError(f"tune.space entry {entry!r}: STEP must be positive")
        param = SearchParam(key, kind, low, high, step)
    else:
        raise ConfigError(f"tune.space entry {entry!r}: kind {kind!r} is not one of {KINDS}")
    # the key must exist and every bound/choice must be a value the config accepts
    for value in param.choices or (param.low, param.high):
        if param.kind == "int":
            value = int(value)
        try:
            Config().with_overrides({key: value})
        except ConfigError as err:
            raise ConfigError(f"tune.space entry {entry!r}: {err}") from None
    return param


def parse_space(entries: Sequence[str]) -> list[SearchParam]:
    """Parse every ``tune.space`` entry; a key may appear once."""
    params = [parse_param(e) for e in entries]
    keys = [p.key for p in params]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ConfigError(f"tune.space: {', '.join(duplicated)} appear more than once")
    if not params:
        raise ConfigError("tune.space is empty: nothing to search")
    return params


def suggest_overrides(trial, params: Sequence[SearchParam]) -> dict[str, Any]:
    """The config overrides an Optuna ``trial`` draws from ``params``."""
    return {p.key: p.suggest(trial) for p in params}
