"""The typed configuration: shipped files parse, and bad values fail with errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from olora.config import Config, apply_overrides, config_from_dict, dump_config, load_config
from olora.errors import ConfigError
from olora.layout import Layout

from conftest import REPO


def test_shipped_params_parse_and_round_trip():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.adapter.init == "olora"
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    # params.yaml is the serialised form of the typed config: every key is present
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == cfg.to_dict()


def test_dvc_stages_list_existing_keys_and_cover_every_block():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    flat = Config().flat()
    blocks = {f.name for f in dataclasses.fields(Config)}
    used = set()
    for name, stage in stages.items():
        assert stage["cmd"].startswith("python -m olora.stages."), name
        for key in stage.get("params", []):
            assert key in blocks or key in flat, f"stage {name} lists unknown param {key}"
            used.add(key.split(".")[0])
    # runtime knobs (thread count) cannot change an output: no stage depends on them
    assert used == blocks - {"runtime"}


def test_dvc_outputs_match_layout():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                declared.add(next(iter(item)) if isinstance(item, dict) else item)
    layout = Layout()
    expected = {str(layout.data), str(layout.init), str(layout.adapter), str(layout.exported), str(layout.report)}
    expected.add(str(layout.registration))
    expected |= {str(layout.metrics(n)) for n in ("data", "init", "train", "eval_base", "eval_adapter")}
    expected |= {str(layout.plot(n)) for n in ("train_loss", "val_loss")}
    expected |= {str(layout.samples(n)) for n in ("base", "adapter")}
    assert declared == expected


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"adapter": {"rank": 8}}, "unknown key(s) 'rank' in block 'adapter'; allowed: alpha, calibration_batch, calibration_samples, dora, dropout"),
        ({"adapters": {}}, "unknown key(s) 'adapters' at the top level; did you mean 'adapter' for 'adapters'? allowed: adapter,"),
        ({"adaptor": {"r": 4}}, "did you mean 'adapter' for 'adaptor'?"),
        ({"train": {"learnig_rate": 1e-4}}, "unknown key(s) 'learnig_rate' in block 'train'; did you mean 'train.learning_rate'"),
        ({"eval": {"limit": 5}}, "did you mean 'evaluate' for 'eval'?"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate='fast' has the wrong type; expected float"),
        ({"runtime": {"num_threads": -1}}, "runtime.num_threads=-1 is out of range"),
        ({"adapter": {"r": 0}}, "adapter.r=0 is out of range"),
        ({"adapter": {"r": -3}}, "adapter.r=-3 is out of range"),
        ({"adapter": {"r": "8"}}, "adapter.r='8' has the wrong type; expected int"),
        ({"adapter": {"r": 8.5}}, "adapter.r=8.5 has the wrong type"),
        ({"adapter": {"init": "loftq"}}, "adapter.init='loftq' is not allowed; choose one of: olora, lora, pissa, orthogonal, eva, corda, lora_ga"),
        # combinations PEFT or the stages cannot do: refused with both settings named (issue 29)
        ({"adapter": {"init": "orthogonal", "r": 5}}, "adapter.r=5 is odd but adapter.init=orthogonal"),
        ({"adapter": {"init": "pissa", "dora": True}}, "adapter.dora=true cannot be combined with adapter.init=pissa"),
        ({"adapter": {"init": "olora", "dora": True}}, "adapter.dora=true cannot be combined with adapter.init=olora"),
        ({"adapter": {"init": "lora_ga"}, "model": {"quantization": "4bit"}},
         "adapter.init=lora_ga cannot initialise a model.quantization=4bit base"),
        ({"adapter": {"init": "corda"}, "model": {"quantization": "4bit"}}, "adapter.init=corda cannot initialise a model.quantization=4bit"),
        ({"adapter": {"init": "eva", "calibration_samples": 4, "calibration_batch": 8}},
         "adapter.calibration_batch=8 exceeds adapter.calibration_samples=4"),
        ({"adapter": {"pissa_niter": -1}}, "adapter.pissa_niter=-1 is out of range"),
        ({"adapter": {"eva_rho": 0.5}}, "adapter.eva_rho=0.5 is out of range"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate=0.0 is out of range"),
        ({"train": {"learning_rate": -1e-4}}, "train.learning_rate=-0.0001 is out of range"),
        ({"data": {"validation_fraction": 1.0}}, "data.validation_fraction=1.0 is out of range"),
        ({"data": {"validation_fraction": 0}}, "strictly between 0.0 and 1.0"),
        ({"train": {"gradient_checkpointing": "yes"}}, "expected bool"),
        ({"model": {"dtype": "fp8"}}, "model.dtype='fp8' is not allowed"),
        ({"evaluate": {"tasks": []}}, "evaluate.tasks is empty"),
        ({"adapter": []}, "adapter must be a mapping"),
    ],
)
def test_bad_values_name_key_value_and_allowed(values, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(values)
    assert fragment in str(info.value)


def test_overrides_and_int_to_float(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"adapter": {"r": 4, "alpha": 8}}))
    cfg = load_config(path, {"adapter.r": 16, "train.learning_rate": 1})
    assert cfg.adapter.r == 16 and cfg.adapter.alpha == 8.0 and isinstance(cfg.train.learning_rate, float)
    with pytest.raises(ConfigError, match="must look like block.key"):
        apply_overrides({}, {"r": 1})


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("adapter: [r: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("adapter:\n  r: 0\n")
    with pytest.raises(ConfigError, match=r"params.yaml: adapter.r=0"):
        load_config(bad)


def test_yaml_1_1_float_strings_are_the_numbers_users_meant(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  learning_rate: 3e-4\n  max_grad_norm: 1E0\n")
    assert isinstance(yaml.safe_load(path.read_text())["train"]["learning_rate"], str)  # the YAML 1.1 trap
    cfg = load_config(path)
    assert cfg.train.learning_rate == 3e-4 and cfg.train.max_grad_norm == 1.0
    with pytest.raises(ConfigError, match=r"adapter.r='4e0' has the wrong type; expected int"):
        config_from_dict({"adapter": {"r": "4e0"}})  # only float settings take the string form


def test_the_parameter_reference_is_generated_from_the_field_docstrings():
    from olora.devtools import PARAMS_MARKERS, params_table, replace_between_markers

    readme = (REPO / "docs" / "parameters.md").read_text()
    assert replace_between_markers(readme, params_table()) == readme, (
        "docs/parameters.md is stale: run `olora params-table --write docs/parameters.md`"
    )
    table = params_table()
    assert all(f"`{key}`" in table for key in Config().flat())
    start, end = PARAMS_MARKERS
    assert readme.count(start) == readme.count(end) == 1


def test_every_config_field_has_a_docstring():
    import typing

    from olora.devtools import field_docs

    hints = typing.get_type_hints(Config)
    for block in Config().to_dict():
        cls = hints[block]
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in field_docs(cls)]
        assert not missing, f"{block}: fields without a docstring: {missing}"


def test_tracking_uri_precedence_is_the_one_stated_rule(tmp_path, monkeypatch):
    from olora.config import TrackingConfig
    from olora.tracking.client import resolve_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_uri(TrackingConfig(uri="http://params:5000"), tmp_path) == "http://params:5000"
    assert resolve_uri(TrackingConfig(uri=""), tmp_path) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri(TrackingConfig(uri=""), tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
