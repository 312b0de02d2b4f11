"""Where every stage reads and writes, relative to the project root, and the file names shared by modules.

`dvc.yaml` is generated from the stage table (`olora.stages`), which takes its paths from here, so
a path is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PARAMS = "params.yaml"
DVC_YAML = "dvc.yaml"
DVC_LOCK = "dvc.lock"
LOCKFILE = "requirements.lock"  # the locked library versions: every stage depends on it

TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"
TEMPLATE_FILE = "prompt_template.json"  # in data/prepared and models/adapter: the rendered prompt template
INIT_META = "olora_init.json"  # in models/init and models/adapter: how the initial adapter was built
RUN_FILE = "mlflow_run.json"  # in models/adapter: the MLflow run that holds this adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Project-relative paths (as dvc.yaml writes them)
DATA_INPUTS = "data/raw"  # local data files (data.source) must live here: prepare depends on it
MODEL_INPUTS = "models/base"  # local base-model folders (model.name) must live here: every model stage depends on it
DATA = "data/prepared"
INIT = "models/init"
ADAPTER = "models/adapter"
EXPORTED = "models/exported"
CHECKPOINTS = "checkpoints/train"
EVAL = "eval"  # per-question results of the evaluate stages (DVC outputs)
EVALS = "evals"  # the team's own lm-eval tasks (YAMLs and data): an input of both evaluate stages
REPORT = "reports/eval.md"
REGISTRATION = "reports/registration.json"
PROMOTION = "reports/promotion.json"  # the last `olora promote` decision made in this checkout


EVAL_ARTIFACTS = "eval"  # in the adapter's MLflow run: the evaluation's per-question results and metrics files
RESCORED_ARTIFACTS = f"{EVAL_ARTIFACTS}/rescored"  # in a version's run: its re-scorings by the gate, one folder a set


def metrics_file(name: str) -> str:
    """A metrics file's name (`eval_adapter.json`), as it is also named among a run's artifacts."""
    return f"{name}.json"


def metrics_path(name: str) -> str:
    return f"metrics/{metrics_file(name)}"


def samples_file(which: str) -> str:
    """The name of an evaluation's per-question results: `base` (evaluate_base) or `adapter` (evaluate)."""
    return f"{which}_samples.csv"


def samples_path(which: str) -> str:
    """Per-question results of an evaluation: `base` (evaluate_base) or `adapter` (evaluate)."""
    return f"{EVAL}/{samples_file(which)}"


def plot_path(name: str) -> str:
    return f"plots/{name}.csv"


@dataclass(frozen=True)
class Layout:
    """The project's paths under one root (a checkout, a temp test repo, an isolated run workspace)."""

    root: Path = Path(".")

    def path(self, rel: str) -> Path:
        return Path(self.root) / rel

    @property
    def params(self) -> Path:
        return self.path(PARAMS)

    @property
    def data_inputs(self) -> Path:
        return self.path(DATA_INPUTS)

    @property
    def model_inputs(self) -> Path:
        return self.path(MODEL_INPUTS)

    @property
    def data(self) -> Path:
        return self.path(DATA)

    @property
    def init(self) -> Path:
        return self.path(INIT)

    @property
    def adapter(self) -> Path:
        return self.path(ADAPTER)

    @property
    def exported(self) -> Path:
        return self.path(EXPORTED)

    @property
    def checkpoints(self) -> Path:
        return self.path(CHECKPOINTS)

    def metrics(self, name: str) -> Path:
        return self.path(metrics_path(name))

    def samples(self, which: str) -> Path:
        return self.path(samples_path(which))

    def plot(self, name: str) -> Path:
        return self.path(plot_path(name))

    @property
    def report(self) -> Path:
        return self.path(REPORT)

    @property
    def registration(self) -> Path:
        return self.path(REGISTRATION)
