"""Stage `train`: fine-tune the initialised adapter with transformers' Trainer (accelerate underneath).

Response-only loss (prompt tokens masked), padding-free batches (each micro-batch one unpadded
sequence with per-example position ids, checked on the model before use), validation loss every N
steps, checkpoints that let an interrupted run resume where it stopped (only when its inputs are
unchanged), a fixed seed, and a stop on the first NaN/inf loss that keeps the last good checkpoint.
With `train.processes` > 1 the stage launches itself under torch.distributed's launcher (DDP: gloo
on CPU, NCCL on CUDA); only the main process writes outputs and talks to MLflow. Outputs the
trained adapter and an exported plain LoRA that loads on an untouched base.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from olora import models, peft_glue
from olora.config import Config
from olora.data.templates import encode
from olora.errors import ConfigError, NonFiniteLossError, OloraError
from olora.faults import marker
from olora.io import atomic_dir, read_json, read_jsonl, write_json
from olora.layout import ADAPTER_WEIGHTS, INIT_META, TEMPLATE_FILE, TRAIN_FILE, VALIDATION_FILE, Layout
from olora.runtime import Runtime, peak_memory_bytes, seed_everything

FINGERPRINT = "fingerprint.json"
log = logging.getLogger("olora")


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    exported_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def tokenize_split(tokenizer, rows: list[dict[str, Any]], max_len: int) -> list[dict[str, list[int]]]:
    out = []
    for row in rows:
        encoded = encode(tokenizer, row["prompt"], row["response"], max_len)
        if encoded is not None:
            ids, labels, _ = encoded
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(cfg: Config, data_dir: Path, init_dir: Path) -> str:
    """What a checkpoint must match to be resumed: training settings, data and initial adapter.

    The process count is not part of it: checkpoints of the same run under another count are
    refused by name (`_prepare_checkpoints`) rather than silently thrown away.
    """
    train = {k: v for k, v in cfg.to_dict()["train"].items() if k != "processes"}
    payload = {
        "model": [cfg.model.name, cfg.model.dtype],
        "data.max_seq_length": cfg.data.max_seq_length,
        "adapter": cfg.to_dict()["adapter"],
        "train": train,
        "data": _file_digest(list(Path(data_dir).glob("*.jsonl"))),
        "init": _file_digest([p for p in Path(init_dir).iterdir() if p.is_file()]),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    return [p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]


def _finished_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The latest complete checkpoint when it already holds the run's last step, else None."""
    done = sorted(_complete_checkpoints(checkpoint_dir), key=lambda p: int(p.name.split("-")[1]))
    if not done:
        return None
    state = read_json(done[-1] / "trainer_state.json")
    return done[-1] if state.get("max_steps") and state["global_step"] >= state["max_steps"] else None


def resumable_run_id(checkpoint_dir: Path, fingerprint: Callable[[], str]) -> str | None:
    """The MLflow run of an interrupted run these checkpoints can resume (so a resume continues that run)."""
    marker = Path(checkpoint_dir) / FINGERPRINT
    if not marker.is_file() or not _complete_checkpoints(Path(checkpoint_dir)):
        return None
    recorded = read_json(marker)
    return recorded.get("mlflow_run_id") if recorded.get("fingerprint") == fingerprint() else None


def _prepare_checkpoints(checkpoint_dir: Path, fingerprint: str, processes: int = 1, run_id: str | None = None) -> bool:
    """Keep checkpoints only when they belong to this exact run; return whether one can be resumed.

    A checkpoint a killed process left half-written (no trainer_state.json, which the Trainer
    writes last) is removed, so the resume starts from the last complete one. Checkpoints of this
    run written under another process count are refused: the data order would not line up.
    """
    marker = checkpoint_dir / FINGERPRINT
    if checkpoint_dir.exists():
        recorded = read_json(marker) if marker.is_file() else {}
        if recorded.get("fingerprint") != fingerprint:
            shutil.rmtree(checkpoint_dir)
        elif recorded.get("processes", 1) != processes and _complete_checkpoints(checkpoint_dir):
            raise ConfigError(
                f"{checkpoint_dir} holds this run interrupted under train.processes={recorded.get('processes', 1)}; "
                f"resume it with that count, or delete {checkpoint_dir} to start over with train.processes={processes}"
            )
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for partial in checkpoint_dir.glob("checkpoint-*"):
        if partial.is_dir() and not (partial / "trainer_state.json").is_file():
            shutil.rmtree(partial)
    write_json(marker, {"fingerprint": fingerprint, "processes": processes, "mlflow_run_id": run_id})
    return bool(_complete_checkpoints(checkpoint_dir))


def _trainer_class():
    from transformers import Trainer

    class FiniteLossTrainer(Trainer):
        """Trainer that stops on the first non-finite loss, before the optimizer step or a save."""

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = result[0] if return_outputs else result
            if model.training and not torch.isfinite(loss.detach()).all():
                step = self.state.global_step
                saved = sorted(Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss.item()}) at step {step + 1}; training stopped and "
                    f"{kept}. Lower train.learning_rate or check the data."
                )
            return result

    return FiniteLossTrainer


class _SaveMarker(TrainerCallback):
    """Logs `olora-marker train:saved-<step>` once a checkpoint is complete on disk (fault tests act on it)."""

    def on_save(self, args, state, control, **kwargs):
        marker(f"train:saved-{state.global_step}")


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Once the outputs, metrics and MLflow run are complete: the checkpoints have served, and a finished
    run must never pass for an interrupted one."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


class _ThroughputMeter(TrainerCallback):
    """Counts non-padding tokens and seconds of the steps this process runs (after a resume too).

    `elapsed` seconds include periodic validation (a whole-stage throughput); `eval_seconds` is the
    part spent validating, so the training-only rate can be reported beside it.
    """

    def __init__(self):
        self.start_time = self.start_tokens = None
        self.eval_seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start_time is None:
            self.start_time, self.start_tokens = time.perf_counter(), int(state.num_input_tokens_seen or 0)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.start_time is not None and metrics and "eval_runtime" in metrics:
            self.eval_seconds += float(metrics["eval_runtime"])

    def elapsed(self, state) -> tuple[float, int]:
        if self.start_time is None:
            return 0.0, 0
        return time.perf_counter() - self.start_time, int(state.num_input_tokens_seen or 0) - self.start_tokens


def packing_is_exact(model, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the model keeps packed examples apart: the same logits for two sequences packed as one by one.

    transformers builds a block-diagonal causal mask from restarting position ids (with no
    attention mask and no cache); a model whose attention ignores them would mix examples.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    a, b = torch.randint(0, vocab, (7,), generator=generator), torch.randint(0, vocab, (5,), generator=generator)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            one = [model(input_ids=x[None].to(device), use_cache=False).logits[0].float() for x in (a, b)]
            position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
            packed = model(input_ids=torch.cat([a, b])[None].to(device), position_ids=position_ids, use_cache=False)
    finally:
        model.train(was_training)
    reference = torch.cat(one)
    error = float((packed.logits[0].float() - reference).norm() / reference.norm().clamp_min(1e-12))
    return error < (1e-4 if dtype == torch.float32 else 3e-2)


def padding_waste(lengths: list[int], micro_batch: int, samples: int = 64, seed: int = 0) -> float:
    """Expected share of a padded micro-batch that is padding, over random micro-batches of these lengths."""
    import random

    if not lengths or micro_batch <= 1:
        return 0.0
    rng = random.Random(seed)
    real = padded = 0
    for _ in range(samples):
        batch = rng.sample(lengths, min(micro_batch, len(lengths)))
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1.0 - real / padded


PACKING_MIN_WASTE = 0.1  # below this, packing's longer attention costs more than the padding it saves


def world() -> tuple[int, int]:
    """(rank, world size) of this process under a torch.distributed launcher; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _weights_checksum(model) -> float:
    return float(sum(p.detach().double().sum().item() * (i + 1) for i, p in enumerate(
        q for _, q in sorted(model.named_parameters()) if q.requires_grad)))


def train_adapter(
    cfg: Config,
    ref: models.ModelRef,
    runtime: Runtime,
    data_dir: Path,
    init_dir: Path,
    adapter_dir: Path,
    exported_dir: Path,
    checkpoint_dir: Path,
    callbacks: list | None = None,
    run_id: str | None = None,
) -> TrainResult:
    """Fine-tune and write the trained and exported adapters; returns metrics and the loss history.

    Under a distributed launch every process trains from the same initial adapter (DDP keeps the
    weights identical; the metrics record each rank's checksum) and only rank 0 writes outputs.
    Checkpoints stay in `checkpoint_dir` (with `run_id`, the MLflow run a resume continues); the
    caller removes them once everything the run produces is recorded (`remove_checkpoints`).
    """
    from accelerate import PartialState
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, TrainingArguments

    rank, world_size = world()
    main = rank == 0

    meta = read_json(Path(init_dir) / INIT_META)
    expected = {"init": cfg.adapter.init, "r": cfg.adapter.r, "alpha": cfg.adapter.alpha, "base_model": cfg.model.name}
    stale = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if stale:
        raise ConfigError(
            f"the initial adapter in {init_dir} was built with other settings {stale} (saved, configured); "
            "re-run the init stage (`dvc repro init`)"
        )
    seed_everything(cfg.train.seed)
    tokenizer = models.load_tokenizer(ref)
    train_rows = tokenize_split(tokenizer, read_jsonl(Path(data_dir) / TRAIN_FILE), cfg.data.max_seq_length)
    val_rows = tokenize_split(tokenizer, read_jsonl(Path(data_dir) / VALIDATION_FILE), cfg.data.max_seq_length)
    if cfg.train.max_eval_examples:
        val_rows = val_rows[: cfg.train.max_eval_examples]

    import datasets

    train_set = datasets.Dataset.from_list(train_rows)
    val_set = datasets.Dataset.from_list(val_rows)
    base = models.load_base(ref, runtime)
    base.config.use_cache = False  # training: no KV cache (it would also hide packed-sequence boundaries)
    model = peft_glue.load_for_training(base, init_dir, cfg.adapter.init)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    t = cfg.train
    waste = padding_waste([len(r["input_ids"]) for r in train_rows], t.micro_batch_size)
    packed = t.padding_free and waste >= PACKING_MIN_WASTE and packing_is_exact(model, runtime.device, runtime.dtype)
    if t.padding_free and waste >= PACKING_MIN_WASTE and not packed:
        log.warning("train.padding_free: %s does not keep packed examples apart; training with padded batches",
                    type(base).__name__)
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=t.max_steps if t.max_steps else -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=runtime.device.type == "cpu",
        bf16=runtime.is_cuda and runtime.dtype == torch.bfloat16,
        fp16=runtime.is_cuda and runtime.dtype == torch.float16,
        include_num_input_tokens_seen="all" if packed else "non_padding",  # packed batches hold no padding
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        ddp_backend=("gloo" if runtime.device.type == "cpu" else "nccl") if world_size > 1 else None,
        ddp_find_unused_parameters=False if world_size > 1 else None,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
    )
    state = PartialState()  # the process group, set up by TrainingArguments under a launcher
    fingerprint = run_fingerprint(cfg, data_dir, init_dir)
    if main:
        resume = _prepare_checkpoints(Path(checkpoint_dir), fingerprint, world_size, run_id)
    state.wait_for_everyone()
    if not main:
        resume = bool(_complete_checkpoints(Path(checkpoint_dir)))
    collator = (DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if packed
                else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collator,
        callbacks=callbacks or [],
    )
    meter = _ThroughputMeter()
    trainer.add_callback(meter)
    trainer.add_callback(_SaveMarker())
    finished = _finished_checkpoint(Path(checkpoint_dir)) if resume else None
    if finished is not None:
        # killed after the last step's checkpoint but before the outputs: take that checkpoint as the result
        # (the Trainer would run one step more when resumed at max_steps)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import TrainerState

        set_peft_model_state_dict(model, load_file(str(finished / ADAPTER_WEIGHTS)))
        trainer.state = TrainerState.load_from_json(str(finished / "trainer_state.json"))
        log.info("train: %s already holds the final step; its adapter is the result", finished)
    else:
        trainer.train(resume_from_checkpoint=True if resume else None)
    seconds, tokens = meter.elapsed(trainer.state)
    train_only = seconds - meter.eval_seconds  # before any final evaluation below
    history = trainer.state.log_history
    if not any("eval_loss" in h and h.get("step") == trainer.state.global_step for h in history):
        trainer.evaluate()
        history = trainer.state.log_history

    checksums = [_weights_checksum(model)]
    if world_size > 1:
        import torch.distributed as dist

        checksums = [None] * world_size
        dist.all_gather_object(checksums, _weights_checksum(model))
    if main:
        with atomic_dir(Path(adapter_dir)) as tmp:
            peft_glue.save_adapter(model, tmp, ref.name)
            shutil.copy(Path(init_dir) / INIT_META, tmp / INIT_META)
            if (Path(data_dir) / TEMPLATE_FILE).is_file():  # what the adapter was trained on, for serving
                shutil.copy(Path(data_dir) / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
        with atomic_dir(Path(exported_dir)) as tmp:
            peft_glue.export_plain_lora(model, tmp, Path(init_dir), cfg.adapter.init, ref.name)
    state.wait_for_everyone()

    train_losses = [h["loss"] for h in history if "loss" in h]
    val_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    metrics = {
        "steps": trainer.state.global_step,
        "final_train_loss": train_losses[-1] if train_losses else math.nan,
        "final_val_loss": val_losses[-1] if val_losses else math.nan,
        "best_val_loss": min(val_losses) if val_losses else math.nan,
        "train_seconds": round(seconds, 3),
        "tokens_trained": tokens,
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else 0.0,
        "train_tokens_per_second": round(tokens / train_only, 2) if train_only > 0 else 0.0,
        "resumed": bool(resume),
        "processes": world_size,
        "effective_batch": world_size * t.micro_batch_size * t.gradient_accumulation_steps,
        "padding_free": packed,
        "padding_share_avoided": round(waste, 4) if packed else 0.0,
        "rank_weight_checksums": checksums,
        "weights_identical_across_ranks": len(set(checksums)) == 1,
        "peak_memory_mb": round(peak_memory_bytes(runtime) / 2**20, 1),
        "device": str(runtime.device),
        "dtype": runtime.dtype_name,
    }
    return TrainResult(Path(adapter_dir), Path(exported_dir), metrics, history)


def train(layout: Layout = Layout(), overrides: dict[str, Any] | None = None, callbacks=None) -> dict[str, Any]:
    """The stage: data/prepared + models/init -> models/adapter, models/exported, metrics, loss curves.

    Opens the adapter's MLflow run (tracking.enabled) and records its id in models/adapter. With
    train.processes > 1 it launches itself under torch.distributed's launcher and returns rank 0's metrics.
    """
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides)
    rank, world_size = world()
    if world_size == 1 and cfg.train.processes > 1:
        check_distributed(cfg, runtime)
        return _launch(layout, overrides, cfg.train.processes)
    if world_size != cfg.train.processes:
        raise ConfigError(
            f"this train stage was launched with {world_size} processes but train.processes={cfg.train.processes}; "
            f"set train.processes={world_size} so the recorded effective batch is the one that ran"
        )
    main = rank == 0
    callbacks = list(callbacks or [])
    run = None
    if cfg.tracking.enabled and main:  # one MLflow run, opened by the main process only
        from olora.tracking import runs
        from olora.tracking.callback import BatchLogger

        # a resumed run continues the MLflow run it started (recorded beside its checkpoints)
        previous = resumable_run_id(layout.checkpoints, lambda: run_fingerprint(cfg, layout.data, layout.init))
        run = runs.start_training_run(cfg, layout.root, ref.name, ref.revision, resume_run_id=previous)
        batch_logger = BatchLogger(*run, held=BatchLogger.held_by(*run) if previous else None)
        callbacks.append(batch_logger.callback)
    try:
        result = train_adapter(
            cfg, ref, runtime, layout.data, layout.init, layout.adapter, layout.exported, layout.checkpoints, callbacks,
            run_id=run[1] if run else None,
        )
    except BaseException as exc:
        if run and not isinstance(exc, KeyboardInterrupt):
            try:  # best effort: the error itself matters more than the run's status
                run[0].set_terminated(run[1], "FAILED")
            except Exception:  # noqa: BLE001 - e.g. the tracking server is down too
                log.warning("train: could not mark MLflow run %s as failed", run[1])
        raise
    if not main:
        return result.metrics
    if run:
        result.metrics["tracking_seconds"] = round(batch_logger.seconds, 4)
        result.metrics["tracking_sends"] = batch_logger.sends
        result.metrics["tracking_values_sent"] = batch_logger.values_sent
        result.metrics["tracking_share_of_train_time"] = round(batch_logger.seconds / max(result.metrics["train_seconds"], 1e-9), 6)
        runs.finish_training_run(*run, cfg, result.metrics, result.history, layout.exported, layout.adapter)
    _write_curve(layout.plot("train_loss"), [(h["step"], h["loss"]) for h in result.history if "loss" in h], "loss")
    _write_curve(
        layout.plot("val_loss"), [(h["step"], h["eval_loss"]) for h in result.history if "eval_loss" in h], "val_loss"
    )
    write_json(layout.metrics("train"), result.metrics)
    remove_checkpoints(layout.checkpoints)
    log.info("train: %s steps, final val loss %.4f", result.metrics["steps"], result.metrics["final_val_loss"])
    return result.metrics


def check_distributed(cfg: Config, runtime: Runtime) -> None:
    """Refuse a process count the machine cannot run, before any model loads."""
    n = cfg.train.processes
    if runtime.device.type == "mps":
        raise ConfigError(f"train.processes={n} is not supported on MPS; use train.processes=1")
    if runtime.device.type == "cuda":
        if runtime.device.index is not None and cfg.model.device != "auto":
            raise ConfigError(
                f"model.device={cfg.model.device!r} pins one GPU, but train.processes={n} needs one GPU per process; "
                "use model.device=cuda or auto"
            )
        visible = torch.cuda.device_count()
        if n > visible:
            raise ConfigError(
                f"train.processes={n} but only {visible} CUDA device(s) are visible; use train.processes<={visible} "
                "(one process per GPU), or model.device=cpu"
            )


def _launch(layout: Layout, overrides: dict[str, Any] | None, processes: int) -> dict[str, Any]:
    """Run this stage in `processes` processes through torch.distributed's launcher (torchrun) and wait."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "olora.cli", "--root", str(layout.root)]
    for key, value in (overrides or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    command.append("train")
    log.info("train: launching %d processes: %s", processes, " ".join(command))
    done = subprocess.run(command, env=os.environ.copy())
    if done.returncode != 0:
        raise OloraError(
            f"distributed training with train.processes={processes} failed (exit code {done.returncode}); the "
            f"processes' errors are printed above. Complete checkpoints in {layout.checkpoints} are kept, so a "
            "re-run resumes from the last one"
        )
    return read_json(layout.metrics("train"))


def _write_curve(path: Path, points: list[tuple[int, float]], column: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", column])
        writer.writerows(points)
    tmp.replace(path)
