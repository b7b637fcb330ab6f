"""A non-editable ``pip install`` of the project into a fresh virtual environment ships the
custom pipeline, the license and the declared dependencies, and the README's post-install form
(``custom_pipeline=snella_diffusion.pipelines.CUSTOM_PIPELINE``) runs on a tiny model.

Fast by design: the venv gets no pip and no packages of its own. A ``.pth`` file naming this
interpreter's site-packages lends it torch, diffusers and the rest, and ``pip install --no-deps
--no-build-isolation`` builds and installs only this project (a wheel, not a link to the
checkout). ``--system-site-packages`` would do the lending too, but it also runs the ``.pth``
files there, among them the editable install of the checkout that CI makes, whose import hook
would shadow the installed copy; a plain path line in a ``.pth`` adds the directory only.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("pyproject.toml", "README.md", "LICENSE", "snella_diffusion", "train_scripts")

CHECK = r'''
import json, sys
from pathlib import Path
from importlib import metadata

import torch
import snella_diffusion
from diffusers import DiffusionPipeline
from snella_diffusion import SnellaConfig, apply_snella, save_snella
from snella_diffusion.pipelines import CUSTOM_PIPELINE, SnellaStableDiffusionPipeline
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline

work = Path(sys.argv[1])
base = tiny_sd_pipeline(seed=0)
base.save_pretrained(work / "base")
layers = apply_snella(base.unet, SnellaConfig(rank=4, target_modules="unet"))
with torch.no_grad():
    for layer in layers.values():
        layer.out_factors.add_(0.5)
adapter = save_snella(base.unet, work / "snella_weights.safetensors")

def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a toy", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np").images

pipe = DiffusionPipeline.from_pretrained(work / "base", custom_pipeline=CUSTOM_PIPELINE, trust_remote_code=True,
                                         snella_weights=str(adapter))
direct = SnellaStableDiffusionPipeline.from_pretrained(work / "base", snella_weights=str(adapter))
plain = DiffusionPipeline.from_pretrained(work / "base")
adapted, again, untouched = sample(pipe), sample(direct), sample(plain)
dist = metadata.distribution("snella-diffusion")
print(json.dumps({
    "package": snella_diffusion.__file__,
    "pipeline_class": type(pipe).__name__,
    "active": pipe.get_active_snella_adapters(),
    "same_as_direct": bool(abs(adapted - again).max() < 1e-6),
    "adapter_changes_image": float(abs(adapted - untouched).max()),
    "requires": dist.requires,
    "files": [str(f) for f in dist.files if "LICENSE" in str(f) or "pipelines" in str(f)],
}))
'''


@pytest.mark.slow
def test_wheel_install_in_a_fresh_venv_runs_the_custom_pipeline(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SHIPPED:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(environment)
    python = environment / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    lent = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (purelib / "lent_site_packages.pth").write_text("\n".join(dict.fromkeys(lent)) + "\n")
    env = {**os.environ, "PYTHONNOUSERSITE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
        check=True, env=env, cwd=tmp_path, capture_output=True,
    )
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([str(python), "-c", CHECK, str(work)], env=env, cwd=work,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(purelib)  # the installed copy, not the checkout
    assert report["pipeline_class"] == "SnellaStableDiffusionPipeline"
    assert report["active"] == ["default_0"] and report["same_as_direct"]
    assert report["adapter_changes_image"] > 1e-3
    assert any(r.startswith("huggingface_hub") for r in report["requires"])
    assert any(f.endswith("LICENSE") for f in report["files"])
    assert any(f.endswith("pipelines/snella_pipeline.py") for f in report["files"])
