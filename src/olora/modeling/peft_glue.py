"""PEFT glue: every place the pipeline touches PEFT's LoRA layers (build, OLoRA init, save, reload, export).

OLoRA (Büyükakyüz 2024): for a target weight W (out x in) with W = QR, B0 = Q[:, :r], A0 = R[:r, :]
and the frozen base becomes W - s*B0*A0 (s = alpha / r), so the model is unchanged at step 0.

Only adapters are versioned, never base weights. The initial adapter (A0, B0) is saved with
`init_lora_weights=True` so that loading it never re-runs the decomposition; the residual base is
rebuilt from the untouched base by subtracting each layer's s*B0*A0 (`load_for_training`).
PiSSA, CorDA and LoRA-GA (PEFT's inits) leave the base as the same residual W - s*B0*A0, so they
share that path and the rank-2r export; LoRA, orthogonal and EVA leave the base alone.
"""

from __future__ import annotations

import contextlib

import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from olora.config import REWRITING_INITS, AdapterConfig
from olora.core.olora import olora_factors
from olora.errors import ConfigError
from olora.layout import ADAPTER_WEIGHTS

EVA_MAX_PASSES = 50  # passes over the calibration sample before EVA's SVD counts as not converging


def lora_config(cfg: AdapterConfig, init_lora_weights, causal_lm: bool = True, **extra):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        init_lora_weights=init_lora_weights,
        task_type=TaskType.CAUSAL_LM if causal_lm else None,
        bias="none",
        use_dora=cfg.dora,
        use_rslora=cfg.rslora,
        **extra,
    )


def rewrites_base(init: str) -> bool:
    """Whether `init` leaves the base as the residual W - s·B0·A0 (olora, pissa, corda, lora_ga)."""
    return init in REWRITING_INITS


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """Qualified name -> PEFT LoRA layer, for every adapted layer of the model."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def olora_init_(model, adapter: str = "default") -> None:
    """Overwrite a PEFT LoRA model's adapters with the OLoRA init and make each base the residual.

    bitsandbytes-quantised layers use PEFT's own routine (dequantise, decompose, requantise).
    `orthonormality_errors` checks the result. Exact O(m·n·r) factors from `olora.core.olora`, equal
    to PEFT's full-QR `init_lora_weights="olora"` (tests/modeling/test_olora_init_vs_peft.py) at a fraction of its cost.
    """
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            if adapter not in layer.lora_A:
                continue
            base = layer.get_base_layer()
            for module in (layer.lora_A[adapter], layer.lora_B[adapter]):
                if module.weight.is_meta:  # built with low_cpu_mem_usage: allocate, the init fills it
                    module.to_empty(device=base.weight.device)
            if type(base.weight).__module__.startswith("bitsandbytes"):
                layer.olora_init(adapter)
                continue
            r, s = layer.r[adapter], layer.scaling[adapter]
            fan = bool(getattr(layer, "fan_in_fan_out", False))
            a0, b0, w = olora_factors(base.weight, r, fan, name)  # ValueError -> ConfigError in initialise
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            lora_a.data = a0.to(lora_a.dtype).contiguous()
            lora_b.data = b0.to(lora_b.dtype).contiguous()
            # W - s*B0*A0 in place: for a float32 weight `w` is a view of it (no m×n temporaries,
            # which cost more than the flops here); otherwise `w` is this layer's float32 copy
            w.addmm_(b0, a0, alpha=-s)
            if w.data_ptr() != base.weight.data_ptr():
                base.weight.data.copy_(w.T if fan else w)
            del a0, b0, w


def initialise(base, cfg: AdapterConfig, calibration: list[dict] | None = None):
    """Wrap `base` with LoRA adapters initialised by `cfg.init` (the base is rewritten in place for olora,
    pissa, corda and lora_ga).

    OLoRA uses `olora_init_` (the exact O(m·n·r) factors); a rank that does not fit a layer, or a
    rank-deficient weight, is a ConfigError naming adapter.r. The others are PEFT's own inits;
    eva, corda and lora_ga read `calibration` (batches of input_ids, attention_mask and labels).
    """
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    causal_lm = hasattr(base, "prepare_inputs_for_generation")  # plain nn.Modules (tests) get no task type
    lean = {"logits_to_keep": 1} if causal_lm else {}  # a forward for the layers' inputs, not the logits
    if cfg.init in ("eva", "corda", "lora_ga") and not calibration:
        raise ConfigError(f"adapter.init={cfg.init} needs calibration batches from the prepared train split; none were given")
    if cfg.init in ("olora", "lora"):
        # OLoRA overwrites A and B: build them on the meta device (no random init; 0.8 s of 3.8 s at r=64 on
        # TinyLlama shapes) and let olora_init_ materialise them
        model = get_peft_model(base, lora_config(cfg, True, causal_lm), low_cpu_mem_usage=cfg.init == "olora")
        if cfg.init == "olora":
            try:
                olora_init_(model)
            except ValueError as exc:
                raise ConfigError(f"adapter.r={cfg.r}, adapter.init=olora: {exc}") from None
            model.peft_config["default"].init_lora_weights = "olora"  # provenance; saved as True (save_initial)
    elif cfg.init in ("pissa", "orthogonal"):
        name = f"pissa_niter_{cfg.pissa_niter}" if cfg.init == "pissa" and cfg.pissa_niter else cfg.init
        model = _peft_init(base, lora_config(cfg, name, causal_lm), cfg)
    elif cfg.init == "eva":
        from peft import EvaConfig, initialize_lora_eva_weights

        forward = EvaBound(cfg, calibration, lean)  # refuses a sample EVA could never converge on
        model = _peft_init(base, lora_config(cfg, "eva", causal_lm, eva_config=EvaConfig(rho=cfg.eva_rho)), cfg)
        with torch.no_grad():
            initialize_lora_eva_weights(model, dataloader=calibration, forward_fn=forward, show_progress_bar=False)
    elif cfg.init == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = lora_config(cfg, "corda", causal_lm, corda_config=CordaConfig(corda_method="ipm"))

        @torch.no_grad()
        def run_model():  # PEFT's covariance hook takes one sequence per call (it squeezes the batch axis)
            for batch in calibration:
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                    base(input_ids=ids[mask.bool()].unsqueeze(0), **lean)

        preprocess_corda(base, config, run_model=run_model)
        model = _peft_init(base, config, cfg)
    elif cfg.init == "lora_ga":
        from peft import LoraGAConfig, preprocess_loraga

        config = lora_config(cfg, "lora_ga", causal_lm, lora_ga_config=LoraGAConfig())

        def train_step():
            with warnings.catch_warnings():  # PEFT's counting hook on frozen inputs: expected, not a problem
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for batch in calibration:
                    base(**batch).loss.backward()

        preprocess_loraga(base, config, train_step)
        model = _peft_init(base, config, cfg)
    else:  # unreachable through validated config
        raise ConfigError(f"adapter.init={cfg.init!r} is not an init this pipeline knows")
    return model


def eva_rows(batch: dict) -> int:
    """Rows a calibration batch gives each layer's SVD in PEFT's EVA: tokens with attention and a label (its
    use_label_mask; prompt tokens are labelled -100)."""
    mask = batch["attention_mask"].bool()
    if "labels" in batch:
        mask = mask & (batch["labels"] != -100)
    return int(mask.sum())


class EvaBound:
    """The forward_fn for PEFT's EVA, which cycles over the sample until every layer's incremental SVD converges.

    PEFT skips a batch with fewer rows than a layer's components (round(r·rho)): a sample with no batch that large
    can never converge, so it is refused before any pass. Otherwise the init stops after EVA_MAX_PASSES passes. No
    earlier stop: on the tiny Llama, runs that converged within 50 passes went up to 30 passes with no new layer
    converging (docs/architecture.md, EVA's cost)."""

    def __init__(self, cfg: AdapterConfig, calibration: list[dict], lean: dict) -> None:
        self.rows, self.lean, self.calls = [eva_rows(b) for b in calibration], lean, 0
        self.components, self.layers = round(cfg.r * cfg.eva_rho), 0
        self.short = sum(rows < self.components for rows in self.rows)
        if cfg.eva_rho <= 1000 and self.short == len(self.rows):  # PEFT lowers rho above 1000: not checked then
            raise ConfigError(
                f"adapter.init=eva: every calibration batch has fewer response tokens (at most {max(self.rows)}) than "
                f"the {self.components} components of each layer's SVD (adapter.r x adapter.eva_rho), and PEFT skips "
                "such batches, so EVA could never converge; use a larger adapter.calibration_batch, a lower adapter.r, or "
                "another adapter.init")

    def __call__(self, model, inputs):
        from peft.tuners.lora.eva import SVDHook

        self.calls += 1  # call 1 is PEFT's hashing forward; from call 2 each target layer input has an SVD hook
        if self.calls == 2 or self.calls > EVA_MAX_PASSES * len(self.rows):
            active = sum(isinstance(h, SVDHook) for m in model.modules() for h in m._forward_hooks.values())
            if self.calls == 2:
                self.layers = active  # PEFT removes a layer's hook while its SVD counts as converged
            else:
                raise ConfigError(
                    f"adapter.init=eva: the layers' input SVD did not converge in {EVA_MAX_PASSES} passes over "
                    f"adapter.calibration_samples ({self.layers - active} of {self.layers} layer inputs converged; "
                    f"{self.short} of {len(self.rows)} batches have fewer response tokens than the {self.components} "
                    f"components and are skipped); lower adapter.r (docs/architecture.md, EVA's cost), or use another "
                    "adapter.init")
        # the hooks need only the target layers' inputs: no loss, and logits for one position only
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **self.lean)


def _peft_init(base, config, cfg: AdapterConfig):
    """get_peft_model with PEFT's init; its ValueErrors (a rank a layer cannot hold) become ConfigErrors."""
    from peft import get_peft_model

    try:
        return get_peft_model(base, config)
    except ValueError as exc:
        raise ConfigError(f"adapter.init={cfg.init}, adapter.r={cfg.r}: {exc}") from None


def orthonormality_errors(model, adapter: str = "default") -> dict[str, float]:
    """Per layer max |B^T B - I| (float64): zero up to rounding for an OLoRA init."""
    out = {}
    for name, layer in lora_layers(model).items():
        b = layer.lora_B[adapter].weight.detach().to(torch.float64)
        eye = torch.eye(b.shape[1], dtype=torch.float64, device=b.device)
        out[name] = float((b.T @ b - eye).abs().max())
    return out


@contextlib.contextmanager
def reproducible(model, base_name: str, adapter: str = "default"):
    """While saving: the same adapter_config.json and model card (README.md) on every machine and run.

    PEFT records the base's absolute folder (config and card) and keeps target_modules in a set,
    whose order varies with the process's hash seed: either would give the same adapter a
    different DVC hash in every clone. The configured model name stands in for the folder (saves
    pass save_embedding_layers=False: only linear layers are adapted, and PEFT would otherwise look
    that name up on the hub to compare vocabularies).
    """
    cfg = model.peft_config[adapter]
    cfg.base_model_name_or_path = base_name
    if isinstance(cfg.target_modules, (set, frozenset)):
        cfg.target_modules = sorted(cfg.target_modules)
    base = model.get_base_model()
    base_config = getattr(base, "config", None)  # None: a bare torch module (tests)
    saved = (getattr(base_config, "_name_or_path", None), base.__dict__.get("name_or_path"))
    if base_config is not None:
        base_config._name_or_path = base_name
    if "name_or_path" in base.__dict__:
        base.name_or_path = base_name
    try:
        yield
    finally:
        if base_config is not None:
            base_config._name_or_path = saved[0]
        if saved[1] is not None:
            base.name_or_path = saved[1]


def save_adapter(model, out_dir: Path, base_name: str, state_dict: dict | None = None) -> None:
    """save_pretrained, reproducibly (`reproducible`); `state_dict`: the model's full state gathered from
    sharded training processes (the model's own parameters are then only this process's shards)."""
    with reproducible(model, base_name):
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(str(out_dir), save_embedding_layers=False, **extra)


def save_initial(model, out_dir: Path, base_name: str) -> None:
    """Save the initial adapter (A0, B0) so that loading it does not initialise anything again."""
    cfg = model.peft_config["default"]
    # the data-driven inits' settings only matter while initialising (PEFT warns when a loaded config carries them)
    fields = ("init_lora_weights", "eva_config", "corda_config", "lora_ga_config")
    original = {name: getattr(cfg, name, None) for name in fields}
    for name in fields:
        if hasattr(cfg, name):
            setattr(cfg, name, True if name == "init_lora_weights" else None)
    try:
        save_adapter(model, out_dir, base_name)
    finally:
        for name, value in original.items():
            if hasattr(cfg, name):
                setattr(cfg, name, value)


def apply_residual(model, adapter: str = "default") -> None:
    """Turn each adapted base weight W into W - s*B0*A0 using the adapter's current (initial) weights.

    In place, computed in float32: no second copy of the model's weights is ever held, so training
    OLoRA needs no more memory than LoRA.
    """
    with torch.no_grad():
        for layer in lora_layers(model).values():
            weight = layer.get_base_layer().weight
            delta = layer.get_delta_weight(adapter).to(torch.float32)  # s * B @ A, transposed for fan_in_fan_out
            if type(weight).__module__.startswith("bitsandbytes"):
                _requantised_residual(layer, delta)
            elif weight.dtype == torch.float32:
                weight.data.sub_(delta)
            else:
                weight.data.copy_((weight.data.to(torch.float32) - delta).to(weight.dtype))


def _requantised_residual(layer, delta: torch.Tensor) -> None:
    """A bitsandbytes 4-bit base weight W becomes quant(dequant(W) - s*B0*A0), as PEFT's own OLoRA init
    leaves it (`LoraLayer.olora_init`): the same residual the init stage's factors were computed against."""
    from peft.utils.integrations import dequantize_module_weight

    base = layer.get_base_layer()
    weight = base.weight
    residual = dequantize_module_weight(base).to(torch.float32) - delta
    base.weight = weight.__class__(residual, quant_type=weight.quant_type, quant_storage=weight.quant_storage,
                                   compress_statistics=weight.compress_statistics, module=weight.module).to(weight.device)


def load_for_training(base, init_dir: Path, init: str, gradient_checkpointing: bool = False):
    """Base + initial adapter as a trainable PeftModel; for OLoRA the base becomes the residual.

    A 4-bit (QLoRA) base is first made ready for training the PEFT way (`prepare_model_for_kbit_training`:
    norms in float32, input gradients for checkpointing).
    """
    from peft import PeftModel, prepare_model_for_kbit_training

    if getattr(base, "is_loaded_in_4bit", False):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    model = PeftModel.from_pretrained(base, str(init_dir), is_trainable=True)
    if rewrites_base(init):
        apply_residual(model)
    return model


def export_plain_lora(model, out_dir: Path, init_dir: Path, init: str, base_name: str) -> None:
    """Save the trained adapter as a plain LoRA that loads on an untouched base.

    For OLoRA this is PEFT's conversion (rank 2r, alpha doubled): dW = s*(B*A - B0*A0). PEFT
    rewrites the initial adapter's config in place, so it works on a temporary copy, leaving the
    versioned initial adapter untouched.
    """
    with reproducible(model, base_name):
        if not rewrites_base(init):
            model.save_pretrained(str(out_dir), save_embedding_layers=False)
            return
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "initial"
            shutil.copytree(init_dir, copy)
            model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(copy), save_embedding_layers=False)


def convert_to_plain_lora(adapter_dir: Path, init_dir: Path, out_dir: Path) -> None:
    """The trained OLoRA adapter in `adapter_dir` as a plain LoRA, from the saved files alone.

    The same result as `export_plain_lora` (PEFT's `path_initial_model_for_weight_conversion`, compared
    in tests/modeling/test_olora_invariants.py): A' = [A; A0], B' = [B, -B0], rank and alpha doubled, so
    that s'*B'A' = s*(BA - B0*A0). PEFT's conversion needs the whole model in one process; after sharded
    training (train.strategy fsdp or deepspeed) no process holds it, while the files are on rank 0.
    """
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    trained = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    initial = load_file(str(Path(init_dir) / ADAPTER_WEIGHTS))
    if trained.keys() != initial.keys():
        raise ConfigError(f"{adapter_dir} and {init_dir} adapt different layers; re-run the init and train stages")
    tensors = {}
    for name, value in trained.items():
        if "lora_A" in name:
            tensors[name] = torch.cat([value, initial[name]], dim=0).contiguous()
        elif "lora_B" in name:
            tensors[name] = torch.cat([value, -initial[name]], dim=1).contiguous()
        else:
            raise ConfigError(f"{adapter_dir}: {name} is not a LoRA A or B matrix; only those can be converted")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    if config.rank_pattern or config.alpha_pattern or config.use_dora:
        raise ConfigError(f"{adapter_dir}: per-layer ranks or DoRA cannot be converted here")
    # rsLoRA scales by alpha / sqrt(r): doubling r needs alpha * sqrt(2) to keep the scale (as PEFT's conversion does)
    config.init_lora_weights, config.r = True, config.r * 2
    config.lora_alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    if isinstance(config.target_modules, (set, frozenset)):  # a set's order varies by process (`reproducible`)
        config.target_modules = sorted(config.target_modules)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
