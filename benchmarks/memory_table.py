"""Peak training memory of SNELLA DreamBooth on large DiTs, by accounting, for {bf16, fp8, int8, nf4}
bases × {no swap, half the blocks swapped} (nf4 without swapping, which refuses it), and which
cards it fits.

    python benchmarks/memory_table.py   # prints the table, writes benchmarks/results/memory_table.md

Peak = frozen weights on the device + SNELLA training state + activations + SNELLA workspace:

- **Weights** (exact, parameter accounting on ``meta``: ``build_reference_model``): every
  parameter in bf16 (2 bytes), except the linears ``--quantize_base`` quantizes
  (``training.quantized_base.quantized_linear_names``): fp8 = 1 byte per weight and bias entry
  (layerwise casting stores the whole layer in float8); int8 = 1 byte per weight entry + a float32
  scale and an int8 zero point per output row (torchao ``Int8WeightOnlyConfig``), bias bf16; nf4 =
  0.5 byte per weight entry + a uint8 absmax per 64-entry block + a float32 absmax per 256 blocks
  (bitsandbytes' nested statistics) + 1092 bytes of code tables per layer, bias bf16. With N
  blocks swapped (``--blocks_to_swap``: the last N) their
  weights leave the device, and the two largest consecutive swapped blocks come back (the block
  running and the one being prefetched).
- **SNELLA state** (exact count on ``meta``): the ``dit`` preset at rank 32 (the script's default
  for these models); float32 parameters, gradients and two AdamW moments: 16 bytes per parameter.
- **SNELLA workspace**: one adapted layer's dense ΔW in float32 and its copy in the compute dtype
  (6 bytes per entry of the largest adapted layer); layers build ΔW one at a time.
- **Activations**, with ``--gradient_checkpointing`` and batch 1: the input of every block (its
  token streams × width, bf16: what checkpointing keeps) plus the tensors one block saves for its
  backward while it is recomputed, plus those of the layers outside the blocks. The last two are
  *measured*: the bytes autograd saves (``saved_tensors_hooks``, parameters excluded, each storage
  once) in a bf16 forward of the same architecture narrowed by ``width factor`` (fewer heads, the
  feed-forward narrowed alike; one block of each kind) at three small token counts, fitted as
  a + b·tokens and evaluated at the real token count, then multiplied by the width factor.
  Assumptions: attention saves no tokens × tokens matrix (flash/memory-efficient SDPA; the
  measurement runs the CPU flash kernel, so the fit's residual shows it); every saved tensor is
  tokens × (a multiple of the width), so bytes scale linearly in width; text tokens: 512 (T5 /
  Qwen / Mistral prompt length, in the token stream for the joint-attention models, cross-attended
  by Wan).
- **Fit**: peak + 1 GiB (CUDA context and allocator slack, not in ``max_memory_allocated``) ≤ the
  card's memory (12/16/24/48/80 GiB). Text encoders are freed after caching the prompts (the
  script's default) and the VAE (≤ 0.3 GiB in float32) is not counted.

Models: Flux.1-dev, Flux.2-dev, Flux.2-klein 4B, Qwen-Image, Z-Image at 1024 × 1024 (4096 image
tokens), and Wan 2.1 T2V 14B at 81 frames of 480 × 832 (21 latent frames × 30 × 52 patches =
32760 tokens), whose config is diffusers' ``WanTransformer3DModel`` defaults.
"""


import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024 ** 3
CARDS_GIB = (12, 16, 24, 48, 80)
OVERHEAD_GIB = 1.0
QUANTIZATIONS = ("bf16", "fp8", "int8", "nf4")
SNELLA_RANK = 32
TEXT_TOKENS = 512
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
# per nf4 layer: the 16-value nf4 code and the 256-value code of the nested absmax (float32) and
# the absmax offset (a float32)
NF4_LAYER_TABLES = 4 * 16 + 4 * 256 + 4


@dataclass(frozen=True)
class ModelRow:
    """One model of the table: its reference config, block lists, the narrowing of the
    activation measurement, the real token count and how to call it on ``tokens`` image tokens."""

    label: str
    reference: str
    block_lists: tuple[str, ...]
    narrow: dict[str, Any]
    width_factor: int
    image_tokens: int
    call: Callable[[nn.Module, int], Any]
    measure_tokens: tuple[int, ...] = (64, 256, 576)
    text_in_stream: bool = True
    # the checkpointed blocks when more than the swapped ones (Z-Image's refiners)
    checkpointed_lists: tuple[str, ...] = ()

    @property
    def activation_lists(self) -> tuple[str, ...]:
        return self.checkpointed_lists or self.block_lists


# --- model calls at a given number of image tokens (batch 1, bf16) --------------------------------

def _grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return side, tokens // side


def _flux_call(model: nn.Module, tokens: int) -> Any:
    height, width = _grid(tokens)
    config = model.config
    ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // width, torch.arange(tokens) % width], 1)
    return model(hidden_states=torch.randn(1, tokens, config.in_channels),
                 encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config.joint_attention_dim),
                 pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([0.5]),
                 img_ids=ids, txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.tensor([3.5])).sample


def _flux2_call(model: nn.Module, tokens: int) -> Any:
    from snella_diffusion.families.flux2 import position_ids, text_position_ids

    height, width = _grid(tokens)
    config = model.config
    guidance = torch.tensor([3.5]) if config.guidance_embeds else None
    return model(hidden_states=torch.randn(1, tokens, config.in_channels),
                 encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config.joint_attention_dim),
                 timestep=torch.tensor([0.5]), guidance=guidance, img_ids=position_ids(1, height, width, "cpu"),
                 txt_ids=text_position_ids(1, TEXT_TOKENS, "cpu"), return_dict=False)[0]


def _qwen_call(model: nn.Module, tokens: int) -> Any:
    height, width = _grid(tokens)
    config = model.config
    return model(hidden_states=torch.randn(1, tokens, config.in_channels),
                 encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config.joint_attention_dim),
                 timestep=torch.tensor([0.5]), img_shapes=[(1, height, width)], return_dict=False)[0]


def _z_image_call(model: nn.Module, tokens: int) -> Any:
    height, width = _grid(tokens)
    config = model.config
    latents = torch.randn(config.in_channels, 1, 2 * height, 2 * width)
    return model([latents], torch.tensor([0.5]), [torch.randn(TEXT_TOKENS, config.cap_feat_dim)],
                 return_dict=False)[0][0]


def _wan_call(model: nn.Module, tokens: int) -> Any:
    frames = max(1, tokens // 64)
    config = model.config
    return model(hidden_states=torch.randn(1, config.in_channels, frames, 16, 16), timestep=torch.tensor([500]),
                 encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config.text_dim), return_dict=False)[0]


DOUBLE_SINGLE = ("transformer_blocks", "single_transformer_blocks")
MODELS: dict[str, ModelRow] = {
    "flux": ModelRow("Flux.1-dev", "flux", DOUBLE_SINGLE, {"num_attention_heads": 3, "num_layers": 1,
                     "num_single_layers": 1}, 8, 4096, _flux_call),
    "flux2-dev": ModelRow("Flux.2-dev", "flux2", DOUBLE_SINGLE, {"num_attention_heads": 6, "num_layers": 1,
                          "num_single_layers": 1}, 8, 4096, _flux2_call),
    "flux2-klein": ModelRow("Flux.2-klein 4B", "flux2-klein", DOUBLE_SINGLE, {"num_attention_heads": 3,
                            "num_layers": 1, "num_single_layers": 1}, 8, 4096, _flux2_call),
    "qwen-image": ModelRow("Qwen-Image", "qwen-image", ("transformer_blocks",), {"num_attention_heads": 3,
                           "num_layers": 1}, 8, 4096, _qwen_call),
    "z-image": ModelRow("Z-Image", "z-image", ("layers",), {"dim": 384, "n_heads": 3, "n_kv_heads": 3, "n_layers": 1,
                        "n_refiner_layers": 1}, 10, 4096, _z_image_call,
                        checkpointed_lists=("noise_refiner", "context_refiner", "layers")),
    "wan-14b": ModelRow("Wan 2.1 14B (81 × 480 × 832)", "wan2.1-14b", ("blocks",), {"num_attention_heads": 5,
                        "ffn_dim": 1728, "num_layers": 1}, 8, 21 * 30 * 52, _wan_call,
                        measure_tokens=(64, 128, 256), text_in_stream=False),
}


# --- weights -----------------------------------------------------------------------------------------

def quantized_layer_names(model: nn.Module) -> set[str]:
    """The linears ``--quantize_base`` quantizes in ``model`` (the script's own choice)."""
    from snella_diffusion.training.quantized_base import quantized_linear_names

    return set(quantized_linear_names(model))


def linear_bytes(linear: nn.Linear, quantization: str) -> int:
    """Bytes of one quantized linear's weight and bias as ``quantization`` stores them (module docstring)."""
    entries, rows = linear.weight.numel(), linear.weight.shape[0]
    bias = 0 if linear.bias is None else linear.bias.numel()
    if quantization == "fp8":
        return entries + bias
    if quantization == "int8":
        return entries + 5 * rows + 2 * bias
    if quantization == "nf4":
        blocks = math.ceil(entries / NF4_BLOCK)
        return math.ceil(entries / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_LAYER_TABLES + 2 * bias
    return 2 * (entries + bias)


def module_bytes(module: nn.Module, quantization: str, quantized: set[str], prefix: str = "") -> int:
    """Bytes of ``module``'s parameters stored as ``quantization`` (``quantized``: the qualified
    names, in the whole model, of the linears quantized; ``prefix``: ``module``'s own name)."""
    total = 0
    for name, child in module.named_modules(prefix=prefix):
        own = sum(p.numel() for p in child.parameters(recurse=False))
        if quantization != "bf16" and name in quantized:
            total += linear_bytes(child, quantization)
        else:
            total += 2 * own
    return total


@dataclass(frozen=True)
class WeightAccount:
    """Bytes of the frozen weights: all of them, those of each block in order, and what stays on
    the device with the last ``swapped`` blocks swapped (in-flight copies included)."""

    total: int
    blocks: tuple[int, ...]

    def on_device(self, swapped: int) -> int:
        if not swapped:
            return self.total
        away = self.blocks[len(self.blocks) - swapped:]
        in_flight = max(sum(away[i:i + 2]) for i in range(len(away)))
        return self.total - sum(away) + in_flight

    def swapped_away(self, swapped: int) -> int:
        """Bytes of the swapped blocks (all in CPU memory between visits)."""
        return sum(self.blocks[len(self.blocks) - swapped:]) if swapped else 0


def model_blocks(model: nn.Module, block_lists: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of the blocks of ``block_lists``, in forward order."""
    return [(f"{name}.{index}", block) for name in block_lists
            for index, block in enumerate(getattr(model, name, None) or ())]


def weight_account(model: nn.Module, quantization: str, block_lists: tuple[str, ...]) -> WeightAccount:
    quantized = quantized_layer_names(model) if quantization != "bf16" else set()
    blocks = tuple(module_bytes(block, quantization, quantized, name) for name, block in model_blocks(model, block_lists))
    return WeightAccount(module_bytes(model, quantization, quantized), blocks)


def snella_counts(model: nn.Module) -> tuple[int, int]:
    """(SNELLA parameters of the ``dit`` preset at rank 32, entries of the largest adapted layer),
    on ``model`` (``meta`` works: nothing is allocated). SNELLA is attached in place."""
    from snella_diffusion import SnellaConfig, apply_snella

    layers = apply_snella(model, SnellaConfig(rank=SNELLA_RANK, target_modules=["dit"]))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return parameters, max(layer.in_features * layer.out_features for layer in layers.values())


# --- activations ---------------------------------------------------------------------------------------

def saved_bytes(model: nn.Module, call: Callable[[], Any], blocks: list[nn.Module]) -> tuple[int, list[int]]:
    """Bytes autograd saves for the backward in ``call()`` (a forward with grad), each storage
    once and parameters excluded: ``(outside the blocks, [per block])``."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    current = {"block": None}
    per_block = [0] * len(blocks)
    outside = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if type(tensor) is torch.Tensor or type(tensor) is nn.Parameter:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in parameters and pointer not in seen and pointer != 0:
                seen.add(pointer)
                if current["block"] is None:
                    outside[0] += storage.nbytes()
                else:
                    per_block[current["block"]] += storage.nbytes()
        return tensor

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda module, args, index=index: current.update(block=index)))
        handles.append(block.register_forward_hook(lambda module, args, output: current.update(block=None)))
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            call()
    finally:
        for handle in handles:
            handle.remove()
    return outside[0], per_block


@dataclass(frozen=True)
class ActivationFit:
    """Measured saved bytes of the narrowed model as a + b·tokens: outside the blocks and per
    block kind (the largest block), with the worst relative residual of the fits."""

    outside: tuple[float, float]
    block: tuple[float, float]
    residual: float

    def at(self, tokens: int, width_factor: int) -> tuple[float, float]:
        """(outside, one block) bytes at ``tokens``, scaled by ``width_factor``."""
        return tuple(width_factor * (a + b * tokens) for a, b in (self.outside, self.block))


def _linear_fit(xs: list[int], ys: list[float]) -> tuple[tuple[float, float], float]:
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    residual = max(abs(intercept + slope * x - y) / max(y, 1.0) for x, y in zip(xs, ys))
    return (intercept, slope), residual


def measure_activations(row: ModelRow) -> ActivationFit:
    """Fit the narrowed model's saved bytes over ``row.measure_tokens`` (bf16, SNELLA attached)."""
    from snella_diffusion.testing.reference_configs import build_reference_model

    torch.manual_seed(0)
    model = build_reference_model(row.reference, device="cpu", **row.narrow).to(torch.bfloat16)
    snella_counts(model)
    blocks = [block for _, block in model_blocks(model, row.activation_lists)]
    outside, largest = [], []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for tokens in row.measure_tokens:
            kept_outside, per_block = saved_bytes(model, lambda: row.call(model, tokens), blocks)
            outside.append(float(kept_outside))
            largest.append(float(max(per_block)))
    outside_fit, outside_residual = _linear_fit(list(row.measure_tokens), outside)
    block_fit, block_residual = _linear_fit(list(row.measure_tokens), largest)
    return ActivationFit(outside_fit, block_fit, max(outside_residual, block_residual))


def checkpoint_inputs_bytes(blocks: int, width: int, tokens: int, text_in_stream: bool) -> int:
    """Bytes of the block inputs gradient checkpointing keeps: every block's token streams × width, bf16."""
    stream = tokens + (TEXT_TOKENS if text_in_stream else 0)
    return 2 * blocks * stream * width


def model_width(model: nn.Module) -> int:
    config = model.config
    for key in ("dim",):
        if key in config:
            return int(config[key])
    return int(config["num_attention_heads"] * config["attention_head_dim"])


# --- the table -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryRow:
    model: str
    quantization: str
    swapped: int
    blocks: int
    weights: int
    snella_state: int
    workspace: int
    activations: int

    @property
    def peak(self) -> int:
        return self.weights + self.snella_state + self.workspace + self.activations

    def fits(self, card_gib: int) -> bool:
        return self.peak / GIB + OVERHEAD_GIB <= card_gib


def model_rows(key: str) -> list[MemoryRow]:
    """The table's rows of one model: every quantization × {no swap, half the blocks swapped}
    (nf4 unswapped only: ``--blocks_to_swap`` refuses it)."""
    from snella_diffusion.testing.reference_configs import build_reference_model

    row = MODELS[key]
    model = build_reference_model(row.reference, device="meta")
    block_count = len(model_blocks(model, row.block_lists))
    checkpointed = len(model_blocks(model, row.activation_lists))
    width = model_width(model)
    accounts = {quantization: weight_account(model, quantization, row.block_lists) for quantization in QUANTIZATIONS}
    parameters, largest_layer = snella_counts(model)
    fit = measure_activations(row)
    outside, one_block = fit.at(row.image_tokens, row.width_factor)
    activations = int(outside + one_block) + checkpoint_inputs_bytes(checkpointed, width, row.image_tokens,
                                                                      row.text_in_stream)
    rows = []
    for quantization in QUANTIZATIONS:
        # --blocks_to_swap refuses nf4 (bitsandbytes' Params4bit cannot be copied between devices)
        for swapped in (0, block_count // 2) if quantization != "nf4" else (0,):
            rows.append(MemoryRow(row.label, quantization, swapped, block_count,
                                  accounts[quantization].on_device(swapped), 16 * parameters, 6 * largest_layer,
                                  activations))
    return rows


def render_table(rows: list[MemoryRow]) -> str:
    cards = " | ".join(f"{card} GB" for card in CARDS_GIB)
    lines = [f"| model | base | blocks swapped | weights | SNELLA state | activations | peak | {cards} |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |" + " :---: |" * len(CARDS_GIB)]
    for row in rows:
        marks = " | ".join("yes" if row.fits(card) else "–" for card in CARDS_GIB)
        lines.append(f"| {row.model} | {row.quantization} | {row.swapped} / {row.blocks} | {row.weights / GIB:.1f} | "
                     f"{(row.snella_state + row.workspace) / GIB:.1f} | {row.activations / GIB:.1f} | "
                     f"{row.peak / GIB:.1f} | {marks} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--output", type=Path, default=RESULTS / "memory_table.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row for key in args.models for row in model_rows(key)]
    table = render_table(rows)
    from snella_diffusion.files import write_text_atomically

    write_text_atomically(args.output, "Peak training memory in GiB (benchmarks/memory_table.py; rules in its "
                                       "docstring): batch 1, gradient checkpointing, SNELLA rank 32.\n\n" + table)
    print(table, end="")
    return table


if __name__ == "__main__":
    main()
