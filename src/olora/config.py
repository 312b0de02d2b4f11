"""The one typed configuration of the pipeline; `params.yaml` is its serialised form.

One dataclass per block. Every setting is declared once here, with its type, default and the
docstring under it (docs/parameters.md is generated from these: `olora params-table --write docs/parameters.md`);
`load_config` parses YAML into these types and rejects unknown keys (suggesting the closest known
one), wrong types and out-of-range values with a message that names the key, the bad value and what
is allowed. The `runtime` block holds knobs that cannot change any output (no stage depends on it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from olora.errors import ConfigError
from olora.layout import PARAMS

ADAPTER_INITS = ("olora", "lora", "pissa", "orthogonal", "eva", "corda", "lora_ga")
REWRITING_INITS = ("olora", "pissa", "corda", "lora_ga")  # the base becomes W - s·B0·A0; exported at rank 2r
DATA_DRIVEN_INITS = ("eva", "corda", "lora_ga")  # read a calibration sample of the prepared train split
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]


@dataclass
class ModelConfig:
    name: str = "embedded:SmolLM2-135M-Instruct"
    """Base model: `embedded:<name>` (shipped in a PyPI package), a local folder, or a hub id."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of the base; ignored for embedded and local models."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps. auto picks CUDA when present, else CPU."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. auto is bf16 on CUDA with bf16 support, fp16 on older GPUs, else fp32."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model or tokenizer (transformers' trust_remote_code). Off: only architectures built into transformers load. Turn on only for a model whose code you have read."""
    quantization: str = "none"
    """none | 4bit. 4bit is QLoRA: the base loads as 4-bit NF4 through bitsandbytes (double quantisation, computing in model.dtype) and the OLoRA init runs through PEFT's dequantise-initialise-requantise path; needs a CUDA device and the bitsandbytes package."""

    def validate(self) -> None:
        kind, sep, index = self.device.partition(":")
        if kind not in ("auto", "cpu", "cuda", "mps") or (sep and (kind != "cuda" or not index.isdigit())):
            raise ConfigError(
                f"model.device={self.device!r} is not allowed; choose one of: auto, cpu, cuda, cuda:N (N a GPU index), mps"
            )
        _choice("model.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        _choice("model.quantization", self.quantization, ["none", "4bit"])
        if not self.name.strip():
            raise ConfigError("model.name is empty; use e.g. 'embedded:SmolLM2-135M-Instruct' or a hub id")


DATA_FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion")


@dataclass
class DataConfig:
    source: str = "embedded"
    """embedded | a local .jsonl/.json/.csv/.parquet file | a hub data set id."""
    embedded_sets: list[str] = field(default_factory=lambda: ["commonsense_qa", "social_i_qa", "trivia_qa"])
    """For source=embedded: packaged question/answer sets (none of them an evaluation benchmark)."""
    hub_subset: str | None = None
    """For a hub id: the configuration name (`name=` of datasets.load_dataset)."""
    split: str = "train"
    """For a hub id or a file: which split to read."""
    instruction_field: str = "instruction"
    """Field holding the instruction, in files and hub data."""
    input_field: str | None = "input"
    """Optional context field; rows without it (or empty) render without the Input section."""
    output_field: str = "output"
    """Field holding the expected response."""
    template: str = "alpaca"
    """alpaca (instruction / input / response) | chat (the tokenizer's chat template, or data.chat_template)."""
    format: str = "alpaca"
    """Rows of a file or hub set: alpaca (instruction/input/output fields) | messages (a list of role/content turns) | sharegpt (a list of from/value turns) | prompt_completion (prompt/completion fields). messages and sharegpt need data.template=chat."""
    conversation_field: str = ""
    """messages/sharegpt: the field holding the turns ('' = `messages` for messages, `conversations` for sharegpt)."""
    prompt_field: str = "prompt"
    """prompt_completion: the field holding the prompt (rendered through data.template like an instruction)."""
    completion_field: str = "completion"
    """prompt_completion: the field holding the completion."""
    chat_template: str = ""
    """data.template=chat: '' = the tokenizer's chat template | chatml (a named template, for tokenizers without one)."""
    max_examples: int = 0
    """Keep at most this many examples after cleaning (0 = all)."""
    max_seq_length: int = 256
    """Token budget of one example. Instruction data: prompt + response; a longer response is cut, a prompt that fills the budget alone is dropped. Conversations: the whole conversation; a longer one is cut (assistant turns past the budget leave the loss), one whose first assistant turn starts beyond it is dropped."""
    validation_fraction: float = 0.05
    """Fraction held out for validation loss, strictly between 0 and 1."""
    invalid_rows: str = "error"
    """What to do with invalid rows (missing or empty fields; in conversations also unknown roles and misplaced, empty or missing turns). error: stop, naming file, row and fault | drop: skip and count them (dropped_invalid). A file that cannot be parsed (a broken JSON line, not UTF-8) stops prepare either way."""
    seed: int = 42
    """Shuffling and split seed."""

    def validate(self) -> None:
        _choice("data.template", self.template, ["alpaca", "chat"])
        _choice("data.format", self.format, list(DATA_FORMATS))
        if self.chat_template not in ("", "chatml"):
            raise ConfigError(f"data.chat_template={self.chat_template!r} is not a named template; choose chatml, "
                              "or leave it empty ('') for the tokenizer's own chat template")
        if self.format in ("messages", "sharegpt") and self.template != "chat":
            raise ConfigError(
                f"data.format={self.format} holds conversations, which render through a chat template; "
                "set data.template=chat (the tokenizer's template, or data.chat_template=chatml where it has none)"
            )
        if self.source == "embedded" and self.format != "alpaca":
            raise ConfigError(
                f"data.format={self.format} applies to files and hub data sets; data.source=embedded is built in "
                "(instruction pairs): set data.source to your file under data/raw/ or a hub id, or data.format=alpaca"
            )
        _choice("data.invalid_rows", self.invalid_rows, ["error", "drop"])
        _at_least("data.max_examples", self.max_examples, 0)
        _at_least("data.max_seq_length", self.max_seq_length, 8)
        _open_interval("data.validation_fraction", self.validation_fraction, 0.0, 1.0)
        if self.source == "embedded" and not self.embedded_sets:
            raise ConfigError("data.embedded_sets is empty; choose from commonsense_qa, social_i_qa, trivia_qa")


@dataclass
class AdapterConfig:
    init: str = "olora"
    """olora (orthonormal init from W = QR) | lora (PEFT's standard init: the paper's baseline) | pissa (top singular vectors, W = USV) | orthogonal (B ⊥ A through a random orthogonal matrix: B·A = 0) | eva (A from the SVD of the layers' inputs on a calibration sample, B = 0) | corda (context-oriented SVD: the weight times the inputs' covariance on a calibration sample) | lora_ga (the SVD of the full-weight gradient on a calibration sample). olora, pissa, corda and lora_ga rewrite the base (W - s·B0·A0), so their export is a plain LoRA of rank 2r."""
    r: int = 8
    """Rank; must be <= the smaller dimension of every target layer (even for orthogonal)."""
    alpha: float = 16.0
    """lora_alpha; the scale is s = alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """LoRA dropout, 0 <= dropout < 1."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Names (suffixes) of the linear layers that get adapters."""
    seed: int = 0
    """Seed for the random parts of the init (LoRA's A, orthogonal, pissa_niter's sketch; OLoRA is deterministic)."""
    pissa_niter: int = 0
    """pissa only: subspace iterations of PEFT's fast randomized SVD (`pissa_niter_N`); 0 = the full SVD."""
    dora: bool = False
    """DoRA (PEFT's use_dora): a learned magnitude per output on top of the low-rank direction. Not with the inits that rewrite the base (their export drops the magnitude)."""
    rslora: bool = False
    """rsLoRA (PEFT's use_rslora): scale s = alpha / sqrt(r) instead of alpha / r."""
    calibration_samples: int = 64
    """eva, corda, lora_ga: training examples (the first of the prepared train split) the init reads."""
    calibration_batch: int = 8
    """eva, corda, lora_ga: examples per forward pass over the calibration sample. eva reads only their response tokens, and a batch with fewer than r·eva_rho of them is skipped (docs/architecture.md, EVA's cost)."""
    eva_rho: float = 1.0
    """eva only: a layer may get up to rho·r ranks when EVA redistributes them (1 = every layer keeps r, the same size as the other inits)."""

    def validate(self) -> None:
        _choice("adapter.init", self.init, list(ADAPTER_INITS))
        _at_least("adapter.r", self.r, 1)
        _positive("adapter.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout={self.dropout!r} is out of range; allowed: 0 <= dropout < 1")
        if not self.target_modules:
            raise ConfigError("adapter.target_modules is empty; list linear layer names such as q_proj, v_proj")
        _at_least("adapter.pissa_niter", self.pissa_niter, 0)
        _at_least("adapter.calibration_samples", self.calibration_samples, 1)
        _at_least("adapter.calibration_batch", self.calibration_batch, 1)
        _at_least("adapter.eva_rho", self.eva_rho, 1.0)
        if self.init == "orthogonal" and self.r % 2:
            raise ConfigError(f"adapter.r={self.r} is odd but adapter.init=orthogonal splits the rank into two halves; "
                              "use an even rank")
        if self.dora and self.init in REWRITING_INITS:
            raise ConfigError(f"adapter.dora=true cannot be combined with adapter.init={self.init}: that init rewrites "
                              "the base, and PEFT's conversion to a plain LoRA for the untouched base drops DoRA's "
                              "magnitude vector; use adapter.init lora, orthogonal or eva with DoRA, or adapter.dora=false")
        if self.calibration_batch > self.calibration_samples and self.init in DATA_DRIVEN_INITS:
            raise ConfigError(f"adapter.calibration_batch={self.calibration_batch} exceeds adapter.calibration_samples="
                              f"{self.calibration_samples}; use a batch of at most the sample size")

    def check_with(self, model: "ModelConfig") -> None:
        """What PEFT cannot initialise on the configured model (refused before any model loads)."""
        if model.quantization == "4bit" and self.init in ("pissa", "corda", "lora_ga", "orthogonal"):
            raise ConfigError(f"adapter.init={self.init} cannot initialise a model.quantization=4bit base: PEFT's "
                              f"{self.init} init needs float weights (it refuses the packed 4-bit ones); use "
                              "adapter.init olora, lora or eva with 4-bit, or model.quantization=none")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def rewrites_base(self) -> bool:
        """Whether the init rewrites the base weights (W - s·B0·A0): the export is then a plain LoRA of rank 2r."""
        return self.init in REWRITING_INITS

    @property
    def export_rank(self) -> int:
        return 2 * self.r if self.rewrites_base else self.r


@dataclass
class TrainConfig:
    seed: int = 42
    """Training seed (CPU runs are bit-for-bit repeatable)."""
    max_steps: int = 40
    """Optimizer steps; 0 means train for `epochs` epochs instead."""
    epochs: float = 1.0
    """Epochs when max_steps is 0."""
    micro_batch_size: int = 8
    """Examples per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-4
    """Peak learning rate (> 0; the default is OLoRA's rate at r = 8 from the method-choice study in docs/results.md);
    YAML's `3e-4` (read as a string by YAML 1.1) is accepted."""
    lr_scheduler: str = "cosine"
    """linear | cosine | constant | constant_with_warmup | cosine_with_restarts | polynomial."""
    warmup_steps: int = 4
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory."""
    eval_steps: int = 20
    """Validation loss every N steps."""
    max_eval_examples: int = 64
    """Cap on validation examples scored at each evaluation (0 = all)."""
    save_steps: int = 20
    """Checkpoint every N steps; an interrupted run resumes from the last one."""
    logging_steps: int = 1
    """Training-loss logging interval (the loss plot's resolution)."""
    padding_free: bool = True
    """Concatenate each micro-batch into one unpadded sequence with per-example position ids (transformers' DataCollatorWithFlattening); the loss is the padded path's. Used when padding would waste >= 10% of the batch tokens (estimated from the data's lengths) and a check on the model shows its attention keeps packed examples apart; otherwise batches are padded."""
    processes: int = 1
    """Data-parallel training processes (all machines together), launched through torch.distributed's launcher: gloo on CPU, NCCL on CUDA (one GPU each). The effective batch is processes x micro_batch_size x gradient_accumulation_steps."""
    strategy: str = "ddp"
    """How the processes share the work: ddp (each holds the whole model) | fsdp (PyTorch FSDP2 through accelerate: parameters, gradients and optimizer state sharded over the processes; CPU (gloo) or CUDA) | deepspeed (DeepSpeed ZeRO-3 through accelerate; CUDA only, needs the deepspeed package). fsdp and deepspeed run under torch.distributed's launcher even with one process."""
    nodes: int = 1
    """Machines the processes are spread over (processes / nodes on each). With nodes > 1, `olora train` runs on every machine, each with $OLORA_NODE_RANK (0 .. nodes-1; node 0 writes the outputs and the MLflow run) and $OLORA_MASTER_ADDR (host:port of node 0's rendezvous)."""

    def validate(self) -> None:
        _at_least("train.max_steps", self.max_steps, 0)
        if self.max_steps == 0:
            _positive("train.epochs", self.epochs)
        _at_least("train.micro_batch_size", self.micro_batch_size, 1)
        _at_least("train.gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _positive("train.learning_rate", self.learning_rate)
        _choice(
            "train.lr_scheduler",
            self.lr_scheduler,
            ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"],
        )
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _positive("train.max_grad_norm", self.max_grad_norm)
        _at_least("train.eval_steps", self.eval_steps, 1)
        _at_least("train.max_eval_examples", self.max_eval_examples, 0)
        _at_least("train.save_steps", self.save_steps, 1)
        _at_least("train.logging_steps", self.logging_steps, 1)
        _at_least("train.processes", self.processes, 1)
        _at_least("train.nodes", self.nodes, 1)
        _choice("train.strategy", self.strategy, ["ddp", "fsdp", "deepspeed"])
        if self.processes % self.nodes:
            raise ConfigError(
                f"train.processes={self.processes} cannot be spread evenly over train.nodes={self.nodes}; "
                f"use a multiple of {self.nodes} processes (each node runs processes / nodes)"
            )


@dataclass
class EvaluateConfig:
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))
    """lm-eval task names: stock tasks (the default: the paper's seven commonsense benchmarks) and the team's own, defined by task YAMLs under evals/ (docs/evaluations.md)."""
    source: str = "offline"
    """offline: packaged validation splits with lm-eval's stock prompts | hub: lm-eval's stock tasks."""
    limit: int = 100
    """Rows per task (0 = all)."""
    num_fewshot: int = 0
    """Few-shot examples per question."""
    batch_size: int = 16
    """lm-eval batch size (for `prefix`: the padded tokens of `hf`'s batch of this many longest requests)."""
    seed: int = 1234
    """lm-eval's seeds."""
    backend: str = "prefix"
    """prefix: lm-eval's `hf` with each shared prompt prefix encoded once (`olora-prefix`; same decisions, faster) | hf: lm-eval's `hf`."""

    def validate(self) -> None:
        _choice("evaluate.source", self.source, ["offline", "hub"])
        _choice("evaluate.backend", self.backend, ["prefix", "hf"])
        _at_least("evaluate.limit", self.limit, 0)
        _at_least("evaluate.num_fewshot", self.num_fewshot, 0)
        _at_least("evaluate.batch_size", self.batch_size, 1)
        if not self.tasks:
            raise ConfigError("evaluate.tasks is empty; the paper's tasks are " + ", ".join(PAPER_TASKS))
        twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if twice:
            raise ConfigError(f"evaluate.tasks lists {', '.join(twice)} more than once; list each task once")
        # names that are neither stock nor in evals/ are refused by the evaluate stages before any model loads
        # (olora.evaluation.tasks): the team's tasks are files, which this check does not read


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log runs to MLflow (train, evaluate) and register adapters (register)."""
    uri: str = ""
    """Tracking server URI. The one rule: tracking.uri when set, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project (artifacts in mlartifacts/)."""
    experiment: str = "olora"
    """MLflow experiment name."""
    retries: int = 3
    """Attempts (with exponential backoff) for each call to the tracking server."""

    def validate(self) -> None:
        _at_least("tracking.retries", self.retries, 1)
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment is empty; name the MLflow experiment, e.g. olora")


@dataclass
class RegisterConfig:
    model_name: str = ""
    """Registered model name; empty means `olora-<base model name>`."""
    promote_metric: str = "mean_acc"
    """Metric compared by `olora promote` (higher is better): mean_acc | mean_acc_norm (every task of evaluate.tasks weighing the same) | pooled_acc (the question-weighted mean: every question weighing the same, so a task weighs its question count) | one task of evaluate.tasks (e.g. copa_example) | a weighted set, `task:weight` terms joined by `+` (e.g. arc_easy:1+copa_example:2). A task's score is its accuracy (exact match for a generative task)."""
    min_improvement: float = 0.0
    """`olora promote` promotes only when the lower bound of the interval of the challenger's gain over the champion (same questions, paired) exceeds this (accuracy as a fraction: 0.01 is one point)."""
    confidence: float = 0.95
    """Confidence of the paired bootstrap intervals (promotion gate, fine-tuned vs base), in (0.5, 1)."""
    resamples: int = 10000
    """Bootstrap resamples of those intervals (at least 1000)."""
    stages: list[int] = field(default_factory=list)
    """Questions per task at each look of the sequential gate, increasing, 0 (the whole split) only last, e.g. [100, 400, 0]: `olora promote` scores both sides on a look's questions (lm-eval's first N of each task), promotes when the interval's lower bound clears min_improvement, keeps the champion when its upper bound falls below it, else looks again; the overall false-promotion rate stays the fixed gate's. Empty: one look at the comparison set."""
    spending: str = "obrien-fleming"
    """How the sequential gate spends its error over the looks: obrien-fleming (strict early, nearly the fixed test at the last look) | pocock (stops early more often, less power at the last look) | bonferroni (the same level at every look)."""

    def validate(self) -> None:
        _at_least("register.min_improvement", self.min_improvement, 0.0)
        _choice("register.spending", self.spending, ["obrien-fleming", "pocock", "bonferroni"])
        looks = [s if s else math.inf for s in self.stages]
        if any(s < 0 for s in self.stages) or any(b <= a for a, b in zip(looks, looks[1:])):
            raise ConfigError(f"register.stages={self.stages} must be questions per task that increase from look to look, "
                              "0 (the whole split) only last, e.g. [100, 400, 0]; or [] for a single look")
        _open_interval("register.confidence", self.confidence, 0.5, 1.0)
        if self.resamples < 1000:
            raise ConfigError(f"register.resamples={self.resamples} is too few for a stable interval; use at least 1000 "
                              "(the default is 10000)")
        self.metric_weights()

    def metric_weights(self) -> dict[str, float] | None:
        """promote_metric's task weights (task -> weight > 0, as written), or None for mean_acc / mean_acc_norm
        (every task weighing the same)."""
        metric = self.promote_metric.strip()
        if metric in ("mean_acc", "mean_acc_norm", "pooled_acc"):
            return None
        weights: dict[str, float] = {}
        for term in metric.split("+"):
            task, sep, weight = term.strip().partition(":")
            task = task.strip()
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", task):
                raise ConfigError(
                    f"register.promote_metric={self.promote_metric!r} is not allowed; choose mean_acc, mean_acc_norm, "
                    "one task of evaluate.tasks (e.g. copa_example) or a weighted set of them (e.g. arc_easy:1+copa_example:2)")
            try:
                value = float(weight) if sep else 1.0
            except ValueError:
                value = math.nan
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"register.promote_metric={self.promote_metric!r}: the weight of {task} must be a "
                                  f"number > 0, got {weight!r} (e.g. {task}:2)")
            if task in weights:
                raise ConfigError(f"register.promote_metric={self.promote_metric!r} names {task} twice; give it one weight")
            weights[task] = value
        return weights

    def check_tasks(self, tasks: list[str]) -> None:
        """promote_metric names only tasks that `tasks` (evaluate.tasks) scores."""
        missing = [t for t in self.metric_weights() or {} if t not in tasks]
        if missing:
            raise ConfigError(
                f"register.promote_metric={self.promote_metric!r} names task(s) {missing} that evaluate.tasks does not "
                f"list ({', '.join(tasks)}); " + _did_you_mean(missing, ["mean_acc", "mean_acc_norm", "pooled_acc", *tasks])
                + "use mean_acc, mean_acc_norm, pooled_acc, tasks that evaluate.tasks lists, or add the task(s) to evaluate.tasks")


@dataclass
class RuntimeConfig:
    num_threads: int = 0
    """CPU threads for torch (0: $OLORA_NUM_THREADS if set, else torch's default), per machine: shared among the training processes on it. No stage depends on it: it cannot change an output."""

    def validate(self) -> None:
        _at_least("runtime.num_threads", self.num_threads, 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        self.register.check_tasks(self.evaluate.tasks)
        self.adapter.check_with(self.model)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (for logging and fingerprints)."""
        out: dict[str, Any] = {}
        for block, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{block}.{key}"] = value
        return out


# ---------------------------------------------------------------- parsing


def _did_you_mean(unknown: list[Any], known: list[str], prefix: str = "") -> str:
    """`did you mean 'x' for 'y'? ` for each unknown name with a close known one ('' when none is close)."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
        if close:
            hints.append(f"did you mean {prefix + close[0]!r} for {key!r}?")
    return " ".join(hints) + " " if hints else ""


def _choice(key: str, value: Any, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value!r} is out of range; it must be >= {low}")


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={value!r} is out of range; it must be a finite number > 0")


def _open_interval(key: str, value: float, low: float, high: float) -> None:
    if not low < value < high:
        raise ConfigError(f"{key}={value!r} is out of range; it must lie strictly between {low} and {high}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation, allowing int -> float; raise ConfigError otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):  # `-S adapter.target_modules=q_proj` style single value
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a list")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string; it is the number users meant
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in this module
        raise TypeError(f"unsupported annotation {annotation!r} for {key}")
    expected = annotation.__name__ + (" (a number, e.g. 0.0003 or 3e-4)" if annotation is float else "")
    if value is None:
        raise ConfigError(f"{key} has no value (YAML null); expected {expected}: set a value, or remove the key to use its default")
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {expected}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'params'} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)  # key=str: YAML keys may be numbers or booleans
    if unknown:
        where = f"in block {prefix!r}" if prefix else "at the top level"
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} {where}; "
            + _did_you_mean(unknown, sorted(known), prefix + "." if prefix else "")
            + f"allowed: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(key, value, hint)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Parse and validate a (possibly partial) mapping; missing keys take their defaults."""
    return _build(Config, values, "").validate()


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `values` with dotted-key overrides applied, e.g. {"adapter.r": 16}."""
    import copy

    out = copy.deepcopy(values)
    for dotted, value in overrides.items():
        block, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override key {dotted!r} must look like block.key, e.g. adapter.r")
        out.setdefault(block, {})
        if not isinstance(out[block], dict):
            raise ConfigError(f"override {dotted!r}: {block!r} is not a block")
        out[block][key] = value
    return out


def load_config(path: str | Path = PARAMS, overrides: dict[str, Any] | None = None) -> Config:
    """Read params.yaml (plus optional overrides) into a validated Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameters file {path} not found; run from the project root or pass --root")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1}: {problem})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax there\n{exc}") from exc
    if overrides:
        values = apply_overrides(values, overrides)
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def edit_params(source: str | Path, overrides: dict[str, Any], target: str | Path | None = None) -> Config:
    """Apply dotted-key overrides to the params file `source`, validate, and write it to `target` (default: back).

    Nothing is written when the result is invalid: a bad override fails here, before any stage runs.
    With no overrides and no target it only validates.
    """
    source = Path(source)
    target = Path(target) if target is not None else source
    values = apply_overrides(yaml.safe_load(source.read_text()) or {}, overrides)
    try:
        cfg = config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{source} with overrides {overrides}: {exc}") from None
    if overrides or target != source:
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(yaml.safe_dump(values, sort_keys=False))
        tmp.replace(target)
    return cfg


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
