"""Every `adapter.init` (issue 29) on the tiny Llama, through the pipeline's PEFT glue: the model unchanged at
step 0 within the method's stated tolerance, the saved initial adapter reloading to the same model, and after a
few optimizer steps the export reproducing the trained model on an untouched base, with the embeddings (the
served tokens and chat template) untouched."""

from __future__ import annotations

import json

import pytest
import torch

from olora.config import AdapterConfig, config_from_dict
from olora.layout import ADAPTER_WEIGHTS, TRAIN_FILE
from olora.modeling import peft_glue

# Largest |logit difference| to the base at step 0, float32 on the tiny model (logits of order 0.1-1).
# lora and eva: B0 = 0, so the adapter adds exactly nothing. orthogonal: B0·A0 = 0 only up to rounding
# (B0 and A0 come from disjoint rows of one random orthogonal matrix). olora, pissa, corda, lora_ga: the
# base becomes W - s·B0·A0 and the adapter adds s·B0·A0 back, equal up to float32 rounding.
STEP0_TOLERANCE = {"lora": 0.0, "eva": 0.0, "orthogonal": 1e-5, "olora": 1e-5, "pissa": 1e-5, "corda": 1e-5,
                   "lora_ga": 1e-5}

CASES = [  # (init, extra adapter settings)
    ("lora", {}), ("olora", {}), ("pissa", {}), ("pissa", {"pissa_niter": 2}), ("orthogonal", {}),
    ("eva", {}), ("corda", {}), ("lora_ga", {}),
    # the switches, with an init of each kind (DoRA is refused with the base-rewriting inits: test_config)
    ("lora", {"dora": True}), ("orthogonal", {"dora": True}), ("eva", {"dora": True}), ("pissa", {"rslora": True}),
    ("corda", {"rslora": True}), ("eva", {"rslora": True}),
]


def _calibration(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Four batches of 8 sequences of 64 tokens, the first 8 of each masked out of the labels as a prompt would be."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, vocab, (8, 64), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = base(input_ids=x).logits
    return x, logits, _calibration(base.config.vocab_size), base.model.embed_tokens.weight.detach().clone()


@pytest.mark.parametrize("init, extra", CASES, ids=[f"{i}-{'-'.join(e) or 'plain'}" for i, e in CASES])
def test_init_invariants(tmp_path, tiny_model_dir, tiny, init, extra):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x, base_logits, calibration, embeddings = tiny
    cfg = config_from_dict({"adapter": {"init": init, "r": 4, "alpha": 8.0, **extra}}).adapter
    fresh = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731 an untouched base

    model = peft_glue.initialise(fresh(), cfg, calibration).eval()
    with torch.no_grad():
        step0 = (model(input_ids=x).logits - base_logits).abs().max().item()
    assert step0 <= STEP0_TOLERANCE[init], f"{init}: output changed by {step0} at step 0"
    layers = peft_glue.lora_layers(model)
    assert layers and all(layer.r["default"] == cfg.r for layer in layers.values())
    untouched = fresh()
    rewritten = any(not torch.equal(layer.get_base_layer().weight, untouched.get_submodule(name.removeprefix("base_model.model.")).weight)
                    for name, layer in layers.items())
    assert rewritten == cfg.rewrites_base  # olora, pissa, corda, lora_ga rewrite the base; the others leave it

    init_dir, out_dir = tmp_path / "init", tmp_path / "exported"
    peft_glue.save_initial(model, init_dir, "tiny")
    trained = peft_glue.load_for_training(fresh(), init_dir, init)
    with torch.no_grad():  # the saved initial adapter (and the residual base rebuilt from it) is the same model
        torch.testing.assert_close(trained(input_ids=x).logits, base_logits, atol=max(STEP0_TOLERANCE[init], 1e-6), rtol=0)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        trained(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained.eval()
    with torch.no_grad():
        after = trained(input_ids=x).logits
    assert (after - base_logits).abs().max() > 1e-3  # training changed the model

    peft_glue.export_plain_lora(trained, out_dir, init_dir, init, "tiny")
    exported = json.loads((out_dir / "adapter_config.json").read_text())
    assert exported["r"] == cfg.export_rank == (2 * cfg.r if cfg.rewrites_base else cfg.r)
    assert exported["use_dora"] == cfg.dora and exported["use_rslora"] == cfg.rslora
    served = PeftModel.from_pretrained(fresh(), out_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=x).logits, after, atol=1e-4, rtol=1e-4)
    # only the target layers are adapted: the embeddings, so the served tokens and chat template, are untouched
    from safetensors.torch import load_file

    assert not any("embed" in k or "lm_head" in k for k in load_file(str(out_dir / ADAPTER_WEIGHTS)))
    torch.testing.assert_close(served.get_base_model().model.embed_tokens.weight, embeddings, atol=0, rtol=0)


def test_rewriting_inits_convert_from_files_alone(tmp_path, tiny_model_dir, tiny):
    """After sharded training the export is converted from the saved files (`convert_to_plain_lora`): with rsLoRA
    too, it equals PEFT's conversion (alpha * sqrt(2) keeps the scale alpha / sqrt(r) at rank 2r)."""
    from transformers import AutoModelForCausalLM

    x, _, calibration, _ = tiny
    cfg = AdapterConfig(init="pissa", r=4, alpha=8.0, rslora=True)
    peft_glue.save_initial(peft_glue.initialise(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg), tmp_path / "init", "tiny")
    model = peft_glue.load_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "init", "pissa")
    for layer in peft_glue.lora_layers(model).values():  # a "trained" adapter: A and B moved
        with torch.no_grad():
            layer.lora_A["default"].weight.add_(0.01)
            layer.lora_B["default"].weight.add_(0.01)
    peft_glue.save_adapter(model, tmp_path / "trained", "tiny")
    peft_glue.export_plain_lora(model, tmp_path / "peft", tmp_path / "init", "pissa", "tiny")
    peft_glue.convert_to_plain_lora(tmp_path / "trained", tmp_path / "init", tmp_path / "ours")
    from safetensors.torch import load_file

    ours, theirs = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("ours", "peft"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours_cfg, theirs_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert ours_cfg["r"] == theirs_cfg["r"] == 8
    assert ours_cfg["lora_alpha"] == pytest.approx(theirs_cfg["lora_alpha"]) == pytest.approx(8.0 * 2**0.5)


def test_calibration_sample_is_the_prepared_train_split_tokenized_as_training_does(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from olora.data.calibration import calibration_batches
    from olora.data.templates import encode
    from olora.errors import DataError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer:", "response": f" {2 * i}" * (i % 3 + 1)} for i in range(7)]
    (tmp_path / TRAIN_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = calibration_batches(tmp_path, tokenizer, 64, samples=5, batch=2)
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]  # the first 5 examples, in batches of 2
    for k, row in enumerate(rows[:5]):
        b = batches[k // 2]
        ids, labels, _ = encode(tokenizer, row["prompt"], row["response"], 64)
        n = len(ids)
        assert b["input_ids"][k % 2, :n].tolist() == ids and b["labels"][k % 2, :n].tolist() == labels
        assert b["attention_mask"][k % 2].sum() == n and (b["labels"][k % 2, n:] == -100).all()
    with pytest.raises(DataError, match="data.max_seq_length=2"):  # no prompt fits: nothing to calibrate on
        calibration_batches(tmp_path, tokenizer, 2, samples=5, batch=2)


def test_data_driven_init_without_calibration_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from olora.errors import ConfigError

    with pytest.raises(ConfigError, match="adapter.init=corda needs calibration batches"):
        peft_glue.initialise(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AdapterConfig(init="corda", r=4))


def _small_sample(response_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Two batches of 4 x 24 random tokens, all but the last `response_tokens` of each labelled -100 (a prompt)."""
    g, small = torch.Generator().manual_seed(1), []
    for _ in range(2):
        ids = torch.randint(0, 49152, (4, 24), generator=g)
        labels = ids.clone()
        labels[:, :24 - response_tokens] = -100
        small.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return small


def _counting_base(tiny_model_dir):
    """The tiny Llama and a list that grows by one at each of its forward passes."""
    from transformers import AutoModelForCausalLM

    base, forwards = AutoModelForCausalLM.from_pretrained(tiny_model_dir), []
    base.register_forward_pre_hook(lambda module, args: forwards.append(1))
    return base, forwards


def test_eva_that_does_not_converge_stops_with_the_setting_to_change(tiny_model_dir):
    """PEFT's EVA cycles over the sample until every layer's SVD converges; two small batches (16 response tokens
    per sequence) take it 253 passes here, so the init stops after `EVA_MAX_PASSES` passes, says how far it got,
    and names the settings to change."""
    from olora.errors import ConfigError

    base, forwards = _counting_base(tiny_model_dir)
    with pytest.raises(ConfigError, match=rf"did not converge in {peft_glue.EVA_MAX_PASSES} passes over adapter.calibration_samples "
                                          r"\(\d of 8 layer inputs converged; 0 of 2 batches .* the 4 components and are skipped\); "
                                          "lower adapter.r"):
        peft_glue.initialise(base, AdapterConfig(init="eva", r=4), _small_sample(16))
    assert len(forwards) == peft_glue.EVA_MAX_PASSES * 2  # PEFT's hashing forward, then 50 passes less one batch


def test_eva_refuses_a_sample_it_could_never_converge_on(tiny_model_dir):
    """PEFT's EVA skips a batch with fewer response tokens than a layer's components (r x rho) and then cycles
    forever: with 3 response tokens per sequence (12 per batch) and r=16, the init is refused before any pass."""
    from olora.errors import ConfigError

    base, forwards = _counting_base(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"every calibration batch has fewer response tokens \(at most 12\) than the 16 "
                                          "components .* use a larger adapter.calibration_batch"):
        peft_glue.initialise(base, AdapterConfig(init="eva", r=16), _small_sample(3))
    assert forwards == []


@pytest.mark.parametrize("init, line", [
    ("pissa", "- exported as a plain LoRA of rank 8 for the untouched base (the `pissa` init rewrites the base"),
    ("eva", "- exported as a plain LoRA of rank 4 for the untouched base\n"),
])
def test_model_card_states_the_export_rank(init, line):
    import math

    from olora.evaluation.result import EvalResult
    from olora.tracking.card import model_card

    cfg = config_from_dict({"adapter": {"init": init, "r": 4}})
    assert line in model_card(cfg, "olora-tiny", "1", "tiny", EvalResult({}, math.nan, math.nan, 0), {})
