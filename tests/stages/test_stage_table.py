"""The stage table is the one declaration: dvc.yaml, the CLI and the Prefect flows all come from it."""

from __future__ import annotations

import importlib

import pytest
import yaml

from olora.cli import _stage_for, base_parser, main
from olora.devtools import code_files, code_modules, dvc_yaml
from olora.layout import Layout
from olora.stages import STAGES

from conftest import REPO


def test_committed_dvc_yaml_is_the_one_generated_from_the_table():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), "dvc.yaml is stale: run `olora dvc-yaml --write`"
    assert main(["--root", str(REPO), "dvc-yaml", "--check"]) == 0


def test_dvc_yaml_check_fails_on_a_hand_edit(tmp_path):
    (tmp_path / "dvc.yaml").write_text(dvc_yaml().replace("- requirements.lock\n", "", 1))
    assert main(["--root", str(tmp_path), "dvc-yaml", "--check"]) == 1


def test_every_stage_function_exists_and_every_cli_command_maps_to_its_stage():
    parser = base_parser()
    for stage in STAGES.values():
        module, name = stage.function.split(":")
        assert callable(getattr(importlib.import_module(module), name)), stage.function
        assert _stage_for(parser.parse_args(list(stage.cli or (stage.name,)))) == stage.name
        assert stage.cmd == f"python -m {stage.module}"  # dvc.yaml starts the stage's own module, not the dispatcher
        assert stage.module.startswith("olora.stages."), "a newcomer finds every stage under src/olora/stages/"


def test_stage_modules_are_the_pipeline():
    files = sorted(p.stem for p in (REPO / "src/olora/stages").glob("*.py") if p.stem not in ("__init__", "lock", "entry"))
    assert set(files) == {s.module.rsplit(".", 1)[1] for s in STAGES.values()}


def test_code_deps_are_the_import_closure():
    init = code_modules(STAGES["init"])
    assert "olora.core.olora" in init and "olora.modeling.peft_glue" in init  # the QR and its PEFT glue
    assert "olora.tracking.registry" not in init  # registry code cannot rerun training
    prepare = code_modules(STAGES["prepare"])
    assert "olora.data.templates" in prepare and "olora.modeling.peft_glue" not in prepare
    train = code_modules(STAGES["train"])
    assert "olora.data.templates" in train  # the label masking (encode) runs in train
    for stage in STAGES.values():
        files = code_files(stage)
        assert all((REPO / f).is_file() for f in files)
        assert "src/olora/stages/__init__.py" in files and "src/olora/stages/entry.py" in files
        assert not [f for f in files if f.endswith(("cli.py", "cliargs.py", "admin.py")) or "/ops/" in f], (stage.name, files)
    assert not [m for m in code_modules(STAGES["evaluate_base"]) if m.startswith("olora.tracking")]  # no MLflow code


def test_a_stage_module_runs_as_dvc_yaml_starts_it(tmp_path):
    """`python -m olora.stages.<stage>` parses --root/--set and reports a bad input as the CLI does (exit 2, one line)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "olora.stages.prepare", "--root", str(tmp_path), "--set", "data.max_examples=3"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("olora prepare: error: ") and "params.yaml" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_tracked_stage_says_when_stack_env_is_there_but_not_loaded(tmp_path):
    """Stages read the environment, never stack.env (ops/ is no stage's dep): started without it, they say so."""
    import os
    import subprocess
    import sys

    (tmp_path / "stack.env").write_text("MLFLOW_TRACKING_URI=http://127.0.0.1:5000\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [sys.executable, "-m", "olora.stages.register", "--root", str(tmp_path)]
    bare = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bare.returncode == 2 and "stack.env exists but is not loaded" in bare.stderr and "set -a; . ./stack.env" in bare.stderr
    loaded = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert loaded.returncode == 2 and "stack.env" not in loaded.stderr  # only the missing params.yaml


def test_the_flows_dispatch_through_the_table():
    from flows import olora_pipeline as flows

    assert flows.STAGES is STAGES
    source = (REPO / "flows" / "olora_pipeline.py").read_text()
    for stage in STAGES:  # no second list of stage names
        assert f'"{stage}"' not in source or stage == "train", stage


def test_outputs_come_from_layout():
    layout = Layout(REPO)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["outs"] == ["models/adapter", "models/exported"]
    assert layout.adapter == REPO / "models/adapter"


@pytest.mark.parametrize("name", list(STAGES))
def test_local_inputs_are_dependencies(name):
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    assert "requirements.lock" in stage["deps"]
    if name in ("prepare", "init", "train", "evaluate_base", "evaluate"):
        assert "models/base" in stage["deps"]
    if name == "prepare":
        assert "data/raw" in stage["deps"]


def test_relock_code_records_moved_code_without_the_outputs(tmp_path):
    """`dvc commit` refuses a checkout without the outputs; relock_code records the new cmd and code hashes and keeps
    the recorded outputs, so `dvc status` then reports only what is missing here, as before the move."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from olora.devtools import relock_code

    dvc = str(Path(sys.executable).parent / "dvc")

    def run(*args):
        return subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    def status() -> dict:
        return json.loads(run(dvc, "status", "--json") or "{}")

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    (tmp_path / "code.py").write_text("import pathlib; pathlib.Path('a').write_text('A')\n")
    stages = {"stages": {
        "one": {"cmd": "python code.py", "deps": ["code.py"], "outs": ["a"]},
        "two": {"cmd": "python -c \"import pathlib; pathlib.Path('b').write_text(pathlib.Path('a').read_text())\"",
                "deps": ["a"], "outs": ["b"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    run(dvc, "repro", "-q")
    for out in ("a", "b"):
        (tmp_path / out).unlink()
    shutil.rmtree(tmp_path / ".dvc/cache")  # a checkout that has never had the outputs
    before = status()
    assert {"one", "two"} == set(before)

    (tmp_path / "code.py").write_text((tmp_path / "code.py").read_text() + "# moved\n")
    stages["stages"]["one"]["cmd"] = "python ./code.py"
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    assert "changed command" in json.dumps(status()) and "modified" in json.dumps(status())
    with pytest.raises(subprocess.CalledProcessError):
        run(dvc, "commit", "-f")
    assert relock_code(tmp_path) == ["one"]
    assert status() == before and relock_code(tmp_path) == []
