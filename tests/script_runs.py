"""The DreamBooth script run in-process by tests, as its console entry runs it.

- :func:`run_dreambooth`: ``main(parse_args(argv))`` with accelerate's process-global state
  reset before (another test may have left a different mixed precision) and after;
- :func:`tiny_flux_flags`: the flags of a 2-step run of a tiny Flux pipeline on 32 px images
  with one validation image at step 2 (``validation/step_2.png``), which the quantized-base
  tests extend with the flag under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def run_dreambooth(argv: Sequence[str]) -> Path:
    """Run ``train_dreambooth_snella.main`` on ``argv``; return the adapter file it wrote."""
    from accelerate.state import AcceleratorState

    from train_scripts import train_dreambooth_snella as script

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return script.main(script.parse_args(list(argv)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def tiny_flux_flags(pipeline_folder: Path, images: Path, output_dir: Path, steps: int = 2) -> list[str]:
    """A ``steps``-step rank-4 run at 32 px, batch 1, 16 prompt tokens, one validation image
    of the instance prompt at the last step."""
    return [
        "--pretrained_model_name_or_path", str(pipeline_folder), "--output_dir", str(output_dir),
        "--instance_data_dir", str(images), "--instance_prompt", "a photo of sks dog", "--resolution", "32",
        "--max_train_steps", str(steps), "--train_batch_size", "1", "--rank", "4", "--max_sequence_length", "16",
        "--report_to", "none", "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1",
        "--validation_inference_steps", "1", "--validation_steps", str(steps),
    ]
