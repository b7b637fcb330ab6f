"""The base of the run's typed settings: frozen dataclasses whose fields are named after the
command-line flags that fill them (``--train_batch_size`` fills ``train_batch_size``).

Each settings class declares its flags next to its fields, in a static ``add_arguments(parser)``,
and is built from the parsed values by :meth:`FlagSettings.from_flags`, which takes a plain
mapping ``{flag name: value}``: library code sees typed settings or plain dicts, never
argparse's result object.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

SettingsType = TypeVar("SettingsType", bound="FlagSettings")


class FlagSettings:
    """Mixin of the frozen settings dataclasses (see the module docstring)."""

    @classmethod
    def from_flags(cls: type[SettingsType], flags: Mapping[str, Any]) -> SettingsType:
        """The settings from ``{flag name: parsed value}``; lists become tuples (frozen). A
        field without a flag of its name raises KeyError (a declaration mistake)."""
        values = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            value = flags[field.name]
            values[field.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def flags(self) -> dict[str, Any]:
        """``{flag name: value}`` of this group (tuples as lists, as the parser gives them)."""
        return {field.name: list(value) if isinstance(value, tuple) else value
                for field in dataclasses.fields(self)  # type: ignore[arg-type]
                for value in [getattr(self, field.name)]}
