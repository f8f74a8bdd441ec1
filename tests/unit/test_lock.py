"""constraints.txt (``make lock``) against pyproject.toml and the venv ``make venv`` installed from it."""

from __future__ import annotations

import tomllib
from importlib import metadata

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO


def pins() -> dict[str, str]:
    """Name -> version of every pin in constraints.txt that applies to this interpreter."""
    out: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, _, marker = line.partition(";")
        name, sep, version = spec.strip().partition("==")
        assert sep, f"constraints.txt: {line!r} is not NAME==VERSION"
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        out[canonicalize_name(name)] = version.strip()
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return [Requirement(d) for d in deps]


def test_every_dependency_of_pyproject_is_pinned_within_its_bounds() -> None:
    pinned = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is in pyproject.toml but not in constraints.txt: run make lock"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req.specifier}: run make lock"
        )
    assert "fulcrum-lb" not in pinned and "fulcrum" not in pinned  # never the project itself


def test_the_venv_holds_exactly_the_pinned_versions() -> None:
    wrong = {}
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "(not installed)"
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}, f"pinned vs installed: {wrong} (make venv installs with -c constraints.txt)"
    assert metadata.version("fulcrum-lb")  # this checkout, under its index-safe name
