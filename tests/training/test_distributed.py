"""Padding-free batches and multi-process training through torch.distributed's real launcher (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from olora.layout import Layout
from olora.stages import STAGES

from conftest import free_port
from overlay import write_params

BIN = Path(sys.executable).parent


def _features(tokenizer, n=6):
    from olora.data.templates import encode, render_prompt, resolve_template

    template = resolve_template("alpaca")
    rows = []
    for i in range(n):
        prompt = render_prompt(template, f"Question number {i}: " + "why " * i, "")
        ids, labels, _ = encode(tokenizer, prompt, "Because. " * (i + 1), 128)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def test_packed_batch_has_the_padded_batch_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from olora.training.packing import packing_is_exact

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = False
    assert packing_is_exact(model, torch.device("cpu"), torch.float32)
    rows = _features(tokenizer)
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(rows)
    packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].numel() == sum(len(r["input_ids"]) for r in rows) < padded["input_ids"].numel()
    # the same response tokens are scored: the mean per-token loss is the same
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)


def test_packing_check_catches_a_model_that_mixes_examples(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from olora.training.packing import packing_is_exact

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = True  # with a cache, transformers does not build the packed mask: examples mix
    original = model.forward

    def forward(*args, **kwargs):  # ignore the caller's use_cache=False, as a model without support would
        kwargs.pop("use_cache", None)
        return original(*args, use_cache=True, **kwargs)

    model.forward = forward
    assert not packing_is_exact(model, torch.device("cpu"), torch.float32)




def sh(args, cwd, check=True, env=None):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert out.returncode == 0, f"{args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny project after prepare and init; each test trains in its own copy."""
    root = tmp_path_factory.mktemp("dist")
    write_params(root, tiny_model_dir, {"train.micro_batch_size": 4, "train.save_steps": 2})
    layout = Layout(root)
    STAGES["prepare"].run(layout)
    STAGES["init"].run(layout)
    return root


def _copy(src: Path, dst: Path) -> Layout:
    shutil.copytree(src, dst)
    return Layout(dst)


def _adapter(layout: Layout) -> dict[str, torch.Tensor]:
    return load_file(str(layout.adapter / "adapter_model.safetensors"))


def _losses(layout: Layout) -> list[float]:
    return [float(line.split(",")[1]) for line in layout.plot("train_loss").read_text().splitlines()[1:]]


@pytest.mark.integration
def test_padding_free_trains_the_adapter_the_padded_path_trains(prepared, tmp_path):
    packed, padded = _copy(prepared, tmp_path / "packed"), _copy(prepared, tmp_path / "padded")
    off = {"tracking.enabled": False}
    m_packed = STAGES["train"].run(packed, off)
    m_padded = STAGES["train"].run(padded, {**off, "train.padding_free": False})
    assert m_packed["padding_free"] and not m_padded["padding_free"]
    assert m_packed["tokens_trained"] == m_padded["tokens_trained"]  # real tokens, no padding counted
    for a, b in zip(_losses(packed), _losses(padded)):
        assert a == pytest.approx(b, rel=1e-4)
    weights_packed, weights_padded = _adapter(packed), _adapter(padded)
    for key in weights_packed:
        torch.testing.assert_close(weights_packed[key], weights_padded[key], rtol=1e-3, atol=1e-5)


@pytest.mark.integration
def test_two_processes_match_one_at_the_same_effective_batch(prepared, tmp_path):
    """`olora train` with train.processes=2 launches torchrun (gloo): one MLflow run, outputs once, equal ranks."""
    two, one = _copy(prepared, tmp_path / "two"), _copy(prepared, tmp_path / "one")
    sh([str(BIN / "olora"), "--set", "train.processes=2", "train"], two.root)
    metrics = json.loads(two.metrics("train").read_text())
    assert metrics["processes"] == 2 and metrics["effective_batch"] == 8 and metrics["steps"] == 6
    assert metrics["weights_identical_across_ranks"] and len(metrics["rank_weight_checksums"]) == 2
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{two.root / 'mlflow.db'}", registry_uri=f"sqlite:///{two.root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("olora").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == json.loads((two.adapter / "mlflow_run.json").read_text())["run_id"]

    # one process, micro-batch 4 x accumulation 2: the same 8 examples per step
    STAGES["train"].run(one, {"train.gradient_accumulation_steps": 2, "tracking.enabled": False})
    single = json.loads(one.metrics("train").read_text())
    assert single["effective_batch"] == 8
    for a, b in zip(_losses(two), _losses(one), strict=True):
        assert a == pytest.approx(b, rel=1e-3), (_losses(two), _losses(one))
    for key, value in _adapter(two).items():
        torch.testing.assert_close(value, _adapter(one)[key], rtol=1e-3, atol=1e-4)


@pytest.mark.integration
def test_a_killed_two_process_run_resumes_and_a_changed_count_is_refused(prepared, tmp_path):
    layout = _copy(prepared, tmp_path / "killed")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": "1"}
    _kill_after_checkpoint(layout, [str(BIN / "olora"), "--set", "train.processes=2", "--set", "tracking.enabled=false",
                                    "train"], env)

    refused = sh([str(BIN / "olora"), "--set", "tracking.enabled=false", "train"], layout.root, check=False)
    assert refused.returncode == 2
    assert "holds this run interrupted under train.processes=2; resume it with that count" in refused.stderr

    sh([str(BIN / "olora"), "--set", "train.processes=2", "--set", "tracking.enabled=false", "train"], layout.root)
    metrics = json.loads(layout.metrics("train").read_text())
    assert metrics["resumed"] and metrics["steps"] == 6 and metrics["weights_identical_across_ranks"]


@pytest.mark.integration
def test_fsdp_on_two_processes_trains_the_ddp_adapter_and_loads_on_an_untouched_base(prepared, tmp_path):
    """train.strategy=fsdp through the real launcher (gloo): FSDP2 shards the parameters (accelerate's own
    FSDP2 path), the loss curve and the gathered adapter equal the DDP run's, one MLflow run, and the
    exported plain LoRA reproduces the trained model on an untouched base."""
    fsdp, ddp = _copy(prepared, tmp_path / "fsdp"), _copy(prepared, tmp_path / "ddp")
    sh([str(BIN / "olora"), "--set", "train.processes=2", "--set", "train.strategy=\"fsdp\"", "train"], fsdp.root)
    sh([str(BIN / "olora"), "--set", "train.processes=2", "--set", "tracking.enabled=false", "train"], ddp.root)
    metrics = json.loads(fsdp.metrics("train").read_text())
    assert metrics["strategy"] == "fsdp" and metrics["processes"] == 2 and metrics["steps"] == 6
    assert metrics["weights_identical_across_ranks"] is None and len(metrics["rank_weight_checksums"]) == 1
    # rank 0 held about half of every weight (DTensor shards; odd sizes round up on rank 0)
    assert metrics["sharded"] and 0.45 < metrics["rank0_parameter_share"] < 0.56, metrics
    for a, b in zip(_losses(fsdp), _losses(ddp), strict=True):
        assert a == pytest.approx(b, rel=1e-4), (_losses(fsdp), _losses(ddp))
    reference = _adapter(ddp)
    assert _adapter(fsdp).keys() == reference.keys()
    # with gradient checkpointing (transformers' own under FSDP): the same losses and a complete adapter
    checkpointed = _copy(prepared, tmp_path / "fsdp-gc")
    sh([str(BIN / "olora"), "--set", "train.processes=2", "--set", "train.strategy=fsdp", "--set",
        "train.gradient_checkpointing=true", "--set", "tracking.enabled=false", "train"], checkpointed.root)
    for a, b in zip(_losses(checkpointed), _losses(fsdp), strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert _adapter(checkpointed).keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(_adapter(fsdp)[key], value, rtol=1e-4, atol=1e-6)
    from mlflow import MlflowClient

    uri = f"sqlite:///{fsdp.root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("olora").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["train.strategy"] == "fsdp"

    # the export (converted from the files after sharded training) reproduces base-with-residual + trained adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from olora.modeling import peft_glue

    from peft import set_peft_model_state_dict

    model_dir = _model_dir(fsdp)
    x = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    trained = peft_glue.load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), fsdp.init, "olora")
    set_peft_model_state_dict(trained, _adapter(fsdp))
    with torch.no_grad():
        expected = trained.eval()(input_ids=x).logits
        untouched = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(fsdp.exported)).eval()
        torch.testing.assert_close(untouched(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_adapter(prepared, tmp_path):
    layout, reference = _copy(prepared, tmp_path / "killed"), _copy(prepared, tmp_path / "whole")
    args = ["--set", "train.processes=2", "--set", "train.strategy=\"fsdp\"", "--set", "tracking.enabled=false", "train"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": "1"}
    whole = subprocess.Popen([str(BIN / "olora"), *args], cwd=reference.root, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    _kill_after_checkpoint(layout, [str(BIN / "olora"), *args], env)
    sh([str(BIN / "olora"), *args], layout.root)
    assert whole.wait(600) == 0
    metrics = json.loads(layout.metrics("train").read_text())
    assert metrics["resumed"] and metrics["steps"] == 6 and metrics["strategy"] == "fsdp"
    assert _losses(layout)[-1] == pytest.approx(_losses(reference)[-1], rel=1e-4)
    for key, value in _adapter(reference).items():
        torch.testing.assert_close(_adapter(layout)[key], value, rtol=1e-4, atol=1e-6)


def _model_dir(layout: Layout) -> str:
    import yaml

    name = Path(yaml.safe_load((layout.root / "params.yaml").read_text())["model"]["name"])
    return str(name if name.is_absolute() else layout.root / name)


def _kill_after_checkpoint(layout: Layout, command: list[str], env: dict) -> None:
    """Start `command` in `layout`, SIGKILL the whole launch (olora, torchrun, every rank) once checkpoint-2 is complete."""
    import psutil

    launcher = subprocess.Popen(command, cwd=layout.root, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = layout.checkpoints / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not marker.is_file() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.is_file(), "no checkpoint was written"
    # the whole launch, as a preempted node loses it: torchrun starts each rank in a session of its own,
    # so the ranks are found as descendants rather than through the launcher's process group
    processes = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    assert len(processes) >= 4  # olora, torchrun, two ranks
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    launcher.wait(30)
    assert not (layout.adapter / "adapter_model.safetensors").exists()


@pytest.mark.integration
def test_two_nodes_of_one_process_train_as_one_node_of_two(prepared, tmp_path):
    """Two "machines" (two clones of the project, one process each) rendezvous over loopback through
    torchrun: the loss curve and adapter of one node with two processes, one MLflow run, outputs once."""
    one_node = _copy(prepared, tmp_path / "one-node")
    sh([str(BIN / "olora"), "--set", "train.processes=2", "--set", "tracking.enabled=false", "train"], one_node.root)

    nodes = [_copy(prepared, tmp_path / f"node{rank}") for rank in range(2)]
    master = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": "1", "OLORA_MASTER_ADDR": master}
    launchers = [subprocess.Popen([str(BIN / "olora"), "--set", "train.processes=2", "--set", "train.nodes=2", "train"],
                                  cwd=layout.root, env={**env, "OLORA_NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank, layout in enumerate(nodes)]
    outputs = [p.communicate(timeout=600) for p in launchers]
    for p, (out, err) in zip(launchers, outputs):
        assert p.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    first, second = nodes
    metrics = json.loads(first.metrics("train").read_text())
    assert metrics["processes"] == 2 and metrics["effective_batch"] == 8 and metrics["weights_identical_across_ranks"]
    for a, b in zip(_losses(first), _losses(one_node), strict=True):
        assert a == pytest.approx(b, rel=1e-4), (_losses(first), _losses(one_node))
    for key, value in _adapter(one_node).items():
        torch.testing.assert_close(_adapter(first)[key], value, rtol=1e-4, atol=1e-6)
    # node 1 trained but wrote nothing: no adapter, no metrics, no MLflow run
    assert not (second.adapter / "adapter_model.safetensors").exists() and not second.metrics("train").exists()
    assert not (second.root / "mlflow.db").exists()
    from mlflow import MlflowClient

    uri = f"sqlite:///{first.root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("olora").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params.get("train.nodes") == "2"


def test_process_count_is_validated():
    from olora.config import config_from_dict
    from olora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.processes=0 is out of range"):
        config_from_dict({"train": {"processes": 0}})


def test_packing_is_used_only_where_padding_wastes_tokens():
    from olora.training.packing import PACKING_MIN_WASTE, padding_waste

    assert padding_waste([64] * 100, 8) == 0.0  # equal lengths: nothing to save, packing only adds attention
    assert padding_waste([10, 100] * 50, 8) > 0.4
    assert padding_waste([30, 32, 31, 33] * 25, 8) < PACKING_MIN_WASTE
    assert padding_waste([5, 9], 1) == 0.0  # one example per micro-batch is never padded
