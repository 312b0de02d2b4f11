"""Generated files and the tools that check them: dvc.yaml from the stage table, the parameter table
(docs/parameters.md) from the config's field docstrings, and docs/errors.md from the error catalogue.

Nothing here runs inside a stage (no stage imports it), so editing a generator reruns nothing.

    olora dvc-yaml --write          # dvc.yaml
    python -c "from olora.devtools import relock_code; relock_code()"   # dvc.lock after code moved (no outputs here)
    olora params-table --write docs/parameters.md
    .venv/bin/python tests/test_errors.py --write docs/errors.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from olora import layout as L
from olora.config import Config
from olora.errors import OloraError
from olora.stages import STAGES, Stage

PARAMS_MARKERS = ("<!-- params-table:start -->", "<!-- params-table:end -->")

# ---------------------------------------------------------------- code dependencies and dvc.yaml

PACKAGE_ROOT = Path(__file__).resolve().parent  # src/olora
ENTRY_MODULE = "olora.stages.entry"  # what `python -m olora.stages.<stage>` (dvc.yaml's cmd) runs around the stage function


def _module_file(name: str) -> Path | None:
    rel = name.split(".")[1:]
    base = PACKAGE_ROOT.joinpath(*rel)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(name: str, module_level_only: bool = False) -> set[str]:
    """Project modules that `name` imports in its source: anywhere (inside functions too), or at module level."""
    path = _module_file(name)
    if path is None:
        return set()
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "olora")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "olora":
                continue
            found.add(base)
            for alias in node.names:
                if _module_file(f"{base}.{alias.name}") is not None:
                    found.add(f"{base}.{alias.name}")
    return found


def code_modules(stage: Stage) -> list[str]:
    """Every project module the stage can execute when dvc.yaml's command (`python -m <its module>`) runs.

    From the stage's own module and the entry (`olora.stages.entry`), every import, at module level
    or inside a function, is followed transitively; the packages above each module (whose
    `__init__` Python runs first: `olora`, `olora.stages` with the stage table) come with it. The
    `olora` dispatcher (`cli.py`, `cliargs.py`), `admin.py` and `ops/` are not on this path.
    """
    todo = [stage.module, ENTRY_MODULE, "olora"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run their __init__
        todo.extend(_imports(name))
    return sorted(seen)


def code_files(stage: Stage) -> list[str]:
    """The stage's code dependencies as project-relative paths, `src/olora/...` (what dvc.yaml lists under deps)."""
    project = PACKAGE_ROOT.parents[1]
    return sorted(str(_module_file(m).relative_to(project)) for m in code_modules(stage))


def dvc_yaml() -> str:
    """dvc.yaml as generated from the table (deterministic text)."""
    stages: dict[str, Any] = {}
    for stage in STAGES.values():
        entry: dict[str, Any] = {"cmd": stage.cmd}
        entry["deps"] = [*code_files(stage), L.LOCKFILE, *stage.inputs]
        entry["params"] = list(stage.params)
        if stage.outs:
            entry["outs"] = list(stage.outs)
        outs_uncached = [{path: {"cache": False}} for path in stage.reports]
        if outs_uncached:
            entry.setdefault("outs", []).extend(outs_uncached)
        if stage.metrics:
            entry["metrics"] = [{path: {"cache": False}} for path in stage.metrics]
        if stage.plots:
            entry["plots"] = [{path: {"cache": False, "x": x, "y": y}} for path, x, y in stage.plots]
        stages[stage.name] = entry
    header = (
        "# Generated from the stage table in src/olora/stages/__init__.py by `olora dvc-yaml --write`; do not edit.\n"
        "# Each cmd is a thin caller of a library function; deps are every project module the stage can run\n"
        "# (its import closure), the locked library versions and its data inputs; params are only the keys it reads.\n"
    )
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=1000)


def relock_code(root: Path | str = ".") -> list[str]:
    """Record in dvc.lock the commands and the deps that exist here, keeping every recorded output.

    What `dvc commit` does after code moved without changing what the stages compute, for a checkout
    that lacks the pipeline's outputs (`dvc commit` refuses a missing output): each stage's cmd and
    its present deps (code, lock, input folders) are hashed by DVC itself; a dep that is another
    stage's absent output keeps its recorded hash. Returns the stages whose entry changed.

        python -c "from olora.devtools import relock_code; relock_code()"
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.utils.serialize import dump_yaml, load_yaml

    root = Path(root)
    lock = load_yaml(root / L.DVC_LOCK)
    order = ("path", "hash", "md5", "size", "nfiles")
    changed = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            entry = lock["stages"][stage.name]
            recorded = {d["path"]: d for d in entry.get("deps", [])}
            deps = []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):  # params.yaml's keys: dvc.lock's `params:`, unchanged here
                    continue
                if (root / dep.def_path).exists():
                    dep.save()
                    fresh = dep.dumpd()
                    deps.append({**{k: fresh[k] for k in order if k in fresh}, **{k: v for k, v in fresh.items() if k not in order}})
                elif dep.def_path in recorded:  # another stage's output, absent here: its recorded hash stands
                    deps.append(recorded[dep.def_path])
                else:
                    raise OloraError(f"{dep.def_path} (a dep of stage {stage.name}) is neither here nor in dvc.lock: run `dvc repro`")
            deps.sort(key=lambda d: d["path"])
            if (entry.get("cmd"), entry.get("deps")) != (stage.cmd, deps):
                entry["cmd"], entry["deps"] = stage.cmd, deps
                changed.append(stage.name)
    dump_yaml(root / L.DVC_LOCK, lock)
    return changed


# ---------------------------------------------------------------- the parameter table


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in this module (attribute docstrings)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    out: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def params_table() -> str:
    """The parameter table (docs/parameters.md), generated from the dataclasses and their field docstrings."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    defaults = Config().to_dict()
    hints = typing.get_type_hints(Config)
    for block in defaults:
        cls = hints[block]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name not in docs:
                raise AssertionError(f"config field {block}.{f.name} has no docstring")
            default = yaml.safe_dump(defaults[block][f.name], default_flow_style=True, width=1000).strip()
            default = default.removesuffix("...").strip()
            rows.append(f"| `{block}.{f.name}` | `{default}` | {docs[f.name].replace('|', '&#124;')} |")
    return "\n".join(rows)


def replace_between_markers(text: str, table: str, markers: tuple[str, str] = PARAMS_MARKERS) -> str:
    start, end = markers
    if start not in text or end not in text:
        raise OloraError(f"the file has no {start} ... {end} markers to replace")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{table}\n{end}{tail}"


# ---------------------------------------------------------------- docs/errors.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    """A markdown code span that may hold backticks."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def errors_markdown(cases: Iterable[Any], categories: dict[str, tuple[str, str]], empty: dict[str, str]) -> str:
    """docs/errors.md from the catalogue in tests/test_errors.py: each case's trigger, first line and fix."""
    cases = list(cases)
    uncaught = [case.id for case in cases if case.message.startswith("(traceback)")]
    sentence = ("Every case ends in a clear error; none leaves the user with a Python traceback." if not uncaught else
                f"{len(uncaught)} lines start with `(traceback)`: errors the code does not catch yet, where the user "
                "sees a Python traceback ending in that line.")
    lines = [
        "# Error catalogue",
        "",
        "<!-- Generated from tests/test_errors.py by `.venv/bin/python tests/test_errors.py --write docs/errors.md`; do not edit. -->",
        "",
        "What each bad input produces, through the entry point a user hits: the first line of the error "
        "(`olora <command>: error: ...` on stderr, exit code 2, for the CLI), what triggers it and how to fix it. "
        "`<project>` is the project folder, `<tmp>` a folder outside it. Every row is a test "
        "(`tests/test_errors.py`) asserting that exact first line. " + sentence,
        "",
    ]
    by_category: dict[str, list[Any]] = {}
    for case in cases:
        by_category.setdefault(case.category, []).append(case)
    lines.append("| section | cases |")
    lines.append("|---|---|")
    for key, (title, _) in categories.items():
        anchor = re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
        lines.append(f"| [{title}](#{anchor}) | {len(by_category.get(key, []))} |")
    lines.append("")
    for key, (title, intro) in categories.items():
        lines += [f"## {title}", "", intro, ""]
        found = by_category.get(key, [])
        if not found:
            lines += [empty.get(key, "No cases yet."), ""]
            continue
        lines.append("| case | what triggers it | first line of the error | how to fix it |")
        lines.append("|---|---|---|---|")
        for case in found:
            lines.append(f"| `{case.id}` | {_cell(case.trigger)} | {_cell(_code(case.message))} | {_cell(case.fix)} |")
        lines.append("")
    return "\n".join(lines)
