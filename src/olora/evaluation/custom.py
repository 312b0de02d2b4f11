"""The team's own lm-eval tasks: task YAMLs and their data files kept in the repository under `evals/`.

`evals/` is an lm-eval include path and a DVC input of both evaluate stages, so editing a question
reruns the evaluation and nothing else. Every `*.yaml` under it defines one task (`task: <name>`),
in lm-eval's own task format; `evaluate.tasks` lists it by name next to the stock tasks. A data file
read by one of lm-eval's local loaders (`dataset_path: json | csv | parquet | arrow | text`, files in
`dataset_kwargs.data_files`) is named relative to the task's YAML and must lie under `evals/`.
lm-eval itself resolves such paths against the working directory, so the task it runs is a copy of
the YAML whose data files are absolute paths (`write_task`): the stage works from any directory.

Checked here, before any model loads: the YAML's syntax and keys, its data files, the output type
and the per-question score the pipeline keeps and compares (`acc` for `multiple_choice`,
`exact_match` for `generate_until`, after the task's first filter). The `definition` hash (the
task's YAML and the files it includes, its data, the Python files beside it) goes into the
evaluation's fingerprint, so changed questions are never compared as the same questions.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from olora.errors import OloraError
from olora.layout import EVALS as FOLDER

LOCAL_LOADERS = ("json", "csv", "parquet", "arrow", "text")
SCORED_BY = {"multiple_choice": "acc", "generate_until": "exact_match"}
"""The per-question 0/1 score kept for each output type (the `acc` column of the samples file)."""
STRUCTURE_KEYS = {"include", "group", "task_list"}
"""Keys lm-eval's loader reads besides its TaskConfig fields."""
GUIDE = "docs/evaluations.md"


class EvalTaskError(OloraError, ValueError):
    """A task YAML under evals/ that lm-eval cannot load or the pipeline cannot score."""


@dataclass(frozen=True)
class CustomTask:
    name: str
    path: Path
    """Its YAML file."""
    label: str
    """Its YAML file as messages name it (`evals/<file>.yaml`)."""
    config: dict[str, Any]
    """The YAML with its includes merged (lm-eval's loader; `!function` entries unresolved)."""
    data_files: dict[str, list[Path]]
    """split -> absolute data files, for lm-eval's local loaders; empty for a hub data set."""
    metric: str
    """The per-question score kept and compared: acc (multiple_choice) or exact_match (generate_until)."""
    filter: str
    """The filter whose output is scored: the task's first `filter_list` entry, else lm-eval's `none`."""
    split: str
    """The split lm-eval scores: the test split when the task names one, else the validation split."""
    definition: str
    """sha256 of what defines its questions: its YAML and includes, data files, the Python files beside it."""

    @property
    def hub(self) -> bool:
        """Its data set comes from the hub (not from files under evals/)."""
        return not self.data_files


def _where(path: Path, root: Path) -> str:
    """`evals/x.yaml` when under the project, else the path as given."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve().parent))
    except ValueError:
        return str(path)


def _yaml_problem(exc: BaseException) -> str:
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _task_keys() -> set[str]:
    from lm_eval.config.task import TaskConfig

    return {f.name for f in dataclasses.fields(TaskConfig)}


def _includes(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """The YAML file and every file it includes, recursively (lm-eval's rule: relative to the including file)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = path.resolve()
    seen = seen if seen is not None else set()
    if path in seen:
        return []
    seen.add(path)
    out = [path]
    include = load_yaml(path, resolve_func=False, recursive=False).get("include")
    for inc in include if isinstance(include, list) else [include] if include else []:
        out += _includes(path.parent / inc if not Path(inc).is_absolute() else Path(inc), seen)
    return out


def _data_files(name: str, path: Path, cfg: dict[str, Any], folder: Path) -> dict[str, list[Path]]:
    where = _where(path, folder)
    if cfg.get("dataset_path") not in LOCAL_LOADERS:
        return {}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        raise EvalTaskError(
            f"{where}: task {name} reads `dataset_path: {cfg['dataset_path']}` but names no data file; add "
            f"`dataset_kwargs: {{data_files: {{validation: data/{name}.jsonl}}}}` (relative to the YAML, under evals/)")
    if not isinstance(files, dict):
        files = {"validation" if cfg.get("validation_split") else "test": files}
    out: dict[str, list[Path]] = {}
    inside = folder.resolve()
    for split, names in files.items():
        for rel in names if isinstance(names, list) else [names]:
            rel = str(rel)
            if Path(rel).is_absolute():
                raise EvalTaskError(f"{where}: data file {rel} of task {name} is an absolute path; name it relative to "
                                    f"the YAML (e.g. data/{Path(rel).name}) and keep it under evals/, which DVC tracks")
            target = (path.parent / rel).resolve()
            if not target.is_relative_to(inside):
                raise EvalTaskError(
                    f"{where}: data file {rel} of task {name} lies outside evals/, the folder DVC tracks as the evaluate "
                    f"stages' input; move it under evals/ (e.g. evals/data/{Path(rel).name}) and name it relative to the YAML")
            if not target.is_file():
                raise EvalTaskError(
                    f"{where}: data file {rel} of task {name} not found (looked for {target}); data files are named "
                    "relative to the task's YAML and live under evals/: add the file or fix the path")
            out.setdefault(str(split), []).append(target)
    return out


def _definition(path: Path, data_files: dict[str, list[Path]], folder: Path) -> str:
    digest = hashlib.sha256()
    root = folder.resolve().parent
    files = _includes(path) + sorted({f for fs in data_files.values() for f in fs}) + sorted(path.parent.glob("*.py"))
    for f in files:
        try:
            label = str(f.resolve().relative_to(root))
        except ValueError:  # an included YAML outside the project (e.g. one of lm-eval's own)
            label = f.name
        digest.update(label.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def read_task(path: Path, folder: Path) -> CustomTask:
    """One task YAML under `folder` (evals/), checked; an EvalTaskError names the file, what is wrong and the fix."""
    from lm_eval.tasks._yaml_loader import load_yaml

    where = _where(path, folder)
    try:
        cfg = load_yaml(path, resolve_func=False, recursive=True)
    except yaml.YAMLError as exc:
        raise EvalTaskError(f"{where} is not valid YAML ({_yaml_problem(exc)}); fix the syntax there") from None
    except Exception as exc:  # noqa: BLE001 - lm-eval's loader: a missing include, an include cycle, not a mapping
        raise EvalTaskError(f"{where} cannot be loaded as an lm-eval task ({_yaml_problem(exc)}); "
                            f"fix it (the task format: {GUIDE})") from None
    if "group" in cfg or isinstance(cfg.get("task"), list):
        raise EvalTaskError(f"{where} defines a group of tasks; list the tasks themselves in evaluate.tasks "
                            "(one YAML per task under evals/)")
    if "class" in cfg:
        raise EvalTaskError(f"{where} defines a Python-class task (`class:`); evals/ takes YAML tasks only: write it "
                            f"as a YAML task ({GUIDE})")
    name = cfg.get("task")
    if not isinstance(name, str) or not name:
        raise EvalTaskError(
            f"{where} defines no task (no `task: <name>` key); every *.yaml under evals/ is a task: name a shared "
            "template without the .yaml suffix (e.g. _template_yaml) and `include:` it")
    known = _task_keys() | STRUCTURE_KEYS
    unknown = sorted(set(cfg) - known, key=str)
    if unknown:
        hints = [f"did you mean {m[0]!r} for {k!r}?" for k in unknown
                 if (m := difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=0.6))]
        raise EvalTaskError(f"{where}: task {name} has key(s) lm-eval does not know: {', '.join(map(repr, unknown))}; "
                            + (" ".join(hints) + " " if hints else "") + f"lm-eval's task keys: {', '.join(sorted(known))}")
    output_type = cfg.get("output_type", "generate_until")  # lm-eval's default
    if output_type not in SCORED_BY:
        raise EvalTaskError(f"{where}: task {name} has output_type {output_type!r}; the pipeline scores "
                            f"multiple_choice (per-question acc) and generate_until (per-question exact_match) tasks")
    metric = SCORED_BY[output_type]
    metrics = [m.get("metric") if isinstance(m, dict) else m for m in cfg.get("metric_list") or []]
    if metrics and metric not in metrics:
        raise EvalTaskError(
            f"{where}: task {name} ({output_type}) reports {', '.join(map(str, metrics))} but not {metric}, the "
            f"per-question score the pipeline keeps and compares (intervals, the promotion gate); add "
            f"`- metric: {metric}` to its metric_list")
    filters = cfg.get("filter_list") or []
    first = filters[0].get("name") if filters and isinstance(filters[0], dict) else None
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise EvalTaskError(f"{where}: task {name} names no split to score; add `validation_split: validation` "
                            "(or test_split), the split name its data_files use")
    data_files = _data_files(name, path, cfg, folder)
    if data_files and split not in data_files:
        raise EvalTaskError(f"{where}: task {name} scores split {split!r} but its data_files name "
                            f"{sorted(data_files)}; use the same split name in both")
    return CustomTask(name, Path(path), where, cfg, data_files, metric, first or "none", split,
                      _definition(Path(path), data_files, folder))


def scan(folder: Path) -> dict[str, CustomTask]:
    """Every task under `folder` (evals/), checked; {} when there is no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    tasks: dict[str, CustomTask] = {}
    for path in sorted(p for p in folder.rglob("*.yaml") if "__pycache__" not in p.parts and p.is_file()):
        task = read_task(path, folder)
        if task.name in tasks:
            raise EvalTaskError(f"task {task.name} is defined twice, in {_where(tasks[task.name].path, folder)} and "
                                f"{_where(path, folder)}; rename one")
        tasks[task.name] = task
    return tasks


def write_task(task: CustomTask, folder: Path) -> Path:
    """The task as lm-eval runs it: its YAML included as is, with absolute data-file paths (lm-eval reads relative
    ones against the working directory)."""
    spec: dict[str, Any] = {"include": str(task.path.resolve()), "task": task.name}
    if task.data_files:
        kwargs = dict(task.config.get("dataset_kwargs") or {})
        kwargs["data_files"] = {split: [str(f) for f in files] for split, files in task.data_files.items()}
        spec["dataset_kwargs"] = kwargs
    path = Path(folder) / f"{task.name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def check_loads(tasks: list[CustomTask], manager) -> None:
    """Build each task through lm-eval (its data read, its prompts parsed) and render its first question,
    so what lm-eval would refuse is refused before any model loads."""
    for task in tasks:
        try:
            built = manager.load([task.name])["tasks"][task.name]
            docs = list(built.eval_docs)
            if not docs:
                raise ValueError(f"its {task.split} split is empty")
            built.doc_to_text(docs[0])
            built.doc_to_target(docs[0])
            if task.metric == "acc":
                choices = built.doc_to_choice(docs[0])
                if not isinstance(choices, list) or len(choices) < 2:
                    raise ValueError(f"doc_to_choice gave {choices!r} for the first question, not a list of choices")
        except EvalTaskError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever lm-eval or the data loader raised
            cause = exc
            while (cause.__cause__ or cause.__context__) is not None:  # the data loader wraps the reason
                cause = cause.__cause__ or cause.__context__
            message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            data = ", ".join(sorted({_where(f, task.path.parent) for fs in task.data_files.values() for f in fs}))
            raise EvalTaskError(f"{task.label}: lm-eval cannot load task {task.name} ({type(cause).__name__}: {message}); "
                                f"fix {'its data (' + data + ') or ' if data else ''}the YAML ({GUIDE})") from None
