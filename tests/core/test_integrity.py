"""`olora doctor`'s verdicts (`olora.core.integrity`), pure: which facts make which record broken, named with a repair."""

from __future__ import annotations

from olora.core import integrity as I

RECORDED = {"adapter/adapter_model.safetensors": "a" * 64, "base.json": "b" * 64, "template.json": "c" * 64}
WHOLE = frozenset({"model/MLmodel", I.CARD, *(f"model/artifacts/{n}" for n in RECORDED)})


def facts(**changes) -> I.VersionFacts:
    base = dict(model="m", version="2", run_id="r1", status="READY", run_state=I.RUN_ACTIVE, files=WHOLE,
                recorded=RECORDED, description="card", branch="runs/x")
    return I.VersionFacts(**{**base, **changes})


def test_a_whole_version_alias_and_branch_have_no_problem():
    assert I.version_problems(facts()) == []
    assert I.alias_problems("m", "champion", "2", False, None) == []
    assert I.branch_problems("runs/x", "0" * 40, {"models/exported": True, "models/exported/a.safetensors": True}) == []


def test_each_broken_record_is_named_with_its_repair():
    [gone] = I.version_problems(facts(files=WHOLE - {"model/artifacts/base.json"}))
    assert gone.subject == "m version 2" and "model/artifacts/base.json" in gone.broken
    assert "olora restore --model m --version 2" in gone.repair and "runs/x" in gone.repair

    [missing] = I.version_problems(facts(run_state=I.RUN_MISSING, files=frozenset()))  # nothing else is asked of it
    assert "run r1 does not exist" in missing.broken
    deleted = I.version_problems(facts(run_state=I.RUN_DELETED))
    assert [p.repair for p in deleted] == ["restore it: `mlflow runs restore --run-id r1` (with MLFLOW_TRACKING_URI set)"]

    [card] = I.version_problems(facts(files=WHOLE - {I.CARD}, description=" "))
    assert "model card is missing" in card.broken and I.CARD in card.broken and "registry description" in card.broken
    assert len(I.version_problems(facts(recorded=None, status="FAILED_REGISTRATION"))) == 2

    [alias] = I.alias_problems("m", "champion", "2", True, None)
    assert alias.subject == "alias champion of m" and "olora rollback" in alias.repair
    [unloadable] = I.alias_problems("m", "champion", "2", False, "ConfigError: no base")
    assert "does not load: ConfigError: no base" in unloadable.broken

    [branch] = I.branch_problems("runs/x", "abcdef0123456789", {"models/exported": True, "models/exported/a": False,
                                                                "data/prepared": False})
    assert branch.subject == "branch runs/x (abcdef012345)"
    assert "missing from the DVC remote: data/prepared, models/exported/a" in branch.broken and "dvc push" in branch.repair
    [unchecked] = I.branch_problems("runs/x", "abcdef0123456789", None, "WorkspaceError: no DVC remote")
    assert "could not be checked: WorkspaceError: no DVC remote" in unchecked.broken
