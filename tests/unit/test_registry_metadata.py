"""Registry metadata (issue 25): pyproject's [project] and [tool.comfy], the publish workflow, the changelog."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
WORKFLOW = REPO / ".github" / "workflows" / "publish.yml"


def test_project_name_version_and_command_line():
    project = PYPROJECT["project"]
    # the registry's node id: lower case, no "comfyui" in it (the registry's naming rule)
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", project["name"]) and "comfy" not in project["name"].lower()
    assert project["version"] == "0.2.0"
    assert project["scripts"] == {"p3s": "p3s_core.cli:main"}
    assert project["urls"]["Repository"].startswith("https://github.com/")


def test_tool_comfy_is_complete():
    comfy = PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"].startswith("P3S")
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith(".png")
    # the icon is a file of this repository, at the path the address names
    assert (REPO / comfy["Icon"].split("/main/", 1)[1]).is_file()
    assert re.fullmatch(r">=\s*0\.3\.75", comfy["requires-comfyui"])
    assert comfy["includes"] == []


def test_publish_workflow_is_valid_yaml_with_the_expected_keys():
    wf = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "workflow_dispatch" in on
    assert on["push"]["paths"] == ["pyproject.toml"] and on["push"]["branches"] == ["main"]
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/checkout@") for u in uses)
    publish = next(s for s in steps if s.get("uses", "").startswith("Comfy-Org/publish-node-action@"))
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    # published only when the version changed (or by hand), after the archive scan passed
    assert publish["if"] == "steps.version.outputs.publish == 'true'"
    version_step = next(s for s in steps if s.get("id") == "version")
    assert "HEAD^:pyproject.toml" in version_step["run"] and "version" in version_step["run"]
    scan = next(s for s in steps if "registry_package.py" in s.get("run", ""))
    assert steps.index(scan) < steps.index(publish)
    assert next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))["with"]["fetch-depth"] == 2


def test_changelog_has_the_current_version_first():
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## (\d+\.\d+\.\d+)", text, flags=re.M)
    assert versions[0] == PYPROJECT["project"]["version"] and "0.1.0" in versions


def test_readme_install_section_puts_the_manager_first_and_says_how_to_publish():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    install = text[text.index("## Install in your ComfyUI"):text.index("\n## ", text.index("## Install in your ComfyUI") + 5)]
    manager, git_url, by_name = install.index("ComfyUI-Manager"), install.index("Install via Git URL"), install.index(PYPROJECT["project"]["name"])
    clone = install.index("git clone")
    assert manager < git_url < clone and by_name < clone
    publish = install[install.index("### Publishing a release"):]
    for needle in ("pyproject.toml", "CHANGELOG.md", "scripts/registry_package.py", "publish.yml", "REGISTRY_ACCESS_TOKEN"):
        assert needle in publish, needle
