"""Every command the README shows is run by a test: this maps each one to the test that runs it."""

from __future__ import annotations

import re

from conftest import REPO

# README command (comment stripped) -> the test that runs it. `test_readme_commands_run` in
# test_pipeline_dvc.py runs the ones mapped to it, as written, in the tiny project.
RUN_IN_TINY_PROJECT = "tests/stages/test_pipeline_dvc.py::test_readme_commands_run"
ONE_MACHINE = "tests/orchestration/test_durable.py::test_readme_deployment_on_one_machine_records_durably"
COVERED = {
    "make run": "tests/stages/test_pipeline_dvc.py::test_repro_produces_every_output_and_a_noop_second_run",
    "make test": ".ci/run",
    "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000": RUN_IN_TINY_PROJECT,
    "olora promote": RUN_IN_TINY_PROJECT,
    "olora promote --force": RUN_IN_TINY_PROJECT,
    "olora rollback": RUN_IN_TINY_PROJECT,
    ".venv/bin/olora promote --force": RUN_IN_TINY_PROJECT,
    ".venv/bin/olora serve --port 5001": "tests/tracking/test_mlflow.py::test_served_model_answers_over_http_in_the_training_template",
    "curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{\"inputs\": {\"prompt\": "
    "[\"What is the capital of France?\"]}, \"params\": {\"max_new_tokens\": 32}}'":
        "tests/tracking/test_mlflow.py::test_served_model_answers_over_http_in_the_training_template",
    "python flows/olora_pipeline.py": "tests/orchestration/test_flows.py::test_isolated_run_is_recorded_and_restores_in_a_fresh_clone",
    "olora restore --model olora-tiny-llama --alias champion": "tests/orchestration/test_flows.py::test_isolated_run_is_recorded_and_restores_in_a_fresh_clone",
    # the one-machine deployment set-up: run line by line, as written, by this test
    'export MLFLOW_TRACKING_URI="sqlite:///$HOME/olora-stores/mlflow.db" PREFECT_API_URL=http://127.0.0.1:4200/api '
    'OLORA_GIT_REMOTE="$PWD" OLORA_GIT_BRANCH=main': ONE_MACHINE,
    'dvc remote add -d --force local ~/olora-stores/dvc-remote && git commit -qm "DVC remote outside the clones" .dvc/config':
        ONE_MACHINE,
    "prefect server start --host 127.0.0.1": ONE_MACHINE,
    "prefect work-pool create olora-process --type process": ONE_MACHINE,
    "olora check --deployment && prefect deploy --all": ONE_MACHINE,
    "prefect worker start --pool olora-process": ONE_MACHINE,
    "prefect deployment run 'olora-pipeline/on-demand' --watch": ONE_MACHINE,
    "olora promote --model olora-tiny-llama": ONE_MACHINE,
    "olora doctor": ONE_MACHINE,
    "git clone -q . ../olora-restored && cd ../olora-restored && olora restore --model olora-tiny-llama --alias champion":
        ONE_MACHINE,
    "prefect deployment run 'olora-sweep/sweep' --param 'grid={\"adapter.r\": [2, 4]}' --param push=false": "tests/orchestration/test_flows.py::test_deployment_runs_on_a_real_server_and_worker",
    "prefect flow-run retry <flow run id>":
        "tests/ops/test_stack.py::test_two_deployment_runs_on_two_workers_recorded_restored_and_a_killed_worker_rerun",
    'olora publish-data data/raw/train.jsonl -m "more rows"':
        "tests/orchestration/test_continuous_training.py::test_new_data_retrains_on_its_commit_and_the_server_follows_the_champion",
    "prefect deployment run 'olora-data-watch/data-watch'":
        "tests/orchestration/test_continuous_training.py::test_new_data_retrains_on_its_commit_and_the_server_follows_the_champion",
    "olora compare --methods olora,lora --ranks 8 --seeds 0,1":
        "tests/orchestration/test_compare.py::test_compare_on_a_real_server_and_worker_retries_a_killed_trial_and_resumes",
    "dvc exp run -S adapter.init=lora -S adapter.r=2": "tests/stages/test_pipeline_dvc.py::test_experiment_variants_rerun_only_what_changed",
    "dvc exp show": RUN_IN_TINY_PROJECT,
    "dvc exp run -S data.source=data/raw/chat.jsonl -S data.format=messages -S data.template=chat": RUN_IN_TINY_PROJECT,
    "dvc exp run -S 'evaluate.tasks=[arc_easy,copa_example]' -S register.promote_metric=arc_easy:1+copa_example:2":
        RUN_IN_TINY_PROJECT,
    "dvc metrics diff": RUN_IN_TINY_PROJECT,
    "dvc plots show plots/val_loss.csv": RUN_IN_TINY_PROJECT,
    # needs the hub: run offline, where it must fail at once with the message naming the fix
    "dvc exp run -S model.name=TinyLlama/TinyLlama-1.1B-Chat-v1.0 -S data.source=yahma/alpaca-cleaned "
    "-S data.max_seq_length=512 -S adapter.r=32 -S adapter.alpha=64 -S train.max_steps=1000 "
    "-S train.micro_batch_size=16 -S train.gradient_accumulation_steps=4 -S evaluate.source=hub "
    "-S evaluate.limit=0": RUN_IN_TINY_PROJECT,
}


def readme_commands(text: str) -> list[str]:
    """The command lines of the README's ```bash blocks, without trailing comments."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_readme_command_is_run_by_a_test():
    commands = readme_commands((REPO / "README.md").read_text())
    assert commands, "no commands found"
    missing = [c for c in commands if c not in COVERED]
    assert not missing, f"README commands that no test runs: {missing}"
    for command in commands:
        target = COVERED[command]
        path, _, name = target.partition("::")
        source = (REPO / path).read_text()
        assert not name or f"def {name}(" in source, f"{command!r} maps to {target}, which does not exist"


def test_the_tiny_project_runs_the_commands_mapped_to_it():
    source = (REPO / "tests/stages/test_pipeline_dvc.py").read_text()
    assert "readme_commands(" in source and "RUN_IN_TINY_PROJECT" in source


def readme_section_block(text: str, heading: str, lang: str = "text") -> str:
    """The first ```lang block after `heading` and before the next `## ` heading."""
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{lang}\n(.*?)```", section, flags=re.S)
    assert match, f"no ```{lang} block under {heading!r}"
    return match.group(1)


def test_readme_layout_map_matches_the_tree():
    block = readme_section_block((REPO / "README.md").read_text(), "## Layout")
    package = REPO / "src" / "olora"
    entries = set()
    for path in package.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        if path.is_dir():
            entries.add(f"{path.name}/")
        elif path.suffix == ".py" and path.name != "__init__.py":
            entries.add(path.name)
    missing = sorted(e for e in entries if not re.search(rf"(?<![\w.]){re.escape(e)}", block))
    assert not missing, f"the README's layout map leaves out {missing}"
    names = {p.name for p in package.rglob("*.py")}
    stale = sorted(t for t in set(re.findall(r"[\w]+\.py\b", block)) if t not in names)
    assert not stale, f"the README's layout map names modules that do not exist under src/olora: {stale}"


DOC_PAGES = ["architecture", "parameters", "tracking-and-serving", "orchestration", "stack", "performance",
             "reliability", "testing"]


def test_readme_is_a_guide():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 240, "the README is a guide: move reference material to docs/"
    links = set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text))
    for page in DOC_PAGES:
        assert f"docs/{page}.md" in links, f"the README does not link to docs/{page}.md"
    for link in links:
        if "://" not in link:
            assert (REPO / link).exists(), f"the README links to {link}, which does not exist"
