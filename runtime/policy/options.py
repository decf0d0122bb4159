"""A policy's options by name: the fields of its config dataclasses, set from text
(`--policy-option KEY=VALUE`), converted to each field's type and validated by the config."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import get_type_hints

from kvrt.runtime.config import ConfigError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def option_names(configs: Iterable[type], fixed: Iterable[str] = ()) -> list[str]:
    return [f.name for config in configs for f in fields(config) if f.name not in set(fixed)]


def parse_options(options: Mapping[str, str], configs: Iterable[type],
                  fixed: Iterable[str] = ()) -> list[object]:
    """One instance of each config, its fields named in `options` set (the others default);
    `fixed` fields are not options. A ConfigError names an unknown option or a bad value."""
    configs = list(configs)
    known = option_names(configs, fixed)
    unknown = sorted(set(options) - set(known))
    if unknown:
        offered = ", ".join(known) or "none"
        raise ConfigError(f"unknown policy option {', '.join(unknown)} (this policy takes: "
                          f"{offered})")
    built = []
    for config in configs:
        types = get_type_hints(config)
        values = {name: _convert(name, options[name], types[name])
                  for name in (f.name for f in fields(config)) if name in options}
        try:
            built.append(config(**values))
        except ValueError as exc:
            raise ConfigError(f"bad policy option: {exc}") from None
    return built


def _convert(name: str, text: str, kind: type) -> object:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in _TRUE + _FALSE:
                raise ValueError(text)
            return lowered in _TRUE
        return kind(text)
    except ValueError:
        raise ConfigError(f"policy option {name} takes a {kind.__name__}, not {text!r}") from None
