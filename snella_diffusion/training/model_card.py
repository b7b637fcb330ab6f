"""The ``README.md`` model card written next to a trained adapter (SNELLA, or the LoRA / full
fine-tuning result of an ``--adapter`` A/B run)."""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any, Optional, Sequence

from ..config import SnellaConfig
from ..files import write_text_atomically


def sparsity_summary(budgets: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per component (the part of a layer name before the first dot): layer count and the
    mean, min and max sparsity."""
    grouped: dict[str, list[float]] = {}
    for name, sparsity in budgets.items():
        grouped.setdefault(name.split(".", 1)[0], []).append(sparsity)
    return {
        component: {"layers": len(values), "mean": mean(values), "min": min(values), "max": max(values)}
        for component, values in grouped.items()
    }


def render_model_card(
    base_model: str,
    family: str,
    instance_prompt: Optional[str],
    config: SnellaConfig,
    budgets: dict[str, float],
    training: dict[str, Any],
    validation_prompt: Optional[str] = None,
    validation_images: Sequence[str] = (),
    class_prompt: Optional[str] = None,
    run_config: Optional[str] = None,
    adapter: str = "snella",
    lora_rank: Optional[int] = None,
    component: str = "unet",
    data_subsets: Sequence[dict[str, Any]] = (),
    also_trained: Sequence[str] = (),
) -> str:
    """Markdown text of the card: base model, prompts, how to load the result, the adapter's
    settings, the run's training settings (data, loss and optimizer options included), for
    SNELLA the final per-layer sparsity (summary table + full list), and, when given, the
    resolved ``config.toml`` text. ``instance_prompt`` None: the images were trained on their
    own captions. ``adapter`` is ``"snella"``, ``"lora"`` (rank ``lora_rank`` or
    ``config.rank`` on ``config.target_modules``) or ``"full"`` (``component`` fine-tuned);
    ``component``: the trained denoiser, ``also_trained`` further ones trained in the same run
    (Wan 2.2 A14B's second expert); every card names them.
    ``data_subsets``: the run's dataset subsets (``SubsetDataset.subset_records``), tabled."""
    title, summary = {
        "snella": ("SNELLA DreamBooth adapter", "A SNELLA sparse adapter"),
        "lora": ("LoRA DreamBooth adapter", "A PEFT LoRA adapter (snella-diffusion `--adapter lora`)"),
        "full": (f"DreamBooth fine-tuned {component}", f"The fully fine-tuned {component}"),
    }[adapter]
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: snella-diffusion",
        "tags:",
        *({"snella": ["- snella"], "lora": ["- lora"], "full": []}[adapter]),
        "- dreambooth",
        "- diffusers",
        *([f"instance_prompt: {instance_prompt!r}"] if instance_prompt else []),
        "---",
        "",
        f"# {title}",
        "",
        f"{summary} trained with DreamBooth on **{base_model}** ({family}).",
        "",
        "- Trained denoiser: " + ", ".join(f"`{name}`" for name in (component, *also_trained)),
        f"- Instance prompt: `{instance_prompt}`" if instance_prompt else "- Prompts: per-image captions",
    ]
    if class_prompt:
        lines.append(f"- Prior preservation with class prompt: `{class_prompt}`")
    if validation_prompt:
        lines.append(f"- Validation prompt: `{validation_prompt}`")
    load = {
        "snella": ["from snella_diffusion.loaders import load_snella_weights", "",
                   f'pipe = DiffusionPipeline.from_pretrained("{base_model}")',
                   'load_snella_weights(pipe, "snella_weights.safetensors")  # every component in the file'],
        "lora": ["", f'pipe = DiffusionPipeline.from_pretrained("{base_model}")',
                 'pipe.load_lora_weights(".", weight_name="pytorch_lora_weights.safetensors")'],
        "full": ["", f'pipe = DiffusionPipeline.from_pretrained("{base_model}")',
                 f'pipe.{component} = type(pipe.{component}).from_pretrained("{component}")'],
    }[adapter]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        *load,
        f'image = pipe("{instance_prompt or "<a caption like the training captions>"}").images[0]',
        "```",
        "",
    ]
    if adapter == "snella":
        lines += ["## SNELLA settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| `{key}` | `{value}` |" for key, value in config.to_dict().items()]
        lines.append("")
    elif adapter == "lora":
        rank = lora_rank or config.rank
        lines += ["## LoRA settings", "", "| setting | value |", "| --- | --- |", f"| `rank` | `{rank}` |",
                  f"| `lora_alpha` | `{rank}` |", f"| `target_modules` | `{config.target_modules}` |", ""]
    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| `{key}` | `{value}` |" for key, value in training.items()]
    lines.append("")
    lines += subset_lines(data_subsets)
    if adapter == "snella":
        lines += sparsity_lines(budgets)
    if validation_images:
        lines += ["## Validation samples", ""]
        lines += [f"![{image}]({image})" for image in validation_images]
        lines.append("")
    if adapter == "snella":
        lines += ["Allocation over training: `allocation.png` (layers × steps → kept fraction).", ""]
    if run_config:
        lines += ["<details><summary>Resolved settings (config.toml; repeat the run with "
                  "<code>--config config.toml</code>)</summary>", "", "```toml", run_config.rstrip(), "```", "",
                  "</details>", ""]
    return "\n".join(lines)


def subset_lines(subsets: Sequence[dict[str, Any]]) -> list[str]:
    """The card's training-data section: one row per dataset subset (none without subsets)."""
    if not subsets:
        return []
    lines = ["## Training data", "", "| subset | folder | images | repeats | draws per epoch | prompt | regularisation |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for subset in subsets:
        prompt = subset.get("prompt")
        source = "captions" if subset.get("caption_extension") or subset.get("caption_from_filename") else ""
        shown = " or ".join(part for part in (source, f"`{prompt}`" if prompt else "") if part) or "-"
        lines.append(f"| {subset['name']} | `{subset['folder']}` | {subset['images']} | {subset['repeats']} | "
                     f"{subset['draws_per_epoch']} | {shown} | {'yes' if subset['is_reg'] else 'no'} |")
    return lines + [""]


def sparsity_lines(budgets: dict[str, float]) -> list[str]:
    """The card's final-sparsity section: a per-component summary and the per-layer list."""
    lines = [
        "## Final sparsity (fraction of ΔW entries set to zero)",
        "",
        "| component | layers | mean | min | max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for component, row in sparsity_summary(budgets).items():
        lines.append(
            f"| {component} | {row['layers']} | {row['mean']:.4f} | {row['min']:.4f} | {row['max']:.4f} |"
        )
    lines += ["", "<details><summary>Per-layer sparsity</summary>", "", "| layer | sparsity |", "| --- | --- |"]
    lines += [f"| `{name}` | {value:.4f} |" for name, value in budgets.items()]
    lines += ["", "</details>", ""]
    return lines


def write_model_card(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + rename)."""
    return write_text_atomically(path, text)
