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


def test_deprecations_from_olora_fail_and_known_third_party_ones_are_ignored(tmp_path):
    """pyproject's filterwarnings: a DeprecationWarning/FutureWarning attributed to `olora.*` fails its test; a listed
    third-party one is ignored; any other third-party one is shown, not failed."""
    import subprocess
    import sys

    (tmp_path / "test_w.py").write_text(
        "import warnings\n"
        "def test_ours():\n    warnings.warn_explicit('x', DeprecationWarning, 'io.py', 1, module='olora.io')\n"
        "def test_ours_future():\n    warnings.warn_explicit('y', FutureWarning, 'c.py', 1, module='olora.tracking.client')\n"
        "def test_theirs():\n    warnings.warn_explicit('z', DeprecationWarning, 'm.py', 1, module='mlflow.x')\n"
        "def test_known():\n    warnings.warn_explicit('`is_gradient_checkpointing` is deprecated and will be removed in v6. "
        "Use `is_activation_checkpointing` instead.', FutureWarning, 'm.py', 1, module='transformers.modeling_utils')\n"
    )
    done = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
                           str(tmp_path / "test_w.py"), "-q", "-p", "no:cacheprovider", "-rA"],
                          capture_output=True, text=True, cwd=tmp_path)
    out = done.stdout
    assert "FAILED test_w.py::test_ours " in out and "FAILED test_w.py::test_ours_future " in out, out[-3000:]
    assert "PASSED test_w.py::test_theirs" in out and "PASSED test_w.py::test_known" in out, out[-3000:]
    assert "DeprecationWarning: z" in out and "is_gradient_checkpointing" not in out.split("warnings summary")[-1]
