"""The README stays a front page, and the manuals in docs/ stay true to the tree: every relative link (and its
#anchor) resolves, and every file, module and test they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowers_ddpm.config.reference import render
from flowers_ddpm.config.sections import TrainConfig

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"(?ms)^```.*?^```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:flowers_ddpm|scripts|configs|tests|docs)/[\w./-]*\w)")
MODULE = re.compile(r"(?<![\w/.])flowers_ddpm(?:\.[A-Za-z_]\w*)+")
TEST_REF = re.compile(r"^(?:tests/)?(test_\w+\.py)(?:::(test_\w+?)(\.\.\.)?)?$")
TEST_NAME = re.compile(r"^(test_\w+?)(\.\.\.)?$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def prose(page: Path) -> str:
    """The page without fenced code blocks."""
    return FENCE.sub("", page.read_text())


def test_the_pages_exist():
    names = {page.name for page in PAGES}
    assert {"README.md", "architecture.md", "training.md", "configuration.md", "recipes.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    text = CODE.sub("code", prose(page))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_module_and_test_named_exists(page):
    text = page.read_text()
    missing = [p for p in REPO_PATH.findall(text) if not (REPO / p).exists()]
    for dotted in MODULE.findall(text):
        folder, parts = REPO, dotted.split(".")
        for i, part in enumerate(parts):
            if (folder / f"{part}.py").is_file():  # a module: the next name must be defined at its top level
                source = (folder / f"{part}.py").read_text()
                if i + 1 < len(parts) and not re.search(rf"(?m)^(?:def |class ){parts[i + 1]}\b|^{parts[i + 1]}\s*[:=]",
                                                        source):
                    missing.append(dotted)
                break
            if not (folder / part).is_dir():
                missing.append(dotted)
                break
            folder = folder / part
    tests = {path.name: path.read_text() for path in (REPO / "tests").glob("test_*.py")}
    for span in CODE.findall(text):
        if ref := TEST_REF.match(span) or TEST_NAME.match(span):
            file, name, prefix = ref.groups() if len(ref.groups()) == 3 else (None, *ref.groups())
            definition = re.compile(f"def {name}" + ("" if prefix else r"\("))
            sources = [tests.get(file, "")] if file else list(tests.values())
            if file and file not in tests or name and not any(definition.search(s) for s in sources):
                missing.append(span)
    assert not missing, missing


def test_the_configuration_reference_lists_every_setting_with_its_default():
    documented = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        if row := re.match(r"^\| `(\w+)`(?: \(YAML only\))? \| `([^`]*)` \|", line):
            documented[row.group(1)] = row.group(2)
    assert documented == {name: str(value) for name, value in TrainConfig().to_dict(secrets=True).items()}


def test_readme_is_a_front_page_with_a_two_command_quickstart():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move manuals to docs/"
    quickstart = "\n".join(lines[lines.index("## Quickstart"):])
    block = re.search(r"(?ms)^```bash\n(.*?)^```", quickstart).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    train, test = commands
    config = re.search(r"flowers-ddpm train --config (\S+)", train)
    assert train.startswith("pip install -e . && ") and config and (REPO / config.group(1)).is_file(), train
    assert test == 'pip install -e ".[test]" && python -m pytest', test
    assert {"## Architecture", "## Errors", "## Development"} <= set(lines)


def test_the_configuration_reference_is_generated_from_the_settings():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == render(page), "run: python -m flowers_ddpm.config.reference docs/configuration.md"


def test_the_documented_sampling_defaults_are_the_defaults():
    """docs/sampling.md's table of defaults (sampler for DDPM- / EDM-trained models, steps, guidance) is what the
    training grids, `sample`, `evaluate` and the demo use."""
    from diffusers import DDPMScheduler

    from flowers_ddpm.cli import build_parser
    from flowers_ddpm.config.loading import build_config
    from flowers_ddpm.demo.generation import Request
    from flowers_ddpm.models.unet import build_edm_scheduler
    from flowers_ddpm.pipelines.sampling import default_sampler

    text = (REPO / "docs" / "sampling.md").read_text()
    table = text.split("### Defaults", 1)[1].split("\n\n", 2)[1]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in table.splitlines()[2:])}
    grids, edm = build_config({}, {}).run, build_config({"objective": "edm"}, {}).run
    by_family = [default_sampler(DDPMScheduler().config), default_sampler(build_edm_scheduler().config)]
    parser = build_parser()
    expected = {
        "training sample grids and in-training evaluation": ([grids.sample_scheduler, edm.sample_scheduler],
                                                             grids.ddpm_num_inference_steps),
        "`flowers-ddpm sample`": (by_family, parser.parse_args(["sample", "--model", "m"]).steps),
        "`flowers-ddpm evaluate`": (by_family, parser.parse_args(["evaluate", "--model", "m"]).steps),
        "`flowers-ddpm demo`": (by_family, Request().steps),
    }
    for where, (samplers, steps) in expected.items():
        sampler, shown_steps, guidance, _ = rows[where]
        assert CODE.findall(sampler)[:2] == samplers and int(shown_steps) == steps, where
    guidance = rows["training sample grids and in-training evaluation"][2]
    assert float(re.match(r"[\d.]+", guidance).group()) == grids.sample_guidance_scale
