"""``--config job.toml`` (or ``.yaml`` / ``.yml`` / ``.json``): flags from a file.

The file's keys are flag names (``train_batch_size``, or ``train-batch-size``, or
``--train_batch_size``); TOML tables / YAML mappings one level deep are flattened, so a file
may group its keys (``[data]``, ``[training]``). Values go through the parser as if typed
(``true`` turns a switch on, a list fills a many-valued flag), and flags given on the command
line win over the file. Paths are relative to the working directory, as on the command line.

The resolved settings of a run are written as ``config.toml`` (flat, one key per flag, unset
flags left out); ``--config <output_dir>/config.toml`` repeats the run. A run with dataset
subsets (``--dataset_config``, kohya folder layouts) also records every subset's resolved
settings and counts as ``[[dataset_subsets]]`` tables: a record of the run, skipped when the
file is read back (the flags that define the subsets repeat them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..errors import SnellaError
from ..files import write_text_atomically

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")
RESOLVED_CONFIG_FILE = "config.toml"
SUBSET_RECORD_KEY = "dataset_subsets"


class JobConfigError(SnellaError):
    """A ``--config`` file cannot be read or names an unknown flag or a bad value."""


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=str, default=None,
                        help="A job file (.toml, .yaml or .json) whose keys are flag names; flags on the "
                             "command line win. The resolved settings are saved as <output_dir>/config.toml.")


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise JobConfigError(f"--config={path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise JobConfigError(f"--config={path}: expected a {', '.join(CONFIG_SUFFIXES)} file")
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # each parser has its own error class
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise JobConfigError(f"--config={path}: not valid {suffix[1:].upper()}: {first_line}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobConfigError(f"--config={path}: the top level must be a table of flag names")
    return data


def normalize_key(key: str) -> str:
    """``--train-batch-size`` → ``train_batch_size``."""
    return key.lstrip("-").replace("-", "_")


def read_job_config(path: Path) -> dict[str, Any]:
    """The flat ``{flag name: value}`` of a job file (one level of tables flattened)."""
    flat: dict[str, Any] = {}
    for key, value in _read_mapping(path).items():
        if key == SUBSET_RECORD_KEY:
            continue
        entries = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in entries:
            if isinstance(item, dict):
                raise JobConfigError(f"--config={path}: key {name!r}: tables nest one level at most")
            flag = normalize_key(str(name))
            if flag in flat:
                raise JobConfigError(f"--config={path}: key {flag!r} is given twice")
            flat[flag] = item
    return flat


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings}


def config_tokens(parser: argparse.ArgumentParser, values: dict[str, Any], path: Path) -> list[str]:
    """Command-line tokens equivalent to ``values`` (so argparse types and choices apply)."""
    actions = _actions_by_dest(parser)
    tokens: list[str] = []
    for key, value in values.items():
        action = actions.get(key)
        if action is None or key in ("help", "config"):
            raise JobConfigError(f"--config={path}: key {key!r} is not a flag of this script (see --help)")
        option = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:  # switches: store_true / store_false / BooleanOptionalAction
            if not isinstance(value, bool):
                raise JobConfigError(f"--config={path}: key {key!r} is a switch: give true or false")
            if isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(option if value else f"--no-{option[2:]}")
            elif value != bool(action.default):
                tokens.append(option)
            continue
        if value is None:
            continue
        if not isinstance(value, list):
            tokens.append(f"{option}={_token(value)}")  # "=" keeps values such as "-1" values
            continue
        if action.nargs is None:
            raise JobConfigError(f"--config={path}: key {key!r} takes one value, not a list")
        tokens.append(option)
        tokens.extend(_token(item) for item in value)
    return tokens


def _token(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> dict[str, Any]:
    """The parsed flags as ``{flag name: value}``: ``parser.parse_args(argv)`` with the
    ``--config`` file's values underneath the flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return vars(parser.parse_args(argv))
    path = Path(known.config)
    tokens = config_tokens(parser, read_job_config(path), path)
    exit_on_error = parser.exit_on_error
    parser.exit_on_error = False
    try:
        parser.parse_known_args(tokens)
    except argparse.ArgumentError as error:
        raise JobConfigError(f"--config={path}: {error}") from None
    finally:
        parser.exit_on_error = exit_on_error
    return vars(parser.parse_args(tokens + argv))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def render_toml(values: dict[str, Any], subsets: Sequence[dict[str, Any]] = ()) -> str:
    """Flat TOML of ``values`` in key order, then one ``[[dataset_subsets]]`` table per entry
    of ``subsets``; None values are left out (TOML has no null)."""
    lines = ["# Resolved settings of this run; repeat it with --config config.toml"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    for subset in subsets:
        lines += ["", f"[[{SUBSET_RECORD_KEY}]]  # record of the run, not read back"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in subset.items() if value is not None]
    return "\n".join(lines) + "\n"


def resolved_settings(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flags of a run (``{flag name: value}``) as a flat dict, sorted by name (``config``
    itself left out)."""
    return {key: value for key, value in sorted(flags.items()) if key != "config"}


def write_resolved_config(flags: Mapping[str, Any], path: Path, subsets: Sequence[dict[str, Any]] = ()) -> str:
    """Write ``resolved_settings(flags)`` (and the ``subsets`` record) as TOML to ``path``
    atomically; returns the text."""
    text = render_toml(resolved_settings(flags), subsets)
    write_text_atomically(path, text)
    return text
