"""Crash safety, proved by killing: SIGKILL inside every stage, then `dvc repro` finishes with the same results.

Each kill lands at a marker the stage logs (`olora.faults.marker`), where the process pauses, so
the moment is exact rather than guessed with sleeps: the worst moments are chosen (an output
complete in its temp folder but not yet swapped in, a training checkpoint just saved, scores
computed but not written, a model uploaded but not yet registered). The whole process group dies
(`dvc repro` and the stage), as with the OOM killer or a lost node. A second run started while
one is in progress is refused by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import BIN, PausedRun, make_dvc_project, sh
from olora import dvc
from olora.layout import Layout
from olora.stages.lock import WorkspaceBusyError
from olora.stages import STAGES

pytestmark = [pytest.mark.integration, pytest.mark.fault]

# (stage, marker): in pipeline order, so each rerun goes on to the next kill
KILLS = [
    ("prepare", "prepared:written"),  # the split is complete in data/.prepared.*.tmp, not yet swapped in
    ("init", "init:written"),
    ("train", "train:saved-4"),  # mid-training, right after a checkpoint: the rerun must resume from it
    ("train", "exported:written"),  # after the last step, the adapter written, the export not yet
    ("evaluate_base", "evaluate_base:scored"),  # lm-eval done, nothing written
    ("evaluate", "evaluate:scored"),
    ("register", "register:uploaded"),  # the model uploaded to the run, the version not yet created
]


def _outs(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", []) if "md5" in o}


def _registry(root: Path):
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}", registry_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("olora").experiment_id])
    versions = c.search_model_versions("name='olora-tiny-llama'")
    return c, runs, versions


# The uninterrupted run goes on beside the killed one (one core each, so the two runs share the two
# cores instead of taking turns); the thread count is not a stage input, so it cannot change an output.
ONE_THREAD = {"runtime.num_threads": 1}


class Straight:
    """An uninterrupted `dvc repro` of the same project, started in the background."""

    def __init__(self, root: Path):
        self.root, self.log = root, root.parent / f"{root.name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
                                            start_new_session=True)

    def finished(self) -> Path:
        code = self.process.wait(900)
        assert code == 0, f"the uninterrupted dvc repro failed ({code}):\n{self.log.read_text()[-4000:]}"
        return self.root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    straight = Straight(make_dvc_project(tmp_path_factory.mktemp("straight"), tiny_model_dir, ONE_THREAD))
    yield straight
    if straight.process.poll() is None:
        os.killpg(straight.process.pid, signal.SIGKILL)
        straight.process.wait(60)


def test_sigkill_in_every_stage_then_repro_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, reference):
    root = make_dvc_project(tmp_path / "killed", tiny_model_dir, ONE_THREAD)
    for i, (stage, marker) in enumerate(KILLS):
        run = PausedRun([str(BIN / "dvc"), "repro"], root, [marker], tmp_path / f"pause-{i}")
        run.wait(marker)
        if marker == "train:saved-4":
            _second_runs_are_refused_by_name(root)
        run.kill()
        assert not dvc.up_to_date(root, stage), f"a half-done {stage} passed for current after a kill at {marker}"
        if stage == "train":
            assert (root / "checkpoints" / "train" / "checkpoint-4" / "trainer_state.json").is_file()
    sh([str(BIN / "dvc"), "repro"], root)
    assert sh([str(BIN / "dvc"), "status"], root).stdout.strip() == "Data and pipelines are up to date."
    assert not list(root.glob("**/.*.tmp")), "a killed writer's temp folder was left behind"

    # the same data and initial adapter (bit for bit), the same trained adapter, scores and registry state
    reference = reference.finished()
    killed, straight = _outs(root), _outs(reference)
    for path in ("data/prepared", "models/init"):
        assert killed[path] == straight[path], path
    for name in ("adapter", "exported"):
        ours = load_file(root / "models" / name / "adapter_model.safetensors")
        theirs = load_file(reference / "models" / name / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():  # resumed from checkpoint-4: equal up to float reassociation
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6)
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert train["resumed"] and train["steps"] == 6
    assert train["final_val_loss"] == pytest.approx(json.loads((reference / "metrics/train.json").read_text())["final_val_loss"], rel=1e-5)
    for which in ("eval_base", "eval_adapter"):
        ours = json.loads((root / "metrics" / f"{which}.json").read_text())
        theirs = json.loads((reference / "metrics" / f"{which}.json").read_text())
        assert {t: e["acc"] for t, e in ours["tasks"].items()} == pytest.approx({t: e["acc"] for t, e in theirs["tasks"].items()}, abs=1e-9)

    # one MLflow run (the resumed training continued the run it started), every step logged once, one version
    c, runs, versions = _registry(root)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert len(versions) == 1 and versions[0].run_id == runs[0].info.run_id
    assert json.loads((root / "reports" / "registration.json").read_text())["version"] == "1"


def _second_runs_are_refused_by_name(root: Path) -> None:
    """While a `dvc repro` is inside train: a second repro, a stage run by hand and a flow's steps are refused."""
    second = sh([str(BIN / "dvc"), "repro"], root, check=False)
    assert second.returncode != 0  # DVC's own lock names the holder and the lock file
    assert "is busy, it is being blocked by" in second.stderr and "dvc repro" in second.stderr
    assert str(root / ".dvc" / "tmp" / "rwlock") in second.stderr
    by_hand = sh([str(BIN / "olora"), "train"], root, check=False)
    assert by_hand.returncode == 2
    first_line = by_hand.stderr.strip().splitlines()[-1]
    assert f"the workspace {root.resolve()} is busy: stage 'train' (PID" in first_line
    assert f"holds the lock {root / '.olora' / 'stage.lock'}" in first_line
    with pytest.raises(dvc.DvcLockError, match=r"found the DVC lock .*\.dvc/tmp/rwlock held"):
        dvc.run(root, "repro", "train")  # a flow's experiment step on the busy stage
    with pytest.raises(WorkspaceBusyError, match="is busy: stage 'train'"):
        STAGES["evaluate"].run(Layout(root))  # what a flow's task then calls
