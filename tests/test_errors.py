"""The bad-input catalogue: every user-facing error, triggered through the entry point a user hits.

Each `Case` names what triggers it, the exact first line of the message it must produce (temp
paths normalised: the project folder to `<project>`, other temp files to `<tmp>`) and the fix; its
function makes the mistake through the real entry point (`olora <command>` via `olora.cli.main`,
`load_config`, `resolve_model`, `check_adapter_dir`, ...) and returns the error text.

docs/errors.md is generated from this list, and a test fails when it is stale:

    .venv/bin/python tests/test_errors.py --write docs/errors.md

A first line that starts with `(traceback)` is an error the code does not catch yet: the user
sees a Python traceback ending in that line (fixes suggested in docs/errors.md's "fix" column).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.fault

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"
MODEL = "models/base/tiny-llama"  # where the tiny project keeps its base model (model.name)
REGISTERED = "olora-tiny-llama"  # the registered model of the registry project

# category -> (section title, one-line introduction); the order is the document's
CATEGORIES: dict[str, tuple[str, str]] = {
    "params": ("Parameters (params.yaml and --set)",
               "`load_config` checks every key, type and range before any stage starts (also `olora check`)."),
    "train": ("Training processes and batches",
              "The train block's batch settings and `train.processes`, checked before any model loads."),
    "data": ("Fine-tuning data (the prepare stage)",
             "`olora prepare` / `dvc repro prepare`: `data.source` and the rows it holds."),
    "model": ("Base model (model.name) and the layers it has",
              "Resolved before any weights load; shape-dependent adapter settings are checked on the meta device."),
    "adapter": ("Adapter folders",
                "`check_adapter_dir` runs before evaluate and register read an exported adapter."),
    "evaluate": ("Evaluation tasks",
                 "The evaluate block, checked with the rest of params.yaml; the tasks themselves (stock, and the team's "
                 "task YAMLs under evals/) by `olora evaluate` before any model loads."),
    "order": ("Stages run out of order", "A stage whose input an earlier stage writes, run before that stage."),
    "registry": ("Tracking and the model registry",
                 "`olora promote` / `olora rollback` / `olora register` against an MLflow store (SQLite here)."),
    "cli": ("Command line", "Mistakes in the `olora` command itself (argparse answers with exit code 2 too)."),
    "publish": ("Publishing data (olora publish-data)",
                "Checked before anything is added, pushed or committed; a failed `dvc push` stops before the commit."),
    "deployment": ("Deployment runs (stores that outlive a worker's clone)",
                   "Every flow run and the data watcher check, before any stage, that the MLflow store and the DVC "
                   "remote lie outside the folders deleted when the run ends (by hand: `olora check --deployment`)."),
    "serving": ("Serving requests",
                "Requests to `olora serve` or `mlflow models serve` (the registered pyfunc model): each is answered "
                "HTTP 400 with this message (MLflow's INVALID_PARAMETER_VALUE) before any generation."),
}
EMPTY_CATEGORY: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    trigger: str
    """What the user did (markdown)."""
    message: str
    """The exact first line of the error, temp paths normalised to <project> / <tmp>."""
    fix: str
    """How to fix it (markdown)."""
    run: Callable[["Ctx"], str]
    """Makes the mistake through the real entry point; returns the error text."""


# ---------------------------------------------------------------- how a case reaches the code


class Ctx:
    """A case's world: an empty project folder (`root`, shown as <project>) in a fresh temp folder (<tmp>)."""

    def __init__(self, tmp: Path, request) -> None:
        self.tmp = tmp
        self.root = tmp / "project"
        self.root.mkdir()
        self.request = request
        self.monkeypatch = request.getfixturevalue("monkeypatch")
        self.roots = [self.root]
        # determinism: no tracking server or hub from the environment
        self.monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def params(self, text: str) -> Path:
        """Write <project>/params.yaml verbatim (keys left out take their defaults)."""
        path = self.root / "params.yaml"
        path.write_text(text)
        return path

    def project(self, extra: dict | None = None) -> Path:
        """<project> as a tiny pipeline project: the tiny Llama under models/base/ (hard links), tiny params."""
        from olora.overlay import write_params

        model = self.request.getfixturevalue("tiny_model_dir")
        target = self.root / MODEL
        if not target.exists():
            shutil.copytree(model, target, copy_function=_link)
        write_params(self.root, target, extra)  # the model is in place already: nothing is copied
        (self.root / "data" / "raw").mkdir(parents=True, exist_ok=True)
        return self.root

    def file(self, rel: str, content: str | bytes) -> Path:
        """Write a file under <project> (parents created)."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def registry(self) -> Path:
        """The shared registry project (its own <project>): a SQLite MLflow store with registered versions."""
        root = self.request.getfixturevalue("registry_project")
        self.roots.append(root)
        return root

    def normalise(self, text: str) -> str:
        for root in self.roots:
            for form in sorted({str(root.resolve()), str(root)}, key=len, reverse=True):
                text = text.replace(form, "<project>")
        for form in sorted({str(self.tmp.resolve()), str(self.tmp)}, key=len, reverse=True):
            text = text.replace(form, "<tmp>")
        return text


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def raises(fn: Callable[[], object], *types: type[BaseException]) -> str:
    """Call fn; it must raise one of `types` (any Exception by default). Returns the message."""
    try:
        fn()
    except types or (Exception,) as exc:
        return str(exc)
    raise AssertionError("no error was raised")


def cli(root: Path, *argv: str) -> str:
    """`olora --root ROOT ARGV...`: it must exit with code 2; returns its error line(s) from stderr."""
    from olora.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["--root", str(root), *argv])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    text = err.getvalue()
    assert code == 2, f"exit code {code}, stderr:\n{text}"
    found = re.search(r"^olora(?: \S+)?: error: .*", text, flags=re.M | re.S)
    assert found, f"no `olora <command>: error:` line in stderr:\n{text}"
    return found.group(0)


def uncaught(fn: Callable[[], object], kind: type[BaseException]) -> str:
    """An uncaught error: what the user sees is a traceback ending in `Kind: message`."""
    try:
        fn()
    except kind as exc:
        return f"(traceback) {type(exc).__name__}: {exc}"
    raise AssertionError(f"no {kind.__name__} was raised")


def _base_scores(ctx) -> None:
    """The base model's scores, so `evaluate adapter` goes on to look at the adapter folder."""
    (ctx.root / "metrics").mkdir(exist_ok=True)
    shutil.copy(REPO / "metrics" / "eval_base.json", ctx.root / "metrics" / "eval_base.json")  # a whole result


TEAM_TASK = """task: copa_ours
dataset_path: json
dataset_kwargs:
  data_files:
    validation: data/copa_ours.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{premise}}"
doc_to_choice: "{{[choice1, choice2]}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
TEAM_ROW = '{"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.", "label": 1}\n'


def team_task(ctx: Ctx, yaml_text: str = TEAM_TASK, tasks: str = "[arc_easy, copa_ours]", data: bool = True) -> str:
    """`olora evaluate base` in the tiny project with <project>/evals/copa_ours.yaml holding `yaml_text`."""
    ctx.project()
    ctx.file("evals/copa_ours.yaml", yaml_text)
    if data:
        ctx.file("evals/data/copa_ours.jsonl", TEAM_ROW)
    return cli(ctx.root, "--set", f"evaluate.tasks={tasks}", "evaluate", "base")


_GENERATOR: dict[str, object] = {}


def serve(ctx, model_input, params: dict | None = None) -> str:
    """The registered model's predict() on the tiny Llama (its context: 512 tokens), as the scoring server calls it."""
    from mlflow.exceptions import MlflowException

    from olora.data.templates import resolve_template
    from olora.serving.pyfunc import AdapterGenerator

    if "g" not in _GENERATOR:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = ctx.request.getfixturevalue("tiny_model_dir")
        g = AdapterGenerator()
        g.model, g.tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
        if g.tokenizer.pad_token is None:
            g.tokenizer.pad_token = g.tokenizer.eos_token
        g.template = resolve_template("alpaca")
        _GENERATOR["g"] = g
    try:
        _GENERATOR["g"].predict(None, model_input, params)
    except MlflowException as exc:
        assert exc.error_code == "INVALID_PARAMETER_VALUE", exc.error_code
        return exc.message
    raise AssertionError("the request was accepted")


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"answer {i}"} for i in range(20)]


def prepare(ctx: Ctx, rel: str, content: str | bytes, *argv: str) -> str:
    """`olora prepare` in the tiny project with data.source=<rel> holding `content`."""
    ctx.project()
    ctx.file(rel, content)
    return cli(ctx.root, "--set", f"data.source={rel}", *argv, "prepare")


def records(ctx: Ctx, rel: str | None, content: str | bytes = "", **data) -> str:
    """`load_records` (what the prepare stage reads the data with) on <project>/REL holding `content`.

    Cheaper than `olora prepare` (no tokenizer), with the same message minus the `olora prepare: error: ` prefix."""
    from olora.config import DataConfig
    from olora.data.sources import load_records
    from olora.errors import OloraError

    if rel is not None:
        ctx.file(rel, content)
        data = {"source": rel, **data}
    return raises(lambda: load_records(DataConfig(**data), {"dropped_invalid": 0}, ctx.root), OloraError)


GOOD_TURNS = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}]


def conversations(ctx: Ctx, bad_turns: list[dict]) -> str:
    """`load_records` with data.format=messages on data/raw/chat.jsonl: a good row, then BAD_TURNS (row 2)."""
    return records(ctx, "data/raw/chat.jsonl", jsonl({"messages": GOOD_TURNS}, {"messages": bad_turns}),
                   format="messages", template="chat")


def _publish(ctx: Ctx, path: str, origin: bool = False) -> str:
    """`olora publish-data PATH` in a git + DVC checkout of <project> (with `origin` when asked, no DVC remote)."""
    import subprocess

    ctx.monkeypatch.delenv("OLORA_DVC_REMOTE_URL", raising=False)
    for args in (["git", "init", "-q", "-b", "main"], *([["git", "remote", "add", "origin", str(ctx.tmp / "team.git")]] if origin else []),
                 [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(args, cwd=ctx.root, check=True, capture_output=True)
    ctx.file("data/raw/rows.jsonl", jsonl(*ROWS))
    (ctx.tmp / "rows.jsonl").write_text(jsonl(*ROWS))
    return cli(ctx.root, "publish-data", path)


def _deployment(ctx: Ctx, tracking: bool, remote: str) -> str:
    """`olora check --deployment` in a committed git + DVC checkout of <project> whose DVC remote `local` is `remote`
    (as written in .dvc/config), with MLFLOW_TRACKING_URI an absolute store under <tmp> when `tracking`."""
    import subprocess

    ctx.monkeypatch.delenv("OLORA_DVC_REMOTE_URL", raising=False)
    if tracking:
        ctx.monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ctx.tmp / 'mlflow.db'}")
    ctx.params("")
    for args in (["git", "init", "-q", "-b", "main"], [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(args, cwd=ctx.root, check=True, capture_output=True)
    with (ctx.root / ".dvc" / "config").open("a") as config:
        config.write(f"[core]\n    remote = local\n['remote \"local\"']\n    url = {remote}\n")
    for args in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@e.com", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=ctx.root, check=True, capture_output=True)
    return cli(ctx.root, "check", "--deployment")


def _data_config(**data) -> str:
    from olora.config import DataConfig

    return raises(lambda: DataConfig(**data).validate())


def _without_chat_template() -> str:
    """`resolve_template` (prepare's first step) on the embedded tokenizer with its chat template removed."""
    from transformers import AutoTokenizer

    from olora.data.templates import resolve_template
    from olora.modeling.assets import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("SmolLM2-135M-Instruct"))
    tokenizer.chat_template = None
    return raises(lambda: resolve_template("chat", tokenizer))


def load(ctx: Ctx, text: str) -> str:
    """load_config on a params.yaml holding `text`."""
    from olora.config import load_config
    from olora.errors import ConfigError

    return raises(lambda: load_config(ctx.params(text)), ConfigError)


def distributed_check(ctx: Ctx, device: str, overrides: dict, model_path: str | None = None, quantization: str = "none") -> str:
    """What `olora train` runs before launching train.processes > 1 processes, on a machine whose device is `device`."""
    import torch

    from olora.config import load_config
    from olora.errors import ConfigError
    from olora.modeling.runtime import Runtime
    from olora.training.distributed import check_distributed

    cfg = load_config(ctx.params(""), overrides)
    runtime = Runtime(torch.device(device), torch.float32, quantization)
    return raises(lambda: check_distributed(cfg, runtime, model_path), ConfigError)


def runtime_check(ctx: Ctx, overrides: dict) -> str:
    """What every model stage resolves first (device, dtype, quantisation), on this CPU machine."""
    from olora.config import load_config
    from olora.errors import ConfigError
    from olora.modeling.runtime import resolve_runtime

    cfg = load_config(ctx.params(""), overrides)
    return raises(lambda: resolve_runtime(cfg.model, cfg.runtime), ConfigError)


def adapter_dir(ctx: Ctx, config: str | None = '{"peft_type": "LORA", "r": 4}', weights: str = "whole") -> Path:
    """<project>/models/exported with the given adapter_config.json text and weights: whole | truncated | empty | None."""
    import torch
    from safetensors.torch import save_file

    folder = ctx.root / "models" / "exported"
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "adapter_config.json").write_text(config)
    if weights is not None:
        path = folder / "adapter_model.safetensors"
        save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 64)}, str(path))
        data = path.read_bytes()
        path.write_bytes({"whole": data, "truncated": data[: len(data) // 2], "empty": b""}[weights])
    return folder


def check_adapter(ctx: Ctx, **kwargs) -> str:
    from olora.errors import OloraError
    from olora.io import check_adapter_dir

    folder = adapter_dir(ctx, **kwargs)
    return raises(lambda: check_adapter_dir(folder), OloraError)


def model_folder(ctx: Ctx, rel: str, config: dict | None, weights: bool) -> Path:
    """A model folder at <project>/REL: the tiny Llama's tokenizer, `config` as config.json, its weights or not."""
    src = ctx.request.getfixturevalue("tiny_model_dir")
    target = ctx.root / rel
    target.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "config.json" or (f.suffix == ".safetensors" and not weights):
            continue
        _link(str(f), str(target / f.name))
    if config is not None:
        (target / "config.json").write_text(json.dumps(config))
    return target


def tiny_config(ctx: Ctx, **changes) -> dict:
    return {**json.loads((ctx.request.getfixturevalue("tiny_model_dir") / "config.json").read_text()), **changes}


def resolve(ctx: Ctx, name: str, root: bool = True) -> str:
    from olora.config import ModelConfig
    from olora.errors import OloraError
    from olora.modeling.models import resolve_model

    return raises(lambda: resolve_model(ModelConfig(name=name), ctx.root if root else None), OloraError)


# ---------------------------------------------------------------- the catalogue

CASES: list[Case] = [
    # ---- params
    Case("params-file-missing", "params",
         "`olora check` (any command) in a folder without params.yaml",
         "olora check: error: parameters file <project>/params.yaml not found; run from the project root or pass --root",
         "Run from the project root, or pass `olora --root <project> ...`.",
         lambda ctx: cli(ctx.root, "check")),
    Case("params-not-yaml", "params",
         "params.yaml with broken YAML syntax (`adapter: [r: 1`)",
         "<project>/params.yaml is not valid YAML (line 2, column 1: expected ',' or ']', but got '<stream end>'); fix the syntax there",
         "Fix the syntax at the line and column named.",
         lambda ctx: load(ctx, "adapter: [r: 1\n")),
    Case("params-not-a-mapping", "params",
         "params.yaml that is a list, not `block: {key: value}`",
         "<project>/params.yaml: params must be a mapping of keys to values, got ['adapter', {'r': 8}]",
         "Write params.yaml as blocks of keys (see the shipped params.yaml).",
         lambda ctx: load(ctx, "- adapter\n- r: 8\n")),
    Case("block-not-a-mapping", "params",
         "A block given a value instead of keys (`adapter: 8`)",
         "<project>/params.yaml: adapter must be a mapping of keys to values, got 8",
         "Put the key under its block: `adapter:` then `  r: 8`.",
         lambda ctx: load(ctx, "adapter: 8\n")),
    Case("misspelt-block", "params",
         "A misspelt block name (`adaptor:`)",
         "<project>/params.yaml: unknown key(s) 'adaptor' at the top level; did you mean 'adapter' for 'adaptor'? allowed: adapter, data, evaluate, model, register, runtime, tracking, train",
         "Use the suggested block name.",
         lambda ctx: load(ctx, "adaptor:\n  r: 4\n")),
    Case("unknown-key-did-you-mean", "params",
         "A misspelt key (`train.learnig_rate`)",
         "<project>/params.yaml: unknown key(s) 'learnig_rate' in block 'train'; did you mean 'train.learning_rate' for 'learnig_rate'? allowed: epochs, eval_steps, gradient_accumulation_steps, gradient_checkpointing, learning_rate, logging_steps, lr_scheduler, max_eval_examples, max_grad_norm, max_steps, micro_batch_size, nodes, padding_free, processes, save_steps, seed, strategy, warmup_steps, weight_decay",
         "Use the suggested key.",
         lambda ctx: load(ctx, "train:\n  learnig_rate: 1e-4\n")),
    Case("unknown-key", "params",
         "A key that does not exist and resembles none (`adapter.rank`)",
         "<project>/params.yaml: unknown key(s) 'rank' in block 'adapter'; allowed: alpha, calibration_batch, calibration_samples, dora, dropout, eva_rho, init, pissa_niter, r, rslora, seed, target_modules",
         "Use one of the allowed keys (docs/parameters.md explains each).",
         lambda ctx: load(ctx, "adapter:\n  rank: 8\n")),
    Case("unknown-key-set", "params",
         "A misspelt key in an override (`olora --set adapter.alpah=8 check`, or `dvc exp run -S`)",
         "olora check: error: <project>/params.yaml: unknown key(s) 'alpah' in block 'adapter'; did you mean 'adapter.alpha' for 'alpah'? allowed: alpha, calibration_batch, calibration_samples, dora, dropout, eva_rho, init, pissa_niter, r, rslora, seed, target_modules",
         "Use the suggested key.",
         lambda ctx: (ctx.params(""), cli(ctx.root, "--set", "adapter.alpah=8", "check"))[1]),
    Case("wrong-type-int-string", "params",
         "An integer setting given as a quoted string (`adapter.r: '8'`)",
         "<project>/params.yaml: adapter.r='8' has the wrong type; expected int",
         "Write the number without quotes.",
         lambda ctx: load(ctx, "adapter:\n  r: '8'\n")),
    Case("wrong-type-int-float", "params",
         "An integer setting given a fraction (`adapter.r: 8.5`)",
         "<project>/params.yaml: adapter.r=8.5 has the wrong type; expected int",
         "Use a whole number.",
         lambda ctx: load(ctx, "adapter:\n  r: 8.5\n")),
    Case("wrong-type-bool", "params",
         "A boolean given as a quoted string (`tracking.enabled: \"false\"`)",
         "<project>/params.yaml: tracking.enabled='false' has the wrong type; expected bool",
         "Write `true` or `false` without quotes.",
         lambda ctx: load(ctx, "tracking:\n  enabled: \"false\"\n")),
    Case("null-value", "params",
         "A key with no value (`adapter:` / `  r:`)",
         "<project>/params.yaml: adapter.r has no value (YAML null); expected int: set a value, or remove the key to use its default",
         "Give it a value, or delete the line to use the default.",
         lambda ctx: load(ctx, "adapter:\n  r:\n")),
    Case("float-string-refused", "params",
         "A float that is not a number (`train.learning_rate: 3e-4x`); `3e-4`, which YAML 1.1 reads as a string, is accepted",
         "<project>/params.yaml: train.learning_rate='3e-4x' has the wrong type; expected float (a number, e.g. 0.0003 or 3e-4)",
         "Write a number: `3e-4`, `3.0e-4` or `0.0003`.",
         lambda ctx: _float_strings(ctx)),
    Case("out-of-range-int", "params",
         "A count below its minimum (`adapter.r: 0`)",
         "<project>/params.yaml: adapter.r=0 is out of range; it must be >= 1",
         "Use a value in the range named.",
         lambda ctx: load(ctx, "adapter:\n  r: 0\n")),
    Case("out-of-range-positive", "params",
         "A negative learning rate (`train.learning_rate: -1e-4`)",
         "<project>/params.yaml: train.learning_rate=-0.0001 is out of range; it must be a finite number > 0",
         "Use a finite number > 0.",
         lambda ctx: load(ctx, "train:\n  learning_rate: -1e-4\n")),
    Case("not-finite", "params",
         "A learning rate of `.nan` (or `.inf`)",
         "<project>/params.yaml: train.learning_rate=nan is out of range; it must be a finite number > 0",
         "Use a finite number > 0.",
         lambda ctx: load(ctx, "train:\n  learning_rate: .nan\n")),
    Case("out-of-range-fraction", "params",
         "`data.validation_fraction: 1.0` (nothing left to train on)",
         "<project>/params.yaml: data.validation_fraction=1.0 is out of range; it must lie strictly between 0.0 and 1.0",
         "Use a fraction strictly between 0 and 1, e.g. 0.05.",
         lambda ctx: load(ctx, "data:\n  validation_fraction: 1.0\n")),
    Case("out-of-range-dropout", "params",
         "`adapter.dropout: 1.0`",
         "<project>/params.yaml: adapter.dropout=1.0 is out of range; allowed: 0 <= dropout < 1",
         "Use 0 <= dropout < 1.",
         lambda ctx: load(ctx, "adapter:\n  dropout: 1.0\n")),
    Case("bad-enum-init", "params",
         "An initialisation the pipeline does not have (`adapter.init: loftq`)",
         "<project>/params.yaml: adapter.init='loftq' is not allowed; choose one of: olora, lora, pissa, orthogonal, eva, corda, lora_ga",
         "Use one of the inits named (docs/parameters.md says what each does).",
         lambda ctx: load(ctx, "adapter:\n  init: loftq\n")),
    Case("init-orthogonal-odd-rank", "params",
         "`adapter.init: orthogonal` with an odd `adapter.r`",
         "<project>/params.yaml: adapter.r=5 is odd but adapter.init=orthogonal splits the rank into two halves; use an even rank",
         "Use an even rank.",
         lambda ctx: load(ctx, "adapter:\n  init: orthogonal\n  r: 5\n")),
    Case("init-dora-rewrites-base", "params",
         "`adapter.dora: true` with an init that rewrites the base (olora, pissa, corda, lora_ga)",
         "<project>/params.yaml: adapter.dora=true cannot be combined with adapter.init=pissa: that init rewrites the base, and PEFT's conversion to a plain LoRA for the untouched base drops DoRA's magnitude vector; use adapter.init lora, orthogonal or eva with DoRA, or adapter.dora=false",
         "Use DoRA with lora, orthogonal or eva, or turn it off.",
         lambda ctx: load(ctx, "adapter:\n  init: pissa\n  dora: true\n")),
    Case("init-needs-float-weights", "params",
         "`adapter.init: pissa` (or corda, lora_ga, orthogonal) with `model.quantization: 4bit`",
         "<project>/params.yaml: adapter.init=pissa cannot initialise a model.quantization=4bit base: PEFT's pissa init needs float weights (it refuses the packed 4-bit ones); use adapter.init olora, lora or eva with 4-bit, or model.quantization=none",
         "Use olora, lora or eva on a 4-bit base, or load it unquantised.",
         lambda ctx: load(ctx, "adapter:\n  init: pissa\nmodel:\n  quantization: 4bit\n")),
    Case("init-calibration-batch", "params",
         "A data-driven init (eva, corda, lora_ga) with `adapter.calibration_batch` larger than `adapter.calibration_samples`",
         "<project>/params.yaml: adapter.calibration_batch=8 exceeds adapter.calibration_samples=4; use a batch of at most the sample size",
         "Lower the batch or raise the sample.",
         lambda ctx: load(ctx, "adapter:\n  init: eva\n  calibration_samples: 4\n")),
    Case("bad-enum-dtype", "params",
         "`model.dtype: fp8`",
         "<project>/params.yaml: model.dtype='fp8' is not allowed; choose one of: auto, float32, bfloat16, float16",
         "Use one of the dtypes named (`auto` picks one for the device).",
         lambda ctx: load(ctx, "model:\n  dtype: fp8\n")),
    Case("bad-device", "params",
         "`model.device: cuda:first` (a GPU index must be a number)",
         "<project>/params.yaml: model.device='cuda:first' is not allowed; choose one of: auto, cpu, cuda, cuda:N (N a GPU index), mps",
         "Use `cuda:0`, `cuda`, `cpu`, `mps` or `auto`.",
         lambda ctx: load(ctx, "model:\n  device: cuda:first\n")),
    Case("bad-enum-scheduler", "params",
         "`train.lr_scheduler: cosine_annealing`",
         "<project>/params.yaml: train.lr_scheduler='cosine_annealing' is not allowed; choose one of: linear, cosine, constant, constant_with_warmup, cosine_with_restarts, polynomial",
         "Use one of the schedulers named.",
         lambda ctx: load(ctx, "train:\n  lr_scheduler: cosine_annealing\n")),
    Case("bad-enum-template", "params",
         "`data.template: llama`",
         "<project>/params.yaml: data.template='llama' is not allowed; choose one of: alpaca, chat",
         "Use `alpaca` or `chat` (the tokenizer's chat template).",
         lambda ctx: load(ctx, "data:\n  template: llama\n")),
    Case("bad-enum-invalid-rows", "params",
         "`data.invalid_rows: skip`",
         "<project>/params.yaml: data.invalid_rows='skip' is not allowed; choose one of: error, drop",
         "Use `error` (stop and name the rows) or `drop` (skip and count them).",
         lambda ctx: load(ctx, "data:\n  invalid_rows: skip\n")),
    Case("bad-enum-promote-metric", "params",
         "`register.promote_metric: accuracy`",
         "<project>/params.yaml: register.promote_metric='accuracy' names task(s) ['accuracy'] that evaluate.tasks does not list (arc_challenge, arc_easy, boolq, hellaswag, openbookqa, piqa, winogrande); use mean_acc, mean_acc_norm, pooled_acc, tasks that evaluate.tasks lists, or add the task(s) to evaluate.tasks",
         "Use `mean_acc`, `mean_acc_norm`, a task of evaluate.tasks, or a weighted set of them (`arc_easy:1+copa_example:2`).",
         lambda ctx: load(ctx, "register:\n  promote_metric: accuracy\n")),
    Case("confidence-out-of-range", "params",
         "`register.confidence: 1.0` (an interval that covers everything)",
         "<project>/params.yaml: register.confidence=1.0 is out of range; it must lie strictly between 0.5 and 1.0",
         "Use a confidence such as `0.95` (the default) or `0.9`.",
         lambda ctx: load(ctx, "register:\n  confidence: 1.0\n")),
    Case("too-few-resamples", "params",
         "`register.resamples: 100`",
         "<project>/params.yaml: register.resamples=100 is too few for a stable interval; use at least 1000 (the default is 10000)",
         "Use at least 1000 resamples; the default 10000 takes well under a second.",
         lambda ctx: load(ctx, "register:\n  resamples: 100\n")),
    Case("list-expected", "params",
         "A list setting given a number (`adapter.target_modules: 5`)",
         "<project>/params.yaml: adapter.target_modules=5 has the wrong type; expected a list",
         "Give a list of layer names, e.g. `[q_proj, v_proj]`.",
         lambda ctx: load(ctx, "adapter:\n  target_modules: 5\n")),
    Case("list-item-type", "params",
         "A list with an item of the wrong type (`adapter.target_modules: [q_proj, 3]`)",
         "<project>/params.yaml: adapter.target_modules[1]=3 has the wrong type; expected str",
         "Make every item a layer name.",
         lambda ctx: load(ctx, "adapter:\n  target_modules: [q_proj, 3]\n")),
    Case("empty-model-name", "params",
         "`model.name: ''`",
         "<project>/params.yaml: model.name is empty; use e.g. 'embedded:SmolLM2-135M-Instruct' or a hub id",
         "Name a base model.",
         lambda ctx: load(ctx, "model:\n  name: ''\n")),
    Case("empty-experiment", "params",
         "`tracking.experiment: ''`",
         "<project>/params.yaml: tracking.experiment is empty; name the MLflow experiment, e.g. olora",
         "Name the MLflow experiment.",
         lambda ctx: load(ctx, "tracking:\n  experiment: ' '\n")),
    Case("set-without-equals", "params",
         "`olora --set adapter.r check` (no `=`)",
         "olora check: error: --set 'adapter.r' must look like key=value, e.g. adapter.r=16",
         "Write `--set key=value`.",
         lambda ctx: (ctx.params(""), cli(ctx.root, "--set", "adapter.r", "check"))[1]),
    Case("set-without-block", "params",
         "`olora --set r=16 check` (no block)",
         "olora check: error: override key 'r' must look like block.key, e.g. adapter.r",
         "Write the dotted key, `--set adapter.r=16`.",
         lambda ctx: (ctx.params(""), cli(ctx.root, "--set", "r=16", "check"))[1]),
    # ---- train: batches and processes
    Case("micro-batch-zero", "train",
         "`train.micro_batch_size: 0`",
         "<project>/params.yaml: train.micro_batch_size=0 is out of range; it must be >= 1",
         "Use at least 1; the effective batch is processes x micro_batch_size x gradient_accumulation_steps.",
         lambda ctx: load(ctx, "train:\n  micro_batch_size: 0\n")),
    Case("accumulation-zero", "train",
         "`train.gradient_accumulation_steps: 0`",
         "<project>/params.yaml: train.gradient_accumulation_steps=0 is out of range; it must be >= 1",
         "Use at least 1.",
         lambda ctx: load(ctx, "train:\n  gradient_accumulation_steps: 0\n")),
    Case("processes-zero", "train",
         "`train.processes: 0`",
         "<project>/params.yaml: train.processes=0 is out of range; it must be >= 1",
         "Use at least 1 (1: no torch.distributed launch).",
         lambda ctx: load(ctx, "train:\n  processes: 0\n")),
    Case("processes-on-mps", "train",
         "`train.processes: 2` on an Apple GPU (MPS)",
         "train.processes=2 is not supported on MPS; use train.processes=1",
         "Use `train.processes: 1` on MPS (raise micro_batch_size or gradient_accumulation_steps instead).",
         lambda ctx: distributed_check(ctx, "mps", {"train.processes": 2, "model.device": "mps"})),
    Case("processes-pinned-gpu", "train",
         "`train.processes: 2` with `model.device: cuda:1` (one pinned GPU)",
         "model.device='cuda:1' pins one GPU, but train.processes=2 needs one GPU per process; use model.device=cuda or auto",
         "Use `model.device: cuda` or `auto`: each process takes its own GPU.",
         lambda ctx: distributed_check(ctx, "cuda:1", {"train.processes": 2, "model.device": "cuda:1"})),
    Case("processes-more-than-gpus", "train",
         "`train.processes: 4` on a machine with one GPU",
         "train.processes=4 but only 1 CUDA device(s) are visible; use train.processes<=1 (one process per GPU), or model.device=cpu",
         "Use at most one process per GPU, or `model.device: cpu` (gloo).",
         lambda ctx: _more_processes_than_gpus(ctx)),
    Case("processes-more-than-cores", "train",
         "`train.processes: 64` on a 2-core CPU machine",
         "train.processes=64 but this machine has 2 usable CPU core(s); use train.processes<=2 (each process needs a core of its own; raise micro_batch_size or gradient_accumulation_steps for a larger batch)",
         "Use at most one process per usable core (`nproc`), or a larger batch per process.",
         lambda ctx: _more_processes_than_cores(ctx)),
    Case("processes-more-than-memory", "train",
         "`train.processes: 2` where two copies of the model do not fit in the available memory",
         "train.processes=2 would hold 2 copies of the model (4 MiB of weights in float32, + 512 MiB a process) = 1.01 GiB, but only 922 MiB of memory is available; use train.processes<=1",
         "Use fewer processes, a smaller `model.dtype`, or a machine with more memory.",
         lambda ctx: _more_processes_than_memory(ctx)),
    Case("strategy-unknown", "train",
         "`train.strategy: zero3` (not a strategy)",
         "<project>/params.yaml: train.strategy='zero3' is not allowed; choose one of: ddp, fsdp, deepspeed",
         "Use `ddp`, `fsdp` (FSDP2; CPU or CUDA) or `deepspeed` (ZeRO-3; CUDA).",
         lambda ctx: load(ctx, "train:\n  strategy: zero3\n")),
    Case("deepspeed-on-cpu", "train",
         "`train.strategy: deepspeed` on a machine without a GPU",
         "train.strategy=deepspeed (ZeRO-3) needs CUDA devices, but this run is on cpu; use train.strategy=fsdp to shard on CPU, or run on GPUs",
         "Use `train.strategy: fsdp` on CPU; DeepSpeed needs an accelerator.",
         lambda ctx: distributed_check(ctx, "cpu", {"train.strategy": "deepspeed", "train.processes": 2})),
    Case("sharded-quantised-base", "train",
         "`train.strategy: fsdp` with `model.quantization: 4bit`",
         "model.quantization=4bit with train.strategy=fsdp is not supported: a 4-bit base is not sharded here; use train.strategy=ddp (each process holds the 4-bit base)",
         "Use `train.strategy: ddp` with a 4-bit base (QLoRA keeps the base small already).",
         lambda ctx: distributed_check(ctx, "cpu", {"train.strategy": "fsdp", "train.processes": 2}, quantization="4bit")),
    Case("quantization-on-cpu", "params",
         "`model.quantization: 4bit` (QLoRA) on a machine without a GPU",
         "model.quantization='4bit' loads the base through bitsandbytes, which needs a CUDA device, but this run is on cpu; use model.quantization=none here, or run on a machine with a GPU",
         "Use `model.quantization: none` on CPU; QLoRA runs on CUDA with bitsandbytes installed.",
         lambda ctx: runtime_check(ctx, {"model.quantization": "4bit", "model.device": "cpu"})),
    Case("check-several-refusals", "params",
         "`olora check` with settings that different stages refuse (`--set adapter.r=100000 --set 'evaluate.tasks=[arc_eazy]'`)",
         "olora check: error: 2 settings would be refused:",
         "Fix each one listed under it (the stage that refuses it, then that stage's own message). `olora check` runs "
         "every stage's pre-flight that needs no weights (the base's config gives its layers); one refusal alone is "
         "printed as the stage prints it.",
         lambda ctx: (ctx.project(), cli(ctx.root, "--set", "adapter.r=100000", "--set", "evaluate.tasks=[arc_eazy]",
                                         "check"))[1]),
    Case("quantization-unknown", "params",
         "`model.quantization: 8bit`",
         "<project>/params.yaml: model.quantization='8bit' is not allowed; choose one of: none, 4bit",
         "Use `none` or `4bit`.",
         lambda ctx: load(ctx, "model:\n  quantization: 8bit\n")),
    Case("nodes-uneven", "train",
         "`train.processes: 3` with `train.nodes: 2`",
         "<project>/params.yaml: train.processes=3 cannot be spread evenly over train.nodes=2; use a multiple of 2 processes (each node runs processes / nodes)",
         "Use a process count that is a multiple of the node count.",
         lambda ctx: load(ctx, "train:\n  processes: 3\n  nodes: 2\n")),
    Case("nodes-without-master", "train",
         "`train.nodes: 2` without `$OLORA_MASTER_ADDR`",
         "train.nodes=2 needs $OLORA_MASTER_ADDR=host:port, node 0's address and a free port that every node reaches (e.g. 10.0.0.1:29500); got None",
         "Set `OLORA_MASTER_ADDR=<node 0's address>:<port>` on every node.",
         lambda ctx: _node_check(ctx, {"OLORA_NODE_RANK": "1"})),
    Case("node-rank-out-of-range", "train",
         "`$OLORA_NODE_RANK=2` with `train.nodes: 2`",
         "$OLORA_NODE_RANK=2 is outside 0 .. 1 for train.nodes=2; give each machine its own rank",
         "Number the machines 0 .. nodes-1; node 0 is the one at `$OLORA_MASTER_ADDR`.",
         lambda ctx: _node_check(ctx, {"OLORA_NODE_RANK": "2", "OLORA_MASTER_ADDR": "127.0.0.1:29500"})),
    Case("processes-launch-mismatch", "train",
         "`torchrun --nproc-per-node=2 -m olora.cli train` with `train.processes: 1`",
         "olora train: error: this train stage was launched with 2 processes but train.processes=1; set train.processes=2 so the recorded effective batch is the one that ran",
         "Let `olora train` launch the processes (set `train.processes: 2`), or launch as many as it says.",
         lambda ctx: _launch_mismatch(ctx)),
    # ---- data
    Case("data-file-missing", "data",
         "`data.source` names a file that does not exist",
         "olora prepare: error: data.source file <project>/data/raw/nope.jsonl not found; check the name, and keep data files under data/raw/ (data.source=data/raw/<file name>)",
         "Check the name; keep data files under data/raw/.",
         lambda ctx: (ctx.project(), cli(ctx.root, "--set", "data.source=data/raw/nope.jsonl", "prepare"))[1]),
    Case("data-file-outside-raw", "data",
         "`data.source` is a file outside data/raw/ (DVC would not see it change)",
         "data.source='<tmp>/downloads/rows.jsonl' lies outside data/raw/, the folder DVC tracks as prepare's input; copy it to data/raw/rows.jsonl and set data.source=data/raw/rows.jsonl, so that a change to the data reruns the pipeline",
         "Copy the file to data/raw/ and point data.source at the copy.",
         lambda ctx: _outside_raw(ctx)),
    Case("data-file-empty", "data",
         "An empty data file",
         "olora prepare: error: no examples left after filtering ({'dropped_invalid': 0, 'rows_read': 0, 'dropped_duplicate': 0, 'dropped_prompt_too_long': 0, 'truncated': 0}); check data.source, the field names, and data.max_seq_length=128",
         "Add instruction/output rows (rows_read: 0 says the file held none).",
         lambda ctx: prepare(ctx, "data/raw/empty.jsonl", "")),
    Case("data-broken-json-line", "data",
         "A JSONL file with a broken line (line 2)",
         "<project>/data/raw/bad.jsonl, line 2, column 2: not valid JSON (Expecting property name enclosed in double quotes); fix or remove that line",
         "Fix or remove the line named.",
         lambda ctx: records(ctx, "data/raw/bad.jsonl", jsonl(ROWS[0], "{not json", ROWS[1]))),
    Case("data-jsonl-control-character", "data",
         "A JSONL line whose text holds a raw control character (a tab pasted into a string, line 2)",
         "<project>/data/raw/tab.jsonl, line 2, column 21: not valid JSON (Invalid control character); fix or remove that line",
         "Escape the character (`\\t`) or remove it at the line and column named.",
         lambda ctx: records(ctx, "data/raw/tab.jsonl", jsonl(ROWS[0], '{"instruction": "Say\tit", "output": "x"}'))),
    Case("data-missing-fields", "data",
         "Rows without the instruction/output fields (the file names them differently, or leaves them empty)",
         "data.source='data/raw/fields.jsonl': rows lack the required field(s) 'instruction' / 'output'; set data.instruction_field / data.output_field to the file's field names, fix the rows, or set data.invalid_rows=drop to skip them. First bad rows:",
         "Set data.instruction_field / data.output_field to the file's names, fix the rows, or `data.invalid_rows: drop`.",
         lambda ctx: records(ctx, "data/raw/fields.jsonl", jsonl(ROWS[0], {"question": "q", "answer": "a"}, {"instruction": "x", "output": " "}))),
    Case("data-not-utf8-jsonl", "data",
         "A JSONL file with Latin-1 bytes (line 2)",
         "<project>/data/raw/latin1.jsonl, line 2: not UTF-8 text (byte 0xe9 at position 20); re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
         "Re-save the file as UTF-8.",
         lambda ctx: records(ctx, "data/raw/latin1.jsonl", jsonl(ROWS[0]).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')),
    Case("data-not-utf8-csv", "data",
         "A CSV file with Latin-1 bytes",
         "<project>/data/raw/latin1.csv: not UTF-8 text (byte 0xe9 at position 22); re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
         "Re-save the file as UTF-8.",
         lambda ctx: records(ctx, "data/raw/latin1.csv", b"instruction,output\ncaf\xe9,x\n")),
    Case("data-unsupported-suffix", "data",
         "A data file with a suffix the pipeline does not read (`.txt`)",
         "data.source <project>/data/raw/data.txt has an unsupported suffix; use one of .jsonl, .json, .csv, .parquet",
         "Convert it to .jsonl, .json, .csv or .parquet.",
         lambda ctx: records(ctx, "data/raw/data.txt", "instruction: x\n")),
    Case("data-json-not-a-list", "data",
         "A .json file holding one object instead of a list of rows",
         "<project>/data/raw/one.json: expected a JSON list of objects (or {'data': [...]}), got dict",
         "Write a JSON list of row objects, or `{\"data\": [...]}`.",
         lambda ctx: records(ctx, "data/raw/one.json", json.dumps(ROWS[0]))),
    Case("data-json-broken", "data",
         "A .json file with a syntax error",
         "<project>/data/raw/broken.json: not valid JSON (line 1, column 22: Expecting property name enclosed in double quotes)",
         "Fix the JSON at the line and column named.",
         lambda ctx: records(ctx, "data/raw/broken.json", '[{"instruction": "x",]')),
    Case("data-parquet-corrupt", "data",
         "A .parquet file that is not Parquet (e.g. a CSV renamed)",
         "<project>/data/raw/rows.parquet: not a readable Parquet file (Could not open Parquet input source '<project>/data/raw/rows.parquet': Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.)",
         "Write the file with a Parquet writer (pyarrow, pandas).",
         lambda ctx: records(ctx, "data/raw/rows.parquet", "instruction,output\nx,y\n")),
    Case("data-prompts-too-long", "data",
         "Every prompt longer than `data.max_seq_length` tokens",
         "olora prepare: error: no examples left after filtering ({'dropped_invalid': 0, 'rows_read': 20, 'dropped_duplicate': 0, 'dropped_prompt_too_long': 20, 'truncated': 0}); check data.source, the field names, and data.max_seq_length=8",
         "Raise data.max_seq_length or shorten the prompts.",
         lambda ctx: prepare(ctx, "data/raw/d.jsonl", jsonl(*ROWS), "--set", "data.max_seq_length=8")),
    Case("data-too-few-rows", "data",
         "One usable example (none left to train on after the validation split)",
         "olora prepare: error: only 1 example(s) after filtering: too few to split with data.validation_fraction=0.1; add data or lower the fraction",
         "Add data (the validation split takes at least one example).",
         lambda ctx: prepare(ctx, "data/raw/d.jsonl", jsonl(ROWS[0]))),
    Case("data-conversation-unknown-role", "data",
         "`data.format: messages` with a turn whose role is not system/user/assistant (row 2)",
         "<project>/data/raw/chat.jsonl:2: turn 1 has unknown role 'bot'; allowed: system, user, assistant; fix the conversation, or set data.invalid_rows=drop to skip such rows",
         "Use the roles system, user, assistant (ShareGPT's human/gpt need `data.format: sharegpt`).",
         lambda ctx: conversations(ctx, [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}])),
    Case("data-sharegpt-unknown-role", "data",
         "`data.format: sharegpt` with a turn whose `from` is not system/human/gpt (row 2)",
         "<project>/data/raw/chat.jsonl:2: turn 1 has unknown role 'bot'; allowed: system, human, gpt (data.format=sharegpt; user and assistant are read too); fix the conversation, or set data.invalid_rows=drop to skip such rows",
         "Use ShareGPT's roles system, human, gpt.",
         lambda ctx: records(ctx, "data/raw/chat.jsonl",
                             jsonl({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                                   {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}),
                             format="sharegpt", template="chat")),
    Case("data-conversation-empty-turn", "data",
         "A conversation with an empty turn",
         "<project>/data/raw/chat.jsonl:2: turn 1 (assistant) has empty content; fix the conversation, or set data.invalid_rows=drop to skip such rows",
         "Fill in or remove the turn.",
         lambda ctx: conversations(ctx, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}])),
    Case("data-conversation-last-turn", "data",
         "A conversation that does not end with an assistant turn",
         "<project>/data/raw/chat.jsonl:2: the conversation ends with a user turn; it must end with an assistant turn; fix the conversation, or set data.invalid_rows=drop to skip such rows",
         "End each conversation with the assistant turn the model should learn (drop a trailing user turn).",
         lambda ctx: conversations(ctx, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                         {"role": "user", "content": "Bye"}])),
    Case("data-conversation-system-turn", "data",
         "A system turn anywhere but first",
         "<project>/data/raw/chat.jsonl:2: turn 1 is a system turn; a system turn may only open the conversation; fix the conversation, or set data.invalid_rows=drop to skip such rows",
         "Move the system prompt to the first turn.",
         lambda ctx: conversations(ctx, [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief"},
                                         {"role": "assistant", "content": "Hello"}])),
    Case("data-conversation-field", "data",
         "`data.format: sharegpt` on rows whose turns are in another field",
         "<project>/data/raw/chat.jsonl:1: no field 'conversations' (present: ['dialog']); set data.conversation_field to the turns' field; fix the conversation, or set data.invalid_rows=drop to skip such rows",
         "Set `data.conversation_field` to the field that holds the turns.",
         lambda ctx: records(ctx, "data/raw/chat.jsonl", jsonl({"dialog": []}), format="sharegpt", template="chat")),
    Case("data-conversation-needs-chat", "params",
         "`data.format: messages` with `data.template: alpaca`",
         "data.format=messages holds conversations, which render through a chat template; set data.template=chat (the tokenizer's template, or data.chat_template=chatml where it has none)",
         "Set `data.template: chat`.",
         lambda ctx: _data_config(source="data/raw/chat.jsonl", format="messages")),
    Case("data-no-chat-template", "data",
         "`data.template: chat` with a tokenizer that has no chat template",
         "data.template=chat needs a chat template: this tokenizer has none; set data.chat_template to a named template (chatml) or use data.template=alpaca",
         "Set `data.chat_template: chatml` (or the format the base model was trained with), or use the alpaca template.",
         lambda ctx: _without_chat_template()),
    Case("data-unknown-embedded-set", "data",
         "`data.embedded_sets: [commonsenseqa]`",
         "data.embedded_sets has unknown entries ['commonsenseqa']; did you mean 'commonsense_qa' for 'commonsenseqa'? available: commonsense_qa, social_i_qa, trivia_qa",
         "Use the suggested set; the packaged sets are listed.",
         lambda ctx: records(ctx, None, source="embedded", embedded_sets=["commonsenseqa"])),
    Case("data-hub-offline", "data",
         "A hub data set id while the hub is offline (`HF_HUB_OFFLINE=1`)",
         "data.source='yahma/alpaca-cleaned' is neither 'embedded' nor an existing local file and the hub is offline (HF_HUB_OFFLINE set); use data.source=embedded, a local .jsonl/.json/.csv/.parquet path, or a hub id like yahma/alpaca-cleaned",
         "Go online (unset HF_HUB_OFFLINE), or use a file under data/raw/ or `data.source: embedded`.",
         lambda ctx: records(ctx, None, source="yahma/alpaca-cleaned")),
    Case("data-source-typo", "data",
         "`data.source: embeded`",
         "data.source='embeded' is neither 'embedded' nor an existing local file (did you mean 'embedded'?) and the hub is offline (HF_HUB_OFFLINE set); use data.source=embedded, a local .jsonl/.json/.csv/.parquet path, or a hub id like yahma/alpaca-cleaned",
         "Use `embedded`, a file under data/raw/, or a hub id.",
         lambda ctx: records(ctx, None, source="embeded")),
    # ---- model
    Case("model-unknown-embedded", "model",
         "`model.name: embedded:SmolLM2-135M` (no such embedded model)",
         "olora prepare: error: unknown embedded model 'SmolLM2-135M'; available: embedded:SmolLM2-135M-Instruct (did you mean model.name='embedded:SmolLM2-135M-Instruct'?)",
         "Use the suggested embedded model.",
         lambda ctx: (ctx.project(), cli(ctx.root, "--set", "model.name=embedded:SmolLM2-135M", "prepare"))[1]),
    Case("model-folder-outside-base", "model",
         "`model.name` is a local model folder outside models/base/ (DVC would not see it change)",
         "model.name='<project>/downloads/tiny-llama' is a local folder outside models/base/, the folder DVC tracks as the model stages' input; copy it to models/base/tiny-llama and set model.name=models/base/tiny-llama, so that a change to the model reruns the pipeline",
         "Copy the folder to models/base/ and point model.name at the copy.",
         lambda ctx: (model_folder(ctx, "downloads/tiny-llama", tiny_config(ctx), True),
                      resolve(ctx, str(ctx.root / "downloads/tiny-llama")))[1]),
    Case("model-folder-missing", "model",
         "`model.name: models/base/tiny-lama` (no such folder)",
         "model.name='models/base/tiny-lama' looks like a local path but no such folder exists; use an existing folder, a hub id such as TinyLlama/TinyLlama-1.1B-Chat-v1.0, or the default embedded:SmolLM2-135M-Instruct",
         "Check the folder name under models/base/.",
         lambda ctx: resolve(ctx, "models/base/tiny-lama")),
    Case("model-no-config", "model",
         "A model folder without config.json",
         "model.name='models/base/no-config' is a folder without config.json; point it at a transformers model folder",
         "Copy the whole transformers model folder (config.json, weights, tokenizer).",
         lambda ctx: (model_folder(ctx, "models/base/no-config", None, True), resolve(ctx, "models/base/no-config"))[1]),
    Case("model-no-weights", "model",
         "A model folder with config.json but no weights (`olora init`)",
         "olora init: error: model.name='models/base/no-weights' (<project>/models/base/no-weights) has no *.safetensors weight file; point model.name at a transformers folder with model.safetensors",
         "Copy the weights (model.safetensors or its shards) into the folder.",
         lambda ctx: (ctx.project(), model_folder(ctx, "models/base/no-weights", tiny_config(ctx), False),
                      cli(ctx.root, "--set", "model.name=models/base/no-weights", "init"))[2]),
    Case("model-not-causal-lm", "model",
         "config.json of an architecture that is not a causal LM (`\"model_type\": \"t5\"`; `olora init`)",
         "olora init: error: model.name='models/base/t5': model_type 't5' is not a causal language model; use a decoder-only model (e.g. Llama, Mistral, Gemma, SmolLM2)",
         "Use a decoder-only (causal LM) model.",
         lambda ctx: (ctx.project(), model_folder(ctx, "models/base/t5", {"model_type": "t5"}, True),
                      cli(ctx.root, "--set", "model.name=models/base/t5", "init"))[2]),
    Case("model-unknown-architecture", "model",
         "config.json whose model_type transformers does not know (`\"model_type\": \"llama9\"`; `olora init`)",
         "olora init: error: model.name='models/base/llama9': its config.json has a model type this transformers version does not know (The checkpoint you are trying to load has model type `llama9` but Transformers does not recognize this architecture. This could be because of an issue with the checkpoint, or because your version of Transformers is out of date.); use a decoder-only model that transformers supports",
         "Use a model whose architecture this transformers version has, or upgrade transformers.",
         lambda ctx: (ctx.project(), model_folder(ctx, "models/base/llama9", tiny_config(ctx, model_type="llama9"), True),
                      cli(ctx.root, "--set", "model.name=models/base/llama9", "init"))[2]),
    Case("model-hub-offline", "model",
         "A hub model id while the hub is offline (`HF_HUB_OFFLINE=1`)",
         "model.name='TinyLlama/TinyLlama-1.1B-Chat-v1.0' is a hub id but HF_HUB_OFFLINE is set; use a local folder or the embedded default embedded:SmolLM2-135M-Instruct",
         "Go online, or copy the model under models/base/.",
         lambda ctx: resolve(ctx, "TinyLlama/TinyLlama-1.1B-Chat-v1.0")),
    Case("model-no-cuda", "model",
         "`model.device: cuda` on a machine without a CUDA GPU",
         "olora init: error: model.device='cuda' but no CUDA device is visible; use model.device=cpu or auto",
         "Use `model.device: auto` or `cpu`.",
         lambda ctx: _no_cuda(ctx)),
    Case("target-modules-match-nothing", "model",
         "`adapter.target_modules: [query_key_value]` on a Llama (`olora init`)",
         "olora init: error: adapter.target_modules=['query_key_value'] match no linear layer of the model; its linear layers are named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
         "Use the layer names listed.",
         lambda ctx: (ctx.project(), cli(ctx.root, "--set", "adapter.target_modules=[query_key_value]", "init"))[1]),
    Case("rank-too-large", "model",
         "`adapter.r` above a target layer's smaller dimension (`olora init`)",
         "olora init: error: adapter.r=33 is larger than the smaller dimension of target layer model.layers.0.self_attn.k_proj (32, 64); choose r <= 32",
         "Use r <= the bound named, or leave that layer out of target_modules.",
         lambda ctx: (ctx.project(), cli(ctx.root, "--set", "adapter.r=33", "init"))[1]),
    Case("eva-batches-too-small", "model",
         "`adapter.init: eva` with `adapter.r` above the response tokens of every calibration batch (`olora init`)",
         "olora init: error: adapter.init=eva: every calibration batch has fewer response tokens (at most 10) than the 32 components of each layer's SVD (adapter.r x adapter.eva_rho), and PEFT skips such batches, so EVA could never converge; use a larger adapter.calibration_batch, a lower adapter.r, or another adapter.init",
         "Raise `adapter.calibration_batch`, lower `adapter.r`, or choose another init (docs/architecture.md, EVA's cost).",
         lambda ctx: _eva_short_batches(ctx)),
    # ---- adapter folders
    Case("adapter-folder-missing", "adapter",
         "`olora evaluate adapter` before train wrote models/exported",
         "olora evaluate: error: <project>/models/exported is not a PEFT adapter folder (missing adapter_config.json and adapter_model.safetensors); re-run the train stage to write it again (`dvc repro train`, or `dvc checkout` to restore it)",
         "Run the train stage (`dvc repro train`).",
         lambda ctx: (ctx.project(), _base_scores(ctx), cli(ctx.root, "evaluate", "adapter"))[2]),
    Case("adapter-weights-missing", "adapter",
         "An adapter folder without adapter_model.safetensors",
         "<project>/models/exported is not a PEFT adapter folder (missing adapter_model.safetensors); re-run the train stage to write it again (`dvc repro train`, or `dvc checkout` to restore it)",
         "Re-run train, or restore the folder with `dvc checkout`.",
         lambda ctx: check_adapter(ctx, weights=None)),
    Case("adapter-weights-truncated", "adapter",
         "A truncated adapter_model.safetensors (an interrupted copy; `olora register`)",
         "olora register: error: <project>/models/exported/adapter_model.safetensors is unreadable or truncated (Error while deserializing header: incomplete metadata, file not fully covered); re-run the train stage to write it again (`dvc repro train`, or `dvc checkout` to restore it)",
         "Re-run train, or restore the folder with `dvc checkout`.",
         lambda ctx: _register_truncated(ctx)),
    Case("adapter-weights-empty", "adapter",
         "An empty (0-byte) adapter_model.safetensors",
         "<project>/models/exported/adapter_model.safetensors is unreadable or truncated (Error while deserializing header: header too small); re-run the train stage to write it again (`dvc repro train`, or `dvc checkout` to restore it)",
         "Re-run train, or restore the folder with `dvc checkout`.",
         lambda ctx: check_adapter(ctx, weights="empty")),
    Case("adapter-config-broken", "adapter",
         "An adapter_config.json that is not JSON",
         "<project>/models/exported/adapter_config.json is not valid JSON (Expecting value: line 1 column 15 (char 14)); re-run the train stage to write it again (`dvc repro train`, or `dvc checkout` to restore it)",
         "Re-run train, or restore the folder with `dvc checkout`.",
         lambda ctx: check_adapter(ctx, config="{\"peft_type\": ")),
    Case("adapter-config-not-peft", "adapter",
         "An adapter_config.json without peft_type (not written by PEFT)",
         "<project>/models/exported/adapter_config.json is not a PEFT adapter config (no peft_type); re-run the train stage to write it again (`dvc repro train`, or `dvc checkout` to restore it)",
         "Re-run train, or restore the folder with `dvc checkout`.",
         lambda ctx: check_adapter(ctx, config='{"r": 4}')),
    # ---- evaluate
    Case("eval-unknown-task-did-you-mean", "evaluate",
         "A misspelt offline task (`evaluate.tasks: [hellaswg]`; `olora evaluate base`)",
         "olora evaluate: error: evaluate.tasks has unknown task(s) ['hellaswg'] for evaluate.source=offline; did you mean 'hellaswag' for 'hellaswg'? available offline: arc_challenge, arc_easy, boolq, hellaswag, openbookqa, piqa, winogrande (add a task YAML under evals/, or set evaluate.source=hub to use any lm-eval task)",
         "Use the suggested task.",
         lambda ctx: (ctx.project(), cli(ctx.root, "--set", "evaluate.tasks=[arc_easy, hellaswg]", "evaluate", "base"))[1]),
    Case("eval-unknown-task", "evaluate",
         "An lm-eval task that is not packaged offline and not in evals/ (`evaluate.tasks: [mmlu]`; `olora evaluate base`)",
         "olora evaluate: error: evaluate.tasks has unknown task(s) ['mmlu'] for evaluate.source=offline; available offline: arc_challenge, arc_easy, boolq, hellaswag, openbookqa, piqa, winogrande (add a task YAML under evals/, or set evaluate.source=hub to use any lm-eval task)",
         "Use the offline tasks listed, a task YAML of your own under evals/ (docs/evaluations.md), or `evaluate.source: hub` (online) for any lm-eval task.",
         lambda ctx: (ctx.project(), cli(ctx.root, "--set", "evaluate.tasks=[mmlu]", "evaluate", "base"))[1]),
    Case("eval-team-task-misspelt", "evaluate",
         "A misspelt team task (`evaluate.tasks: [copa_ousr]`, evals/ defines copa_ours)",
         "olora evaluate: error: evaluate.tasks has unknown task(s) ['copa_ousr'] for evaluate.source=offline; did you mean 'copa_ours' for 'copa_ousr'? available offline: arc_challenge, arc_easy, boolq, hellaswag, openbookqa, piqa, winogrande; in evals/: copa_ours (add a task YAML under evals/, or set evaluate.source=hub to use any lm-eval task)",
         "Use the suggested task.",
         lambda ctx: team_task(ctx, tasks="[copa_ousr]")),
    Case("eval-team-task-yaml-syntax", "evaluate",
         "A task YAML under evals/ with a syntax error (an unclosed quote)",
         "olora evaluate: error: evals/copa_ours.yaml is not valid YAML (line 9, column 17: did not find expected key); fix the syntax there",
         "Fix the YAML at the line named.",
         lambda ctx: team_task(ctx, TEAM_TASK.replace('"{{premise}}"', '"{{premise}}'))),
    Case("eval-team-task-unknown-key", "evaluate",
         "A task YAML with a key lm-eval does not know (`doc_to_txt`)",
         "olora evaluate: error: evals/copa_ours.yaml: task copa_ours has key(s) lm-eval does not know: 'doc_to_txt'; did you mean 'doc_to_text' for 'doc_to_txt'? lm-eval's task keys: custom_dataset, dataset_kwargs, dataset_name, dataset_path, description, doc_to_audio, doc_to_choice, doc_to_decontamination_query, doc_to_image, doc_to_target, doc_to_text, fewshot_config, fewshot_delimiter, fewshot_split, filter_list, gen_prefix, generation_kwargs, group, include, metadata, metric_list, num_fewshot, output_type, process_docs, process_results, repeats, should_decontaminate, tag, target_delimiter, task, task_alias, task_list, test_split, training_split, unsafe_code, use_prompt, validation_split",
         "Use the suggested key (lm-eval's task keys are listed).",
         lambda ctx: team_task(ctx, TEAM_TASK.replace("doc_to_text:", "doc_to_txt:"))),
    Case("eval-team-task-no-task", "evaluate",
         "A YAML under evals/ without `task:` (a shared template named *.yaml)",
         "olora evaluate: error: evals/copa_ours.yaml defines no task (no `task: <name>` key); every *.yaml under evals/ is a task: name a shared template without the .yaml suffix (e.g. _template_yaml) and `include:` it",
         "Name shared templates without the .yaml suffix and `include:` them; every *.yaml under evals/ is a task.",
         lambda ctx: team_task(ctx, TEAM_TASK.replace("task: copa_ours\n", ""))),
    Case("eval-team-task-data-missing", "evaluate",
         "A task whose data file is not in evals/ (`data_files: {validation: data/copa_ours.jsonl}`, no such file)",
         "olora evaluate: error: evals/copa_ours.yaml: data file data/copa_ours.jsonl of task copa_ours not found (looked for <project>/evals/data/copa_ours.jsonl); data files are named relative to the task's YAML and live under evals/: add the file or fix the path",
         "Add the file under evals/, or fix the path (relative to the YAML).",
         lambda ctx: team_task(ctx, data=False)),
    Case("eval-team-task-data-outside", "evaluate",
         "A task whose data file lies outside evals/ (`../data/raw/copa.jsonl`)",
         "olora evaluate: error: evals/copa_ours.yaml: data file ../data/raw/copa.jsonl of task copa_ours lies outside evals/, the folder DVC tracks as the evaluate stages' input; move it under evals/ (e.g. evals/data/copa.jsonl) and name it relative to the YAML",
         "Move the file under evals/ (DVC tracks that folder for the evaluate stages) and name it relative to the YAML.",
         lambda ctx: team_task(ctx, TEAM_TASK.replace("data/copa_ours.jsonl", "../data/raw/copa.jsonl"))),
    Case("eval-team-task-no-score", "evaluate",
         "A multiple-choice task whose metric_list lacks `acc` (only `f1`): the per-question score the gate compares",
         "olora evaluate: error: evals/copa_ours.yaml: task copa_ours (multiple_choice) reports f1 but not acc, the per-question score the pipeline keeps and compares (intervals, the promotion gate); add `- metric: acc` to its metric_list",
         "Add `- metric: acc` (multiple_choice) or `- metric: exact_match` (generate_until) to its metric_list.",
         lambda ctx: team_task(ctx, TEAM_TASK.replace("- metric: acc", "- metric: f1"))),
    Case("eval-team-task-bad-data", "evaluate",
         "A task whose data file is not valid JSON lines",
         "olora evaluate: error: evals/copa_ours.yaml: lm-eval cannot load task copa_ours (ValueError: Expected object or value); fix its data (evals/data/copa_ours.jsonl) or the YAML (docs/evaluations.md)",
         "Fix the data file (one JSON object a line for `dataset_path: json`).",
         lambda ctx: (ctx.file("evals/data/copa_ours.jsonl", "premise,label\nx,1\n"), team_task(ctx, data=False))[1]),
    Case("eval-team-task-hub-data-offline", "evaluate",
         "A task reading a hub data set (`dataset_path: super_glue`) with `evaluate.source: offline`",
         "olora evaluate: error: evals/copa_ours.yaml: task copa_ours reads its data set from the hub (dataset_path: super_glue), but evaluate.source=offline; keep its data under evals/ (dataset_path: json with dataset_kwargs.data_files), or set evaluate.source=hub",
         "Keep the data under evals/ (`dataset_path: json`), or set `evaluate.source: hub`.",
         lambda ctx: team_task(ctx, TEAM_TASK.replace("dataset_path: json", "dataset_path: super_glue"))),
    Case("eval-team-task-stock-name", "evaluate",
         "A task under evals/ named like a stock benchmark (`task: arc_easy`)",
         "olora evaluate: error: evals/copa_ours.yaml defines task arc_easy, the name of a stock benchmark; give the team's task a name of its own (e.g. arc_easy_ours)",
         "Give the team's task a name of its own.",
         lambda ctx: team_task(ctx, TEAM_TASK.replace("task: copa_ours", "task: arc_easy"), tasks="[arc_easy]")),
    Case("eval-tasks-twice", "evaluate",
         "`evaluate.tasks: [arc_easy, arc_easy]`",
         "<project>/params.yaml: evaluate.tasks lists arc_easy more than once; list each task once",
         "List each task once.",
         lambda ctx: load(ctx, "evaluate:\n  tasks: [arc_easy, arc_easy]\n")),
    Case("eval-bad-limit", "evaluate",
         "`evaluate.limit: -1`",
         "<project>/params.yaml: evaluate.limit=-1 is out of range; it must be >= 0",
         "Use 0 (all rows) or a positive row count.",
         lambda ctx: load(ctx, "evaluate:\n  limit: -1\n")),
    Case("eval-limit-all", "evaluate",
         "`evaluate.limit: all`",
         "<project>/params.yaml: evaluate.limit='all' has the wrong type; expected int",
         "Use 0 for all rows.",
         lambda ctx: load(ctx, "evaluate:\n  limit: all\n")),
    Case("eval-bad-source", "evaluate",
         "`evaluate.source: online`",
         "<project>/params.yaml: evaluate.source='online' is not allowed; choose one of: offline, hub",
         "Use `offline` (packaged splits) or `hub`.",
         lambda ctx: load(ctx, "evaluate:\n  source: online\n")),
    Case("eval-bad-batch", "evaluate",
         "`evaluate.batch_size: 0`",
         "<project>/params.yaml: evaluate.batch_size=0 is out of range; it must be >= 1",
         "Use at least 1.",
         lambda ctx: load(ctx, "evaluate:\n  batch_size: 0\n")),
    # ---- stages out of order
    Case("train-before-init", "order",
         "`olora train` before `olora init` (no models/init)",
         "olora train: error: <project>/models/init/olora_init.json not found; the init stage writes it: run it first (`dvc repro init`)",
         "Run the init stage first, or the whole pipeline with `dvc repro`.",
         lambda ctx: (ctx.project(), cli(ctx.root, "--set", "tracking.enabled=false", "train"))[1]),
    Case("train-before-prepare", "order",
         "`olora train` with models/init in place but no data/prepared",
         "olora train: error: <project>/data/prepared/train.jsonl not found; run the prepare stage first (`dvc repro prepare`)",
         "Run the prepare stage first, or the whole pipeline with `dvc repro`.",
         lambda ctx: _train_before_prepare(ctx)),
    Case("register-before-evaluate", "order",
         "`olora register` before `olora evaluate adapter` (no metrics/eval_adapter.json)",
         "olora register: error: <project>/metrics/eval_adapter.json not found; the evaluate stage writes it: run it first (`dvc repro evaluate`)",
         "Run the evaluate stage first, or the whole pipeline with `dvc repro`.",
         lambda ctx: (ctx.project(), cli(ctx.root, "register"))[1]),
    Case("eval-plan-mde-not-positive", "evaluate",
         "`olora eval-plan --mde 0` (or a negative target)",
         "olora eval-plan: error: --mde 0.0 is not a difference that can be detected; give a number of accuracy points > 0, e.g. --mde 1.5",
         "Give the smallest difference worth detecting, in accuracy points.",
         lambda ctx: (ctx.params(""), cli(ctx.root, "eval-plan", "--mde", "0"))[1]),
    Case("eval-plan-without-per-question-results", "evaluate",
         "`olora eval-plan --mde 1.5` in a project whose base model was not evaluated yet",
         "olora eval-plan: error: no per-question results of the base model (<project>/eval/base_samples.csv); the plan is computed from them: run `dvc repro evaluate_base` first",
         "Run `dvc repro evaluate_base` (it writes eval/base_samples.csv and the request rate the plan times with).",
         lambda ctx: (ctx.params(""), cli(ctx.root, "eval-plan", "--mde", "1.5"))[1]),
    # ---- registry
    Case("stack-env-of-a-stopped-stack", "registry",
         "Any `olora` command with a `stack.env` whose MLflow server is down (`make stack-down` before this fix left it)",
         "olora promote: error: <project>/stack.env points at a stack that is down (no MLflow server answers at http://127.0.0.1:9): start it with `make stack`, or stop using it with `mv stack.env stack.stopped.env` (`make stack-down` does) to use the project's own stores",
         "`make stack`, or `make stack-down` (moves this machine's stack.env aside; a teammate's: `mv stack.env stack.stopped.env`).",
         lambda ctx: (ctx.file("stack.env", "MLFLOW_TRACKING_URI=http://127.0.0.1:9\n"), cli(ctx.root, "promote"))[1]),
    Case("promote-unknown-model", "registry",
         "`olora promote --model nope` (no such registered model)",
         "olora promote: error: registered model 'nope' not found; registered models: ['olora-tiny-llama', 'olora-untried']",
         "Use a registered model listed (default: register.model_name, else olora-<base model name>).",
         lambda ctx: cli(ctx.registry(), "promote", "--model", "nope")),
    Case("promote-unknown-version", "registry",
         "`olora promote --version 99` (no such version)",
         "olora promote: error: olora-tiny-llama has no version 99; versions: [1, 2]",
         "Use a version listed.",
         lambda ctx: cli(ctx.registry(), "promote", "--version", "99")),
    Case("promote-version-not-a-number", "registry",
         "`olora promote --version latest`",
         "olora promote: error: --version 'latest' is not a version number; versions of olora-tiny-llama: [1, 2]",
         "Give the version number (`--version 2`); without --version the challenger is promoted.",
         lambda ctx: cli(ctx.registry(), "promote", "--version", "latest")),
    Case("promote-no-challenger", "registry",
         "`olora promote` when no version carries the alias `challenger`",
         "olora promote: error: olora-tiny-llama has no 'challenger' version; register one first (`dvc repro register`)",
         "Register a version (`dvc repro register`), or name one with `--version`.",
         lambda ctx: cli(ctx.registry(), "promote")),
    Case("promote-without-per-question-results", "registry",
         "`olora promote --version 2` when the challenger or the champion holds no per-question results (registered "
         "before per-question evaluation, or not by the evaluate stage)",
         "olora promote: error: olora-tiny-llama version(s) 2, 1 have no per-question results (registered before "
         "per-question evaluation, or not by the evaluate stage), so they cannot be compared on the same questions. "
         "Re-run `dvc repro` for that version (`olora restore --version N`) and register it again, or promote with --force",
         "Register versions through the pipeline (`dvc repro`), which logs `eval/adapter_samples.csv`; or `--force`.",
         lambda ctx: cli(ctx.registry(), "promote", "--version", "2")),
    Case("rollback-unknown-model", "registry",
         "`olora rollback --model nope`",
         "olora rollback: error: registered model 'nope' not found; registered models: ['olora-tiny-llama', 'olora-untried']",
         "Use a registered model listed.",
         lambda ctx: cli(ctx.registry(), "rollback", "--model", "nope")),
    Case("rollback-no-champion", "registry",
         "`olora rollback` when no version is champion",
         "olora rollback: error: olora-untried has no 'champion'; nothing to roll back",
         "Nothing to undo: promote a version first (`olora promote`).",
         lambda ctx: cli(ctx.registry(), "rollback", "--model", "olora-untried")),
    Case("rollback-no-previous", "registry",
         "`olora rollback` when the champion replaced no earlier champion",
         "olora rollback: error: olora-tiny-llama champion v1 replaced no earlier champion; nothing to roll back to",
         "Nothing to roll back to; promote another version with `olora promote --version N --force` instead.",
         lambda ctx: cli(ctx.registry(), "rollback")),
    Case("metrics-file-malformed", "order",
         "`olora register` with a metrics/eval_adapter.json that lacks a field (edited by hand, or written by other code)",
         "olora register: error: <project>/metrics/eval_adapter.json: field 'tasks' is missing; re-run the evaluate stages (`dvc repro`)",
         "Re-run the evaluate stages (`dvc repro`), or restore the file with `dvc checkout`.",
         lambda ctx: (ctx.project(), ctx.file("metrics/eval_adapter.json", '{"mean_acc": 0.5, "mean_acc_norm": 0.5}'),
                      cli(ctx.root, "register"))[2]),
    Case("register-without-run", "registry",
         "`olora register` for an adapter trained with `tracking.enabled: false` (no MLflow run record)",
         "olora register: error: <project>/models/adapter has no MLflow run record; re-run training with tracking.enabled=true (`dvc repro train`)",
         "Re-run training with tracking on (`dvc repro train`).",
         lambda ctx: _register_without_run(ctx)),
    Case("tracking-unreachable", "registry",
         "`tracking.uri` points at a server that is not running",
         'olora promote: error: connecting failed against the MLflow tracking server http://127.0.0.1:9 after 1 attempts: API request to http://127.0.0.1:9/api/2.0/mlflow/experiments/search failed with exception HTTPConnectionPool(host=\'127.0.0.1\', port=9): Max retries exceeded with url: /api/2.0/mlflow/experiments/search (Caused by NewConnectionError("HTTPConnection(host=\'127.0.0.1\', port=9): Failed to establish a new connection: [Errno 111] Connection refused")). Check that the server is running and MLFLOW_TRACKING_URI / tracking.uri is right; the pipeline\'s outputs are intact, so the stage can simply be re-run.',
         "Start the server, or fix tracking.uri / MLFLOW_TRACKING_URI; outputs are intact, so just re-run.",
         lambda ctx: _unreachable(ctx)),
    Case("promote-metric-task-not-evaluated", "registry",
         "`register.promote_metric: copa_ours` (one task) while evaluate.tasks does not list it",
         "<project>/params.yaml: register.promote_metric='copa_ours' names task(s) ['copa_ours'] that evaluate.tasks does not list (arc_challenge, arc_easy, boolq, hellaswag, openbookqa, piqa, winogrande); use mean_acc, mean_acc_norm, pooled_acc, tasks that evaluate.tasks lists, or add the task(s) to evaluate.tasks",
         "Add the task to evaluate.tasks, or promote on tasks it lists (or `mean_acc`).",
         lambda ctx: load(ctx, "register:\n  promote_metric: copa_ours\n")),
    Case("promote-metric-bad-weight", "registry",
         "`register.promote_metric: arc_easy:1+copa_ours:two` (a weighted set with a weight that is not a number)",
         "<project>/params.yaml: register.promote_metric='arc_easy:1+copa_ours:two': the weight of copa_ours must be a number > 0, got 'two' (e.g. copa_ours:2)",
         "Write each term as `task:weight` with a number > 0, joined by `+` (e.g. `arc_easy:1+copa_ours:2`).",
         lambda ctx: load(ctx, "evaluate:\n  tasks: [arc_easy, copa_ours]\nregister:\n  promote_metric: arc_easy:1+copa_ours:two\n")),
    Case("tracking-retries-zero", "registry",
         "`tracking.retries: 0`",
         "<project>/params.yaml: tracking.retries=0 is out of range; it must be >= 1",
         "Use at least 1 attempt.",
         lambda ctx: load(ctx, "tracking:\n  retries: 0\n")),
    # ---- command line
    Case("cli-bad-choice", "cli",
         "`olora evaluate middle` (only base and adapter exist)",
         "olora evaluate: error: argument which: invalid choice: 'middle' (choose from 'base', 'adapter')",
         "Use one of the choices listed (`olora --help` lists the commands).",
         lambda ctx: cli(ctx.root, "evaluate", "middle")),
    Case("cli-evaluate-which", "cli",
         "`olora evaluate` without base/adapter",
         "olora evaluate: error: the following arguments are required: which",
         "Write `olora evaluate base` or `olora evaluate adapter`.",
         lambda ctx: cli(ctx.root, "evaluate")),
    Case("serve-negative-poll", "cli",
         "`olora serve --poll-seconds -5`",
         "olora serve: error: --poll-seconds=-5.0 is negative; use 0 (off) or a number of seconds",
         "Use 0 to turn polling off, or the seconds between looks at the alias.",
         lambda ctx: (ctx.params(""), cli(ctx.root, "serve", "--poll-seconds", "-5"))[1]),
    Case("serve-webhook-short-secret", "cli",
         "`olora serve-webhook --url ...` with `$OLORA_WEBHOOK_SECRET` unset or shorter than 16 characters",
         "olora serve-webhook: error: $OLORA_WEBHOOK_SECRET must hold the webhook's secret, at least 16 characters (e.g. `openssl rand -hex 32`); the server is started with the same value",
         "Set the same long random secret for `olora serve-webhook` and `olora serve`.",
         lambda ctx: (ctx.params(""), ctx.monkeypatch.setenv("OLORA_WEBHOOK_SECRET", "short"),
                      cli(ctx.root, "serve-webhook", "--url", "http://127.0.0.1:5001/webhook"))[2]),
    Case("compare-rate-range-inverted", "cli",
         "`olora compare --lr-range 1e-3,1e-5` (the learning-rate search's range upside down)",
         "olora compare: error: search rate range [0.001, 1e-05] is inverted: give LOW,HIGH with LOW < HIGH, e.g. --lr-range 1e-5,3e-3",
         "Give the range as LOW,HIGH.",
         lambda ctx: (ctx.project(), cli(ctx.root, "compare", "--lr-range", "1e-3,1e-5"))[1]),
    Case("compare-budget-below-pruner", "cli",
         "`olora compare --trials 2 --startup-trials 2`: a trial budget the median pruner cannot act in",
         "olora compare: error: search trial budget 2 with 2 start-up trial(s): the median pruner needs at least 1 start-up trial and a budget of at least 3 (start-up trials + 1) to prune anything; raise --trials to 3 or lower --startup-trials",
         "Raise `--trials` above `--startup-trials`.",
         lambda ctx: (ctx.project(), cli(ctx.root, "compare", "--trials", "2", "--startup-trials", "2"))[1]),
    Case("compare-rank-too-large", "cli",
         "`olora compare --ranks 4,4096` on a model whose smallest target layer is 32 wide",
         "olora compare: error: rank 4096 in --ranks: adapter.r=4096 is larger than the smaller dimension of target layer model.layers.0.self_attn.k_proj (32, 64); choose r <= 32",
         "Compare ranks the target layers can hold.",
         lambda ctx: (ctx.project(), cli(ctx.root, "compare", "--ranks", "4,4096"))[1]),
    Case("compare-one-seed", "cli",
         "`olora compare --seeds 0`: one seed cannot support a claim about convergence",
         "olora compare: error: --seeds 0: a claim about convergence or accuracy needs an interval over seeds, so at least two different seeds, e.g. --seeds 0,1",
         "Give two or more seeds.",
         lambda ctx: (ctx.project(), cli(ctx.root, "compare", "--seeds", "0"))[1]),
    # ---- publishing data
    Case("publish-not-git", "publish",
         "`olora publish-data` in a folder that is not a git checkout",
         "olora publish-data: error: <project> is not a git checkout; publish-data commits and pushes the data's .dvc pointer",
         "Run it in the project's clone.",
         lambda ctx: (ctx.file("data/raw/rows.jsonl", jsonl(*ROWS)), cli(ctx.root, "publish-data", "data/raw/rows.jsonl"))[1]),
    Case("publish-outside-raw", "publish",
         "A file outside data/raw/",
         "olora publish-data: error: <tmp>/rows.jsonl is not under data/raw/, the folder prepare reads; copy it there (data/raw/rows.jsonl) and publish that",
         "Copy the file under data/raw/ and publish that path.",
         lambda ctx: _publish(ctx, str(ctx.tmp / "rows.jsonl"))),
    Case("publish-no-git-remote", "publish",
         "A clone without the git remote `origin`",
         "olora publish-data: error: <project> has no git remote `origin`; add the team's remote (`git remote add origin <url>`)",
         "Add the team's git remote as `origin`.",
         lambda ctx: _publish(ctx, "data/raw/rows.jsonl")),
    Case("publish-no-dvc-remote", "publish",
         "No DVC remote (none configured, no `OLORA_DVC_REMOTE_URL`)",
         "olora publish-data: error: no DVC remote is configured: add one (`dvc remote add -d team <url>`) or set OLORA_DVC_REMOTE_URL (stack.env does)",
         "Add the team's DVC remote, or load `stack.env`.",
         lambda ctx: _publish(ctx, "data/raw/rows.jsonl", origin=True)),
    # ---- deployment runs whose stores would be deleted with their clone
    Case("deployment-tracking-in-clone", "deployment",
         "`olora check --deployment` (or a worker's flow run) with no `MLFLOW_TRACKING_URI`: the store falls back to the clone's `mlflow.db`",
         "olora check: error: a deployment run of this checkout cannot record durably, so it was not started: the MLflow tracking store sqlite:///<clone>/mlflow.db lies inside the Prefect worker's temporary folder <worker temp>, deleted when the flow run ends: the run and its registered version would be lost with it (`olora promote` and `olora serve` elsewhere would find nothing); set MLFLOW_TRACKING_URI, where the worker (or this command) starts, to a tracking server (`make stack` writes it to stack.env) or to a store outside it, e.g. sqlite:////abs/path/mlflow.db. Nothing was run",
         "Export `MLFLOW_TRACKING_URI` (a server, or an absolute `sqlite:///` path outside the clone) before `prefect worker start`, or use `make stack`'s `stack.env`.",
         lambda ctx: _deployment(ctx, tracking=False, remote=str(ctx.tmp / "dvc-remote"))),
    Case("deployment-dvc-remote-in-clone", "deployment",
         "The committed relative DVC remote (`url = ../.dvc-remote`), which resolves inside a worker's clone",
         "olora check: error: a deployment run of this checkout cannot record durably, so it was not started: the DVC remote 'local' (<clone>/.dvc-remote) lies inside the Prefect worker's temporary folder <worker temp>, deleted when the flow run ends: the adapter and data `dvc push` writes there would be lost, and the run's runs/* branch would point at objects that exist nowhere; make the default DVC remote a server URL or an absolute folder outside it (`dvc remote add -d --force NAME /abs/path`, committed in .dvc/config for workers that clone, or in .dvc/config.local beside a checkout), or set OLORA_DVC_REMOTE_URL (stack.env does). Nothing was run",
         "`dvc remote add -d --force local /abs/path` and commit `.dvc/config` (or set `OLORA_DVC_REMOTE_URL`, as `stack.env` does).",
         lambda ctx: _deployment(ctx, tracking=True, remote="../.dvc-remote")),
    # ---- serving requests (the registered pyfunc; the scoring server answers HTTP 400 with the message)
    Case("serve-max-new-tokens-zero", "serving",
         '`{"inputs": {"prompt": ["Hi"]}, "params": {"max_new_tokens": 0}}`',
         "max_new_tokens must be between 1 and 1024, got 0",
         "Ask for 1 to 1024 new tokens.",
         lambda ctx: serve(ctx, {"prompt": ["Hi"]}, {"max_new_tokens": 0})),
    Case("serve-max-new-tokens-too-many", "serving",
         '`"params": {"max_new_tokens": 5000}`',
         "max_new_tokens must be between 1 and 1024, got 5000",
         "Ask for at most 1024 new tokens.",
         lambda ctx: serve(ctx, {"prompt": ["Hi"]}, {"max_new_tokens": 5000})),
    Case("serve-min-over-max", "serving",
         '`"params": {"max_new_tokens": 4, "min_new_tokens": 5}`',
         "min_new_tokens must be between 0 and max_new_tokens (4), got 5",
         "Keep min_new_tokens at or below max_new_tokens.",
         lambda ctx: serve(ctx, {"prompt": ["Hi"]}, {"max_new_tokens": 4, "min_new_tokens": 5})),
    Case("serve-temperature-zero", "serving",
         '`"params": {"do_sample": true, "temperature": 0}`',
         "temperature must be > 0 when do_sample is true, got 0.0",
         "Use a positive temperature, or do_sample false (greedy).",
         lambda ctx: serve(ctx, {"prompt": ["Hi"]}, {"do_sample": True, "temperature": 0.0})),
    Case("serve-no-prompts", "serving",
         '`{"inputs": {"prompt": []}}`',
         "a request must hold between 1 and 64 prompts, got 0",
         "Send 1 to 64 prompts per request.",
         lambda ctx: serve(ctx, {"prompt": []})),
    Case("serve-no-prompt-field", "serving",
         '`{"inputs": {"question": ["Hi"]}}`',
         "the input needs a 'prompt' field; got ['question']",
         "Name the input column `prompt`.",
         lambda ctx: serve(ctx, {"question": ["Hi"]})),
    Case("serve-prompt-too-long", "serving",
         "A prompt longer than the model's context less max_new_tokens",
         "prompt 0 is 480 tokens (in the template); the model's context is 512 tokens, so with max_new_tokens=64 a prompt may hold at most 448",
         "Shorten the prompt or ask for fewer new tokens.",
         lambda ctx: serve(ctx, {"prompt": ["word " * 450]})),
]


# ---------------------------------------------------------------- cases that need more than one line


def _float_strings(ctx: Ctx) -> str:
    from olora.config import load_config

    assert load_config(ctx.params("train:\n  learning_rate: 3e-4\n")).train.learning_rate == 3e-4
    return load(ctx, "train:\n  learning_rate: 3e-4x\n")


def _more_processes_than_gpus(ctx: Ctx) -> str:
    import torch

    ctx.monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return distributed_check(ctx, "cuda", {"train.processes": 4, "model.device": "cuda"})


def _check_passes(ctx: Ctx, overrides: dict, model_path: str | None = None) -> None:
    import torch

    from olora.config import load_config
    from olora.modeling.runtime import Runtime
    from olora.training.distributed import check_distributed

    check_distributed(load_config(ctx.params(""), overrides), Runtime(torch.device("cpu"), torch.float32), model_path)


def _more_processes_than_cores(ctx: Ctx) -> str:
    from olora.training import distributed

    ctx.monkeypatch.setattr(distributed, "usable_cores", lambda: 2)
    _check_passes(ctx, {"train.processes": 2, "model.device": "cpu"})  # 2 of 2 is fine
    return distributed_check(ctx, "cpu", {"train.processes": 64, "model.device": "cpu"})


def _more_processes_than_memory(ctx: Ctx) -> str:
    import torch
    from safetensors.torch import save_file

    from olora.training import distributed

    folder = ctx.tmp / "model"
    folder.mkdir()
    save_file({"w": torch.zeros(1024, 512, dtype=torch.bfloat16)}, folder / "model-00001-of-00002.safetensors")
    save_file({"v": torch.zeros(512, 1024, dtype=torch.bfloat16)}, folder / "model-00002-of-00002.safetensors")
    ctx.monkeypatch.setattr(distributed, "usable_cores", lambda: 8)
    ctx.monkeypatch.setattr(distributed, "available_memory", lambda: int(0.9 * 1024**3))
    _check_passes(ctx, {"train.processes": 1, "model.device": "cpu"}, str(folder))  # one copy fits
    return distributed_check(ctx, "cpu", {"train.processes": 2, "model.device": "cpu"}, str(folder))


def _node_check(ctx: Ctx, env: dict) -> str:
    from olora.config import load_config
    from olora.errors import ConfigError
    from olora.training.distributed import check_nodes

    for key, value in env.items():
        ctx.monkeypatch.setenv(key, value)
    return raises(lambda: check_nodes(load_config(ctx.params(""), {"train.processes": 2, "train.nodes": 2})), ConfigError)


def _launch_mismatch(ctx: Ctx) -> str:
    ctx.project()
    ctx.monkeypatch.setenv("WORLD_SIZE", "2")
    ctx.monkeypatch.setenv("RANK", "0")
    return cli(ctx.root, "--set", "tracking.enabled=false", "train")


def _outside_raw(ctx: Ctx) -> str:
    path = ctx.tmp / "downloads" / "rows.jsonl"
    path.parent.mkdir()
    path.write_text(jsonl(*ROWS))
    return records(ctx, None, source=str(path))


def _no_cuda(ctx: Ctx) -> str:
    import torch

    ctx.project()
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return cli(ctx.root, "--set", "model.device=cuda", "init")


def _register_truncated(ctx: Ctx) -> str:
    ctx.project()
    ctx.file("metrics/eval_adapter.json", (REPO / "metrics" / "eval_adapter.json").read_text())
    adapter_dir(ctx, weights="truncated")
    return cli(ctx.root, "register")


def _register_without_run(ctx: Ctx) -> str:
    ctx.project()
    ctx.file("metrics/eval_adapter.json", (REPO / "metrics" / "eval_adapter.json").read_text())
    adapter_dir(ctx)
    (ctx.root / "models" / "adapter").mkdir(parents=True)
    return cli(ctx.root, "register")


def _eva_short_batches(ctx: Ctx) -> str:
    """EVA at r=32 on a prepared split of short answers, two examples (up to 10 response tokens) per batch."""
    ctx.project()
    ctx.file("data/prepared/train.jsonl", jsonl(*({"prompt": r["instruction"] + "\n", "response": r["output"]} for r in ROWS)))
    return cli(ctx.root, "--set", "adapter.init=eva", "--set", "adapter.r=32", "--set", "adapter.calibration_batch=2", "init")


def _train_before_prepare(ctx: Ctx) -> str:
    from olora.config import load_config

    cfg = load_config(ctx.project() / "params.yaml")
    meta = {"init": cfg.adapter.init, "r": cfg.adapter.r, "alpha": cfg.adapter.alpha, "base_model": cfg.model.name}
    ctx.file("models/init/olora_init.json", json.dumps(meta))
    return cli(ctx.root, "--set", "tracking.enabled=false", "train")


def _unreachable(ctx: Ctx) -> str:
    ctx.params("")
    ctx.monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    ctx.monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return cli(ctx.root, "--set", "tracking.uri=http://127.0.0.1:9", "--set", "tracking.retries=1", "promote")


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="session")
def registry_project(tmp_path_factory) -> Path:
    """A project whose SQLite MLflow store holds REGISTERED (v1 champion, replacing none; v2; no challenger)
    and olora-untried (v1, no aliases)."""
    import yaml

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry") / "project"
    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"model": {"name": MODEL}, "tracking": {"uri": uri, "retries": 1}, "register": {"model_name": REGISTERED}}))
    source = root / "mlartifacts" / "model"
    source.mkdir(parents=True)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name, versions in ((REGISTERED, 2), ("olora-untried", 1)):
        c.create_registered_model(name)
        for _ in range(versions):
            c.create_model_version(name, source.as_uri(), tags={"mean_acc": "0.5"})
    c.set_registered_model_alias(REGISTERED, "champion", "1")
    return root


def test_the_catalogue_is_complete():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert {c.category for c in CASES} <= set(CATEGORIES)
    assert len(CASES) >= 32
    assert all(c.trigger and c.fix and "\n" not in c.message for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_first_line(case: Case, tmp_path, request):
    ctx = Ctx(tmp_path, request)
    text = ctx.normalise(case.run(ctx))
    assert text.splitlines()[0] == case.message, f"full message:\n{text}"


def test_docs_errors_md_is_generated_from_the_catalogue():
    assert DOC.is_file() and DOC.read_text() == errors_markdown(), (
        "docs/errors.md is stale: run `.venv/bin/python tests/test_errors.py --write docs/errors.md`"
    )


# ---------------------------------------------------------------- docs/errors.md


def errors_markdown() -> str:
    from olora.devtools import errors_markdown as render

    return render(CASES, CATEGORIES, EMPTY_CATEGORY)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="print or write docs/errors.md, generated from the catalogue")
    parser.add_argument("--write", metavar="PATH", help="write it to PATH (docs/errors.md)")
    args = parser.parse_args()
    if args.write:
        Path(args.write).write_text(errors_markdown())
    else:
        sys.stdout.write(errors_markdown())
