"""``--dataset_config FILE``: the dataset definitions of other trainers read into one list of
:class:`~.subsets.DatasetSubset`.

- kohya sd-scripts, ``.toml`` (or ``.json`` with a ``datasets`` list): ``[general]``,
  ``[[datasets]]``, ``[[datasets.subsets]]``; a key set higher up is inherited below
  (general → dataset → subset). Subset keys: ``image_dir``, ``num_repeats``, ``class_tokens``,
  ``caption_extension`` (kohya's default ``.caption``), ``is_reg``, ``keep_tokens``,
  ``shuffle_caption``, ``flip_aug``, ``caption_dropout_rate``, ``caption_prefix``; dataset keys:
  ``resolution`` (side, or ``[width, height]``), ``enable_bucket``, ``min_bucket_reso``,
  ``max_bucket_reso``, ``bucket_reso_steps``. ``metadata_file`` (fine-tuning) subsets are refused.
- ai-toolkit, ``.yaml`` job: the ``datasets:`` entries of each process (or a top-level
  ``datasets:`` list): ``folder_path``, ``caption_ext`` (default ``txt``), ``default_caption``,
  ``caption_dropout_rate``, ``shuffle_tokens``, ``keep_tokens``, ``num_repeats``, ``is_reg``,
  ``flip_x``, ``buckets``, ``resolution`` (a side or a list of sides: one subset per side);
  the process's ``trigger_word`` (``[trigger]`` in captions replaced by it, put in front of
  captions without it, and the prompt of images without a caption or ``default_caption``).
- SimpleTuner ``multidatabackend.json`` (a list of backends with ``id``): ``type: local`` image
  backends; ``instance_data_dir``, ``caption_strategy`` (``filename`` (default), ``textfile``,
  ``instanceprompt``), ``instance_prompt``, ``prepend_instance_prompt``,
  ``only_instance_prompt``, ``repeats`` (extra passes: 0 = seen once), ``resolution`` with
  ``resolution_type`` (``pixel``, ``pixel_area``, ``area`` in megapixels), ``crop`` /
  ``crop_aspect`` (``square``: square crops, else buckets), ``is_regularisation_data``,
  ``disabled``. ``text_embeds`` / ``image_embeds`` backends are caches and skipped; other
  backend types (``aws``, ``csv``, ``huggingface``, ...) and caption strategies are refused.
- OneTrainer ``concepts.json`` (a list of concepts with ``path``, or a train config with a
  ``concepts`` list): ``path``, ``enabled``, ``concept_type`` (``STANDARD``;
  ``PRIOR_PREDICTION`` is regularisation; ``VALIDATION`` skipped), ``include_subdirectories``,
  ``balancing`` / ``repeats`` with ``balancing_strategy: REPEATS`` (whole numbers),
  ``image.enable_random_flip`` (OneTrainer's default: on), ``text.prompt_source``
  (``sample``: ``.txt`` beside the image, ``filename``, ``concept``: the one prompt in
  ``text.prompt_path``), ``text.enable_tag_shuffling``, ``text.keep_tags_count``.

Settings the file leaves out come from the run's flags (``--caption_extension``,
``--shuffle_caption``, ``--keep_tokens``, ``--caption_dropout``, ``--random_flip``,
``--resolution``, ``--enable_bucket`` ...). Paths are relative to the working directory, as
in those trainers. Keys not read here are named in one warning line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from .subsets import DatasetSubset, SubsetError, check_subset, with_trigger_word

logger = logging.getLogger(__name__)

KOHYA_DATASET_KEYS = {"resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"}
KOHYA_SUBSET_KEYS = {"image_dir", "num_repeats", "class_tokens", "caption_extension", "is_reg", "keep_tokens",
                     "shuffle_caption", "flip_aug", "caption_dropout_rate", "caption_prefix"}
KOHYA_DEFAULT_CAPTION_EXTENSION = ".caption"
SIMPLETUNER_CACHE_TYPES = ("text_embeds", "image_embeds", "conditioning_image_embeds")
SIMPLETUNER_KEYS = {"id", "type", "dataset_type", "disabled", "disable", "instance_data_dir", "caption_strategy",
                    "instance_prompt", "prepend_instance_prompt", "only_instance_prompt", "repeats", "resolution",
                    "resolution_type", "crop", "crop_aspect", "is_regularisation_data", "is_regularization_data"}
ONETRAINER_KEYS = {"name", "path", "enabled", "concept_type", "validation_concept", "include_subdirectories",
                   "balancing", "balancing_strategy", "repeats", "image", "text"}
ONETRAINER_IMAGE_KEYS = {"enable_random_flip"}
ONETRAINER_TEXT_KEYS = {"prompt_source", "prompt_path", "enable_tag_shuffling", "tag_delimiter", "keep_tags_count"}
AI_TOOLKIT_KEYS = {"folder_path", "caption_ext", "default_caption", "caption_dropout_rate", "shuffle_tokens",
                   "keep_tokens", "num_repeats", "is_reg", "flip_x", "buckets", "resolution"}


class DatasetConfigError(SubsetError):
    """A ``--dataset_config`` file cannot be read: the message names the file, subset and key."""


class _Reader:
    """Typed access to the values of one file, raising errors that name the file, the subset
    and the key, and collecting the keys it does not read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = f"--dataset_config={path}"
        self.unused: list[str] = []

    def fail(self, subset: str, key: Optional[str], message: str) -> DatasetConfigError:
        where = f"{self.source}: subset {subset}" + (f", key {key!r}" if key else "")
        return DatasetConfigError(f"{where}: {message}")

    def note_unused(self, subset: str, table: dict[str, Any], known: set[str]) -> None:
        self.unused += [f"{subset}.{key}" for key in table if key not in known]

    def integer(self, subset: str, key: str, value: Any, minimum: int = 0) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(subset, key, f"{value!r} is not a whole number")
        if value < minimum:
            raise self.fail(subset, key, f"{value} must be at least {minimum}")
        return value

    def number(self, subset: str, key: str, value: Any, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(subset, key, f"{value!r} is not a number")
        if not low <= value < high:
            raise self.fail(subset, key, f"{value} must be in [{low:g}, {high:g})")
        return float(value)

    def switch(self, subset: str, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(subset, key, f"{value!r} is not true or false")
        return value

    def text(self, subset: str, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(subset, key, f"{value!r} is not a string")
        return value

    def resolution(self, subset: str, key: str, value: Any) -> tuple[int, int]:
        """A side, or kohya's ``[width, height]``, as ``(height, width)``."""
        if isinstance(value, list) and len(value) == 2:
            width, height = (self.integer(subset, key, side, 1) for side in value)
            return height, width
        side = self.integer(subset, key, value, 1)
        return side, side

    def folder(self, subset: str, key: str, value: Any) -> Path:
        folder = Path(self.text(subset, key, value)).expanduser()
        if not folder.is_dir():
            raise self.fail(subset, key, f"{folder}: no such folder")
        return folder

    def warn_unused(self) -> None:
        if self.unused:
            logger.warning("%s: keys not used here (ignored): %s", self.source, ", ".join(self.unused))


def _load(path: Path) -> Any:
    if not path.is_file():
        raise DatasetConfigError(f"--dataset_config={path}: no such file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
    except Exception as error:  # each parser has its own error class
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise DatasetConfigError(f"--dataset_config={path}: not valid {suffix[1:].upper()}: {first_line}") from error
    raise DatasetConfigError(f"--dataset_config={path}: expected a .toml, .json, .yaml or .yml file")


def read_dataset_config(path: Path, defaults: DatasetSubset) -> list[DatasetSubset]:
    """The subsets defined by ``path`` (format told by suffix and shape, see the module
    docstring); ``defaults`` holds the run's settings for keys the file leaves out.

    Raises:
        DatasetConfigError: an unreadable file, a format not recognised, a missing folder, a
            bad number, a backend or caption source that cannot be read here, or no subsets.
    """
    path = Path(path)
    data = _load(path)
    reader = _Reader(path)
    defaults = dataclasses.replace(defaults, source=reader.source)
    parse = _format_of(data, path)
    subsets = parse(reader, data, defaults)
    reader.warn_unused()
    if not [s for s in subsets if not s.is_reg]:
        raise DatasetConfigError(f"--dataset_config={path}: no training subsets (only regularisation ones, or none)")
    return [check_subset(subset) for subset in subsets]


def _format_of(data: Any, path: Path) -> Callable[[_Reader, Any, DatasetSubset], list[DatasetSubset]]:
    if isinstance(data, dict) and isinstance(data.get("datasets"), list) and path.suffix.lower() in (".toml", ".json"):
        return _kohya
    if isinstance(data, dict) and path.suffix.lower() in (".yaml", ".yml"):
        return _ai_toolkit
    if isinstance(data, dict) and isinstance(data.get("concepts"), list):
        return lambda reader, data_, defaults: _onetrainer(reader, data_["concepts"], defaults)
    if isinstance(data, list) and data and all(isinstance(entry, dict) for entry in data):
        if any("id" in entry or "instance_data_dir" in entry or "dataset_type" in entry for entry in data):
            return _simpletuner
        if any("path" in entry for entry in data):
            return _onetrainer
    raise DatasetConfigError(
        f"--dataset_config={path}: not a dataset definition read here (kohya .toml with [[datasets]], "
        "ai-toolkit job .yaml with datasets:, SimpleTuner multidatabackend.json, OneTrainer concepts.json)"
    )


def _kohya(reader: _Reader, data: dict[str, Any], defaults: DatasetSubset) -> list[DatasetSubset]:
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise reader.fail("[general]", None, "must be a table")
    reader.note_unused("general", general, KOHYA_DATASET_KEYS | (KOHYA_SUBSET_KEYS - {"image_dir", "is_reg", "class_tokens"}))
    reader.note_unused("file", data, {"general", "datasets"})
    subsets = []
    for d, dataset in enumerate(data["datasets"]):
        if not isinstance(dataset, dict):
            raise reader.fail(f"datasets[{d}]", None, "must be a table")
        reader.note_unused(f"datasets[{d}]", dataset, KOHYA_DATASET_KEYS | KOHYA_SUBSET_KEYS | {"subsets"})
        entries = dataset.get("subsets", [])
        if not entries:
            raise reader.fail(f"datasets[{d}]", "subsets", "the dataset has no [[datasets.subsets]]")
        for s, entry in enumerate(entries):
            name = f"datasets[{d}].subsets[{s}]"
            if not isinstance(entry, dict):
                raise reader.fail(name, None, "must be a table")
            if "metadata_file" in entry:
                raise reader.fail(name, "metadata_file", "kohya's fine-tuning subsets (metadata JSON) cannot be read "
                                                         "here; give image_dir with caption files")
            reader.note_unused(name, entry, KOHYA_DATASET_KEYS | KOHYA_SUBSET_KEYS)
            merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **entry}
            subsets.append(_kohya_subset(reader, name, merged, defaults))
    return subsets


def _kohya_subset(reader: _Reader, name: str, values: dict[str, Any], defaults: DatasetSubset) -> DatasetSubset:
    if "image_dir" not in values:
        raise reader.fail(name, "image_dir", "missing (the folder of the subset's images)")
    fields: dict[str, Any] = {
        "folder": reader.folder(name, "image_dir", values["image_dir"]),
        "name": name,
        "caption_extension": defaults.caption_extension or KOHYA_DEFAULT_CAPTION_EXTENSION,
    }
    readers = {
        "num_repeats": ("repeats", lambda k, v: reader.integer(name, k, v, 1)),
        "class_tokens": ("prompt", lambda k, v: reader.text(name, k, v)),
        "caption_extension": ("caption_extension", lambda k, v: reader.text(name, k, v)),
        "is_reg": ("is_reg", lambda k, v: reader.switch(name, k, v)),
        "keep_tokens": ("keep_tokens", lambda k, v: reader.integer(name, k, v, 0)),
        "shuffle_caption": ("shuffle_caption", lambda k, v: reader.switch(name, k, v)),
        "flip_aug": ("flip_aug", lambda k, v: reader.switch(name, k, v)),
        "caption_dropout_rate": ("caption_dropout_rate", lambda k, v: reader.number(name, k, v, 0.0, 1.0)),
        "caption_prefix": ("caption_prefix", lambda k, v: reader.text(name, k, v).strip().rstrip(",").strip()),
        "resolution": ("resolution", lambda k, v: reader.resolution(name, k, v)),
        "enable_bucket": ("enable_bucket", lambda k, v: reader.switch(name, k, v)),
        "min_bucket_reso": ("min_bucket_reso", lambda k, v: reader.integer(name, k, v, 1)),
        "max_bucket_reso": ("max_bucket_reso", lambda k, v: reader.integer(name, k, v, 1)),
        "bucket_reso_steps": ("bucket_reso_steps", lambda k, v: reader.integer(name, k, v, 1)),
    }
    for key, (field, read) in readers.items():
        if key in values:
            fields[field] = read(key, values[key])
    if fields.get("is_reg") and "class_tokens" not in values:
        fields["prompt"] = None
    return dataclasses.replace(defaults, **fields)


def _ai_toolkit(reader: _Reader, data: dict[str, Any], defaults: DatasetSubset) -> list[DatasetSubset]:
    entries: list[tuple[str, Any, Any]] = []
    if isinstance(data.get("datasets"), list):
        entries = [(f"datasets[{i}]", entry, data.get("trigger_word")) for i, entry in enumerate(data["datasets"])]
    processes = (data.get("config") or {}).get("process") if isinstance(data.get("config"), dict) else None
    for p, process in enumerate(processes or []):
        if isinstance(process, dict) and isinstance(process.get("datasets"), list):
            entries += [(f"config.process[{p}].datasets[{i}]", entry, process.get("trigger_word"))
                        for i, entry in enumerate(process["datasets"])]
    if not entries:
        raise DatasetConfigError(f"{reader.source}: no datasets: list (at the top level or in config.process[*])")
    subsets = []
    for name, entry, trigger in entries:
        if not isinstance(entry, dict):
            raise reader.fail(name, None, "must be a mapping")
        if "folder_path" not in entry:
            raise reader.fail(name, "folder_path", "missing (the folder of the dataset's images)")
        reader.note_unused(name, entry, AI_TOOLKIT_KEYS)
        extension = reader.text(name, "caption_ext", entry.get("caption_ext", "txt"))
        fields: dict[str, Any] = {
            "folder": reader.folder(name, "folder_path", entry["folder_path"]),
            "name": name,
            "caption_extension": extension if extension.startswith(".") else f".{extension}",
            "repeats": reader.integer(name, "num_repeats", entry.get("num_repeats", 1), 1),
            "is_reg": reader.switch(name, "is_reg", entry.get("is_reg", False)),
        }
        if trigger is not None:
            fields["trigger_word"] = reader.text(name, "trigger_word", trigger)
            fields["prompt"] = fields["trigger_word"]
        if "default_caption" in entry:
            caption = reader.text(name, "default_caption", entry["default_caption"])
            fields["prompt"] = caption if trigger is None else with_trigger_word(caption, fields["trigger_word"])
        if "caption_dropout_rate" in entry:
            fields["caption_dropout_rate"] = reader.number(name, "caption_dropout_rate",
                                                           entry["caption_dropout_rate"], 0.0, 1.0)
        if "shuffle_tokens" in entry:
            fields["shuffle_caption"] = reader.switch(name, "shuffle_tokens", entry["shuffle_tokens"])
        if "keep_tokens" in entry:
            fields["keep_tokens"] = reader.integer(name, "keep_tokens", entry["keep_tokens"], 0)
        if "flip_x" in entry:
            fields["flip_aug"] = reader.switch(name, "flip_x", entry["flip_x"])
        if "buckets" in entry:
            fields["enable_bucket"] = reader.switch(name, "buckets", entry["buckets"])
        sides = entry.get("resolution")
        sides = sides if isinstance(sides, list) else [sides] if sides is not None else [None]
        for side in sides:
            resolution = None if side is None else reader.resolution(name, "resolution", side)
            label = name if len(sides) == 1 else f"{name}@{side}"
            subsets.append(dataclasses.replace(defaults, **{**fields, "name": label, "resolution": resolution}))
    return subsets


def _simpletuner(reader: _Reader, data: list[dict[str, Any]], defaults: DatasetSubset) -> list[DatasetSubset]:
    subsets = []
    for index, entry in enumerate(data):
        name = f"[{index}] (id {entry.get('id', '?')!r})"
        dataset_type = entry.get("dataset_type", "image")
        if entry.get("disabled", entry.get("disable", False)) is True or dataset_type in SIMPLETUNER_CACHE_TYPES:
            continue
        if dataset_type != "image":
            raise reader.fail(name, "dataset_type", f"{dataset_type!r} backends cannot be read here (image only)")
        backend = entry.get("type", "local")
        if backend != "local":
            raise reader.fail(name, "type", f"{backend!r} backends cannot be read here; only 'local' image folders")
        if "instance_data_dir" not in entry:
            raise reader.fail(name, "instance_data_dir", "missing (the folder of the backend's images)")
        reader.note_unused(name, entry, SIMPLETUNER_KEYS)
        strategy = entry.get("caption_strategy", "filename")
        prompt = entry.get("instance_prompt")
        prompt = None if prompt is None else reader.text(name, "instance_prompt", prompt)
        fields: dict[str, Any] = {
            "folder": reader.folder(name, "instance_data_dir", entry["instance_data_dir"]),
            "name": name,
            "repeats": 1 + reader.integer(name, "repeats", entry.get("repeats", 0), 0),
            "prompt": prompt if prompt is not None else defaults.prompt,
            "caption_extension": None,
            "caption_from_filename": False,
            "is_reg": reader.switch(name, "is_regularisation_data",
                                    entry.get("is_regularisation_data", entry.get("is_regularization_data", False))),
        }
        if reader.switch(name, "only_instance_prompt", entry.get("only_instance_prompt", False)):
            strategy = "instanceprompt"
        if strategy == "textfile":
            fields["caption_extension"] = ".txt"
        elif strategy == "filename":
            fields["caption_from_filename"] = True
        elif strategy == "instanceprompt":
            if prompt is None:
                raise reader.fail(name, "instance_prompt", "caption_strategy instanceprompt needs an instance_prompt")
        else:
            raise reader.fail(name, "caption_strategy", f"{strategy!r} cannot be read here "
                                                        "(textfile, filename or instanceprompt)")
        if reader.switch(name, "prepend_instance_prompt", entry.get("prepend_instance_prompt", False)):
            fields["caption_prefix"] = prompt
        if "resolution" in entry:
            fields["resolution"] = _simpletuner_resolution(reader, name, entry)
        crop_square = entry.get("crop", False) is True and entry.get("crop_aspect", "square") == "square"
        fields["enable_bucket"] = defaults.enable_bucket if crop_square or "crop" not in entry else True
        subsets.append(dataclasses.replace(defaults, **fields))
    return subsets


def _simpletuner_resolution(reader: _Reader, name: str, entry: dict[str, Any]) -> tuple[int, int]:
    kind = entry.get("resolution_type", "pixel")
    value = entry["resolution"]
    if kind in ("pixel", "pixel_area"):
        side = reader.integer(name, "resolution", value, 1)
    elif kind == "area":
        megapixels = reader.number(name, "resolution", value, 1e-6, 1e3)
        side = max(64, round(math.sqrt(megapixels * 1e6) / 64) * 64)
    else:
        raise reader.fail(name, "resolution_type", f"{kind!r}: expected pixel, pixel_area or area")
    return side, side


def _onetrainer(reader: _Reader, data: list[dict[str, Any]], defaults: DatasetSubset) -> list[DatasetSubset]:
    subsets = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise reader.fail(f"[{index}]", None, "must be an object")
        name = f"[{index}] ({entry.get('name') or entry.get('path', '?')!r})"
        concept_type = entry.get("concept_type", "STANDARD")
        if entry.get("enabled", True) is False or concept_type == "VALIDATION" or entry.get("validation_concept") is True:
            continue
        if concept_type not in ("STANDARD", "PRIOR_PREDICTION"):
            raise reader.fail(name, "concept_type", f"{concept_type!r} cannot be read here (STANDARD, PRIOR_PREDICTION)")
        if "path" not in entry:
            raise reader.fail(name, "path", "missing (the folder of the concept's images)")
        reader.note_unused(name, entry, ONETRAINER_KEYS)
        image = entry.get("image", {}) or {}
        text = entry.get("text", {}) or {}
        reader.note_unused(f"{name}.image", image, ONETRAINER_IMAGE_KEYS)
        reader.note_unused(f"{name}.text", text, ONETRAINER_TEXT_KEYS)
        strategy = entry.get("balancing_strategy", "REPEATS")
        if strategy != "REPEATS":
            raise reader.fail(name, "balancing_strategy", f"{strategy!r} cannot be read here (REPEATS only)")
        key = "balancing" if "balancing" in entry else "repeats"
        fields: dict[str, Any] = {
            "folder": reader.folder(name, "path", entry["path"]),
            "name": name,
            "repeats": reader.integer(name, key, entry.get(key, 1), 1),
            "is_reg": concept_type == "PRIOR_PREDICTION",
            "include_subdirectories": reader.switch(name, "include_subdirectories",
                                                    entry.get("include_subdirectories", False)),
            "flip_aug": reader.switch(name, "image.enable_random_flip", image.get("enable_random_flip", True)),
            "shuffle_caption": reader.switch(name, "text.enable_tag_shuffling",
                                             text.get("enable_tag_shuffling", False)),
            "keep_tokens": reader.integer(name, "text.keep_tags_count", text.get("keep_tags_count", 1), 0),
            "caption_extension": None,
        }
        delimiter = text.get("tag_delimiter", ",")
        if delimiter != ",":
            raise reader.fail(name, "text.tag_delimiter", f"{delimiter!r}: only ',' is read here")
        source = text.get("prompt_source", "sample")
        if source == "sample":
            fields["caption_extension"] = ".txt"
        elif source == "filename":
            fields["caption_from_filename"] = True
        elif source == "concept":
            fields["prompt"] = _one_prompt(reader, name, text.get("prompt_path", ""))
        else:
            raise reader.fail(name, "text.prompt_source", f"{source!r}: expected sample, filename or concept")
        subsets.append(dataclasses.replace(defaults, **fields))
    return subsets


def _one_prompt(reader: _Reader, name: str, value: Any) -> str:
    path = Path(reader.text(name, "text.prompt_path", value)).expanduser()
    if not path.is_file():
        raise reader.fail(name, "text.prompt_path", f"{path}: no such file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != 1:
        raise reader.fail(name, "text.prompt_path", f"{path} holds {len(lines)} prompts; one prompt per concept "
                                                    "is read here")
    return lines[0]
