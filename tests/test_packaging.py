"""pyproject.toml's ranges start at the versions requirements.lock pins (the ones the tests ran on)."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_range_starts_at_the_locked_version():
    locked = {_key(m.group(1)): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "requirements.lock").read_text(), re.M)}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert len(requirements) >= 15
    for requirement in requirements:
        name, op, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)(==|>=)([^,;\s]+)\S*", requirement).groups()
        assert _key(name) in locked, f"{name} is not in requirements.lock"
        assert version == locked[_key(name)], f"pyproject.toml says {requirement}; the lock tests {name}=={locked[_key(name)]}"
