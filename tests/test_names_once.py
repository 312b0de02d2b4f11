"""Names written once: the project's file names only in `olora.layout`, the run-record tags only in
`olora.tracking.lineage`. A second spelling is a copy that drifts (as `peft_glue.INIT_META` had)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from olora import layout
from olora.tracking.lineage import TAGS

from conftest import REPO

FILE_NAMES = ({v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and "." in Path(v).name}
              | {layout.metrics_file(n) for n in ("data", "init", "train", "eval_base", "eval_adapter")}
              | {layout.samples_file(w) for w in ("base", "adapter")})


def _code_strings(path: Path):
    """(line, text) of every string literal in `path` that is not a docstring, f-string parts included."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def _sources() -> list[Path]:
    return [*sorted((REPO / "src" / "olora").rglob("*.py")), *sorted((REPO / "flows").glob("*.py"))]


def _pattern(names: set[str]) -> re.Pattern:
    """One of `names` as a path: the name itself, or a path (no spaces: not prose) ending in it."""
    return re.compile(r"^(\S*/)?(" + "|".join(re.escape(n) for n in sorted(names)) + r")$")


def _spelled(names: set[str], home: Path) -> list[str]:
    pattern = _pattern(names)
    return [f"{p.relative_to(REPO)}:{line}: {text!r}" for p in _sources() if p != home
            for line, text in _code_strings(p) if pattern.match(text)]


def test_file_names_are_spelled_only_in_layout():
    assert FILE_NAMES >= {"params.yaml", "dvc.lock", "olora_init.json", "adapter_samples.csv", "eval_adapter.json"}
    found = _spelled(FILE_NAMES, REPO / "src/olora/layout.py")
    assert not found, "file names spelled outside olora.layout (use its constants and helpers):\n" + "\n".join(found)


def test_run_record_tags_are_spelled_only_in_lineage():
    found = _spelled(set(TAGS.values()), REPO / "src/olora/tracking/lineage.py")
    assert not found, "run-record tags spelled outside olora.tracking.lineage (use TAGS / RunRecord):\n" + "\n".join(found)


def test_the_spelling_check_sees_a_literal(tmp_path):
    """The check is not vacuous: a path literal, an f-string part and a bare tag are found; prose is not."""
    module = tmp_path / "m.py"
    module.write_text('"""Reads params.yaml."""\nA = "params.yaml"\nB = f"{A}/eval/adapter_samples.csv"\n'
                      'C = "olora.git_branch"\nD = "fix params.yaml first"\n')
    strings = [text for _, text in sorted(_code_strings(module))]
    assert [s for s in strings if _pattern(FILE_NAMES | set(TAGS.values())).match(s)] == ["params.yaml", "/eval/adapter_samples.csv", "olora.git_branch"]
