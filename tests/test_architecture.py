"""The package's shape, checked: layers import only downward, no import circle, thin stages and flows.

The layer order is the one the README's layout map describes; a stage's DVC deps are its import
closure (`olora.devtools.code_modules`), so these rules are also what keeps unrelated edits from
rerunning stages.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import olora
from olora import devtools

from conftest import REPO

# low -> high; a module may import its own layer or any lower one, never a higher one
LAYERS = [
    {"errors", "layout", "faults", "io", "dvc", "config"},  # shared basics
    {"core"},  # pure decisions and mathematics
    {"modeling"},  # embedded assets, base models, runtime, PEFT glue
    {"data"},  # sources, templates, prepare (reads the embedded data sets' location from modeling.assets)
    {"training", "evaluation", "serving"},  # the ML library's uses of a model
    {"tracking"},  # MLflow: runs, registry (registers the serving model)
    {"stages"},
    {"orchestration", "ops"},
    {"cliargs", "cli", "admin", "devtools", "overlay"},  # entry points and developer tools
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(olora.__path__, "olora."))


def _graph() -> dict[str, set[str]]:
    """Every project import, at module level or inside a function (the package root `olora` left out)."""
    return {m: {d for d in devtools._imports(m) if d != "olora" and devtools._module_file(d) is not None} for m in _modules()}


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_every_module_belongs_to_a_layer():
    assert {_layer(m) for m in _modules()} <= set(RANK), sorted({_layer(m) for m in _modules()} - set(RANK))


def test_layers_import_only_downward():
    upward = [(m, d) for m, deps in _graph().items() for d in deps if RANK[_layer(d)] > RANK[_layer(m)]]
    assert not upward, f"imports that point up a layer: {upward}"


def test_no_import_circle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if dep == node or dep.startswith(node + "."):
                continue  # a package importing its own submodules
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import circles: {cycles}"


def test_stages_and_flows_are_thin():
    from olora.stages import STAGES

    modules = {s.module.rsplit(".", 1)[1] for s in STAGES.values()}  # the five stages (not the table or the lock)
    long = {m: n for m in modules if (n := len((REPO / f"src/olora/stages/{m}.py").read_text().splitlines())) > 120}
    assert not long, f"stage modules over 120 lines (move the logic into the library): {long}"
    flows = len((REPO / "flows/olora_pipeline.py").read_text().splitlines())
    assert flows <= 150, f"flows/olora_pipeline.py has {flows} lines; orchestration logic belongs in olora.orchestration"


def test_no_test_edits_sys_path():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("*.py")
                 if "sys.path." + "insert" in p.read_text()]
    assert not offenders, offenders


def test_registry_commands_do_not_import_torch(tmp_path):
    """`olora promote` (and rollback, restore) only talk to the registry: no torch, no transformers."""
    script = (
        "import sys\n"
        "from olora import admin\n"
        "import olora.tracking.registry, olora.orchestration.restore, olora.tracking.names\n"
        f"code = admin.main(['--root', {str(tmp_path)!r}, 'promote'])\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr[-2000:]
    assert "parameters file" in done.stderr  # it failed on the missing params.yaml, before any model code


def test_entry_points_generators_admin_and_ops_are_no_stage_dependency():
    """No stage's deps hold the dispatcher, the admin commands, a generator, or any ops/ or orchestration/ module
    (envfile included: stack.env is loaded by whoever starts a stage, never by the stage)."""
    from olora.stages import STAGES

    outside = [f"src/olora/{name}.py" for name in ("cli", "cliargs", "admin", "devtools", "overlay")]
    outside += [str(p.relative_to(REPO)) for folder in ("ops", "orchestration") for p in (REPO / "src/olora" / folder).glob("*.py")]
    assert "src/olora/ops/envfile.py" in outside and "src/olora/cliargs.py" in outside
    for stage in STAGES.values():
        files = devtools.code_files(stage)
        assert not set(files) & set(outside), (stage.name, sorted(set(files) & set(outside)))
