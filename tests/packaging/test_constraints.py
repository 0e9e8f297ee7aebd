"""constraints.txt pins every dependency pyproject.toml declares, at a version it allows.

Goal: ``make`` installs the same versions on every machine; a dependency added to
pyproject.toml without ``make lock`` would install unpinned (whatever is newest that
day), and a raised lower bound would conflict with its old pin. Method: read both
files with ``packaging`` and compare. Transitive dependencies are pinned by ``make
lock`` too but are not listed in pyproject.toml, so only the direct ones are checked.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
FIX = "run `make lock` and commit constraints.txt"


def declared() -> list[Requirement]:
    """Runtime, every extra, and the build backend that ``pip install -e .`` builds with."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    requirements = [Requirement(text) for text in pyproject["build-system"]["requires"]]
    requirements.extend(Requirement(text) for text in project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements.extend(Requirement(text) for text in extra)
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def pinned() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        assert separator, f"constraints.txt: {line!r} is not an exact pin; {FIX}"
        pins[canonicalize_name(name)] = Version(version.split(";", 1)[0].strip())
    return pins


def test_every_declared_dependency_is_pinned_within_its_bounds() -> None:
    pins = pinned()
    unpinned = [str(r) for r in declared() if canonicalize_name(r.name) not in pins]
    outside = [
        f"{r} (pinned {pins[canonicalize_name(r.name)]})"
        for r in declared()
        if canonicalize_name(r.name) in pins
        and not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)
    ]
    assert unpinned == [], f"not in constraints.txt: {FIX}"
    assert outside == [], f"pin outside pyproject's bounds: {FIX}"


def test_the_installer_is_pinned_too() -> None:
    assert "pip" in pinned(), f"make installs pip from constraints.txt first; {FIX}"
