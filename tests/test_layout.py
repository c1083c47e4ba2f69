"""The house rules, checked on the code itself: which part may import which (docs/architecture.md),
no import circle, a package description the ComfyUI registry and pip read as intended, and docs
whose links lead somewhere."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from PIL import Image

from nodes.host import TESTED_COMFYUI

REPO = Path(__file__).resolve().parents[1]
PARTS = ("lookback_core", "training", "toyworld", "lookback_cli", "nodes")
# each part and the parts it may import: the library imports no other part, every part above it
# only those below (the nodes show a toy-world start image, so they read the world)
ALLOWED = {
    "lookback_core": set(),
    "training": {"lookback_core"},
    "toyworld": {"lookback_core", "training"},
    "lookback_cli": {"lookback_core", "toyworld"},
    "nodes": {"lookback_core", "toyworld"},
}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports, at any depth of the file (lazy imports
    count); ``from package import module`` imports that module (the package runs anyway)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            submodules = {f"{module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {module}
    return (found & modules) - {name}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of :data:`PARTS` it imports."""
    files = {_module_name(p, root): p for part in PARTS for p in (root / part).rglob("*.py")}
    return {name: _imports(path, root, set(files)) for name, path in files.items()}


def wrong_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a part that :data:`ALLOWED` does not give it."""
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if target.split(".")[0] != module.split(".")[0]
        and target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]


def import_circles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, str] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_each_part_imports_only_the_parts_below_it() -> None:
    assert wrong_imports(import_graph(REPO)) == []


def test_no_import_circle() -> None:
    assert import_circles(import_graph(REPO)) == []


def test_the_checks_see_a_wrong_import_and_a_circle(tmp_path) -> None:
    files = {
        "lookback_core/__init__.py": "",
        "lookback_core/sampler.py": "def f():\n    from . import weights\n",  # lazy, still a circle
        "lookback_core/weights.py": "from .sampler import f\nfrom toyworld.world import FRAMES\n",
        "toyworld/__init__.py": "",
        "toyworld/world.py": "from lookback_core import sampler\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert wrong_imports(graph) == ["lookback_core.weights imports toyworld.world"]
    assert import_circles(graph) == [
        "lookback_core.sampler -> lookback_core.weights -> lookback_core.sampler",
        "lookback_core.sampler -> lookback_core.weights -> toyworld.world -> lookback_core.sampler",
    ]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r ")]


def test_pyproject_dependencies_are_requirements_txt() -> None:
    project = _pyproject()
    # pip and the registry take the dependencies from requirements.txt, so there is one list
    assert "dependencies" not in project["project"] and project["project"]["dynamic"] == ["dependencies"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    requirements = [Requirement(line) for line in _requirements("requirements.txt")]
    assert {r.name for r in requirements} >= {"torch", "diffusers", "safetensors"}
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev and "-r requirements-train.txt" in dev  # the suite trains
    assert project["project"]["optional-dependencies"]["dev"] == _requirements("requirements-dev.txt")
    # the trainer's own packages: an extra (pip install .[train]) and requirements-train.txt
    assert "-r requirements.txt" in (REPO / "requirements-train.txt").read_text().splitlines()
    train = project["project"]["optional-dependencies"]["train"]
    assert train == _requirements("requirements-train.txt") and "accelerate" in train[0]
    assert not {Requirement(line).name for line in train} & {r.name for r in requirements}


def test_the_nodes_and_the_command_line_import_without_the_training_requirements() -> None:
    """requirements.txt is what a ComfyUI user installs: every module of the library, the command
    line, the toy world and the nodes imports with the trainer's own packages absent."""
    absent = [Requirement(line).name for line in _requirements("requirements-train.txt")]
    modules = sorted(m for m in import_graph(REPO) if not m.startswith("training") and "__main__" not in m)
    code = (
        f"import importlib, sys\nfor name in {absent!r}: sys.modules[name] = None  # import fails\n"
        f"for module in {modules!r}: importlib.import_module(module)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(modules) > 40 and "nodes.native" in modules and "lookback_cli.generate" in modules


def test_registry_metadata_names_the_pack_and_an_icon_in_the_repo() -> None:
    project, comfy = _pyproject()["project"], _pyproject()["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # the registry's rules for a node id
    name = project["name"]
    assert len(name) < 100 and name[0].isalpha() and "comfyui" not in name.lower()
    assert all(c.isalnum() or c in "-_." for c in name) and "--" not in name
    assert project["urls"]["Repository"].startswith("https://")
    icon = comfy["Icon"].split("/main/", 1)[1]
    with Image.open(REPO / icon) as image:  # square, at most 400 px, a type the registry shows
        assert image.format in {"PNG", "JPEG", "GIF"} and image.width == image.height <= 400
    assert {"Repository", "Documentation", "Issues"} <= set(project["urls"])
    assert comfy["requires-comfyui"] == f">={TESTED_COMFYUI}"
    # the licence: GPL-3.0 as ComfyUI's (README.md#licence), its text in LICENSE
    assert project["license"] == "GPL-3.0-or-later" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().split()[:5] == ["GNU", "GENERAL", "PUBLIC", "LICENSE", "Version"]
    assert "Operating System :: OS Independent" in project["classifiers"]


def test_comfy_node_validate_passes() -> None:
    """The registry's own check, ``comfy node validate`` (comfy-cli), on this repository, with no
    warning (it warns, and still exits 0, on a classifier, a version range or a licence it cannot
    read). Skipped without comfy-cli, unless ``COMFY_CLI`` names its ``comfy`` (as .ci/run does)."""
    comfy = os.environ.get("COMFY_CLI") or shutil.which("comfy")
    if comfy is None:
        pytest.skip("comfy-cli is not installed (pip install comfy-cli), and COMFY_CLI is not set")
    run = subprocess.run(
        [comfy, "--skip-prompt", "node", "validate"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DO_NOT_TRACK": "1"},  # no telemetry
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "All validation checks passed" in output, output
    assert "warning" not in output.lower() and "error" not in output.lower(), output


@pytest.mark.parametrize("script", ["lookback"])
def test_console_script_is_the_command_line(script) -> None:
    module, _, function = _pyproject()["project"]["scripts"][script].partition(":")
    from importlib import import_module

    assert callable(getattr(import_module(module), function))


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces as -)."""
    headings = re.findall(r"(?m)^#+ (.*)$", markdown)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(pages: list[Path]) -> list[str]:
    """Relative links of ``pages`` to a file that does not exist, or to a heading a page lacks."""
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_the_readme_and_docs_link_to_what_exists(tmp_path) -> None:
    assert broken_links([REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]) == []
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n[ok](#a-page) [gone](missing.md) [no heading](#other)\n")
    assert broken_links([page]) == ["page.md: missing.md", "page.md: #other (no such heading)"]
