"""``snella-comfyui install <ComfyUI folder>``: write the custom node that registers the SNELLA
weight adapter (``custom_nodes/snella_diffusion/__init__.py`` and its ``requirements.txt``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import SnellaError
from ..files import replace_folder_atomically

NODE_FOLDER = "snella_diffusion"
NODE_INIT = (
    '"""SNELLA adapters in the stock Load LoRA nodes (written by snella-comfyui install)."""\n'
    "from snella_diffusion.comfyui import register\n"
    "register()\n"
    "NODE_CLASS_MAPPINGS = {}\n"
)
NODE_REQUIREMENTS = "snella-diffusion\n"


def install_node(comfyui_root: Union[str, os.PathLike], overwrite: bool = True) -> Path:
    """Write ``<comfyui_root>/custom_nodes/snella_diffusion`` atomically (built beside it, then
    swapped into place by ``files.replace_folder_atomically``); returns the folder.

    Raises:
        SnellaError: ``comfyui_root`` is not a ComfyUI checkout (no ``comfy/`` folder inside),
            or the node exists and ``overwrite`` is off.
    """
    root = Path(comfyui_root)
    if not (root / "comfy").is_dir():
        raise SnellaError(
            f"{root}: not a ComfyUI folder (it has no comfy/ inside); pass the folder that holds "
            "ComfyUI's main.py, comfy/ and custom_nodes/")
    destination = root / "custom_nodes" / NODE_FOLDER
    if destination.exists() and not overwrite:
        raise SnellaError(f"{destination} exists; pass --overwrite to replace it")

    def write(folder: Path) -> None:
        (folder / "__init__.py").write_text(NODE_INIT)
        (folder / "requirements.txt").write_text(NODE_REQUIREMENTS)

    return replace_folder_atomically(destination, write)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snella-comfyui",
        description="Set up ComfyUI to load SNELLA files (snella-export --to comfyui) in its Load LoRA nodes.")
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="write custom_nodes/snella_diffusion into a ComfyUI folder")
    install.add_argument("comfyui", metavar="COMFYUI_FOLDER",
                         help="the ComfyUI checkout (holds comfy/ and custom_nodes/)")
    install.add_argument("--no_overwrite", action="store_true", help="refuse to replace an existing node folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        folder = install_node(args.comfyui, overwrite=not args.no_overwrite)
    except SnellaError as error:
        print(f"snella-comfyui: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder}; install snella-diffusion into ComfyUI's Python "
          f"(pip install -r {folder / 'requirements.txt'}) and restart ComfyUI")
    return 0


def cli() -> None:
    sys.exit(main())
