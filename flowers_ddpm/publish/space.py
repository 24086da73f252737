"""A Hugging Face Space to go with a pushed model: the `flowers-ddpm demo` page serving the model repo by id.

The staged folder holds `app.py`, `requirements.txt` pinned to the versions installed here, a README.md with the
Space's metadata (which links the model), and a copy of the few flowers_ddpm modules the page imports (the demo,
sampling and the pipeline classes; never training), so the Space needs nothing that is not on PyPI.
"""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, SpaceCard, SpaceCardData
from huggingface_hub.errors import HfHubHTTPError

from ..errors import UserError

logger = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SPACE_ENTRY = "demo/app.py"  # the page; the Space gets it and every package module it imports, found by walking


def space_modules(entry: str = SPACE_ENTRY) -> list[str]:
    """`entry` and the package modules it imports, directly or not, with the __init__.py of each folder on the way
    (paths relative to the package; the Space's test imports the page from this copy alone)."""
    todo, found = [entry], {"__init__.py"}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        parts = Path(name).parent.parts
        for i in range(1, len(parts) + 1):
            found.add("/".join(parts[:i]) + "/__init__.py")
        for node in ast.walk(ast.parse((PACKAGE_DIR / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(parts[:len(parts) - node.level + 1])
                modules = [node.module] if node.module else [a.name for a in node.names]
                for module in modules:
                    target = Path(*base, *module.split("."))
                    todo.append(f"{target.as_posix()}/__init__.py" if (PACKAGE_DIR / target).is_dir()
                                else f"{target.as_posix()}.py")
    return sorted(found)
# distribution -> the module the copied code imports; pinned to the installed versions
REQUIREMENTS = {"gradio": "gradio", "torch": "torch", "diffusers": "diffusers", "huggingface_hub": "huggingface_hub",
                "safetensors": "safetensors", "numpy": "numpy", "pillow": "PIL", "tqdm": "tqdm"}

APP = '''"""A demo page for the diffusion model {model_id},
staged by `flowers-ddpm push --space_id {space_id}`.

The page is `flowers-ddpm demo` (the copy of flowers_ddpm next to this file). FLOWERS_DDPM_MODEL serves another
model instead (a Hub id or a local pipeline folder).
"""

import os

from flowers_ddpm.demo.app import build_demo, serve

MODEL = os.environ.get("FLOWERS_DDPM_MODEL", "{model_id}")
demo = build_demo(MODEL, allow_model_change=False)

if __name__ == "__main__":
    serve(demo)
'''


def check_repo_id(value: str, what: str) -> None:
    """USER/NAME, or a one-sentence UserError."""
    parts = value.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in value):
        raise UserError(f"{what} must be USER/NAME; got {value!r}")


def pinned_requirements() -> str:
    """requirements.txt: each package the page imports at the version installed here (local build tags such as
    +cpu dropped, so the Space installs the PyPI build)."""
    lines = []
    for dist in REQUIREMENTS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"staging a Space needs {dist} installed (pip install -e \".[demo]\")") from None
        lines.append(f"{dist}=={version.split('+')[0]}")
    return "\n".join(lines) + "\n"


def build_space_card(space_id: str, model_id: str, license: str = "apache-2.0") -> SpaceCard:
    """The Space's README.md: metadata (gradio SDK and version, the model it serves) and what the page does."""
    name = space_id.split("/")[1]
    metadata = SpaceCardData(
        title=name[:30], sdk="gradio", sdk_version=importlib.metadata.version("gradio"),
        python_version=".".join(platform.python_version_tuple()[:2]), app_file="app.py", license=license,
        models=[model_id], tags=["diffusers", "ddpm", "flowers-ddpm"], emoji="🌸", colorFrom="pink",
        colorTo="green", pinned=False, short_description=f"Generate images with {model_id}"[:60],
    )
    text = (f"# {name}\n\nA demo page for [{model_id}](https://huggingface.co/{model_id}): choose the number of "
            "images, the seed, the sampler and its steps (and, for class-conditional models, the classes and the "
            "guidance scale), and get the image grid, the denoising steps of the first image and the time taken. "
            "The same settings give the same images as `flowers-ddpm sample --model "
            f"{model_id}`.\n\nStaged by `flowers-ddpm push --space_id {space_id}`; `flowers_ddpm/` holds the "
            "modules of flowers_ddpm that the page needs.\n")
    return SpaceCard(f"---\n{metadata.to_yaml()}\n---\n\n{text}")


def stage_space(space_id: str, model_id: str, staging_dir: str | Path, license: str = "apache-2.0") -> list[str]:
    """Write the Space folder into `staging_dir` (empty or new); returns its files, relative and sorted."""
    check_repo_id(space_id, "--space_id")
    staging = Path(staging_dir)
    if staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise UserError(f"Space staging folder {staging} must be an empty or new folder")
    staging.mkdir(parents=True, exist_ok=True)
    for name in space_modules():
        target = staging / "flowers_ddpm" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_DIR / name, target)
    (staging / "app.py").write_text(APP.format(model_id=model_id, space_id=space_id))
    (staging / "requirements.txt").write_text(pinned_requirements())
    build_space_card(space_id, model_id, license).save(staging / "README.md")
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())


def push_space(space_id: str, model_id: str, private: bool = False, license: str = "apache-2.0",
               staging_dir: Optional[str | Path] = None) -> str:
    """Stage the Space and upload it (a gradio Space, created if missing); returns the commit URL."""
    with tempfile.TemporaryDirectory(prefix="flowers-ddpm-space-") as tmp:
        staging = Path(staging_dir) if staging_dir else Path(tmp) / "space"
        files = stage_space(space_id, model_id, staging, license)
        api = HfApi()
        try:
            url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            logger.info("uploading %d files to the Space %s", len(files), url.repo_id)
            commit = api.upload_folder(repo_id=url.repo_id, repo_type="space", folder_path=str(staging),
                                       commit_message=f"Demo page for {model_id} (flowers_ddpm)")
        except (HfHubHTTPError, OSError) as e:  # refused, no access, offline
            raise UserError(f"pushing the Space {space_id} failed: {str(e).splitlines()[0]}") from None
    return commit.commit_url
