"""`olora doctor`: a project and its stores checked in one pass, every broken record named with its repair.

It gathers the facts (the side effects here) and leaves the verdicts to `olora.core.integrity`:
every registered version of every model in the tracking store (its run, its model files, its
card), every alias (pointing at a healthy version; `champion` downloaded and loaded as `olora
serve` would), and every recorded run (`runs/*` branches, the git remote's included) with its DVC
outputs in the DVC remote (each file's object asked of the remote itself). Nothing is changed in the stores; the checkout's git refs for `origin`'s runs
branches are fetched.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from olora.core import integrity
from olora.core.integrity import Problem, VersionFacts
from olora.orchestration import workspace
from olora.tracking.client import Tracking
from olora.tracking.lineage import TAGS

log = logging.getLogger("olora")
LOADED_ALIASES = ("champion",)  # what `olora serve` follows by default: loaded, not only looked up


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    versions: int = 0
    aliases: int = 0
    branches: int = 0

    @property
    def healthy(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [p.text() for p in self.problems]
        lines.append(f"{'OK' if self.healthy else f'{len(self.problems)} problem(s)'}: checked {self.versions} registered "
                     f"version(s), {self.aliases} alias(es), {self.branches} recorded run(s) (runs/* branches)")
        return "\n".join(lines)


def doctor(tracking: Tracking, root: Path, load: bool = True) -> Report:
    """Check the tracking store's registry (when tracking is enabled) and the runs/* branches' DVC outputs."""
    report = Report()
    if tracking.enabled:
        _check_registry(tracking, report, load)
    _check_branches(Path(root), report)
    return report


# ---------------------------------------------------------------- the registry


def _files(c, run_id: str, path: str) -> set[str]:
    """Artifact files under `path` of the run, recursively (an empty set when there is none)."""
    out: set[str] = set()
    todo = [path]
    while todo:
        for info in c.list_artifacts(run_id, todo.pop()):
            (todo.append(info.path) if info.is_dir else out.add(info.path))
    return out


def version_facts(c, mv) -> VersionFacts:
    from mlflow.exceptions import MlflowException

    from olora.serving.pyfunc import CHECKSUMS_KEY

    try:
        state = integrity.RUN_DELETED if c.get_run(mv.run_id).info.lifecycle_stage == "deleted" else integrity.RUN_ACTIVE
    except MlflowException:
        state = integrity.RUN_MISSING
    files: set[str] = set()
    if state != integrity.RUN_MISSING:
        for path in (integrity.MODEL_DIR, Path(integrity.CARD).parent.as_posix()):
            try:
                files |= _files(c, mv.run_id, path)
            except (MlflowException, OSError) as exc:
                log.warning("doctor: cannot list %s of run %s: %s", path, mv.run_id, exc)
    tag = (mv.tags or {}).get(CHECKSUMS_KEY)
    try:
        recorded = json.loads(tag) if tag else None
    except ValueError:
        recorded = None
    return VersionFacts(mv.name, str(mv.version), mv.run_id, str(mv.status), state, frozenset(files), recorded,
                        mv.description or "", (mv.tags or {}).get(TAGS["git_branch"]))


def load_error(c, mv) -> str | None:
    """Download the version's model and load it as `olora serve` does (files verified, base + adapter); None when it loads."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = c.download_artifacts(mv.run_id, integrity.MODEL_DIR, tmp)
            mlflow.pyfunc.load_model(local)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def _check_registry(tracking: Tracking, report: Report, load: bool) -> None:
    c = tracking.client()
    models = tracking.call("listing registered models", lambda: list(c.search_registered_models(max_results=1000)))
    for rm in sorted(models, key=lambda m: m.name):
        versions = tracking.call("listing model versions",
                                 lambda: list(c.search_model_versions(f"name='{rm.name}'", max_results=10000)))
        broken: set[str] = set()
        by_version = {}
        for mv in sorted(versions, key=lambda v: int(v.version)):
            facts = tracking.call("reading a version's run and files", lambda: version_facts(c, mv))
            found = integrity.version_problems(facts)
            report.problems += found
            report.versions += 1
            by_version[str(mv.version)] = mv
            if found:
                broken.add(str(mv.version))
        for alias, version in sorted((rm.aliases or {}).items()):
            version = str(version)
            error = None
            if load and alias in LOADED_ALIASES and version not in broken and version in by_version:
                log.info("doctor: loading %s@%s (version %s)", rm.name, alias, version)
                error = load_error(c, by_version[version])
            report.problems += integrity.alias_problems(rm.name, alias, version, version in broken or version not in by_version,
                                                        error)
            report.aliases += 1


# ---------------------------------------------------------------- recorded runs and the DVC remote


def _git(root: Path, *args: str, check: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise workspace.WorkspaceError(f"`git {' '.join(args)}` failed in {root}: {out.stderr.strip()[-600:]}")
    return out.stdout


def recorded_runs(root: Path) -> dict[str, str]:
    """runs/* branch -> commit: this checkout's own and its `origin`'s (fetched first, when there is one)."""
    if _git(root, "remote", "get-url", "origin", check=False).strip():
        _git(root, "fetch", "--quiet", "origin", f"+refs/heads/{workspace.RUNS_BRANCH}/*:"
             f"refs/remotes/origin/{workspace.RUNS_BRANCH}/*", check=False)
    found: dict[str, str] = {}
    for line in _git(root, "for-each-ref", "--format=%(refname) %(objectname)", f"refs/heads/{workspace.RUNS_BRANCH}/",
                     f"refs/remotes/origin/{workspace.RUNS_BRANCH}/", check=False).splitlines():  # not git: none
        ref, commit = line.split()
        branch = ref.removeprefix("refs/heads/").removeprefix("refs/remotes/origin/")
        found.setdefault(branch, commit)
    return found


def remote_objects(root: Path, commit: str) -> dict[str, bool]:
    """Every cached DVC output of `commit` (each file of a folder output too) -> whether the DVC remote holds it.

    Asked of the remote's object store directly, through DVC's own remote (local, S3, ...): `dvc status --cloud`
    takes a folder's manifest in the remote as proof of all its files, so it misses one that is gone.
    """
    from dvc.repo import Repo

    with tempfile.TemporaryDirectory(prefix="olora-doctor-") as tmp:
        tree = Path(tmp) / "tree"
        _git(root, "worktree", "add", "--quiet", "--detach", str(tree), commit)
        try:
            local = Path(root) / ".dvc" / "config.local"  # the remote's settings that git does not hold
            if local.is_file():
                shutil.copy(local, tree / ".dvc" / "config.local")
            workspace.pin_remote(Path(root), tree)  # a relative remote names the folder it names from this checkout
            if not workspace.has_dvc_remote(tree) and not workspace.add_team_remote(tree):
                raise workspace.WorkspaceError("no DVC remote is configured in this checkout")
            with Repo(str(tree)) as repo:
                odb = repo.cloud.get_remote_odb(None)
                wanted: dict[str, list[str]] = {}  # object id -> the outputs' paths
                for out in repo.index.outs:
                    if not out.use_cache or not out.hash_info:
                        continue
                    oid = out.hash_info.value
                    wanted.setdefault(oid, []).append(out.def_path)
                    if out.hash_info.isdir and odb.exists(oid):
                        with odb.fs.open(odb.oid_to_path(oid)) as manifest:
                            for entry in json.load(manifest):
                                wanted.setdefault(entry["md5"], []).append(f"{out.def_path}/{entry['relpath']}")
                present = set(odb.oids_exist(list(wanted)))
            return {path: oid in present for oid, paths in wanted.items() for path in paths}
        finally:
            _git(root, "worktree", "remove", "--force", str(tree), check=False)
            _git(root, "worktree", "prune", check=False)


def _check_branches(root: Path, report: Report) -> None:
    for branch, commit in sorted(recorded_runs(root).items()):
        try:
            present, error = remote_objects(root, commit), None
        except Exception as exc:  # noqa: BLE001 - git, DVC or the remote's own errors: the finding, named
            present, error = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400] if str(exc).strip() else ''}"
        report.problems += integrity.branch_problems(branch, commit, present, error)
        report.branches += 1
