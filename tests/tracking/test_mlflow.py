"""MLflow for real: a SQLite store in a temp folder, a real `mlflow server` for the UI/REST check."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from olora.evaluation.result import EvalResult
from olora.stages import STAGES
from olora.tracking.client import Tracking
from olora.tracking import client as tracking
from olora.tracking import registry
from olora.tracking import gate
from olora.layout import Layout
from olora.config import load_config
from olora.errors import OloraError

from conftest import free_port, running_server
from overlay import write_params

pytestmark = pytest.mark.integration
PROMPTS = ["What is the capital of France?", "Name a colour."]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_untied_model_dir) -> Layout:
    root = tmp_path_factory.mktemp("tracked")
    write_params(root, tiny_untied_model_dir, {"evaluate.tasks": ["arc_easy", "piqa"]})
    layout = Layout(root)
    STAGES["prepare"].run(layout)
    STAGES["init"].run(layout)
    STAGES["train"].run(layout)
    STAGES["evaluate_base"].run(layout)
    STAGES["evaluate"].run(layout)
    STAGES["register"].run(layout)
    return layout


def _reference_answers(layout, prompts, max_new_tokens, raw=False, min_new_tokens=4):
    """Greedy answers of base + exported adapter in this process, one prompt at a time, in the training template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olora.data.templates import PromptTemplate, render_prompt

    cfg = load_config(layout.params)
    folder = layout.root / cfg.model.name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(layout.exported)).eval()
    template = PromptTemplate.from_dict(json.loads((layout.data / "prompt_template.json").read_text()))
    assert template.kind == cfg.data.template
    answers = []
    for prompt in prompts:
        text = prompt if raw else render_prompt(template, prompt, "", tokenizer)
        ids = tokenizer(text, return_tensors="pt")
        stop = {} if raw or not template.stop else {"stop_strings": list(template.stop), "tokenizer": tokenizer}
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **stop)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        for marker in () if raw else template.stop:
            answer = answer.split(marker)[0]
        answers.append(answer.strip())
    assert all(answers), answers  # non-empty: the comparison means something
    return answers


def _client(layout):
    return Tracking.of(load_config(layout.params), layout.root).client()


def test_one_run_holds_training_and_evaluation(tracked):
    c = _client(tracked)
    assert tracking.resolve_uri(load_config(tracked.params).tracking, tracked.root).endswith(str(tracked.root / "mlflow.db"))
    runs = c.search_runs([c.get_experiment_by_name("olora").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "olora-r4-" + Path(load_config(tracked.params).model.name).name
    assert run.info.status == "FINISHED"
    assert run.data.params["adapter.r"] == "4" and run.data.params["train.max_steps"] == "6"
    assert run.data.tags["base_model_revision"] == "local" and run.data.tags["version.peft"]
    history = c.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert len(c.get_metric_history(run.info.run_id, "val/loss")) == 2
    m = run.data.metrics
    for key in ("eval/mean_acc", "base/mean_acc", "delta/mean_acc", "eval/arc_easy/acc", "base/piqa/acc", "train/tokens_per_second"):
        assert key in m, key
    assert m["delta/mean_acc"] == pytest.approx(m["eval/mean_acc"] - m["base/mean_acc"])
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "eval.md", "exported_adapter"} <= artifacts
    # a training experiment (MLflow 3's "Machine learning" kind), and the run's data as dataset inputs
    assert c.get_experiment_by_name("olora").tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    from olora.tracking.datasets import file_md5

    for name, file, context in (("train", "train.jsonl", "training"), ("validation", "validation.jsonl", "validation")):
        dataset = inputs.pop(name).dataset
        assert dataset.digest == file_md5(tracked.data / file)  # DVC's hash of the file
        source = json.loads(dataset.source)
        assert (dataset.source_type, source["uri"], source["data_source"]) == ("dvc", f"data/prepared/{file}", "embedded")
        assert json.loads(dataset.profile)["num_rows"] == sum(1 for _ in open(tracked.data / file))
        assert [(tag.key, tag.value) for di in run.inputs.dataset_inputs if di.dataset.name == name for tag in di.tags] == [
            ("mlflow.data.context", context)]
    asked = json.loads(tracked.metrics("eval_adapter").read_text())["questions"]["tasks"]
    assert {name: i.dataset.digest for name, i in inputs.items()} == {t: e["questions"][:32] for t, e in asked.items()}
    arc = json.loads(inputs["arc_easy"].dataset.source)
    assert (inputs["arc_easy"].dataset.source_type, arc["path"], arc["config_name"]) == ("hugging_face", "allenai/ai2_arc", "ARC-Easy")
    train = json.loads(tracked.metrics("train").read_text())
    # Batched, not per value: every value the server holds came in a few requests (one per checkpoint
    # save and one at the end), never one request per logged value. The time share is a benchmark
    # figure (bench/bench_overheads.py), not asserted here: it depends on the machine's load.
    held = sum(len(c.get_metric_history(run.info.run_id, k)) for k in ("train/loss", "val/loss", "train/learning_rate", "train/grad_norm"))
    assert train["tracking_values_sent"] == held >= 14
    assert 1 <= train["tracking_sends"] <= held / 4
    assert 0 <= train["tracking_share_of_train_time"] < 1


def test_register_is_idempotent_and_sets_challenger(tracked):
    first = json.loads(tracked.registration.read_text())
    assert first["registered"] and first["version"] == "1"
    again = STAGES["register"].run(tracked)
    assert again["version"] == "1" and not again["created"]
    c = _client(tracked)
    name = first["name"]
    assert len(c.search_model_versions(f"name='{name}'")) == 1
    assert str(c.get_model_version_by_alias(name, "challenger").version) == "1"


def test_every_version_has_a_model_card(tracked, tmp_path):
    """Hugging Face model-card front matter and the sections a reader needs, as the version's description and in its run."""
    import yaml

    c = _client(tracked)
    reg = json.loads(tracked.registration.read_text())
    version = c.get_model_version(reg["name"], reg["version"])
    from olora.tracking.card import for_registry

    card = Path(c.download_artifacts(reg["run_id"], "model_card/README.md", str(tmp_path))).read_text()
    assert version.description == for_registry(card)  # the UI shows the same card, its front matter as a YAML block
    assert version.description.startswith(f"# {reg['name']} version {reg['version']}")
    assert "## Hugging Face front matter\n\n```yaml\n" in version.description
    _, front, body = card.split("---", 2)  # the artifact: a Hugging Face model card, front matter first
    meta = yaml.safe_load(front)
    cfg = load_config(tracked.params)
    from huggingface_hub import ModelCard

    from olora.tracking.card import EMBEDDED_SET_HUB_IDS

    # a local base folder is no Hub id: the card leaves base_model out; the embedded data names its Hub origins
    assert "base_model" not in meta and meta["library_name"] == "peft"
    assert meta["datasets"] == [EMBEDDED_SET_HUB_IDS[s] for s in cfg.data.embedded_sets]

    results = ModelCard(card).data.eval_results  # huggingface_hub's own reading of the model-index
    scores = json.loads(tracked.metrics("eval_adapter").read_text())
    assert {r.dataset_name: r.metric_value for r in results} == {t: round(e["acc"], 4) for t, e in scores["tasks"].items()}
    for section in ("## Base model", "## Data", "## Adapter and training", "## Evaluation", "## Lineage", "## Reproduce",
                    "## Limitations"):
        assert section in body, section
    assert f"olora restore --version {reg['version']}" in body and "Against the base, on the same questions" in body
    lineage = c.get_run(reg["run_id"]).data.tags
    assert lineage["dvc.data_hash"] in body and lineage["mlflow.source.git.commit"] in body


def _trained_model(layout):
    """The trained model rebuilt from the pipeline's own outputs: residual base + trained A, B."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from olora.modeling.peft_glue import load_for_training

    cfg = load_config(layout.params)
    model = load_for_training(AutoModelForCausalLM.from_pretrained(layout.root / cfg.model.name), layout.init, "olora")
    set_peft_model_state_dict(model, load_file(layout.adapter / "adapter_model.safetensors"))
    return model.eval()


def test_registered_model_round_trips_in_a_fresh_process(tracked):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(tracked.params)
    name = registry.model_name(cfg)
    uri = tracking.resolve_uri(cfg.tracking, tracked.root)
    script = (
        "import json, sys, torch, mlflow\n"
        f"mlflow.set_tracking_uri({uri!r}); mlflow.set_registry_uri({uri!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{name}@challenger')\n"
        f"print(json.dumps(m.predict({{'prompt': {PROMPTS!r}}}, params={{'max_new_tokens': 8, 'min_new_tokens': 4}})))\n"
        "x = torch.arange(100, 116).unsqueeze(0)\n"
        "with torch.no_grad(): logits = m.unwrap_python_model().model(input_ids=x).logits\n"
        "print(json.dumps(logits[0, -1].tolist()))\n"
        f"print(mlflow.artifacts.download_artifacts('models:/{name}@challenger'))\n"
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tracked.root)
    assert out.returncode == 0, out.stderr[-3000:]
    generated, served_logits, folder = out.stdout.strip().splitlines()[-3:]

    # the served model computes the trained model's function (up to float rounding)...
    trained = _trained_model(tracked)
    x = torch.arange(100, 116).unsqueeze(0)
    with torch.no_grad():
        expected_logits = trained(input_ids=x).logits[0, -1]
    torch.testing.assert_close(torch.tensor(json.loads(served_logits)), expected_logits, atol=1e-4, rtol=1e-4)

    # ...and answers exactly what base + exported adapter answers here, in the Alpaca template it was trained on
    assert json.loads(generated) == _reference_answers(tracked, PROMPTS, 8)

    # the downloaded artifacts hold a standard PEFT folder that loads directly
    adapter = Path(folder) / "artifacts" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tracked.root / cfg.model.name), str(adapter)).eval()
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, trained(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_broken_adapter_is_refused_before_registration(tracked, tmp_path):
    import shutil

    broken = tmp_path / "exported"
    shutil.copytree(tracked.exported, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    with pytest.raises(OloraError, match="unreadable or truncated"):
        registry.register(load_config(tracked.params), Tracking.of(load_config(tracked.params), tracked.root), tracked.root, tracked.adapter, broken,
                          EvalResult.read(tracked.metrics("eval_adapter")))


def test_unreachable_server_names_the_uri(tracked, monkeypatch, caplog):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config(tracked.params, {"tracking.retries": 2})
    with caplog.at_level("WARNING", logger="olora"), \
            pytest.raises(tracking.TrackingError, match=rf"http://127.0.0.1:{port} after 2 attempts.*re-run"):
        gate.promote(cfg, Tracking.of(cfg, tracked.root))
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 1 and f"127.0.0.1:{port}" in retries[0], retries  # 2 attempts: one backoff, then the error


def _get(base: str, path: str, **query) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_mlflow_server_shows_runs_metrics_and_registry(tracked):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = lambda port: [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),  # noqa: E731
                            "--backend-store-uri", f"sqlite:///{tracked.root / 'mlflow.db'}", "--workers", "1"]
    with running_server(command, tracked.root, "/health", env) as base:
        exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="olora")["experiment"]
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"]
        assert len(runs) == 1
        run_id = runs[0]["info"]["run_id"]
        history = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
        assert len(history) == 6
        name = registry.model_name(load_config(tracked.params))
        model = _get(base, "/api/2.0/mlflow/registered-models/get", name=name)["registered_model"]
        aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
        assert "challenger" in aliases
        assert _get(base, "/api/2.0/mlflow/registered-models/alias", name=name, alias="challenger")["model_version"]["run_id"] == run_id
        assert urllib.request.urlopen(base + "/", timeout=10).status == 200  # the UI itself
        # the UI's data: the experiment's kind tag and the run's dataset inputs, as the REST API serves them
        assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
        assert {d["dataset"]["name"] for d in runs[0]["inputs"]["dataset_inputs"]} >= {"train", "validation", "arc_easy", "piqa"}
        if os.environ.get("OLORA_SCREENSHOTS"):  # the docs' figure: the run page in the training view
            from continuous import screenshot

            screenshot(f"{base}/#/experiments/{exp['experiment_id']}/runs/{run_id}?workflowType=machine_learning",
                       Path(os.environ["OLORA_SCREENSHOTS"]) / "mlflow_run_datasets.png")


def test_served_model_answers_over_http_in_the_training_template(tracked):
    """`olora serve` (MLflow's scoring app under uvicorn) on a free loopback port: answers equal the in-process reference."""
    import urllib.request

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin"}  # a fresh shell's PATH
    command = lambda port: [str(Path(sys.executable).parent / "olora"), "--root", str(tracked.root), "serve",  # noqa: E731
                            "--alias", "challenger", "--port", str(port)]
    with running_server(command, tracked.root, "/ping", env, log_path=tracked.root / "serve.log") as base:

        def invoke(payload):
            request = urllib.request.Request(f"{base}/invocations", data=json.dumps(payload).encode(),
                                             headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]

        served = invoke({"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]},
                         "params": {"max_new_tokens": 8, "min_new_tokens": 4}})
        assert served == _reference_answers(tracked, PROMPTS, 8)
        raw = invoke({"inputs": {"prompt": PROMPTS}, "params": {"max_new_tokens": 8, "min_new_tokens": 4, "raw": True}})
        assert raw == _reference_answers(tracked, PROMPTS, 8, raw=True)


def _chat_rows(n: int) -> list[list[dict]]:
    """Multi-turn conversations (a system prompt on every other one), as `messages` lists."""
    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": "Answer briefly."}] if i % 2 else []
        rows.append(turns + [{"role": "user", "content": f"What is {i} plus one?"},
                             {"role": "assistant", "content": f"It is {i + 1}."},
                             {"role": "user", "content": "And minus one?"},
                             {"role": "assistant", "content": f"It is {i - 1}."}])
    return rows


def test_a_messages_fine_tune_through_dvc_repro_serves_with_the_chat_template(tmp_path_factory, tiny_untied_model_dir):
    """`dvc repro` on a multi-turn `messages` file: the registered model answers in the chat template, and the same
    conversations as ShareGPT rows train the same adapter."""
    from conftest import make_dvc_project, sh
    from safetensors.torch import load_file

    chat = {"data.template": "chat", "data.format": "messages", "data.source": "data/raw/chat.jsonl",
            "data.validation_fraction": 0.1, "evaluate.tasks": ["arc_easy"], "register.model_name": "olora-chat-test"}
    rows = _chat_rows(40)
    root = make_dvc_project(tmp_path_factory.mktemp("chat"), tiny_untied_model_dir, chat)
    (root / "data/raw/chat.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    sh([str(Path(sys.executable).parent / "dvc"), "repro"], root)
    layout = Layout(root)
    data = json.loads(layout.metrics("data").read_text())
    assert data["conversations"] == 40 and data["assistant_turns"] == 80

    other = tmp_path_factory.mktemp("sharegpt")  # the same conversations as ShareGPT rows: the same adapter
    write_params(other, tiny_untied_model_dir, {**chat, "data.format": "sharegpt"})
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    (other / "data/raw").mkdir(parents=True, exist_ok=True)
    (other / "data/raw/chat.jsonl").write_text("".join(
        json.dumps({"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in r]}) + "\n" for r in rows))
    for stage in ("prepare", "init", "train"):
        STAGES[stage].run(Layout(other))
    trained, from_sharegpt = (load_file(folder / "models/adapter/adapter_model.safetensors") for folder in (root, other))
    assert trained.keys() == from_sharegpt.keys()
    assert all(torch.equal(trained[k], from_sharegpt[k]) for k in trained)
    import mlflow

    from mlflow.tracking import _tracking_service
    from mlflow.tracking._model_registry import utils as registry_utils

    uri = tracking.resolve_uri(load_config(layout.params).tracking, root)
    saved = _tracking_service.utils._tracking_uri, registry_utils._registry_uri
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/olora-chat-test@challenger")
    finally:  # process-wide settings and variables: restored, so later tests in this process see no stray store
        _tracking_service.utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    served = model.unwrap_python_model()
    assert served.template.kind == "chat" and served.template.stop == ("<|im_end|>",)
    assert served.template.chat_template == served.tokenizer.chat_template  # what prepare rendered the turns with
    assert model.metadata.metadata["prompt_template"] == "chat"
    assert model.predict({"prompt": PROMPTS}, params={"max_new_tokens": 8, "min_new_tokens": 4}) == _reference_answers(layout, PROMPTS, 8)
    params = {p.name for p in model.metadata.get_params_schema().params}
    assert params == {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "raw"}


def _retrain(tracked: Layout, folder: Path, overrides: dict) -> str:
    """A retrain of the tracked project in a copy of it (other settings), registered in the same registry."""
    import shutil

    shutil.copytree(tracked.root, folder, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    layout = Layout(folder)
    overrides = {"tracking.uri": f"sqlite:///{tracked.root / 'mlflow.db'}", **overrides}
    for stage in ("train", "evaluate_base", "evaluate", "register"):
        STAGES[stage].run(layout, overrides)
    return json.loads(layout.registration.read_text())["version"]


def test_promotion_gate_on_the_real_registry(tracked, tmp_path, caplog):
    """The gate on real lm-eval results: a seed-only retrain is kept (not significant), a challenger asked other
    questions is refused by name, a clearly better one is promoted; rollback and --force as before."""
    cfg = load_config(tracked.params)
    trk = Tracking.of(cfg, tracked.root)
    c = _client(tracked)
    name = registry.model_name(cfg)
    d = gate.promote(cfg, trk, report=tracked.root / "reports" / "promotion.json")
    assert d.promote and d.reason == "no champion yet"
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    assert json.loads((tracked.root / "reports" / "promotion.json").read_text())["decision"] == "promoted"
    again = gate.promote(cfg, trk)
    assert not again.promote and "already champion" in again.reason
    assert c.get_model_version(name, "1").tags["promotion.decision"] == "promoted"  # the record is kept

    # only the seed changed: whatever the two means say, the gain is noise and the champion stays
    seed = _retrain(tracked, tmp_path / "seed", {"train.seed": cfg.train.seed + 1})
    d = gate.promote(cfg, trk)
    assert not d.promote and d.comparison is not None and d.comparison.n == 2 * 2  # two tasks, two questions each
    assert "interval" in d.reason and ("not significant" in d.reason or "worse than the champion" in d.reason)
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    tags = c.get_model_version(name, seed).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.champion_version"] == "1"
    assert float(tags["promotion.interval_low"]) <= float(tags["promotion.gain"]) <= float(tags["promotion.interval_high"])
    assert set(json.loads(tags["promotion.p_values"])) == {"arc_easy", "piqa"}
    assert "## Promotion decision" in c.get_model_version(name, seed).description  # and in its model card
    decision_file = c.download_artifacts(c.get_model_version(name, seed).run_id, f"promotion/v{seed}.json", str(tmp_path))
    assert json.loads(Path(decision_file).read_text())["n"] == 4

    # scored on fewer questions (one task): never compared by means, nor on the smaller set; refused by name
    other = _retrain(tracked, tmp_path / "other", {"evaluate.tasks": ["arc_easy"]})
    with pytest.raises(OloraError, match=rf"challenger {name} v{other} and champion v1 were scored on different "
                                         r"questions \(tasks \['arc_easy', 'piqa'\] vs \['arc_easy'\]\)"):
        gate.promote(cfg, trk, version=other)
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    # from the project (as `olora promote` runs it): the comparison set is the metric's whole set (both tasks), so
    # the challenger is first scored on the task it lacks, from its registered adapter, by the evaluate stage's own
    # code, and that result is kept in its run for the next gate; the decision names the set
    d = gate.promote(cfg, trk, version=other, root=tracked.root)
    assert d.comparison is not None and set(d.comparison.tasks) == {"arc_easy", "piqa"} and d.comparison.n == 4
    assert f"on 4 questions of 2 tasks (limit 2 a task); v{other} re-scored on 4" in d.reason
    tags = c.get_model_version(name, other).tags
    assert tags["promotion.question_set"] == f"4 questions of 2 tasks (limit 2 a task); v{other} re-scored on 4"
    assert f"- compared on 4 questions of 2 tasks" in c.get_model_version(name, other).description
    other_run = c.get_model_version(name, other).run_id
    assert len(c.list_artifacts(other_run, "eval/rescored")) == 1
    v1_run = c.get_model_version(name, "1").run_id
    assert not c.list_artifacts(v1_run, "eval/rescored")  # the champion already held the whole set
    with caplog.at_level("INFO", logger="olora"):
        gate.promote(cfg, trk, version=other, root=tracked.root)
    assert any("was scored on these questions before" in r.getMessage() for r in caplog.records)
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    # a challenger asked more rows than the champion: the champion must be scored on them; when its adapter cannot
    # be loaded any more, refused by name (never a comparison on the champion's smaller set)
    more = _retrain(tracked, tmp_path / "more", {"evaluate.limit": 3})
    exported = Path(c.download_artifacts(v1_run, "exported_adapter", str(tmp_path / "where")))
    stored = Path(c.get_run(v1_run).info.artifact_uri.removeprefix("file://")) / "exported_adapter"
    assert exported.is_dir() and stored.is_dir()
    import shutil

    shutil.rmtree(stored)
    with pytest.raises(OloraError, match=rf"the exported adapter of {name} version 1 could not be loaded from its run"):
        gate.promote(cfg, trk, version=more, root=tracked.root)

    # clearly better on the same questions: the champion's questions, every one answered right by the challenger
    better = _clearly_better_version(c, name, tmp_path)
    d = gate.promote(cfg, trk, version=better)
    assert d.promote and "interval lies above register.min_improvement" in d.reason and d.comparison.low > 0
    assert str(c.get_model_version_by_alias(name, "champion").version) == better
    assert c.get_model_version(name, better).tags["previous_champion"] == "1"

    assert registry.rollback(cfg, trk) == "1"
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"

    forced = gate.promote(cfg, trk, version=seed, force=True)
    assert forced.promote and forced.forced and c.get_model_version(name, seed).tags["promotion.forced"] == "true"
    with pytest.raises(OloraError, match=r"registered model 'nope' not found; registered models: \['olora-"):
        gate.promote(cfg, trk, name="nope")
    with pytest.raises(OloraError, match=r"has no version 99; versions: \[1, "):
        gate.promote(cfg, trk, version="99")


def test_the_sequential_gate_looks_again_only_while_unclear(tracked, tmp_path):
    """register.stages [1, 3] on the real registry with real lm-eval: the first look is cut from what both sides hold
    (nothing scored), is unclear at 2 questions, so both sides are scored on 3 a task and the last look decides; the
    decision records every look (n, interval, adjusted level, seconds) and names them."""
    cfg = load_config(tracked.params)
    trk = Tracking.of(cfg, tracked.root)
    c = _client(tracked)
    name = registry.model_name(cfg)
    if c.get_registered_model(name).aliases.get("champion") is None:
        gate.promote(cfg, trk)
    champion = str(c.get_model_version_by_alias(name, "champion").version)
    seed = _retrain(tracked, tmp_path / "seq", {"train.seed": cfg.train.seed + 2})
    staged = load_config(tracked.params, {"register.stages": [1, 3]})
    d = gate.promote(staged, trk, version=seed, root=tracked.root, report=tmp_path / "decision.json")
    record = json.loads((tmp_path / "decision.json").read_text())
    looks = record["looks"]
    assert [lk["n"] for lk in looks] == [2, 6] and [lk["outcome"] for lk in looks][0] == "continue"
    assert looks[1]["outcome"] in ("keep", "futile") and not d.promote  # a seed-only retrain is kept
    assert looks[0]["seconds"] == 0 and looks[1]["seconds"] > 0  # look 1 from held results; look 2 scored both
    assert looks[0]["level"] > looks[1]["level"] > 0.95  # the error is spent: stricter early, near 95 % at the end
    assert looks[1]["low"] == pytest.approx(d.comparison.low) and d.comparison.confidence == looks[1]["level"]
    # each side held the first 2 of each task (its own evaluation): look 2 scored only the third of each
    assert f"6 questions of 2 tasks (limit 3 a task); v{champion} re-scored on 2; v{seed} re-scored on 2; look 2 of 2" \
        " (obrien-fleming spending; looks: n = 2: [" in d.reason
    assert json.loads(c.get_model_version(name, seed).tags["promotion.looks"])[1]["n"] == 6
    assert str(c.get_model_version_by_alias(name, "champion").version) == champion

    # what the look scored is what scoring the whole set at once gives: the held rows kept, the new ones the same
    from olora.tracking import rescore

    target = gate.comparison_set(staged, *(gate.version_questions(c, name, v)[1] for v in (seed, champion)))
    target = {**target, "limit": 3}
    target["sha256"] = hashlib.sha256(json.dumps({k: v for k, v in target.items() if k != "sha256"},
                                                 sort_keys=True).encode()).hexdigest()
    rows, fingerprint, scored = rescore.rescore(staged, c, name, seed, target, tracked.root)  # the look's, cached
    assert scored == 2 and len(rows) == 6
    whole, whole_fp, scored = rescore.rescore(staged, c, name, seed, {**target, "sha256": "whole-in-one-run"}, tracked.root)
    assert scored == 6 and whole_fp == fingerprint
    for a, b in zip(rows, whole):
        assert (a["task"], a["doc_id"], a["doc_hash"], a["acc"]) == (b["task"], b["doc_id"], b["doc_hash"], b["acc"])
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)

    # the designs side by side (experiments/gate_designs.py, issue 32's tables): the scores cached above are reused
    from conftest import BIN

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([str(BIN / "python"), str(repo / "experiments" / "gate_designs.py"), seed, champion, "--root",
                          str(tracked.root), "--stages", "1,3", "--metrics", "mean_acc"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| mean_acc |")]
    assert [r.split(" | ")[1] for r in rows] == ["fixed, 1 a task", "sequential [1, 3]", "fixed, 3 a task"]
    assert rows[0].split(" | ")[4] == "2" and rows[2].split(" | ")[4] == "6" and rows[1].split(" | ")[3] == "2"
    assert str(c.get_model_version_by_alias(name, "champion").version) == champion  # nothing promoted

    # from two evaluations' files (--evaluations: a pair with no registered side, the base model): the same looks
    import shutil

    from olora.core.paired import compare
    from olora.evaluation import samples

    folders = {}
    for side, metrics in (("adapter", "eval_adapter"), ("base", "eval_base")):
        folders[side] = tmp_path / "evaluations" / side
        folders[side].mkdir(parents=True)
        shutil.copy(tracked.samples(side), folders[side] / "samples.csv")
        shutil.copy(tracked.metrics(metrics), folders[side] / "metrics.json")
    held = len(samples.read_samples(tracked.samples("base")))
    per_task = held // 2
    out = subprocess.run([str(BIN / "python"), str(repo / "experiments" / "gate_designs.py"), "--evaluations",
                          str(folders["adapter"]), str(folders["base"]), "--root", str(tracked.root), "--stages",
                          f"1,{per_task}", "--metrics", "mean_acc"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| mean_acc |")]
    assert [r[1] for r in rows] == ["fixed, 1 a task", f"sequential [1, {per_task}]", f"fixed, {per_task} a task"]
    assert rows[0][4] == "2" and rows[2][4] == str(held)
    direct = compare(samples.table(samples.read_samples(tracked.samples("base"))),
                     samples.table(samples.read_samples(tracked.samples("adapter"))), 0.95, 1000)
    assert rows[2][6] == f"{direct.diff * 100:+.2f}"  # the whole-set design is the plain paired comparison
    assert 0 < float(rows[0][5]) < float(rows[2][5])  # seconds at the measured rates: more questions cost more

    # experiments/whole_splits.py (item 4's tables) on the same files: each evaluation's rate, the pair against the base
    out = subprocess.run([str(BIN / "python"), str(repo / "experiments" / "whole_splits.py"), str(tmp_path / "evaluations"),
                          "--root", str(tracked.root)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    paired = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| adapter | mean_acc |")]
    assert len(paired) == 1 and paired[0][2] == str(held) and paired[0][3] == f"{direct.diff * 100:+.2f}"
    timing = json.loads(tracked.metrics("eval_base").read_text())["timing"]
    assert f"| base | {json.loads(tracked.metrics('eval_base').read_text())['limit']} | {held} | {timing['requests']} |" in out.stdout
    assert "on the same questions" in (folders["adapter"] / "report.md").read_text()


def test_eval_plan_from_the_base_models_per_question_results(tracked, tmp_path):
    """`olora eval-plan --mde 1.5` on an evaluated project: per metric the questions per task, whether the splits hold
    them and the time at the request rate evaluate_base measured; refused for an MDE <= 0 or no per-question results."""
    import shutil

    from conftest import BIN
    from olora.core.paired import plan
    from olora.evaluation import samples

    def olora(*args, cwd=tracked.root):
        return subprocess.run([str(BIN / "olora"), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})

    out = olora("eval-plan", "--mde", "1.5")
    assert out.returncode == 0, out.stderr
    timing = json.loads(tracked.metrics("eval_base").read_text())["timing"]
    assert timing["requests"] > 0 and timing["seconds"] > 0
    base, tuned = samples.read_samples(tracked.samples("base")), samples.read_samples(tracked.samples("adapter"))
    assert "the paired differences of the fine-tuned model and the base" in out.stdout
    from olora.evaluation.plan import _variances

    lines = out.stdout.splitlines()
    for pooled, label in ((False, "mean_acc (every task weighing the same): "),
                          (True, "pooled_acc (every question weighing the same): ")):
        expected = plan(_variances(base, tuned)[0], {"arc_easy": 570, "piqa": 1838}, 0.015, pooled=pooled)
        line = next(line for line in lines if line.startswith(label))
        assert (f"{expected.per_task} questions per task" in line) if expected.per_task else ("not reachable" in line)
    assert out.stdout.count("requests/s evaluate_base measured here") == 2

    for bad in ("0", "-1"):
        refused = olora("eval-plan", "--mde", bad)
        assert refused.returncode == 2 and "is not a difference that can be detected; give a number of accuracy " \
            "points > 0, e.g. --mde 1.5" in refused.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tracked.params, bare / "params.yaml")
    refused = olora("eval-plan", "--mde", "1.5", cwd=bare)
    assert refused.returncode == 2 and "no per-question results of the base model" in refused.stderr
    assert "run `dvc repro evaluate_base` first" in refused.stderr


@pytest.mark.fault
def test_a_promotion_killed_after_the_alias_moved_is_completed_by_the_next_run(tracked, tmp_path):
    """`olora promote` moves the alias first, then records the decision: killed in between (SIGKILL at the marker),
    the champion has no promotion record and no tag claims anything untrue; run again, it records the decision."""
    from conftest import BIN, PausedRun

    cfg = load_config(tracked.params)
    c = _client(tracked)
    name = registry.model_name(cfg)
    if c.get_registered_model(name).aliases.get("champion") is None:
        gate.promote(cfg, Tracking.of(cfg, tracked.root))
    before = str(c.get_model_version_by_alias(name, "champion").version)
    better = _clearly_better_version(c, name, tmp_path)
    c.set_model_version_tag(name, better, "promotion.decision", "rejected")  # an earlier decision on it
    run = PausedRun([str(BIN / "olora"), "promote", "--version", better], tracked.root, ["promote:alias-moved"],
                    tmp_path / "pause")
    run.wait("promote:alias-moved", 300)
    run.kill()
    assert str(c.get_model_version_by_alias(name, "champion").version) == better
    tags = c.get_model_version(name, better).tags
    # the earlier "rejected" was cleared before the alias moved: no record contradicts the champion
    assert tags["previous_champion"] == before and not any(k.startswith("promotion.") for k in tags)

    out = subprocess.run([str(BIN / "olora"), "promote", "--version", better], cwd=tracked.root, capture_output=True,
                         text=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("PROMOTED: ") and "recorded after an interrupted promotion" in out.stdout
    tags = c.get_model_version(name, better).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.forced"] == "false"
    assert tags["promotion.champion_version"] == before and float(tags["promotion.interval_low"]) > 0
    assert "## Promotion decision" in c.get_model_version(name, better).description
    assert str(c.get_model_version_by_alias(name, "champion").version) == better
    again = gate.promote(cfg, Tracking.of(cfg, tracked.root), version=better)  # consistent now: nothing to decide
    assert not again.promote and "already champion" in again.reason
    assert registry.rollback(cfg, Tracking.of(cfg, tracked.root)) == before


def _clearly_better_version(c, name: str, folder: Path) -> str:
    """A version whose run holds v1's evaluation with every question answered right: the same questions and
    fingerprint (the evaluate stage's own files, changed in their outcomes only), so the gate must promote it."""
    from olora.evaluation import samples

    v1 = c.get_model_version(name, "1")
    rows_file = Path(c.download_artifacts(v1.run_id, "eval/adapter_samples.csv", str(folder / "v1")))
    metrics_file = Path(c.download_artifacts(v1.run_id, "eval/eval_adapter.json", str(folder / "v1")))
    rows = [{**r, "acc": 1, "acc_norm": 1 if r["acc_norm"] is not None else None} for r in samples.read_samples(rows_file)]
    out = folder / "better"
    samples.write_samples(out / "adapter_samples.csv", rows)
    metrics = json.loads(metrics_file.read_text())
    metrics["mean_acc"] = 1.0
    (out / "eval_adapter.json").write_text(json.dumps(metrics))
    run = c.create_run(c.get_run(v1.run_id).info.experiment_id)
    for path in (out / "adapter_samples.csv", out / "eval_adapter.json"):
        c.log_artifact(run.info.run_id, str(path), "eval")
    version = c.create_model_version(name, v1.source, run_id=run.info.run_id, tags={"mean_acc": "1.0"})
    return str(version.version)
