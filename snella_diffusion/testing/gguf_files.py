"""Tiny GGUF checkpoints written from a state dict, for tests and the documented recipes
(needs the ``gguf`` package: ``pip install "snella-diffusion[gguf]"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from torch import Tensor

__all__ = ["Q8_0_BLOCK", "write_q8_0_checkpoint"]

Q8_0_BLOCK = 32  # values per Q8_0 block: one float16 scale and 32 int8 values, 34 bytes


def write_q8_0_checkpoint(state_dict: dict[str, Tensor], path: Union[str, Path], arch: str = "flux") -> Path:
    """Write ``state_dict`` to the GGUF file ``path`` under its own (diffusers) key names: every
    2-D weight whose rows split into 32-value blocks as Q8_0, every other tensor as float32.
    Returns ``path``. diffusers loads the file with ``from_single_file`` and
    ``GGUFQuantizationConfig`` without renaming (the keys equal the model's)."""
    import gguf

    q8_0 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name, tensor in state_dict.items():
        array = tensor.detach().float().cpu().numpy()
        if array.ndim == 2 and array.shape[1] % Q8_0_BLOCK == 0:
            packed = gguf.quants.quantize(array, q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
