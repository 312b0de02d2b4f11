"""The train stage for real on the tiny model: determinism, resume after interruption, NaN stop."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from olora.layout import Layout
from olora.stages import STAGES
from olora.errors import ConfigError, NonFiniteLossError

from overlay import write_params

pytestmark = pytest.mark.integration


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"simulated preemption after step {self.step}")


class InterruptAtEnd(TrainerCallback):
    """A kill after the last step's checkpoint, before the stage writes its outputs."""

    def on_train_end(self, args, state, control, **kwargs):
        raise Interrupt("simulated preemption after the final checkpoint")


class PoisonAt(TrainerCallback):
    """Set one adapter weight to NaN after `step`, so the next loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_params(root, tiny_model_dir)
    layout = Layout(root)
    STAGES["prepare"].run(layout)
    STAGES["init"].run(layout)
    return root


def _clone(src: Path, dst: Path) -> Layout:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "adapter", "exported"))
    return Layout(dst)


def _weights(layout: Layout) -> dict[str, torch.Tensor]:
    return load_file(layout.adapter / "adapter_model.safetensors")


def test_resume_after_interruption_matches_uninterrupted_run(prepared, tmp_path):
    straight = _clone(prepared, tmp_path / "a")
    metrics = STAGES["train"].run(straight)
    assert metrics["steps"] == 6 and not metrics["resumed"]

    again = _clone(prepared, tmp_path / "b")
    assert STAGES["train"].run(again)["steps"] == 6
    for key, value in _weights(straight).items():  # a fixed seed makes CPU runs repeatable
        torch.testing.assert_close(_weights(again)[key], value, rtol=0, atol=0)

    broken = _clone(prepared, tmp_path / "c")
    with pytest.raises(Interrupt):
        STAGES["train"].run(broken, callbacks=[InterruptAt(5)])
    assert (broken.checkpoints / "checkpoint-4").is_dir()
    assert not broken.adapter.exists()
    resumed = STAGES["train"].run(broken)
    assert resumed["resumed"] and resumed["steps"] == 6
    for key, value in _weights(straight).items():
        torch.testing.assert_close(_weights(broken)[key], value, rtol=1e-5, atol=1e-6)

    assert not broken.checkpoints.exists()  # removed once the outputs are written

    # killed after the final step's checkpoint but before the outputs were written: the rerun takes
    # that checkpoint as the result instead of training a seventh step
    late = _clone(prepared, tmp_path / "late")
    with pytest.raises(Interrupt):
        STAGES["train"].run(late, callbacks=[InterruptAtEnd()])
    assert (late.checkpoints / "checkpoint-6" / "trainer_state.json").is_file() and not late.adapter.exists()
    finished = STAGES["train"].run(late)
    assert finished["resumed"] and finished["steps"] == 6
    assert len(late.plot("train_loss").read_text().splitlines()) == 7  # header + steps 1..6
    for key, value in _weights(straight).items():
        torch.testing.assert_close(_weights(late)[key], value, rtol=0, atol=0)


def test_changed_settings_do_not_resume_stale_checkpoints(prepared, tmp_path):
    layout = _clone(prepared, tmp_path / "d")
    with pytest.raises(Interrupt):
        STAGES["train"].run(layout, callbacks=[InterruptAt(3)])
    assert (layout.checkpoints / "checkpoint-2").is_dir()
    metrics = STAGES["train"].run(layout, overrides={"train.learning_rate": 5e-4})
    assert not metrics["resumed"] and metrics["steps"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(prepared, tmp_path):
    layout = _clone(prepared, tmp_path / "e")
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss .* at step 6.*last good checkpoint is .*checkpoint-4"):
        STAGES["train"].run(layout, callbacks=[PoisonAt(5)])  # after the step-4 save
    assert (layout.checkpoints / "checkpoint-4").is_dir()
    good = load_file(layout.checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not layout.adapter.exists() and not layout.exported.exists()


def test_init_adapter_from_other_settings_is_refused(prepared, tmp_path):
    layout = _clone(prepared, tmp_path / "f")
    with pytest.raises(ConfigError, match=r"built with other settings .*'r': \(4, 8\).*dvc repro init"):
        STAGES["train"].run(layout, overrides={"adapter.r": 8})


def test_gradient_checkpointing_and_accumulation_train(prepared, tmp_path):
    layout = _clone(prepared, tmp_path / "g")
    metrics = STAGES["train"].run(
        layout, overrides={"train.gradient_checkpointing": True, "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2,
                           "train.max_steps": 2, "train.save_steps": 2, "train.eval_steps": 2}
    )
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["final_val_loss"]))
    assert metrics["tokens_trained"] > 0


def test_a_full_disk_is_named_and_a_truncated_checkpoint_is_not_resumed(tmp_path):
    """A checkpoint a full disk left with a truncated trainer_state.json is not complete (a resume takes the one
    before); the failure is worded as the disk being full, naming the folder and the checkpoint a rerun resumes."""
    import errno
    import json

    from olora.training import checkpoints

    folder = tmp_path / "checkpoints"
    for step, state in ((2, json.dumps({"global_step": 2})), (4, '{"global_st')):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert [p.name for p in checkpoints.complete(folder)] == ["checkpoint-2"]
    (folder / checkpoints.FINGERPRINT).write_text(json.dumps({"fingerprint": "fp", "processes": 1}))
    assert checkpoints.prepare(folder, "fp")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", checkpoints.FINGERPRINT]

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as exc:
        error = checkpoints.disk_full(folder, exc)
    assert str(error).startswith(f"No space left on device while training into {folder} (")
    assert "the last complete checkpoint, checkpoint-2, is kept" in str(error) and "OLORA_RUNS_DIR" in str(error)
    assert checkpoints.disk_full(folder, ValueError("a bug, not the disk")) is None
