"""The Space that `push --space_id` stages next to a model: its app.py builds the demo page offline from the copied
modules alone (no flowers_ddpm install, no training code), its requirements are pinned, its README carries the
Space metadata, and the model card links it. Pushing goes through huggingface_hub against the local stand-in of the
Hub's HTTP API from test_hub.py."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from flowers_ddpm.cli import main
from flowers_ddpm.models.unet import build_noise_scheduler, build_unet
from flowers_ddpm.pipelines.export import export_pipeline
from flowers_ddpm.publish.space import REQUIREMENTS

from .test_hub import FAKE_TOKEN, REPO_ID, FakeHub, fake_hub  # noqa: F401 (fake_hub is a fixture)

SPACE_ID = "someone/flowers-demo"

# Runs with `python -I` (no PYTHONPATH, no user site) from the staged Space folder; an editable install of
# flowers_ddpm in the environment must not be what gets imported.
BUILD_APP = """
import json, sys
sys.path.insert(0, sys.argv[1])
import gradio
import app
assert isinstance(app.demo, gradio.Blocks)
loaded = sorted(name for name in sys.modules if name.startswith("flowers_ddpm"))
elsewhere = [sys.modules[n].__file__ for n in loaded if not sys.modules[n].__file__.startswith(sys.argv[1])]
assert not elsewhere, elsewhere
ids = {block.elem_id: block for block in app.demo.blocks.values() if block.elem_id}
print(json.dumps({"modules": loaded, "elem_ids": sorted(ids), "model": ids["model"].value,
                  "model_interactive": ids["model"].interactive, "classes": ids["classes"].choices}))
"""


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    return export_pipeline(build_unet("tiny", 16, num_classes=2), build_noise_scheduler(1000, "linear", "epsilon"),
                           tmp_path_factory.mktemp("space") / "pipeline", class_names=["blue", "red"])


def test_dry_run_stages_a_space_whose_app_builds_offline_and_a_card_that_links_it(pipeline_dir, tmp_path, capsys):
    import gradio

    staging = tmp_path / "staging"
    assert main(["push", "--model", str(pipeline_dir), "--repo_id", REPO_ID, "--space_id", SPACE_ID, "--dry_run",
                 "--staging_dir", str(staging)]) == 0
    space = tmp_path / "staging-space"
    out = capsys.readouterr().out
    assert f"from {space} to the Space {SPACE_ID}:" in out and "  app.py" in out

    card = (staging / "README.md").read_text()
    assert f"[{SPACE_ID}](https://huggingface.co/spaces/{SPACE_ID})" in card

    files = sorted(p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file())
    assert {"README.md", "app.py", "requirements.txt", "flowers_ddpm/demo/app.py"} <= set(files)
    assert not any(name.startswith("flowers_ddpm/training") for name in files)
    # of config only the sampler names and defaults the page shares with `sample` (constants, no imports)
    assert {name for name in files if name.startswith("flowers_ddpm/config")} == {
        "flowers_ddpm/config/__init__.py", "flowers_ddpm/config/samplers.py"}
    metadata = yaml.safe_load((space / "README.md").read_text().split("---")[1])
    assert metadata["sdk"] == "gradio" and metadata["sdk_version"] == gradio.__version__
    assert metadata["app_file"] == "app.py" and metadata["models"] == [REPO_ID]
    requirements = (space / "requirements.txt").read_text().split()
    assert [line.split("==")[0] for line in requirements] == list(REQUIREMENTS)
    assert f"gradio=={gradio.__version__}" in requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements  # the PyPI build, not +cpu
    assert f'os.environ.get("FLOWERS_DDPM_MODEL", "{REPO_ID}")' in (space / "app.py").read_text()

    # app.py builds the page from the copied modules alone, offline, on a local pipeline instead of the Hub id
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(FLOWERS_DDPM_MODEL=str(pipeline_dir), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               GRADIO_ANALYTICS_ENABLED="False")
    done = subprocess.run([sys.executable, "-I", "-c", BUILD_APP, str(space)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"model", "generate", "grid", "strip", "status", "seed", "steps", "sampler", "classes"} <= set(
        built["elem_ids"])
    assert built["model"] == str(pipeline_dir) and built["model_interactive"] is False  # a Space serves one model
    assert [choice[1] for choice in built["classes"]] == ["blue", "red"]
    assert not any(name.startswith(("flowers_ddpm.training", "flowers_ddpm.data")) for name in built["modules"])
    assert {name for name in built["modules"] if name.startswith("flowers_ddpm.config")} <= {
        "flowers_ddpm.config", "flowers_ddpm.config.samplers"}


def test_the_copied_modules_import_only_the_standard_library_and_the_pinned_requirements(pipeline_dir, tmp_path):
    staging = tmp_path / "staging"
    assert main(["push", "--model", str(pipeline_dir), "--repo_id", REPO_ID, "--space_id", SPACE_ID, "--dry_run",
                 "--staging_dir", str(staging), "--space_staging_dir", str(tmp_path / "space")]) == 0
    allowed = set(sys.stdlib_module_names) | set(REQUIREMENTS.values()) | {"flowers_ddpm", "__future__"}
    imported = {}
    for path in (tmp_path / "space").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level: what importing the file needs
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                imported.setdefault(name.split(".")[0], []).append(path.name)
    assert {"torch", "diffusers", "PIL"} <= set(imported)
    assert set(imported) <= allowed, {k: v for k, v in imported.items() if k not in allowed}


def test_push_uploads_the_model_then_its_space(pipeline_dir, fake_hub, monkeypatch):  # noqa: F811
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert main(["push", "--model", str(pipeline_dir), "--repo_id", REPO_ID, "--space_id", SPACE_ID]) == 0
    assert [(c["organization"], c["name"], c.get("type"), c.get("sdk")) for c in FakeHub.created] == [
        ("someone", "flowers-test", None, None), ("someone", "flowers-demo", "space", "gradio")]
    model, space = FakeHub.commits
    assert f"https://huggingface.co/spaces/{SPACE_ID}" in model["files"]["README.md"].decode()
    assert {"app.py", "requirements.txt", "README.md", "flowers_ddpm/demo/app.py"} <= set(space["files"])
    assert REPO_ID in space["files"]["app.py"].decode()
    paths = [path for _, path, _ in FakeHub.calls]
    assert paths.index(f"/api/models/{REPO_ID}/commit/main") < paths.index(f"/api/spaces/{SPACE_ID}/commit/main")


@pytest.mark.parametrize("flags, message", [
    (["--space_id", "flowers-demo"], "--space_id must be USER/NAME; got 'flowers-demo'"),
    (["--space_id", SPACE_ID, "--revision", "v1"], "the Space serves the model's main branch"),
])
def test_space_mistakes_fail_before_anything_is_staged_or_sent(pipeline_dir, tmp_path, capsys, flags, message):
    staging = tmp_path / "staging"
    assert main(["push", "--model", str(pipeline_dir), "--repo_id", REPO_ID, "--dry_run", "--staging_dir",
                 str(staging), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not staging.exists()
