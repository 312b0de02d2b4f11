"""Stage `train`: fine-tune the initialised adapter with transformers' Trainer (accelerate underneath).

Response-only loss (prompt tokens masked), validation loss every N steps, checkpoints that let an
interrupted run resume where it stopped (only when its inputs are unchanged), a fixed seed, and a
stop on the first NaN/inf loss that keeps the last good checkpoint. Outputs the trained adapter
and an exported plain LoRA that loads on an untouched base.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

import csv
import logging

from olora import models, peft_glue
from olora.config import Config
from olora.data.templates import encode
from olora.errors import ConfigError, NonFiniteLossError
from olora.io import atomic_dir, read_json, read_jsonl, write_json
from olora.layout import INIT_META, TEMPLATE_FILE, TRAIN_FILE, VALIDATION_FILE, Layout
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
    """What a checkpoint must match to be resumed: training settings, data and initial adapter."""
    payload = {
        "model": [cfg.model.name, cfg.model.dtype],
        "data.max_seq_length": cfg.data.max_seq_length,
        "adapter": cfg.to_dict()["adapter"],
        "train": cfg.to_dict()["train"],
        "data": _file_digest(list(Path(data_dir).glob("*.jsonl"))),
        "init": _file_digest([p for p in Path(init_dir).iterdir() if p.is_file()]),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prepare_checkpoints(checkpoint_dir: Path, fingerprint: str) -> bool:
    """Keep checkpoints only when they belong to this exact run; return whether one can be resumed."""
    marker = checkpoint_dir / FINGERPRINT
    if checkpoint_dir.exists():
        same = marker.is_file() and read_json(marker).get("fingerprint") == fingerprint
        if not same:
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fingerprint})
    return any(p.is_dir() and p.name.startswith("checkpoint-") for p in checkpoint_dir.iterdir())


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


class _ThroughputMeter(TrainerCallback):
    """Counts non-padding tokens and seconds of the steps this process runs (after a resume too).

    The seconds include periodic validation; the figure is a whole-stage throughput.
    """

    def __init__(self):
        self.start_time = self.start_tokens = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start_time is None:
            self.start_time, self.start_tokens = time.perf_counter(), int(state.num_input_tokens_seen or 0)

    def elapsed(self, state) -> tuple[float, int]:
        if self.start_time is None:
            return 0.0, 0
        return time.perf_counter() - self.start_time, int(state.num_input_tokens_seen or 0) - self.start_tokens


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
) -> TrainResult:
    """Fine-tune and write the trained and exported adapters; returns metrics and the loss history."""
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

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
    model = peft_glue.load_for_training(base, init_dir, cfg.adapter.init)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()

    resume = _prepare_checkpoints(Path(checkpoint_dir), run_fingerprint(cfg, data_dir, init_dir))
    t = cfg.train
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
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=callbacks or [],
    )
    meter = _ThroughputMeter()
    trainer.add_callback(meter)
    trainer.train(resume_from_checkpoint=True if resume else None)
    seconds, tokens = meter.elapsed(trainer.state)
    history = trainer.state.log_history
    if not any("eval_loss" in h and h.get("step") == trainer.state.global_step for h in history):
        trainer.evaluate()
        history = trainer.state.log_history

    with atomic_dir(Path(adapter_dir)) as tmp:
        model.save_pretrained(str(tmp))
        shutil.copy(Path(init_dir) / INIT_META, tmp / INIT_META)
        if (Path(data_dir) / TEMPLATE_FILE).is_file():  # what the adapter was trained on, for serving
            shutil.copy(Path(data_dir) / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
    with atomic_dir(Path(exported_dir)) as tmp:
        peft_glue.export_plain_lora(model, tmp, Path(init_dir), cfg.adapter.init)

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
        "resumed": bool(resume),
        "peak_memory_mb": round(peak_memory_bytes(runtime) / 2**20, 1),
        "device": str(runtime.device),
        "dtype": runtime.dtype_name,
    }
    return TrainResult(Path(adapter_dir), Path(exported_dir), metrics, history)


def train(layout: Layout = Layout(), overrides: dict[str, Any] | None = None, callbacks=None) -> dict[str, Any]:
    """The stage: data/prepared + models/init -> models/adapter, models/exported, metrics, loss curves.

    Opens the adapter's MLflow run (tracking.enabled) and records its id in models/adapter.
    """
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides)
    callbacks = list(callbacks or [])
    run = None
    if cfg.tracking.enabled:
        from olora.tracking import runs
        from olora.tracking.callback import BatchLogger

        run = runs.start_training_run(cfg, layout.root, ref.name, ref.revision)
        batch_logger = BatchLogger(*run)
        callbacks.append(batch_logger.callback)
    try:
        result = train_adapter(
            cfg, ref, runtime, layout.data, layout.init, layout.adapter, layout.exported, layout.checkpoints, callbacks
        )
    except BaseException:
        if run:
            run[0].set_terminated(run[1], "FAILED")
        raise
    if run:
        result.metrics["tracking_seconds"] = round(batch_logger.seconds, 4)
        result.metrics["tracking_share_of_train_time"] = round(batch_logger.seconds / max(result.metrics["train_seconds"], 1e-9), 6)
        runs.finish_training_run(*run, cfg, result.metrics, result.history, layout.exported, layout.adapter)
    _write_curve(layout.plot("train_loss"), [(h["step"], h["loss"]) for h in result.history if "loss" in h], "loss")
    _write_curve(
        layout.plot("val_loss"), [(h["step"], h["eval_loss"]) for h in result.history if "eval_loss" in h], "val_loss"
    )
    write_json(layout.metrics("train"), result.metrics)
    log.info("train: %s steps, final val loss %.4f", result.metrics["steps"], result.metrics["final_val_loss"])
    return result.metrics


def _write_curve(path: Path, points: list[tuple[int, float]], column: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", column])
        writer.writerows(points)
    tmp.replace(path)
