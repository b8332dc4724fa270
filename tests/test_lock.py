"""The install lock (constraints.txt, scripts/lock.py): the venv `make install` built is exactly the
lock, and the lock covers everything pyproject.toml asks for within its ranges."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import lock  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MADE_BY_MAKE = Path(sys.prefix).resolve() == ROOT / ".venv" and (ROOT / ".venv/.kdlib-installed").exists()


@pytest.mark.skipif(not MADE_BY_MAKE, reason="not running in the .venv that make install built")
def test_the_venv_equals_the_lock():
    problems = lock.compare(lock.read_lock(), lock.frozen())
    assert not problems, "the venv differs from constraints.txt:\n" + "\n".join(problems)


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("kdlib[")]
    return reqs


def test_the_lock_pins_every_requirement_inside_its_range():
    """Editing pyproject.toml without `make lock` leaves a requirement unpinned or outside its range."""
    pins = lock.read_lock()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = lock.canonical(req.name)
        assert name in pins, f"pyproject.toml asks for {req}; constraints.txt has no pin: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}: run make lock")


def test_the_lock_keeps_the_pins_of_constraints_in():
    pins = lock.read_lock()
    kept = [Requirement(line.strip()) for line in (ROOT / "constraints.in").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert any(r.name == "torch" for r in kept)
    for req in kept:
        if req.marker is None or req.marker.evaluate():
            assert req.specifier.contains(pins[lock.canonical(req.name)]), f"the lock lost {req}"


def test_compare_names_each_difference():
    locked = {"torch": "2.9.1", "numpy": "2.4.6", "tqdm": "4.67.1", "setuptools": "84.2.1"}
    installed = {"torch": "2.9.1", "numpy": "2.4.7", "rich": "14.0.0", "kdlib": "0.1.0"}
    problems = lock.compare(locked, installed)
    assert problems == ["numpy: the lock says 2.4.6, installed 2.4.7",
                        "rich==14.0.0 is installed but not in the lock",
                        "tqdm==4.67.1 is in the lock but not installed"]
    assert lock.compare(locked, {**locked, "kdlib": "0.1.0", "pip": "26.3"}) == []


def test_read_lock_evaluates_markers(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# header\nfoo==1.0 ; python_version < '3'\nfoo==2.0 ; python_version >= '3'\n"
                    "    # via bar\nBar_Baz==3.1\n")
    assert lock.read_lock(path) == {"foo": "2.0", "bar-baz": "3.1"}
    path.write_text("foo>=1.0\n")
    with pytest.raises(SystemExit, match="line 1"):
        lock.read_lock(path)
