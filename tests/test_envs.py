"""The conda environments of the rules agree with pyproject.toml and the README's pins. Conda
cannot resolve here, so pip checks the environment's pip section against this checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ENVS = sorted((REPO / "envs").glob("*.yaml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pip_section(env: Path) -> list[str]:
    deps = yaml.safe_load(env.read_text())["dependencies"]
    sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, env
    return sections[0]


def requirements(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines if not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in reqs}


def readme_pins() -> dict[str, str]:
    """Versions pinned in the README's `pip install` commands (torch, torchvision)."""
    pins = {}
    for line in (REPO / "README.md").read_text().splitlines():
        if "pip install" in line:
            for name, version in re.findall(r"([A-Za-z][\w.-]*)==([\w.]+)", line):
                pins[canonicalize_name(name)] = version
    return pins


@pytest.fixture(scope="module")
def parsed_workflow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The workflow as Snakemake parses it (its Python API, on the default config): each rule's
    conda environment file and whether it runs a command, and the SRMIL_ROOT the parse sets."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    workdir = tmp_path_factory.mktemp("parse")
    shutil.copy(REPO / "config.yaml", workdir)
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(),
                config_settings=ConfigSettings(),
                storage_settings=StorageSettings(),
                snakefile=REPO / "Snakefile",
                workdir=workdir,
            )._workflow  # parsed on first use
            rules = {
                rule.name: (
                    rule.conda_env and Path(str(rule.basedir), rule.conda_env).resolve(),
                    not rule.norun,  # a target rule has no command to run
                )
                for rule in workflow.rules
            }
            root = os.environ.get("SRMIL_ROOT")
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return {"rules": rules, "SRMIL_ROOT": root}


def test_every_job_rule_names_an_existing_env(parsed_workflow: dict) -> None:
    jobs = {name: env for name, (env, runs) in parsed_workflow["rules"].items() if runs}
    assert len(jobs) >= 8
    for name, env in jobs.items():
        assert env in ENVS, f"rule {name}: conda env {env} is not one of envs/*.yaml"


@pytest.mark.parametrize("env", ENVS, ids=[e.name for e in ENVS])
def test_env_requirements_match_pyproject(env: Path) -> None:
    spec = yaml.safe_load(env.read_text())
    python = next(d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(python.split("=", 1)[1] + ".0")
    env_reqs = requirements(pip_section(env))
    project = requirements(PYPROJECT["dependencies"])
    assert set(env_reqs) == set(project), set(env_reqs) ^ set(project)
    pins = readme_pins()
    for name, req in project.items():
        if name in pins:
            # Pinned exactly as in the README's install command, inside pyproject's range.
            assert str(env_reqs[name].specifier) == f"=={pins[name]}", name
            assert req.specifier.contains(pins[name]), name
        else:
            assert env_reqs[name].specifier == req.specifier, (name, str(env_reqs[name]))


@pytest.mark.parametrize("env", ENVS, ids=[e.name for e in ENVS])
def test_env_installs_this_checkout(env: Path, tmp_path: Path, parsed_workflow: dict) -> None:
    """The pip section, as conda hands it to pip: ${SRMIL_ROOT} (set by common.smk) expands to
    this checkout, and this test environment satisfies every pin."""
    lines = pip_section(env)
    assert "-e ${SRMIL_ROOT}" in lines
    assert Path(parsed_workflow["SRMIL_ROOT"]) == REPO  # what the workflow sets while parsing
    (tmp_path / "requirements.txt").write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
         "--no-build-isolation", "-r", str(tmp_path / "requirements.txt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "SRMIL_ROOT": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Would install srmil-" in proc.stdout, proc.stdout[-2000:]
