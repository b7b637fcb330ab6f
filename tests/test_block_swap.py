"""``--blocks_to_swap`` (issue 23, item 3) on the CPU, where a block's visit to the device is a
copy on the same device: the DreamBooth training step of tiny Flux and Z-Image gives bit-identical
losses and adapter tensors with and without swapping (with and without gradient checkpointing,
over float8 / torchao / quanto bases too); hooks of the test see each swapped block's weights as
a fresh copy at each of its forward / recompute / backward calls and back at their CPU home
after, at most two copies at a time, in the order the schedule says; the flag's refusals; the
script end to end."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from snella_diffusion import SnellaConfig, apply_snella
from snella_diffusion.block_swap import BlockSwap, BlockSwapError, SwapEvent, frozen_parameters
from snella_diffusion.families import FAMILIES, FamilySettings, TrainingComponents
from snella_diffusion.families.dit import DiTFlags
from snella_diffusion.layer import snella_layers
from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline, tiny_z_image_pipeline
from snella_diffusion.training.batch_loss import training_loss

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
PROMPTS = ["a photo of sks dog", "a photo of sks cat"]
STEPS = 3


def _flux_with_blocks(seed: int = 0):
    """The tiny Flux pipeline with 2 double- and 3 single-stream blocks (5 swappable blocks)."""
    from diffusers import FluxTransformer2DModel

    pipe = tiny_flux_pipeline(seed)
    torch.manual_seed(seed)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return pipe


PIPELINES = {"flux": _flux_with_blocks, "z-image": tiny_z_image_pipeline}


def _bf16(model: nn.Module) -> None:
    model.to(torch.bfloat16)


def _fp8(model: nn.Module) -> None:
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def _torchao_int8(model: nn.Module) -> None:
    quantization = pytest.importorskip("torchao.quantization")
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())


def _quanto_qint8(model: nn.Module) -> None:
    quanto = pytest.importorskip("optimum.quanto")
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)


BASES = {"fp8": _fp8, "torchao_int8": _torchao_int8, "quanto_qint8": _quanto_qint8}


class TrainingRun:
    """The DreamBooth training step (``batch_loss.training_loss``, backward, AdamW) of one tiny
    pipeline, SNELLA on its transformer, optionally checkpointed, quantized and swapped."""

    def __init__(self, family_name: str, swap: int = 0, checkpointing: bool = False, base=None, record: bool = False):
        self.family = FAMILIES[family_name]
        pipe = PIPELINES[family_name](0)
        modules = {name: module for name, module in pipe.components.items()}
        self.components = TrainingComponents("tiny", type(pipe).__name__, modules, self.family.denoiser_component,
                                             self.family.text_encoder_components)
        self.family.configure(self.components, FamilySettings(dit=DiTFlags(max_sequence_length=32),
                                                              train_text_encoder=False, resolution=32))
        denoiser = self.components.denoiser
        if base is not None:
            base(denoiser)
        apply_snella(denoiser, SnellaConfig(rank=4, target_modules=["dit"]))
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        self.blocks = self.family.swappable_blocks(denoiser)
        self.homes = {id(block): {(id(owner), name): owner._parameters[name].detach()
                                  for owner, name in frozen_parameters(block)} for block in self.blocks}
        self.swap = None
        if swap:
            self.swap = BlockSwap(denoiser, self.blocks, swap, CPU, record=record)
            self.swap.attach()
        self.trainable = [p for p in denoiser.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-2)
        with torch.no_grad():
            self.conditioning = self.family.encode_prompt(self.components, PROMPTS, CPU)
            pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
            self.latents = self.family.encode_latents(self.components, pixels, torch.Generator().manual_seed(4))
        self.dtype = next(p for p in self.trainable).dtype
        self.generator = torch.Generator().manual_seed(5)

    def step(self) -> float:
        objective = self.family.objective(self.components)
        loss = training_loss(self.family, self.components, objective, {"num_instance": 2, "prompts": PROMPTS},
                             self.latents.to(self.dtype), self.conditioning, self.components.denoiser,
                             self.generator, 1.0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {f"{layer_name}.{name}": tensor.detach().clone()
                for layer_name, layer in snella_layers(self.components.denoiser).items()
                for name, tensor in layer.adapters.state_dict().items()}


def _trained(family_name: str, **options) -> tuple[list[float], dict[str, Tensor]]:
    run = TrainingRun(family_name, **options)
    initial = run.adapter_tensors()
    losses = [run.step() for _ in range(STEPS)]
    trained = run.adapter_tensors()
    assert any(not torch.equal(trained[name], tensor) for name, tensor in initial.items())  # the steps train
    return losses, trained


def _assert_identical(reference, swapped) -> None:
    assert swapped[0] == reference[0]  # losses, exactly
    assert swapped[1].keys() == reference[1].keys() and len(reference[1]) > 10
    for name, tensor in reference[1].items():
        assert torch.equal(swapped[1][name], tensor), name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family_name", ["flux", "z-image"])
def test_training_with_swapped_blocks_is_bit_identical(family_name, checkpointing):
    reference = _trained(family_name, checkpointing=checkpointing)
    blocks = len(TrainingRun(family_name).blocks)
    assert blocks == {"flux": 5, "z-image": 2}[family_name]
    for count in (1, blocks):
        _assert_identical(reference, _trained(family_name, swap=count, checkpointing=checkpointing))


@pytest.mark.parametrize("base", sorted(BASES))
def test_swapping_quantized_bases_is_bit_identical_and_keeps_their_storage(base):
    reference = _trained("flux", base=BASES[base], checkpointing=True)
    run = TrainingRun("flux", base=BASES[base], swap=3, checkpointing=True)
    losses = [run.step() for _ in range(STEPS)]
    _assert_identical(reference, (losses, run.adapter_tensors()))
    # the homes are the quantized tensors themselves (same type, same bytes): nothing dequantized
    kinds = {type(home).__name__ for slot in run.swap.slots.values() for _, _, home in slot.weights}
    expected = {"fp8": "Tensor", "torchao_int8": "Int8Tensor", "quanto_qint8": "WeightQBytesTensor"}[base]
    assert expected in kinds
    if base == "fp8":
        dtypes = {home.dtype for slot in run.swap.slots.values() for _, _, home in slot.weights}
        assert torch.float8_e4m3fn in dtypes


def _placements(run: TrainingRun) -> dict[int, str]:
    """Where each swapped block's frozen weights are, seen from the test: "home" when every one is
    the tensor the block held before the swap (same storage), "copy" when every one is another
    tensor of equal values; anything else is "mixed"."""
    found = {}
    for index in run.swap.slots:
        block = run.blocks[index]
        states = set()
        for owner, name in frozen_parameters(block):
            now, home = owner._parameters[name].detach(), run.homes[id(block)][(id(owner), name)]
            if now.untyped_storage().data_ptr() == home.untyped_storage().data_ptr():
                states.add("home")
            elif torch.equal(now, home):
                states.add("copy")
            else:
                states.add("wrong")
        found[index] = states.pop() if len(states) == 1 else "mixed"
    return found


def _expected_events(blocks: int, swapped: int, checkpointing: bool) -> list[SwapEvent]:
    """The swap log of one training step, written from the schedule in block_swap's docstring."""
    first, last = blocks - swapped, blocks - 1
    events = []
    for index in range(blocks):
        if index == first == 0:
            events.append(SwapEvent("load", 0, "demand"))
        if index + 1 >= first and index + 1 <= last:
            events.append(SwapEvent("load", index + 1, "prefetch"))
        events.append(SwapEvent("forward", index))
        if index >= first and index != last:
            events.append(SwapEvent("evict", index))
    for index in reversed(range(blocks)):
        if index + 1 <= last and index + 1 >= first:
            events.append(SwapEvent("evict", index + 1))
        if index - 1 >= first:
            events.append(SwapEvent("load", index - 1, "prefetch"))
        events.append(SwapEvent("backward", index))
        if checkpointing:
            events.append(SwapEvent("recompute", index))
    if first == 0:
        events.append(SwapEvent("evict", 0))
    return events


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("swapped", [3, 5])
def test_each_block_finds_its_weights_where_the_schedule_says(swapped, checkpointing):
    run = TrainingRun("flux", swap=swapped, checkpointing=checkpointing, record=True)
    first = len(run.blocks) - swapped
    seen: list[tuple[str, int, dict[int, str]]] = []
    backward = {"running": False}

    def pre(index):
        def hook(module, args):
            seen.append(("recompute" if backward["running"] else "forward", index, _placements(run)))
        return hook

    def post(index):
        def hook(module, args, output):
            if backward["running"]:
                return
            seen.append(("after forward", index, _placements(run)))
            for tensor in (output if isinstance(output, tuple) else (output,)):
                if isinstance(tensor, Tensor) and tensor.requires_grad:
                    tensor.register_hook(lambda grad: on_grad(index))
        return hook

    def on_grad(index):
        backward["running"] = True
        if not seen or seen[-1][:2] != ("backward", index):
            seen.append(("backward", index, _placements(run)))

    for index, block in enumerate(run.blocks):
        block.register_forward_pre_hook(pre(index))
        block.register_forward_hook(post(index))
    run.step()
    backward["running"] = False
    final = _placements(run)

    swapped_indices = range(first, len(run.blocks))
    assert final == {index: "home" for index in swapped_indices}  # nothing stays on the device
    phases = {phase for phase, _, _ in seen}
    assert phases == {"forward", "after forward", "backward"} | ({"recompute"} if checkpointing else set())
    for phase, index, where in seen:
        assert "mixed" not in where.values() and "wrong" not in where.values()
        assert sum(state == "copy" for state in where.values()) <= 2, (phase, index, where)  # current + prefetched
        if index in swapped_indices and phase != "after forward":
            assert where[index] == "copy", (phase, index, where)
        if phase == "after forward" and index in swapped_indices and index != len(run.blocks) - 1:
            assert where[index] == "home", (phase, index, where)
        if phase == "backward":  # the later blocks' backward is over: their copies are gone
            assert all(where[later] == "home" for later in swapped_indices if later > index), (index, where)
    assert run.swap.log == _expected_events(len(run.blocks), swapped, checkpointing)
    assert not any(event.how == "demand" for event in run.swap.log if event.block != 0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_after_the_forward_no_copy_of_an_evicted_block_is_alive(checkpointing):
    """What the swap is for: between the forward and the backward, autograd's graph holds no
    device copy of a swapped block's weights (saved weights are references, read back from the
    backward's copy), except the last block's, kept for the backward that comes first."""
    import weakref

    run = TrainingRun("flux", swap=3, checkpointing=checkpointing)
    copies: list[tuple[int, weakref.ref]] = []

    def record(module, args):
        slot = run.swap.slots.get(run.blocks.index(module))
        if slot is not None and not run.swap._backward_running:  # the parameters the block's layers see
            copies.extend((run.blocks.index(module), weakref.ref(owner._parameters[name]))
                          for owner, name, _ in slot.weights)

    for block in run.blocks:
        block.register_forward_pre_hook(record)
    loss = training_loss(run.family, run.components, run.family.objective(run.components),
                         {"num_instance": 2, "prompts": PROMPTS}, run.latents, run.conditioning,
                         run.components.denoiser, run.generator, 1.0)
    assert {index for index, _ in copies} == {2, 3, 4} and len(copies) > 30
    assert {index for index, copy in copies if copy() is not None} == {4}
    loss.backward()


def test_inference_forward_keeps_one_copy_after_each_block():
    run = TrainingRun("flux", swap=5, record=True)
    run.components.denoiser.eval()
    with torch.no_grad():
        run.family.predict(run.components, run.latents, torch.tensor([500, 500]), run.conditioning, {})
    assert _placements(run) == {index: "home" for index in range(5)}
    assert [event.kind for event in run.swap.log] == ["load", "load", "forward"] + ["evict", "load", "forward"] * 3 + [
        "evict", "forward", "evict"]
    with torch.no_grad():
        swapped = run.family.predict(run.components, run.latents, torch.tensor([500, 500]), run.conditioning, {})
        run.swap.detach()  # every weight back on the device for good, the hooks gone
        assert _placements(run) == {index: "copy" for index in range(5)}
        events = len(run.swap.log)
        kept = run.family.predict(run.components, run.latents, torch.tensor([500, 500]), run.conditioning, {})
    assert len(run.swap.log) == events and torch.equal(kept, swapped)


def test_swap_refuses_what_it_cannot_do():
    from snella_diffusion.training.run_checks import TrainingSetupError, check_block_swap
    from snella_diffusion.methods import METHODS

    from snella_diffusion.testing.tiny_models import tiny_sd_pipeline

    unet = tiny_sd_pipeline(0).unet
    assert FAMILIES["stable-diffusion"].swappable_blocks(unet) == []
    with pytest.raises(BlockSwapError, match=r"^--blocks_to_swap: UNet2DConditionModel has no transformer blocks to swap$"):
        BlockSwap(unet, FAMILIES["stable-diffusion"].swappable_blocks(unet), 1, CPU)
    run = TrainingRun("z-image")
    with pytest.raises(BlockSwapError, match=r"^--blocks_to_swap=3: ZImageTransformer2DModel has 2 blocks "
                                             r"\(swap between 1 and 2\)$"):
        BlockSwap(run.components.denoiser, run.blocks, 3, CPU)
    with pytest.raises(TrainingSetupError, match=r"^--blocks_to_swap=0: must be at least 1"):
        check_block_swap(0, METHODS["snella"], None)
    with pytest.raises(TrainingSetupError, match=r"--adapter full trains them: drop one$"):
        check_block_swap(2, METHODS["full"], None)
    with pytest.raises(TrainingSetupError, match=r"^--blocks_to_swap with --quantize_base nf4"):
        check_block_swap(2, METHODS["snella"], "nf4")
    check_block_swap(2, METHODS["lora"], "int8")


def test_bitsandbytes_packed_weights_are_refused_by_name():
    bnb = pytest.importorskip("bitsandbytes")
    block = nn.Sequential(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))
    block[0].weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    swap = BlockSwap(nn.Module(), [block], 1, CPU)
    with pytest.raises(BlockSwapError, match=r"block 0 holds a bitsandbytes Params4bit \(its \.to\(\) packs"):
        swap.attach()


@pytest.mark.slow
def test_script_with_blocks_to_swap_saves_the_same_adapter(tmp_path, caplog):
    from accelerate.state import AcceleratorState

    from safetensors.torch import load_file

    from snella_diffusion.training.data import synthetic_instance_images, write_images
    from train_scripts.train_dreambooth_snella import main, parse_args

    pipe_folder, images = tmp_path / "flux", tmp_path / "images"
    _flux_with_blocks(0).save_pretrained(pipe_folder)
    write_images(synthetic_instance_images(count=2, size=32, seed=0), images, "instance")

    def train(name: str, *flags: str):
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            return main(parse_args([
                "--pretrained_model_name_or_path", str(pipe_folder), "--output_dir", str(tmp_path / name),
                "--instance_data_dir", str(images), "--instance_prompt", "a photo of sks dog", "--resolution", "32",
                "--max_train_steps", "2", "--train_batch_size", "1", "--rank", "4", "--max_sequence_length", "16",
                "--report_to", "none", *flags,
            ]))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)

    for flags in ((), ("--gradient_checkpointing",)):
        reference = load_file(train("plain", *flags))
        with caplog.at_level("INFO"):
            swapped = load_file(train("swapped", "--blocks_to_swap", "4", *flags))
        assert "--blocks_to_swap=4: the frozen weights of 4 of 5 transformer blocks wait in CPU memory" in caplog.text
        assert swapped.keys() == reference.keys() and len(reference) > 50
        for key, tensor in reference.items():
            assert torch.equal(swapped[key], tensor), key
    from snella_diffusion import SnellaError

    with pytest.raises(SnellaError, match=r"--blocks_to_swap=6: FluxTransformer2DModel has 5 blocks"):
        train("too-many", "--blocks_to_swap", "6")


@pytest.mark.slow
def test_benchmark_times_swapped_against_none(tmp_path):
    from benchmark_scripts import load_benchmark

    result = load_benchmark("bench_block_swap").main(["--tiny", "--swap", "2", "--rounds", "1", "--steps", "1",
                                                      "--output_dir", str(tmp_path)])
    assert sorted(result["times"]) == [0, 2] and all(len(t) == 1 and t[0] > 0 for t in result["times"].values())
    assert "| 0 | " in result["table"] and " | 1.000 |" in result["table"]
    assert (tmp_path / "block_swap_cpu.md").read_text() == result["table"]
