"""The typed configuration: shipped files parse, and bad values fail with errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from olora.config import Config, apply_overrides, config_from_dict, dump_config, load_config
from olora.errors import ConfigError
from olora.pipeline import Layout

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
        assert stage["cmd"].startswith("olora "), name
        for key in stage.get("params", []):
            assert key in blocks or key in flat, f"stage {name} lists unknown param {key}"
            used.add(key.split(".")[0])
    assert used == blocks


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
    assert declared == expected


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"adapter": {"rank": 8}}, "unknown key(s) 'rank' in block 'adapter'; allowed: alpha, dropout, init, r"),
        ({"adapters": {}}, "unknown key(s) 'adapters' at the top level; allowed: adapter, data, eval, model, tracking, train"),
        ({"adapter": {"r": 0}}, "adapter.r=0 is out of range"),
        ({"adapter": {"r": -3}}, "adapter.r=-3 is out of range"),
        ({"adapter": {"r": "8"}}, "adapter.r='8' has the wrong type; expected int"),
        ({"adapter": {"r": 8.5}}, "adapter.r=8.5 has the wrong type"),
        ({"adapter": {"init": "pissa"}}, "adapter.init='pissa' is not allowed; choose one of: olora, lora"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate=0.0 is out of range"),
        ({"train": {"learning_rate": -1e-4}}, "train.learning_rate=-0.0001 is out of range"),
        ({"data": {"validation_fraction": 1.0}}, "data.validation_fraction=1.0 is out of range"),
        ({"data": {"validation_fraction": 0}}, "strictly between 0.0 and 1.0"),
        ({"train": {"gradient_checkpointing": "yes"}}, "expected bool"),
        ({"model": {"dtype": "fp8"}}, "model.dtype='fp8' is not allowed"),
        ({"eval": {"tasks": []}}, "eval.tasks is empty"),
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


def test_readme_documents_every_parameter():
    readme = (REPO / "README.md").read_text()
    missing = [key for key in Config().flat() if f"`{key}`" not in readme]
    assert not missing, f"README lacks {missing}"
