"""MLflow Model Registry: register exported adapters (with their model cards), aliases, roll back.

New versions get the alias `challenger`; the promotion gate that moves `champion` is
`olora.tracking.gate`; `rollback` restores the previous champion. Registering the same run twice returns the existing version, and so does a retry
or a re-run after a crash between upload and registration: the version is looked up again right
before it is created. The sha256 of every artifact file is recorded in the model's metadata and as
the version tag `artifact_sha256`; loading verifies them.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from olora import layout
from olora.config import Config
from olora.errors import OloraError
from olora.evaluation.result import EvalResult
from olora.tracking.client import Tracking
from olora.tracking.names import model_name
from olora.tracking.runs import read_run_file

log = logging.getLogger("olora")
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    created: bool


def register(cfg: Config, tracking: Tracking, root: Path, adapter_dir: Path, exported_dir: Path,
             eval_metrics: EvalResult) -> Registration:
    """Log the exported adapter as a pyfunc model in the adapter's run and register it (once per run)."""
    import mlflow.pyfunc
    import peft
    from mlflow.exceptions import MlflowException
    import torch
    import transformers

    from olora.io import check_adapter_dir
    from olora.modeling.models import resolve_model
    from olora.faults import marker
    from olora.serving.pyfunc import CHECKSUMS_KEY, AdapterGenerator, artifact_checksums, signature

    check_adapter_dir(exported_dir)  # refuse truncated or mismatched files before anything is logged
    run = read_run_file(adapter_dir)
    if run is None:
        raise OloraError(
            f"{adapter_dir} has no MLflow run record; re-run training with tracking.enabled=true (`dvc repro train`)"
        )
    c = tracking.client()
    name, run_id = model_name(cfg), run["run_id"]

    def versions_of_run():
        return c.search_model_versions(f"name='{name}' and run_id='{run_id}'")

    adapter_meta = json.loads((Path(adapter_dir) / layout.INIT_META).read_text())
    existing = tracking.call("searching model versions", versions_of_run)
    if existing:
        found = max(existing, key=lambda v: int(v.version))
        log.info("register: run %s is already %s version %s", run_id, name, found.version)
        if found.description:  # its card is stored: an earlier attempt finished (the alias follows the card)
            return Registration(name, str(found.version), run_id, created=False)
        # an earlier attempt created the version and failed before its card and alias (a registry outage): finish it
        _card_and_alias(c, tracking, cfg, name, str(found.version), run_id, adapter_meta["base_model"], eval_metrics)
        return Registration(name, str(found.version), run_id, created=True)

    template_path = Path(adapter_dir) / layout.TEMPLATE_FILE
    if not template_path.is_file():
        raise OloraError(
            f"{adapter_dir} has no {layout.TEMPLATE_FILE} (the prompt template it was trained with); "
            "re-run prepare and train (`dvc repro`) to record it"
        )
    ref = resolve_model(cfg.model, root)
    with tempfile.TemporaryDirectory() as tmp:
        base_file = Path(tmp) / "base.json"
        base_file.write_text(json.dumps({"name": adapter_meta["base_model"], "revision": cfg.model.revision,
                                         "path": ref.path if ref.local else ""}))
        template_file = Path(tmp) / "template.json"
        shutil.copy(template_path, template_file)
        model_dir = Path(tmp) / "model"
        adapter_copy = Path(tmp) / "adapter"  # pyfunc stores a folder artifact under its own name
        shutil.copytree(exported_dir, adapter_copy)
        checksums = artifact_checksums([adapter_copy, base_file, template_file])
        # save locally, then upload and register through the client: no global tracking state that
        # would leak into other code (or child processes) of the caller
        mlflow.pyfunc.save_model(
            path=str(model_dir),
            python_model=AdapterGenerator(),
            artifacts={"adapter": str(adapter_copy), "base": str(base_file), "template": str(template_file)},
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={transformers.__version__}",
                f"peft=={peft.__version__}",
                "olora-pipeline",
            ],
            signature=signature(),
            metadata={"base_model": adapter_meta["base_model"], "adapter_init": adapter_meta["init"],
                      "prompt_template": json.loads(template_path.read_text())["kind"], CHECKSUMS_KEY: checksums},
        )
        if artifact_checksums(sorted((model_dir / "artifacts").iterdir())) != checksums:
            raise OloraError(f"the saved model's artifacts differ from {exported_dir}; nothing was registered")
        tags = {
            "base_model": adapter_meta["base_model"],
            "adapter_init": adapter_meta["init"],
            "r": str(adapter_meta["r"]),
            "mean_acc": str(eval_metrics.mean_acc),
            "mean_acc_norm": str(eval_metrics.mean_acc_norm),
            CHECKSUMS_KEY: json.dumps(checksums, sort_keys=True),
        }

        def upload_and_register():
            # the same files to the same path each attempt: a re-upload overwrites, it leaves nothing behind
            marker("register:uploading")
            c.log_artifacts(run_id, str(model_dir), "model")
            try:
                c.get_registered_model(name)
            except MlflowException:
                c.create_registered_model(name, description=f"OLoRA/LoRA adapters for {adapter_meta['base_model']}")
            # looked up again right before creating: an earlier attempt whose response was lost (or a
            # concurrent run of this stage) may have registered this run already; never a second version
            found = versions_of_run()
            if found:
                log.info("register: run %s became %s version %s in an earlier attempt", run_id, name,
                         max(int(v.version) for v in found))
                return max(found, key=lambda v: int(v.version))
            marker("register:uploaded")
            return c.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags)

        version = tracking.call("registering the model", upload_and_register)
    marker("register:created")
    _card_and_alias(c, tracking, cfg, name, str(version.version), run_id, adapter_meta["base_model"], eval_metrics)
    return Registration(name, str(version.version), run_id, created=True)


def _card_and_alias(c, tracking: Tracking, cfg: Config, name: str, version: str, run_id: str, base_model: str,
                    eval_metrics: dict[str, Any]) -> None:
    """A new version's card, then its `challenger` alias: the card present means registering finished."""
    store_card(c, tracking, cfg, name, version, run_id, base_model, eval_metrics)
    tracking.call("setting the challenger alias", lambda: c.set_registered_model_alias(name, CHALLENGER, version))
    log.info("register: %s version %s (alias %s)", name, version, CHALLENGER)


def store_card(c, tracking: Tracking, cfg: Config, name: str, version: str, run_id: str, base_model: str,
               eval_metrics: EvalResult) -> str:
    """The version's model card (`olora.tracking.card`): `model_card/README.md` in its run (Hugging Face
    front matter), and the version's description in the registry (the same, its front matter last as a YAML block)."""
    from olora.tracking.card import for_registry, model_card

    lineage = {**tracking.call("reading the run's lineage", lambda: c.get_run(run_id)).data.tags, "run_id": run_id}
    card = model_card(cfg, name, version, base_model, eval_metrics, lineage)
    with tempfile.TemporaryDirectory() as tmp:  # the file first: a description in the registry means both are stored
        path = Path(tmp) / "README.md"
        path.write_text(card)
        tracking.call("uploading the model card", lambda: c.log_artifact(run_id, str(path), "model_card"))
    tracking.call("storing the model card", lambda: c.update_model_version(name, version, description=for_registry(card)))
    return card


def version_metric(c, name: str, version: str, metric: str) -> float | None:
    value = c.get_model_version(name, version).tags.get(metric)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def alias_version(c, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the model has no such alias."""
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def open_model(tracking: Tracking, name: str):
    """A client for a registered model that exists (else an error listing the models that do)."""
    from mlflow.exceptions import MlflowException

    c = tracking.client()
    try:
        c.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in c.search_registered_models())
        raise OloraError(f"registered model {name!r} not found; registered models: {names or 'none'}") from None
    return c


def find_version(c, name: str, alias: str | None, version: str | None) -> str:
    """`version` checked to exist, else the version `alias` points at (an error naming what is missing)."""
    if version is None:
        found = alias_version(c, name, alias or CHAMPION)
        if found is None:
            hint = "register one first (`dvc repro register`)" if alias == CHALLENGER else "name one with --version"
            raise OloraError(f"{name} has no {alias!r} version; {hint}")
        return found
    known = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
    if not str(version).isdigit():
        raise OloraError(f"--version {version!r} is not a version number; versions of {name}: {known}")
    if int(version) not in known:
        raise OloraError(f"{name} has no version {version}; versions: {known}")
    return str(version)


def rollback(cfg: Config, tracking: Tracking, name: str | None = None) -> str:
    """Point `champion` back at the version it replaced; returns that version."""
    name = name or model_name(cfg)
    c = open_model(tracking, name)
    current = alias_version(c, name, CHAMPION)
    if current is None:
        raise OloraError(f"{name} has no {CHAMPION!r}; nothing to roll back")
    previous = c.get_model_version(name, current).tags.get("previous_champion")
    if not previous:
        raise OloraError(f"{name} champion v{current} replaced no earlier champion; nothing to roll back to")
    c.set_registered_model_alias(name, CHAMPION, previous)
    c.set_model_version_tag(name, current, "rolled_back", "true")
    log.info("rollback %s: champion v%s -> v%s", name, current, previous)
    return previous


def registration_record(reg: Registration, uri: str) -> dict[str, Any]:
    return {**asdict(reg), "model_uri": f"models:/{reg.name}/{reg.version}", "tracking_uri": uri}
