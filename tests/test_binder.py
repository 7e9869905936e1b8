"""Binder's pinned environment must satisfy pyproject.toml, and pin the same torch as the Makefile."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def binder_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "binder" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"binder pins exact versions: {line}"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_every_runtime_dependency_is_pinned_and_allowed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = binder_pins()
    wanted = [Requirement(d) for d in project["dependencies"]] + [Requirement(d) for d in project["optional-dependencies"]["pandas"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but binder/requirements.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), f"binder pins {name}=={pins[name]}, pyproject wants {req}"


def test_torch_pin_matches_the_makefile_and_is_the_cpu_build():
    makefile = (ROOT / "Makefile").read_text()
    (version,) = re.findall(r"TORCH_SPEC \?= torch==([\w.+]+)", makefile)
    pinned = binder_pins()["torch"]
    assert pinned.public == Version(version).public and pinned.local == "cpu"
    assert "download.pytorch.org/whl/cpu" in (ROOT / "binder" / "requirements.txt").read_text()
