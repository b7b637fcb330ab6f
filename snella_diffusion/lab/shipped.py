"""The pretrained lab base shipped inside the package: one fp16 safetensors file (UNet, text
encoder and VAE state dicts, keys prefixed ``unet.``, ``text_encoder.``, ``vae.``) and a JSON
record of how it was made and its SHA-256.

    python -m snella_diffusion.lab.shipped export /tmp/lab/base/pipeline   # after pretraining
    python -m snella_diffusion.lab.shipped materialize <folder>            # a diffusers folder

``materialize_base`` checks the hash, rebuilds the pipeline in code (``lab.base``), loads the
weights in float32 and writes a ``StableDiffusionPipeline`` folder that
``DiffusionPipeline.from_pretrained`` and the DreamBooth script load by path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from snella_diffusion.errors import SnellaError
from snella_diffusion.files import replace_folder_atomically
from snella_diffusion.io import file_sha256
from snella_diffusion.lab import base

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "lab_base.fp16.safetensors"
RECORD_FILE = WEIGHTS_DIR / "lab_base.json"
COMPONENTS = ("unet", "text_encoder", "vae")
MAX_BYTES = 8 * 2**20


def export_weights(pipeline_folder: Path, record: Optional[dict[str, Any]] = None,
                   weights_file: Path = WEIGHTS_FILE, record_file: Path = RECORD_FILE) -> str:
    """Writes the fp16 weights of the pipeline saved in ``pipeline_folder`` and the record
    (``record`` plus ``sha256`` and ``bytes``); returns the SHA-256."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipeline = StableDiffusionPipeline.from_pretrained(pipeline_folder, safety_checker=None,
                                                       requires_safety_checker=False)
    tensors = {
        f"{name}.{key}": value.detach().to(torch.float16).contiguous()
        for name in COMPONENTS for key, value in getattr(pipeline, name).state_dict().items()
    }
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, weights_file)
    size = weights_file.stat().st_size
    if size > MAX_BYTES:
        raise SnellaError(f"{weights_file}: {size} bytes, more than the {MAX_BYTES} the package allows")
    digest = file_sha256(weights_file)
    record_file.write_text(json.dumps({**(record or {}), "sha256": digest, "bytes": size}, indent=1) + "\n")
    return digest


def shipped_record(record_file: Path = RECORD_FILE) -> dict[str, Any]:
    if not record_file.is_file():
        raise SnellaError(f"{record_file}: missing; the lab base was not shipped with this install")
    return json.loads(record_file.read_text())


def load_shipped_pipeline(weights_file: Path = WEIGHTS_FILE, record_file: Path = RECORD_FILE) -> Any:
    """The base pipeline with the shipped weights (float32), after checking their hash.

    Raises:
        SnellaError: the weights file is missing, or its SHA-256 differs from the record's.
    """
    from safetensors.torch import load_file

    record = shipped_record(record_file)
    if not weights_file.is_file():
        raise SnellaError(f"{weights_file}: missing; rebuild it with python -m snella_diffusion.lab.pretrain")
    digest = file_sha256(weights_file)
    if digest != record["sha256"]:
        raise SnellaError(f"{weights_file}: SHA-256 {digest} differs from {record['sha256']} in {record_file}")
    tensors = load_file(weights_file)
    pipeline = base.build_pipeline()
    for name in COMPONENTS:
        prefix = name + "."
        state = {k[len(prefix):]: v.to(torch.float32) for k, v in tensors.items() if k.startswith(prefix)}
        getattr(pipeline, name).load_state_dict(state, strict=True)
    for name in COMPONENTS:
        getattr(pipeline, name).eval()
    return pipeline


def materialize_base(folder: Path) -> Path:
    """A diffusers folder of the shipped base at ``folder`` (written once; a folder holding
    the same weights hash is reused). Returns ``folder``."""
    folder = Path(folder)
    marker = folder / "lab_base.sha256"
    expected = shipped_record()["sha256"]
    if marker.is_file() and marker.read_text().strip() == expected and (folder / "model_index.json").is_file():
        return folder
    pipeline = load_shipped_pipeline()

    def write(staging: Path) -> None:
        pipeline.save_pretrained(staging)
        (staging / "lab_base.sha256").write_text(expected + "\n")

    return replace_folder_atomically(folder, write)


def cli(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="Write the package's fp16 weights from a pipeline folder.")
    export.add_argument("pipeline_folder", type=Path)
    export.add_argument("--record", type=str, default="{}", help="JSON merged into the record.")
    materialize = commands.add_parser("materialize", help="Write the shipped base as a diffusers folder.")
    materialize.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "export":
        print(export_weights(args.pipeline_folder, json.loads(args.record)))
    else:
        print(materialize_base(args.folder))


if __name__ == "__main__":
    cli()
