"""Loading mutated adapter files: only SnellaError, or a clean load with finite outputs.

A real adapter is trained (a few AdamW steps of the tiny SD UNet and text encoder) and saved;
1,200 seeded mutations of its file (truncations, byte flips, raw header edits, wrong types
and ranges in every config field and in ``shapes``, tensor dtype and shape edits, dropped
and renamed keys, NaN/Inf, huge and scaled values) are loaded into one UNet with
``load_snella``, and every tenth into a pipeline with ``load_snella_weights``. After a
failure the model (and the pipeline) must equal its snapshot bit for bit: tensors, module
types, ``requires_grad`` flags. After a load, a denoiser forward on fixed inputs is finite.
"""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from snella_diffusion import SnellaConfig, SnellaError, apply_snella, load_snella, remove_snella, save_snella
from snella_diffusion.loaders import load_snella_weights, unload_snella_weights
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

MUTATIONS = 1200
PIPELINE_EVERY = 10
SEED = 21
INPUTS = torch.Generator().manual_seed(5)
LATENTS = torch.randn(1, 4, 8, 8, generator=INPUTS)
CONTEXT = torch.randn(1, 7, 32, generator=INPUTS)
TOKENS = torch.tensor([[0, 70, 71, 72, 1, 1, 1]])


# Ten UNet layers (self- and cross-attention, the MLP; four distinct shapes) and two
# text-encoder layers keep each file small: the 1,200 loads then take seconds, not minutes.
UNET_TARGETS = [r"(?:down_blocks\.1\.attentions\.0|up_blocks\.0\.attentions\.2)\.transformer_blocks\.0\."
                r"(?:attn1\.to_q|attn1\.to_out\.0|attn2\.to_k|ff\.net\.0\.proj|ff\.net\.2)"]
TEXT_TARGETS = [r"(?:.*\.)?layers\.0\.(?:self_attn\.q_proj|mlp\.fc1)"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``(file, pipeline)``: an adapter trained for 3 AdamW steps on the tiny SD UNet and text
    encoder, saved; the pipeline is returned with the adapters removed again."""
    pipe = tiny_sd_pipeline(0)
    unet_layers = apply_snella(pipe.unet, SnellaConfig(rank=4, target_modules=UNET_TARGETS, init_sparsity=0.3))
    text_layers = apply_snella(pipe.text_encoder, SnellaConfig(rank=4, target_modules=TEXT_TARGETS, init_sparsity=0.3))
    assert (len(unet_layers), len(text_layers)) == (10, 2)
    params = [p for layer in [*unet_layers.values(), *text_layers.values()] for p in layer.primary.parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        noise = torch.randn(1, 4, 8, 8, generator=generator)
        context = pipe.text_encoder(TOKENS).last_hidden_state
        loss = torch.nn.functional.mse_loss(pipe.unet(LATENTS + noise, 500, context).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(params, before)), "training moved every adapter tensor"
    path = tmp_path_factory.mktemp("fuzz") / "trained.safetensors"
    save_snella({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, path, base_model="tiny-sd")
    remove_snella(pipe.unet)
    remove_snella(pipe.text_encoder)
    return path, pipe


# ---------------------------------------------------------------------------- mutations


class Source:
    """The trained file as bytes, as tensors and header, and helpers to write variants."""

    def __init__(self, path: Path):
        self.data = path.read_bytes()
        self.tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            self.metadata = dict(handle.metadata())
        self.keys = sorted(self.tensors)
        (length,) = struct.unpack("<Q", self.data[:8])
        self.header = json.loads(self.data[8:8 + length])
        self.body = self.data[8 + length:]

    def rebuilt(self, tensors: dict = None, metadata: dict = None) -> bytes:
        tensors = {k: v.contiguous() for k, v in (tensors if tensors is not None else self.tensors).items()}
        return save(tensors, metadata=metadata if metadata is not None else self.metadata)

    def with_header(self, header: dict) -> bytes:
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + self.body

    def with_config(self, edit: Callable[[dict], None]) -> bytes:
        config = json.loads(self.metadata["config"])
        edit(config)
        return self.rebuilt(metadata={**self.metadata, "config": json.dumps(config)})

    def with_shapes(self, text: str) -> bytes:
        return self.rebuilt(metadata={**self.metadata, "shapes": text})

    def with_tensor(self, key: str, value: torch.Tensor) -> bytes:
        return self.rebuilt(tensors={**self.tensors, key: value})


WRONG_VALUES = [None, "x", "", [], [1, 2], {}, {"a": 1}, True, False, -1, 0, 1, 3, 1.5, -0.5, 2 ** 40, 1e300,
                float("nan"), float("inf")]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool,
          torch.int8, torch.float8_e4m3fn]
HUGE = [1e2, 1e3, 1e4, 1e6, 1e10, 1e20, 1e38, -1e30, 3.4e38, -3.4e38]
SAFETENSORS_DTYPES = ["F16", "BF16", "F32", "F64", "I64", "I32", "U8", "BOOL", "I8", "XYZ", 5, None]


def _config_fields() -> list[str]:
    return list(SnellaConfig().to_dict())


def mutations(source: Source, rng: random.Random) -> list[tuple[str, bytes]]:
    """``MUTATIONS`` seeded ``(description, file bytes)`` pairs over every kind of damage."""
    cases: list[tuple[str, bytes]] = []
    size = len(source.data)
    float_keys = [k for k in source.keys if source.tensors[k].is_floating_point()]
    layer_keys = sorted(json.loads(source.metadata["shapes"]))

    def add(description: str, data: bytes) -> None:
        cases.append((description, data))

    for _ in range(100):
        cut = rng.randrange(size)
        add(f"truncate at {cut}", source.data[:cut])
    for region in ("anywhere", "data"):
        for _ in range(100):
            data = bytearray(source.data)
            start = 0 if region == "anywhere" else size - len(source.body)
            flips = [(rng.randrange(start, size), rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))]
            for position, mask in flips:
                data[position] ^= mask
            add(f"flip bytes {flips}", bytes(data))
    for _ in range(100):
        header = json.loads(json.dumps(source.header))
        key = rng.choice(source.keys)
        kind = rng.randrange(7)
        if kind == 0:
            header[key]["dtype"] = rng.choice(SAFETENSORS_DTYPES)
        elif kind == 1:
            header[key]["shape"] = rng.choice([[], [1], [2, 3], [0], [-1], "x", None, header[key]["shape"] + [1]])
        elif kind == 2:
            begin, end = header[key]["data_offsets"]
            header[key]["data_offsets"] = rng.choice([[begin, end + 4], [begin + 4, end], [end, begin], [0, 0], None])
        elif kind == 3:
            del header[key]
        elif kind == 4:
            entry = rng.choice(sorted(source.metadata))
            header["__metadata__"][entry] = rng.choice([5, None, [], {"a": "b"}, True])
        elif kind == 5:
            del header["__metadata__"][rng.choice(sorted(source.metadata))]
        else:
            header["__metadata__"] = rng.choice([None, [], "x", {}])
        add(f"raw header edit {kind} of {key}", source.with_header(header))
    for field in _config_fields():
        for value in WRONG_VALUES:
            add(f"config {field}={value!r}", source.with_config(lambda c: c.__setitem__(field, value)))
        add(f"config without {field}", source.with_config(lambda c: c.pop(field)))
    for text in ["", "{", "[]", "5", "null", '"x"', json.dumps({"bogus": 1})]:
        add(f"config text {text!r}", source.rebuilt(metadata={**source.metadata, "config": text}))
    add("config with an unknown field", source.with_config(lambda c: c.__setitem__("bogus", 1)))
    for entry, values in {"format": ["lora", "", "SNELLA"], "format_version": ["2", "", "1.0", "01"],
                          "base_model": ["", "other/model", "x" * 1000]}.items():
        for value in values:
            add(f"header {entry}={value!r}", source.rebuilt(metadata={**source.metadata, entry: value}))
    for entry in sorted(source.metadata):
        add(f"header without {entry}", source.rebuilt(metadata={k: v for k, v in source.metadata.items() if k != entry}))
    shapes = json.loads(source.metadata["shapes"])
    for text in ["5", "[]", "{}", '"x"', "null", "{", "true", json.dumps(list(shapes.items()))]:
        add(f"shapes {text}", source.with_shapes(text))
    for _ in range(60):
        key = rng.choice(layer_keys)
        m, n = shapes[key]
        value = rng.choice([[m], [m, n, 1], ["a", n], [0, n], [-1, n], [n, m], [m + 1, n], [m, n + 1], True, None,
                            5, [m, float(n)], [m, True], {"m": m}, [2 ** 62, n]])
        edited = {**shapes, key: value}
        if rng.random() < 0.2:
            edited = {k: v for k, v in shapes.items() if k != key}
            value = "removed"
        elif rng.random() < 0.2:
            edited = {**shapes, rng.choice(["unet.bogus.layer", "x", ".", "unet.", ".a", "unet"]): [m, n]}
            value = "extra entry"
        add(f"shapes {key} -> {value!r}", source.with_shapes(json.dumps(edited)))
    for _ in range(80):
        key, dtype = rng.choice(source.keys), rng.choice(DTYPES)
        add(f"{key} as {dtype}", source.with_tensor(key, source.tensors[key].to(dtype)))
    for _ in range(80):
        key = rng.choice(source.keys)
        tensor = source.tensors[key]
        kind = rng.randrange(5)
        if kind == 0:
            value = tensor.reshape(-1)
        elif kind == 1:
            value = tensor.reshape(1, *tensor.shape)
        elif kind == 2 and tensor.dim() == 3:
            value = tensor.transpose(1, 2)
        elif kind == 3 and tensor.dim() == 3:
            value = tensor[:, : max(1, tensor.shape[1] - 1)]
        else:
            value = torch.cat([tensor.reshape(-1), tensor.reshape(-1)])
        add(f"{key} reshaped ({kind}) to {tuple(value.shape)}", source.with_tensor(key, value))
    for _ in range(50):
        key = rng.choice(source.keys)
        add(f"drop {key}", source.rebuilt(tensors={k: v for k, v in source.tensors.items() if k != key}))
    for _ in range(50):
        key = rng.choice(source.keys)
        head, _, param = key.rpartition(".snella.")
        component, _, path = head.partition(".")
        renamed = rng.choice([f"{head}.snella.{param}x", f"{head}.lora.{param}", f"{component}.{path}.0.snella.{param}",
                              f"other.{path}.snella.{param}", f"{head}.snella.in_factors", f"{head}.snella.drop_count",
                              f"{component}.{path[:-1]}.snella.{param}"])
        tensors = {k: v for k, v in source.tensors.items() if k != key}
        tensors.setdefault(renamed, source.tensors[key])
        add(f"rename {key} -> {renamed}", source.rebuilt(tensors=tensors))
    for _ in range(80):
        key = rng.choice(float_keys)
        value = source.tensors[key].clone()
        value.view(-1)[rng.randrange(value.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        add(f"non-finite entry in {key}", source.with_tensor(key, value))
    for _ in range(120):
        key = rng.choice(source.keys)
        param = key.rpartition(".")[2]
        value = source.tensors[key].clone()
        if param == "gamma":
            number = rng.choice([0.0, -1.0, 1e-30, 1e-8, 1e-4, 1e8] + HUGE)
        elif param == "sparsity":
            number = rng.choice([-0.1, 1.5, 1.0, 0.0, 0.999, 1e30])
        elif param == "threshold":
            number = rng.choice([-1.0, -1e-6, 0.0, 1e30, 10.0])
        elif param == "drop_count":
            numel = 1
            for d in json.loads(source.metadata["shapes"])[key.partition(".snella.")[0]]:
                numel *= d
            number = rng.choice([-1, numel + 1, 0, numel, 2 ** 62])
        else:
            number = rng.choice(HUGE)
        if value.dim() and rng.random() < 0.5:
            value.view(-1)[rng.randrange(value.numel())] = number
        else:
            value.fill_(number)
        add(f"{key} set to {number}", source.with_tensor(key, value))
    while len(cases) < MUTATIONS:
        key = rng.choice([k for k in float_keys if "factors" in k])
        factor = rng.choice([0.0, 0.5, 2.0, 10.0, 100.0, -3.0])
        add(f"{key} scaled by {factor}", source.with_tensor(key, source.tensors[key] * factor))
    rng.shuffle(cases)
    return cases[:MUTATIONS]


# ---------------------------------------------------------------------------- checks


def snapshot(models: dict[str, torch.nn.Module]) -> dict:
    """Every tensor (cloned), the module layout and the requires_grad flags."""
    return {
        name: (
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
        )
        for name, model in models.items()
    }


def changes(models: dict[str, torch.nn.Module], expected: dict) -> list[str]:
    """What differs from ``expected`` (empty when the models are bit for bit the same)."""
    found = []
    for name, model in models.items():
        tensors, layout, flags = expected[name]
        state = model.state_dict()
        if state.keys() != tensors.keys():
            found.append(f"{name}: state_dict keys")
            continue
        found += [f"{name}.{k}" for k, v in tensors.items() if v.dtype != state[k].dtype or not torch.equal(v, state[k])]
        if [(n, type(m)) for n, m in model.named_modules()] != layout:
            found.append(f"{name}: module types")
        if [(n, p.requires_grad) for n, p in model.named_parameters()] != flags:
            found.append(f"{name}: requires_grad flags")
    return found


@torch.no_grad()
def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    return unet(LATENTS, 10, CONTEXT).sample


def test_mutated_files_raise_snella_error_or_load_with_finite_outputs(trained, tmp_path):
    trained_file, pipe = trained
    source = Source(trained_file)
    cases = mutations(source, random.Random(SEED))
    assert len(cases) == MUTATIONS

    unet = tiny_sd_pipeline(1).unet.eval()
    pristine = snapshot({"unet": unet})
    pipe.unet.eval()
    load_snella_weights(pipe, trained_file, adapter_name="old")
    pipe_models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    pipe_state = snapshot(pipe_models)
    assert torch.isfinite(unet_output(pipe.unet)).all()

    path = tmp_path / "mutated.safetensors"
    problems: list[str] = []
    outcomes: Counter = Counter()
    for index, (description, data) in enumerate(cases):
        path.write_bytes(data)
        try:
            load_snella(unet, path, component="unet")
        except SnellaError as error:
            outcomes["refused"] += 1
            assert str(path) in str(error), (description, str(error))
            problems += [f"{description}: after the error, {c} changed" for c in changes({"unet": unet}, pristine)]
        except Exception as error:  # anything but SnellaError is a finding
            problems.append(f"{description}: {type(error).__name__}: {error}")
        else:
            outcomes["loaded"] += 1
            if not torch.isfinite(unet_output(unet)).all():
                problems.append(f"{description}: loaded but the UNet output is not finite")
            remove_snella(unet)
            unet.requires_grad_(True)
            problems += [f"{description}: after unloading, {c} changed" for c in changes({"unet": unet}, pristine)]
        if index % PIPELINE_EVERY == 0:
            outcomes["pipeline"] += 1
            try:
                load_snella_weights(pipe, path, adapter_name="fuzz")
            except SnellaError:
                problems += [f"{description} (pipeline): {c} changed" for c in changes(pipe_models, pipe_state)]
            except Exception as error:
                problems.append(f"{description} (pipeline): {type(error).__name__}: {error}")
            else:
                with torch.no_grad():
                    hidden = pipe.text_encoder(TOKENS).last_hidden_state
                if not (torch.isfinite(unet_output(pipe.unet)).all() and torch.isfinite(hidden).all()):
                    problems.append(f"{description} (pipeline): loaded but an output is not finite")
                unload_snella_weights(pipe, "fuzz")
                problems += [f"{description} (pipeline, unloaded): {c} changed" for c in changes(pipe_models, pipe_state)]
        assert len(problems) < 20, "\n".join(problems)
    assert not problems, "\n".join(problems)
    # Both outcomes are exercised in earnest.
    assert outcomes["refused"] >= 600 and outcomes["loaded"] >= 100, outcomes
    assert outcomes["pipeline"] >= 100, outcomes
