"""Fine-tuning the initialised adapter with transformers' Trainer (accelerate underneath).

Response-only loss (prompt tokens masked), padding-free batches where they pay and the model keeps
examples apart (`olora.training.packing`), validation loss every `train.eval_steps`, checkpoints an
interrupted run resumes from (`olora.training.checkpoints`), a fixed seed, and a stop on the first
NaN/inf loss that keeps the last good checkpoint. Under a distributed launch every process trains
and only rank 0 writes the trained adapter and the exported plain LoRA.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from olora.config import Config, TrainConfig
from olora.data.templates import encode, encode_segments
from olora.errors import ConfigError, NonFiniteLossError, OloraError
from olora.faults import marker
from olora.io import atomic_dir, read_json, read_jsonl
from olora.layout import ADAPTER_WEIGHTS, INIT_META, TEMPLATE_FILE, TRAIN_FILE, VALIDATION_FILE, Layout
from olora.modeling import models, peft_glue
from olora.modeling.runtime import Runtime, peak_memory_bytes, seed_everything
from olora.training import checkpoints
from olora.training.distributed import gather_checksums, weights_checksum_of, world
from olora.training.packing import PACKING_MIN_WASTE, packing_is_exact, padding_waste

log = logging.getLogger("olora")


@dataclass(frozen=True)
class TrainPaths:
    """Where training reads (prepared data, initial adapter) and writes (adapter, export, checkpoints)."""

    data: Path
    init: Path
    adapter: Path
    exported: Path
    checkpoints: Path

    @classmethod
    def of(cls, layout: Layout) -> "TrainPaths":
        return cls(layout.data, layout.init, layout.adapter, layout.exported, layout.checkpoints)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    exported_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def tokenize_split(tokenizer, rows: list[dict[str, Any]], max_len: int) -> list[dict[str, list[int]]]:
    out = []
    for row in rows:
        if "segments" in row:  # a conversation: the loss on every assistant turn
            encoded = encode_segments(tokenizer, [(text, bool(trainable)) for text, trainable in row["segments"]], max_len)
        else:
            encoded = encode(tokenizer, row["prompt"], row["response"], max_len)
        if encoded is not None:
            ids, labels, _ = encoded
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def check_initial_adapter(cfg: Config, init_dir: Path) -> None:
    """Refuse an initial adapter built with other settings (before any model loads)."""
    meta = read_json(Path(init_dir) / INIT_META)
    expected = {"init": cfg.adapter.init, "r": cfg.adapter.r, "alpha": cfg.adapter.alpha, "base_model": cfg.model.name}
    stale = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if stale:
        raise ConfigError(
            f"the initial adapter in {init_dir} was built with other settings {stale} (saved, configured); "
            "re-run the init stage (`dvc repro init`)"
        )


def _trainer_class():
    from transformers import Trainer

    class FiniteLossTrainer(Trainer):
        """Trainer that stops on the first non-finite loss, before the optimizer step or a save."""

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            _fsdp_on_cpu(self)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = result[0] if return_outputs else result
            if model.training and not torch.isfinite(loss.detach()).all():
                step = self.state.global_step
                saved = checkpoints.complete(Path(self.args.output_dir))
                kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss.item()}) at step {step + 1}; training stopped and "
                    f"{kept}. Lower train.learning_rate or check the data."
                )
            return result

    return FiniteLossTrainer


def _fsdp_on_cpu(trainer) -> None:
    """train.strategy=fsdp on CPU processes (gloo): accelerate 1.15 takes FSDP for GPU-like devices only and
    on CPU silently falls back to DDP, although torch's FSDP2 (`fully_shard`) runs over gloo. Select it the
    way accelerate itself does for GPUs (AcceleratorState and PartialState both say FSDP, with the plugin
    the Trainer built from `fsdp_config`); from there accelerate's own FSDP2 code wraps, saves and resumes."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if not trainer.args.fsdp_plugin_args or state.distributed_type != DistributedType.MULTI_CPU:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() copies it back
    trainer.is_fsdp_enabled = True
    if not trainer.accelerator.is_fsdp2:
        raise OloraError("train.strategy=fsdp: accelerate did not take FSDP2 on CPU; check the accelerate version in requirements.lock")


def sharding_arguments(t: TrainConfig, runtime: Runtime, layer_classes: list[str]) -> dict[str, Any]:
    """TrainingArguments for train.strategy: DDP's backend, FSDP2's config, or a DeepSpeed ZeRO-3 config.

    FSDP2 wraps each decoder layer (`layer_classes`, the model's `_no_split_modules`) and saves full
    state dicts so that checkpoints hold a loadable adapter. ZeRO-3 takes batch, clipping
    and precision from the Trainer ("auto") and gathers the 16-bit weights on save.
    """
    if t.strategy == "fsdp":
        return {"fsdp": True, "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layer_classes,
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
            # train.gradient_checkpointing stays transformers' own: FSDP's wraps each layer in a checkpoint
            # wrapper whose names PEFT no longer finds when it saves the adapter
            "activation_checkpointing": False,
        }}
    if t.strategy == "deepspeed":
        return {"deepspeed": {
            "zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }}
    return {}


def _is_sharded(trainer) -> bool:
    return bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)


def held_share(model) -> float:
    """Share of the model's parameter elements this process holds: 1.0 unsharded, about 1/N under FSDP2
    (DTensor shards) or ZeRO-3 (partitioned `ds_tensor`s) over N processes."""
    held = total = 0
    for p in model.parameters():
        full = getattr(p, "ds_numel", None) or p.numel()
        local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)
        held, total = held + local.numel(), total + full
    return held / total if total else 1.0


class _SaveMarker(TrainerCallback):
    """Logs `olora-marker train:saved-<step>` once a checkpoint is complete on disk (fault tests act on it)."""

    def on_save(self, args, state, control, **kwargs):
        marker(f"train:saved-{state.global_step}")


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


def training_arguments(t: TrainConfig, runtime: Runtime, output_dir: Path, packed: bool, world_size: int,
                       layer_classes: list[str] | None = None):
    """transformers' TrainingArguments for these settings (the one place they are translated)."""
    from transformers import TrainingArguments

    ddp = t.strategy == "ddp"
    sharding = sharding_arguments(t, runtime, list(layer_classes or []))
    return TrainingArguments(
        output_dir=str(output_dir),
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
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
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
        ddp_backend=("gloo" if runtime.device.type == "cpu" else "nccl") if world_size > 1 or not ddp else None,
        ddp_find_unused_parameters=False if world_size > 1 and ddp else None,
        save_on_each_node=t.nodes > 1,  # each machine resumes from its own copy of the checkpoints
        **sharding,
    )


def _check_same_resume_point(checkpoint_dir: Path, world_size: int) -> None:
    """Every process must resume from the same step (on several machines each reads its own copy)."""
    import torch.distributed as dist

    done = checkpoints.complete(checkpoint_dir)
    mine = done[-1].name if done else None
    every: list = [None] * world_size
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        raise OloraError(
            f"the training processes would resume from different checkpoints ({', '.join(sorted(map(str, set(every))))} "
            f"by rank: {every}); a machine lost its copy of {checkpoint_dir}. Copy node 0's checkpoints to every node, or "
            "delete them everywhere to start over"
        )


def _take_finished(trainer, model, checkpoint: Path) -> None:
    """Killed after the last step's checkpoint but before the outputs: that checkpoint is the result
    (the Trainer would run one step more when resumed at max_steps)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(model, load_file(str(checkpoint / ADAPTER_WEIGHTS)))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    log.info("train: %s already holds the final step; its adapter is the result", checkpoint)


def _save_outputs(model, paths: TrainPaths, cfg: Config, base_name: str, full_state: dict | None = None) -> None:
    """The trained adapter and its plain-LoRA export. `full_state`: gathered from sharded processes; the
    export is then converted from the saved files (no process holds the whole model)."""
    with atomic_dir(paths.adapter) as tmp:
        peft_glue.save_adapter(model, tmp, base_name, state_dict=full_state)
        shutil.copy(paths.init / INIT_META, tmp / INIT_META)
        if (paths.data / TEMPLATE_FILE).is_file():  # what the adapter was trained on, for serving
            shutil.copy(paths.data / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
    with atomic_dir(paths.exported) as tmp:
        if full_state is not None and cfg.adapter.rewrites_base:
            peft_glue.convert_to_plain_lora(paths.adapter, paths.init, tmp)
        elif full_state is not None:
            peft_glue.save_adapter(model, tmp, base_name, state_dict=full_state)
        else:
            peft_glue.export_plain_lora(model, tmp, paths.init, cfg.adapter.init, base_name)


def train_adapter(cfg: Config, ref: models.ModelRef, runtime: Runtime, paths: TrainPaths, fingerprint: str,
                  callbacks: list | None = None, run_id: str | None = None) -> TrainResult:
    """Fine-tune and write the trained and exported adapters; returns metrics and the loss history.

    `fingerprint` (`checkpoints.run_fingerprint`) decides which checkpoints this run may resume;
    `run_id` is stored beside them so a resume continues the same MLflow run. The caller removes
    the checkpoints once everything the run produces is recorded (`checkpoints.remove`). The steps,
    in order (the order fixes what the seed gives): data, model, batching, resume point, trainer,
    training, outputs, metrics.
    """
    from accelerate import PartialState

    rank, world_size = world()
    main = rank == 0
    check_initial_adapter(cfg, paths.init)
    seed_everything(cfg.train.seed)
    tokenizer = models.load_tokenizer(ref)
    train_rows, val_rows = _load_splits(cfg, tokenizer, paths.data)
    base, model = _load_model(cfg, ref, runtime, paths.init)
    packed, waste = _choose_batching(cfg.train, base, model, runtime, train_rows)
    args = training_arguments(cfg.train, runtime, paths.checkpoints, packed, world_size, getattr(base, "_no_split_modules", None))
    state = PartialState()  # the process group, set up by TrainingArguments under a launcher
    resume = _resume_point(state, paths.checkpoints, fingerprint, world_size, run_id if main else None)
    trainer, meter = _build_trainer(model, args, tokenizer, train_rows, val_rows, packed, callbacks)
    seconds, tokens, train_only = _run_training(trainer, model, meter, paths.checkpoints, resume)
    sharded, share, checksums = _write_outputs(trainer, model, paths, cfg, ref.name, main, world_size)
    state.wait_for_everyone()
    history = trainer.state.log_history
    metrics = _train_metrics(cfg.train, runtime, trainer, history, seconds, tokens, train_only, resume, world_size,
                             packed, waste, sharded, share, checksums)
    return TrainResult(paths.adapter, paths.exported, metrics, history)


def _load_splits(cfg: Config, tokenizer, data: Path) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """The prepared train and validation rows, tokenised (validation capped at `train.max_eval_examples`)."""
    train_rows = tokenize_split(tokenizer, read_jsonl(data / TRAIN_FILE), cfg.data.max_seq_length)
    val_rows = tokenize_split(tokenizer, read_jsonl(data / VALIDATION_FILE), cfg.data.max_seq_length)
    if cfg.train.max_eval_examples:
        val_rows = val_rows[: cfg.train.max_eval_examples]
    return train_rows, val_rows


def _load_model(cfg: Config, ref: models.ModelRef, runtime: Runtime, init_dir: Path):
    """The base (no KV cache) with the initialised adapter on it, ready to train: (base, peft model)."""
    base = models.load_base(ref, runtime)
    base.config.use_cache = False  # training: no KV cache (it would also hide packed-sequence boundaries)
    model = peft_glue.load_for_training(base, init_dir, cfg.adapter.init, cfg.train.gradient_checkpointing)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return base, model


def _choose_batching(t: TrainConfig, base, model, runtime: Runtime, train_rows: list[dict[str, list[int]]]) -> tuple[bool, float]:
    """Padding-free (packed) batches when asked, when padding would waste enough, and when the model keeps them apart."""
    waste = padding_waste([len(r["input_ids"]) for r in train_rows], t.micro_batch_size)
    wanted = t.padding_free and waste >= PACKING_MIN_WASTE
    packed = wanted and packing_is_exact(model, runtime.device, runtime.dtype)
    if wanted and not packed:
        log.warning("train.padding_free: %s does not keep packed examples apart; training with padded batches",
                    type(base).__name__)
    return packed, waste


def _resume_point(state, checkpoint_dir: Path, fingerprint: str, world_size: int, run_id: str | None) -> bool:
    """Whether this run resumes from a checkpoint; each machine's first process prepares its own checkpoints."""
    local_main = state.local_process_index == 0  # each machine keeps its own checkpoints (save_on_each_node)
    if local_main:
        resume = checkpoints.prepare(checkpoint_dir, fingerprint, world_size, run_id)
    state.wait_for_everyone()
    if not local_main:
        resume = bool(checkpoints.complete(checkpoint_dir))
    if world_size > 1:
        _check_same_resume_point(checkpoint_dir, world_size)
    return resume


def _build_trainer(model, args, tokenizer, train_rows, val_rows, packed: bool, callbacks: list | None):
    """transformers' Trainer over the rows (packed or padded batches), with the throughput meter and save marker."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    collator = (DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if packed
                else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = _trainer_class()(model=model, args=args, train_dataset=datasets.Dataset.from_list(train_rows),
                               eval_dataset=datasets.Dataset.from_list(val_rows), data_collator=collator,
                               callbacks=callbacks or [])
    meter = _ThroughputMeter()
    trainer.add_callback(meter)
    trainer.add_callback(_SaveMarker())
    return trainer, meter


def _run_training(trainer, model, meter: "_ThroughputMeter", checkpoint_dir: Path, resume: bool) -> tuple[float, int, float]:
    """Train (or take a finished run's final checkpoint), then a validation loss at the last step if none was logged.

    Returns (seconds, tokens trained, seconds without validation)."""
    done = checkpoints.finished(checkpoint_dir) if resume else None
    if done is not None:
        _take_finished(trainer, model, done)
    else:
        try:
            trainer.train(resume_from_checkpoint=True if resume else None)
        except Exception as exc:
            full = checkpoints.disk_full(checkpoint_dir, exc)
            if full is None:
                raise
            raise full from exc
    seconds, tokens = meter.elapsed(trainer.state)
    train_only = seconds - meter.eval_seconds  # before any final evaluation below
    if not any("eval_loss" in h and h.get("step") == trainer.state.global_step for h in trainer.state.log_history):
        trainer.evaluate()
    return seconds, tokens, train_only


def _write_outputs(trainer, model, paths: TrainPaths, cfg: Config, base_name: str, main: bool,
                   world_size: int) -> tuple[bool, float, list]:
    """Rank 0 writes the trained and exported adapters; returns (sharded, rank 0's parameter share, weight checksums)."""
    sharded = _is_sharded(trainer)
    share = held_share(trainer.model)
    # sharded: every process holds a part of each weight; the full state is gathered to rank 0 (a collective)
    full_state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    if sharded:
        checksums = [weights_checksum_of(full_state)] if main else []
    else:
        checksums = gather_checksums(model, world_size)
    if main:
        _save_outputs(model, paths, cfg, base_name, full_state)
    return sharded, share, checksums


def _train_metrics(t: TrainConfig, runtime: Runtime, trainer, history: list[dict[str, Any]], seconds: float, tokens: int,
                   train_only: float, resume: bool, world_size: int, packed: bool, waste: float, sharded: bool,
                   share: float, checksums: list) -> dict[str, Any]:
    """metrics/train.json: losses, throughput, what ran where."""
    train_losses = [h["loss"] for h in history if "loss" in h]
    val_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {
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
        "strategy": t.strategy,
        "sharded": sharded,
        "rank0_parameter_share": round(share, 4),
        "rank_weight_checksums": checksums,  # sharded: one, of the gathered weights
        "weights_identical_across_ranks": len(set(checksums)) == 1 if not sharded else None,
        "peak_memory_mb": round(peak_memory_bytes(runtime) / 2**20, 1),
        "device": str(runtime.device),
        "dtype": runtime.dtype_name,
    }
