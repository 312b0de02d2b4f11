"""`olora check` runs every stage's pre-flight: each setting a stage refuses before any weights load, `olora check`
refuses too, with the stage's own message, within seconds.

The tiny project's base model has its weight data cut off after the safetensors header: the
header still names every tensor (what the checks may read), but any attempt to load the weights
fails. So a refusal with the stage's message proves the refusal came before any weights loaded.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from olora import cli
from olora.errors import OloraError
from olora.layout import Layout
from olora.stages import STAGES

from overlay import copy_project, write_params

HUB_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"

# (setting, the stage that refuses it): the ten settings `olora check` used to pass (issue 30)
REFUSED = [
    ({"evaluate.tasks": ["arc_eazy"]}, "evaluate_base"),
    ({"adapter.r": 100000}, "init"),
    ({"adapter.target_modules": ["nope_proj"]}, "init"),
    ({"model.name": HUB_ID}, "prepare"),
    ({"train.processes": 64}, "train"),
    ({"model.quantization": "4bit"}, "init"),
    ({"train.strategy": "deepspeed"}, "train"),
    ({"data.source": "elsewhere/train.jsonl"}, "prepare"),
    ({"data.source": "data/raw/missing.jsonl"}, "prepare"),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("preflight")
    copy_project(root)
    write_params(root, tiny_model_dir)
    weights = root / "models/base" / tiny_model_dir.name / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    weights.write_bytes(data[:header + 16])  # the header intact, the tensors gone: loading them fails
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "train.jsonl").write_text('{"instruction": "Say hi.", "output": "Hi."}\n')  # outside data/raw/
    return root


def _sets(overrides: dict) -> list[str]:
    import json

    return [a for key, value in overrides.items() for a in ("--set", f"{key}={json.dumps(value)}")]


def test_a_healthy_project_passes_check_without_loading_weights(project, capsys):
    assert cli.main(["--root", str(project), "check"]) == 0
    assert "adapter:" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, stage", REFUSED, ids=[f"{next(iter(o))}={next(iter(o.values()))}" for o, _ in REFUSED])
def test_check_refuses_what_the_stage_refuses_with_its_message(project, overrides, stage, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OloraError) as refused:
        STAGES[stage].run(Layout(project), overrides)
    capsys.readouterr()
    started = time.monotonic()
    code = cli.main(["--root", str(project), *_sets(overrides), "check"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and f"olora check: error: {refused.value}" in err, err
    assert seconds < 10, f"olora check took {seconds:.1f} s"


def test_a_deploying_checkout_need_not_hold_what_the_workspace_pulls(project):
    """The flows' pre-flight (`present=False`): a data file or a base-model folder only the DVC remote holds is left
    to the run's workspace; everything else is still refused with the stage's message."""
    from olora.config import load_config
    from olora.orchestration.pipeline import preflight as flow_preflight
    from olora.stages import preflight

    pulled = {"data.source": "data/raw/pulled.jsonl", "model.name": "models/base/pulled-model"}
    flow_preflight(project, pulled)
    for key, message in (("data.source", "pulled.jsonl not found"), ("model.name", "pulled-model' looks like a local path")):
        with pytest.raises(OloraError, match=message):  # `olora check` in that checkout
            preflight(load_config(project / "params.yaml", {key: pulled[key]}), project)
    with pytest.raises(OloraError, match="lies outside data/raw/"):
        flow_preflight(project, {"data.source": "elsewhere/train.jsonl"})
    with pytest.raises(OloraError, match=r"adapter.target_modules=\['nope_proj'\] match no linear layer"):
        flow_preflight(project, {"adapter.target_modules": ["nope_proj"]})
