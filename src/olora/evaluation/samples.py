"""Per-question results: every question's outcome, the fingerprint of what was asked, and checks.

A samples file (CSV, one row a question: task, doc_id, doc_hash, acc, acc_norm, gold, loglik,
loglik_norm) is written by each evaluate stage beside its metrics; `acc` is the question's 0/1 score
(exact match for a generative task). For a multiple-choice task lm-eval's own numbers are kept too:
`gold` (the right choice's index), `loglik` (each choice's log-likelihood, `;`-joined) and
`loglik_norm` (each divided by its choice's length in characters, what `acc_norm` compares), so a
later statistic or calibration report needs no model run. Files written before these columns are read
as before (the new fields None). The fingerprint records what was asked — tasks, their lm-eval versions, a hash of each
task's question hashes (and of a team task's YAML, data and code under evals/), limit, few-shot
count, seed and data source — so two evaluations are compared only when they asked exactly the
same questions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from olora.config import EvaluateConfig
from olora.errors import OloraError

COLUMNS = ("task", "doc_id", "doc_hash", "acc", "acc_norm", "gold", "loglik", "loglik_norm")
BASIC = COLUMNS[:5]
"""The columns of files written before the log-likelihoods were kept (still read)."""


class SamplesError(OloraError):
    """Per-question results that are missing, unreadable, or disagree with their fingerprint."""


def rows_from_lm_eval(raw: dict[str, Any], names: dict[str, str],
                      scoring: dict[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """lm-eval's per-sample log (`simple_evaluate(log_samples=True)`) -> one row a question, evaluate.tasks names.

    `acc` is the question's 0/1 score: accuracy, or for a generative task of the team's (`scoring`: task ->
    (metric, filter)) the exact match of its scored filter's answer.
    """
    rows = []
    for stock, name in names.items():
        metric, flt = (scoring or {}).get(stock, ("acc", "none"))
        logged = [s for s in raw["samples"][name] if s.get("filter", "none") == flt]
        for sample in sorted(logged, key=lambda s: int(s["doc_id"])):
            norm = sample.get("acc_norm") if metric == "acc" else None
            rows.append({"task": stock, "doc_id": int(sample["doc_id"]), "doc_hash": sample["doc_hash"],
                         "acc": int(sample[metric]), "acc_norm": int(norm) if norm is not None else None,
                         **_likelihoods(sample, metric)})
    return rows


def _likelihoods(sample: dict[str, Any], metric: str) -> dict[str, Any]:
    """A multiple-choice sample's gold index and each choice's log-likelihood, raw and per character of the choice
    (what lm-eval's acc_norm compares); None for a generative task.

    A task whose choices are contexts before one shared continuation (WinoGrande) has no per-choice length to
    normalise by in what lm-eval logs (it reports no acc_norm): its loglik_norm is None, and its gold index is read
    from the document's `answer` ("1" or "2"), as lm-eval's winogrande does.
    """
    none = {"gold": None, "loglik": None, "loglik_norm": None}
    responses = sample.get("filtered_resps") or []
    if metric != "acc" or not responses or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], (int, float)) for r in responses):
        return none
    lls = [float(r[0]) for r in responses]
    continuations = [str(args[1]) for args in sample.get("arguments", [])]
    if len(continuations) != len(lls):
        return {**none, "loglik": lls}
    target, doc = sample.get("target"), sample.get("doc") or {}
    shared = len(set(continuations)) == 1 and len(lls) > 1
    if shared:
        gold = int(doc["answer"]) - 1 if str(doc.get("answer")) in ("1", "2") and len(lls) == 2 else None
        return {"gold": gold, "loglik": lls, "loglik_norm": None}
    if isinstance(target, str):
        found = [i for i, c in enumerate(continuations) if c.removeprefix(" ") == target.removeprefix(" ")]
        target = found[0] if len(found) == 1 else None
    gold = target if isinstance(target, int) and not isinstance(target, bool) else None
    lengths = [len(c.removeprefix(" ")) or 1 for c in continuations]
    return {"gold": gold, "loglik": lls, "loglik_norm": [ll / n for ll, n in zip(lls, lengths)]}


def _floats(values: list[float] | None) -> str:
    return "" if values is None else ";".join(repr(v) for v in values)


def _parse_floats(cell: str | None) -> list[float] | None:
    return [float(v) for v in cell.split(";")] if cell else None


def write_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    """The samples file, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if row.get(k) is None else _floats(row[k]) if k.startswith("loglik") else row[k]
                      for k in COLUMNS} for row in rows)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def read_samples(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise SamplesError(f"per-question results {path} not found; re-run the evaluate stages (`dvc repro`)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) not in (COLUMNS, BASIC):
            raise SamplesError(f"{path} is not a per-question results file: columns {reader.fieldnames}, expected {list(COLUMNS)}")
        try:
            return [{"task": r["task"], "doc_id": int(r["doc_id"]), "doc_hash": r["doc_hash"], "acc": int(r["acc"]),
                     "acc_norm": int(r["acc_norm"]) if r["acc_norm"] != "" else None,
                     "gold": int(r["gold"]) if r.get("gold") else None, "loglik": _parse_floats(r.get("loglik")),
                     "loglik_norm": _parse_floats(r.get("loglik_norm"))} for r in reader]
        except ValueError as exc:
            raise SamplesError(f"{path} has an unreadable row ({exc}); re-run the evaluate stages") from None


def fingerprint(rows: list[dict[str, Any]], cfg: EvaluateConfig, versions: dict[str, Any],
                definitions: dict[str, str] | None = None) -> dict[str, Any]:
    """What was asked: per task its lm-eval version, question count and a hash of its questions (and, for the
    team's tasks under evals/, `definition`: the hash of its YAML, data and code); the settings."""
    tasks: dict[str, Any] = {}
    for task in sorted({r["task"] for r in rows}):
        hashes = [f"{r['doc_id']}:{r['doc_hash']}" for r in rows if r["task"] == task]
        tasks[task] = {"version": versions.get(task), "n": len(hashes),
                       "questions": hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()}
        if definitions and task in definitions:
            tasks[task]["definition"] = definitions[task]
    asked = {"tasks": tasks, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot, "seed": cfg.seed, "source": cfg.source}
    return {**asked, "sha256": hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()}


def check_matches(rows: list[dict[str, Any]], recorded: dict[str, Any], where: str) -> None:
    """The rows are the questions the fingerprint says were asked (else a SamplesError naming the file)."""
    for task, entry in recorded.get("tasks", {}).items():
        hashes = [f"{r['doc_id']}:{r['doc_hash']}" for r in rows if r["task"] == task]
        if hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest() != entry["questions"] or len(hashes) != entry["n"]:
            raise SamplesError(f"{where}: the per-question results of task {task} do not match their recorded fingerprint "
                               f"({len(hashes)} rows, {entry['n']} recorded); the file was changed or belongs to another "
                               "evaluation: re-run the evaluate stages")
    extra = sorted({r["task"] for r in rows} - set(recorded.get("tasks", {})))
    if extra:
        raise SamplesError(f"{where}: per-question results for tasks the fingerprint does not list: {extra}")


def first(found: tuple[list[dict[str, Any]], dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and fingerprint cut to each task's first `limit` questions (0: all), the set lm-eval's limit asks: what a
    larger evaluation holds of a smaller one."""
    rows, asked = found
    if not limit or asked.get("limit") == limit:
        return found
    kept = [r for r in rows if r["doc_id"] < limit]
    tasks = {}
    for task, entry in asked["tasks"].items():
        hashes = [f"{r['doc_id']}:{r['doc_hash']}" for r in kept if r["task"] == task]
        tasks[task] = {**entry, "n": len(hashes),
                       "questions": hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()}
    cut = {**{k: v for k, v in asked.items() if k != "sha256"}, "tasks": tasks, "limit": limit}
    return kept, {**cut, "sha256": hashlib.sha256(json.dumps(cut, sort_keys=True).encode()).hexdigest()}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """How two fingerprints differ, in words (empty: the same questions were asked)."""
    out = []
    if set(a["tasks"]) != set(b["tasks"]):
        out.append(f"tasks {sorted(a['tasks'])} vs {sorted(b['tasks'])}")
    for key in ("limit", "num_fewshot", "seed", "source"):
        if a.get(key) != b.get(key):
            out.append(f"evaluate.{key} {a.get(key)!r} vs {b.get(key)!r}")
    for task in sorted(set(a["tasks"]) & set(b["tasks"])):
        ta, tb = a["tasks"][task], b["tasks"][task]
        if ta["version"] != tb["version"]:
            out.append(f"{task} task version {ta['version']} vs {tb['version']}")
        elif ta.get("definition") != tb.get("definition"):
            out.append(f"{task} task definition differs (its YAML, data or code under evals/ changed)")
        elif ta["questions"] != tb["questions"]:
            out.append(f"{task} questions differ ({ta['n']} vs {tb['n']})")
    return out


def table(rows: list[dict[str, Any]], metric: str = "acc") -> dict[str, dict[str, float]]:
    """task -> {question key -> 0/1} for `olora.core.paired.compare`; `acc_norm` falls back to `acc` where
    a task has none (as the summary's mean_acc_norm does)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        value = r[metric] if metric == "acc" or r.get(metric) is not None else r["acc"]
        out.setdefault(r["task"], {})[f"{r['doc_id']}:{r['doc_hash']}"] = value
    return out
