"""What `olora doctor` concludes from what it found in the stores: each broken record named, with its repair.

Pure (no I/O): the facts are gathered by `olora.orchestration.doctor`; these functions decide what
is broken. A registered version needs its MLflow run (not deleted), its model's files (`MLmodel` and
every file whose checksum was recorded at registration) and its model card; an alias needs a
healthy version that loads; a recorded run (a `runs/*` branch) needs every DVC output its dvc.lock
and .dvc files name in the DVC remote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_DIR = "model"  # where `register` logs the pyfunc model in the run
CARD = "model_card/README.md"  # the model card in the run (`olora.tracking.registry.store_card`)
RUN_MISSING, RUN_DELETED, RUN_ACTIVE = "missing", "deleted", "active"


@dataclass(frozen=True)
class Problem:
    subject: str
    """What is broken, by name: `olora-tiny-llama version 2`, `alias champion of olora-tiny-llama`, `branch runs/x`."""
    broken: str
    """What is wrong with it."""
    repair: str
    """How to repair it."""

    def text(self) -> str:
        return f"BROKEN {self.subject}: {self.broken}\n  repair: {self.repair}"


@dataclass(frozen=True)
class VersionFacts:
    """What the registry and the artifact store hold for one registered version."""

    model: str
    version: str
    run_id: str
    status: str
    """The version's registry status (READY when registration finished)."""
    run_state: str
    """RUN_ACTIVE, RUN_DELETED (in the store's trash) or RUN_MISSING."""
    files: frozenset[str] = frozenset()
    """Artifact files of the run under `model/` and `model_card/`, relative to the run's artifact root."""
    recorded: dict[str, str] | None = None
    """The version's `artifact_sha256` tag: {file under model/artifacts/: sha256}; None when absent."""
    description: str = ""
    branch: str | None = None
    """The runs/* branch its run was recorded on (tag olora.git_branch), if any."""
    subject: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "subject", f"{self.model} version {self.version}")


def _reregister(f: VersionFacts) -> str:
    where = (f"`olora restore --model {f.model} --version {f.version}` (checks out {f.branch} and pulls its adapter "
             "from the DVC remote), then" if f.branch else "in a checkout holding its run's outputs,")
    return (f"delete the version (`MlflowClient().delete_model_version('{f.model}', '{f.version}')`) and register it again: "
            f"{where} `olora register`; move any alias on it first (`olora rollback`, or `olora promote --version N --force`)")


def version_problems(f: VersionFacts) -> list[Problem]:
    """A registered version's run, model files and card."""
    if f.run_state == RUN_MISSING:
        return [Problem(f.subject, f"its MLflow run {f.run_id} does not exist in the tracking store", _reregister(f))]
    out = []
    if f.run_state == RUN_DELETED:
        out.append(Problem(f.subject, f"its MLflow run {f.run_id} is deleted (in the tracking store's trash; "
                                      "`mlflow gc` would remove its files)",
                           f"restore it: `mlflow runs restore --run-id {f.run_id}` (with MLFLOW_TRACKING_URI set)"))
    if f.status != "READY":
        out.append(Problem(f.subject, f"its registration did not finish (status {f.status})", _reregister(f)))
    expected = [f"{MODEL_DIR}/MLmodel", *(f"{MODEL_DIR}/artifacts/{name}" for name in sorted(f.recorded or {}))]
    missing = [path for path in expected if path not in f.files]
    if missing:
        out.append(Problem(f.subject, f"artifact file(s) missing from run {f.run_id}: {', '.join(missing)}", _reregister(f)))
    if f.recorded is None:
        out.append(Problem(f.subject, "it has no artifact_sha256 tag: its files cannot be verified", _reregister(f)))
    if CARD not in f.files or not f.description.strip():
        what = " and ".join(w for w, gone in ((f"{CARD} in run {f.run_id}", CARD not in f.files),
                                               ("the registry description", not f.description.strip())) if gone)
        out.append(Problem(f.subject, f"its model card is missing ({what})", _reregister(f)))
    return out


def alias_problems(model: str, alias: str, version: str, version_broken: bool, load_error: str | None) -> list[Problem]:
    """An alias must point at a healthy version; the ones `olora serve` follows must also load."""
    subject = f"alias {alias} of {model}"
    repair = (f"point {alias} at a healthy version: `olora rollback --model {model}` (the previous champion), or "
              f"`olora promote --model {model} --version N --force`" if alias == "champion" else
              f"point it at a healthy version (`MlflowClient().set_registered_model_alias('{model}', '{alias}', N)`) "
              "or delete it")
    if version_broken:
        return [Problem(subject, f"points at version {version}, which is broken (above)", repair)]
    if load_error is not None:
        return [Problem(subject, f"points at version {version}, which does not load: {load_error}", repair)]
    return []


def branch_problems(branch: str, commit: str, present: dict[str, bool] | None, error: str | None = None) -> list[Problem]:
    """A recorded run: every cached DVC output of its commit (each file of a folder) must be in the DVC remote."""
    subject = f"branch {branch} ({commit[:12]})"
    if error is not None:
        return [Problem(subject, f"its DVC outputs could not be checked: {error}",
                        "configure the DVC remote here (`dvc remote add -d NAME URL`, or the stack's stack.env) and rerun")]
    absent = sorted(path for path, there in (present or {}).items() if not there)
    if not absent:
        return []
    return [Problem(subject, f"DVC output(s) missing from the DVC remote: {', '.join(absent)}",
                    f"push them from a clone whose DVC cache still holds them (`git checkout {commit[:12]} && dvc push`; "
                    "a failed run's kept workspace under .olora/runs/ is one), else rerun that run; until then "
                    f"`olora restore` of {branch} cannot bring its outputs back")]
