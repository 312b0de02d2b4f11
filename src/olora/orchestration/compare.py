"""`olora compare`: which method wins on this model and data, at the learning rate each one wants.

    olora compare --methods olora,lora --ranks 8,32 --seeds 0,1,2

1. Per (method, rank), a learning-rate search (olora.orchestration.search): trials are flow runs of
   the search-trial deployment, which any worker picks up, until each study holds its budget of
   finished trials; a trial whose worker died is marked failed and its rate retried.
2. Per (method, rank, seed), the full pipeline (prepare, init, train, evaluate, register) at the
   method's chosen rate, as flow runs of the pipeline deployment (`olora-pipeline/on-demand`): each
   in its own workspace, recorded on runs/<name> (olora.orchestration.pipeline, workspace).
3. The report (olora.core.study, olora.core.paired), per rank: validation-loss curves with a t band
   over seeds; steps to the slowest method's final mean loss with an interval over seeds; paired
   per-question accuracy differences of every pair of methods with Holm-corrected intervals; each
   method's rate-sensitivity curve from its study. Written to reports/compare/<key>/ and logged to
   the comparison's parent MLflow run (report, figures, the winning configuration as params), with
   adopt.yaml, the winner's params.yaml block (`olora compare --adopt FILE` writes it into params.yaml).

Every name derives from the comparison's key (a hash of its settings), so running the same command
again resumes: studies load with their trials, recorded pipeline runs are not run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from olora.config import edit_params, load_config
from olora.errors import ConfigError, OloraError
from olora.layout import Layout
from olora.orchestration import pipeline as P
from olora.orchestration import search
from olora.orchestration.search import SearchSettings

log = logging.getLogger("olora")
TRIAL_DEPLOYMENT = "olora-search-trial/search-trial"
RUN_DEPLOYMENT = "olora-pipeline/on-demand"
REPORTS = "reports/compare"


@dataclass(frozen=True)
class CompareSpec:
    methods: tuple[str, ...] = ("olora", "lora")
    """adapter.init values compared (whatever params.yaml's adapter.init accepts)."""
    ranks: tuple[int, ...] = (8,)
    """adapter.r values; adapter.alpha follows the params' alpha / r, so the scale is the same at every rank."""
    seeds: tuple[int, ...] = (0, 1)
    """adapter.seed and train.seed of the pipeline runs (at least two: the intervals are over seeds)."""
    search: SearchSettings = field(default_factory=SearchSettings)
    confidence: float = 0.95
    """Confidence of every interval (per family of pairs, after Holm's correction)."""

    def key(self) -> str:
        """What names the studies and runs: every setting but the reporting level (a new level reruns nothing)."""
        blob = json.dumps({k: v for k, v in asdict(self).items() if k != "confidence"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


def parse_methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in str(text).split(",") if m.strip())


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"{what}={text!r}: expected integers separated by commas, e.g. 8,32") from exc


def parse_range(text: str) -> tuple[float, float]:
    parts = [p for p in str(text).split(",") if p.strip()]
    try:
        low, high = (float(p) for p in parts)
    except ValueError as exc:
        raise ConfigError(f"--lr-range={text!r}: expected LOW,HIGH learning rates, e.g. 1e-5,3e-3") from exc
    return low, high


def check(source: Path, spec: CompareSpec) -> None:
    """Refuse a comparison that cannot be made, naming the input and the fix, before any work."""
    params = Layout(Path(source)).params
    cfg = load_config(params)
    if not cfg.tracking.enabled:
        raise ConfigError("olora compare reads every run's curves and per-question results from MLflow, but "
                          "tracking.enabled is false in params.yaml: set it to true")
    if len(spec.methods) < 2 or len(set(spec.methods)) != len(spec.methods):
        raise ConfigError(f"--methods {','.join(spec.methods) or '(none)'}: name at least two different methods "
                          "(adapter.init values), e.g. --methods olora,lora")
    for method in spec.methods:
        try:
            load_config(params, {"adapter.init": method})
        except ConfigError as exc:
            raise ConfigError(f"unknown method {method!r} in --methods: {exc}") from exc
    if len(set(spec.seeds)) < 2 or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"--seeds {','.join(map(str, spec.seeds)) or '(none)'}: a claim about convergence or accuracy "
                          "needs an interval over seeds, so at least two different seeds, e.g. --seeds 0,1")
    if not spec.ranks or len(set(spec.ranks)) != len(spec.ranks):
        raise ConfigError(f"--ranks {','.join(map(str, spec.ranks)) or '(none)'}: name one or more different ranks, e.g. 8,32")
    if not 0.5 < spec.confidence < 1:
        raise ConfigError(f"--confidence {spec.confidence}: use a level in (0.5, 1), e.g. 0.95")
    spec.search.check()
    from olora.modeling.models import check_targets, linear_layers, resolve_model

    layers = linear_layers(resolve_model(cfg.model, Path(source)))
    for r in spec.ranks:
        if r < 1:
            raise ConfigError(f"--ranks: rank {r} is not a rank; use integers >= 1")
        try:
            check_targets(layers, list(cfg.adapter.target_modules), r)
        except ConfigError as exc:
            raise ConfigError(f"rank {r} in --ranks: {exc}") from exc
    for method in spec.methods:  # each pair as its runs will set it (e.g. orthogonal refuses an odd rank)
        for r in spec.ranks:
            try:
                load_config(params, {"adapter.init": method, "adapter.r": r})
            except ConfigError as exc:
                raise ConfigError(f"--methods {method} with --ranks {r}: {exc}") from exc


def check_durable(source: Path, tracking, storage_url: str, push: bool) -> None:
    """Run as the `compare` deployment (in a worker's temporary clone): its MLflow store, DVC remote and Optuna
    storage must outlive that clone (`olora.orchestration.durable`), else refused before any trial, naming the store."""
    from olora.orchestration import durable

    folders = durable.run_folders(source, None)
    durable.check(source, tracking, folders, push, what="olora compare")
    if storage_url.startswith("sqlite:///") and folders:
        held = durable.inside(Path(storage_url.removeprefix("sqlite:///").split("?", 1)[0]), folders)
        if held is not None:
            raise durable.DurabilityError(
                f"olora compare cannot record durably: the Optuna storage {storage_url} lies inside {held.why}; set "
                "OLORA_OPTUNA_STORAGE (or --storage) on the workers to a database outside it, e.g. the stack's "
                "PostgreSQL or sqlite:////abs/path/optuna.db")


def check_prefect(*deployments: str) -> None:
    """The comparison runs on Prefect workers: a server and the named deployments must exist (else say how)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise OloraError("olora compare runs its trials and pipeline runs on Prefect workers, but no Prefect server is "
                         "set: export PREFECT_API_URL (stack.env of `make stack` sets it), `prefect deploy --all`, and "
                         "start a worker (`prefect worker start --pool olora-process`)")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in deployments:
            try:
                client.read_deployment_by_name(name)
            except Exception as exc:  # noqa: BLE001 - ObjectNotFound, or the server is unreachable
                raise OloraError(f"Prefect deployment {name!r} not found at {PREFECT_API_URL.value()} ({type(exc).__name__}); "
                                 "run `prefect deploy --all` in the project (prefect.yaml declares it)") from exc


def study_name(key: str, method: str, r: int) -> str:
    return f"compare-{key}-{method}-r{r}"


def run_name(key: str, method: str, r: int, seed: int) -> str:
    return f"cmp-{key}-{method}-r{r}-s{seed}"


def _parent_run(tracking, key: str, spec: CompareSpec) -> str:
    """The comparison's MLflow run: found by its key (a resumed comparison), else created."""
    from olora.tracking.client import experiment_id

    c = tracking.client()
    exp = experiment_id(c, tracking.experiment)
    found = c.search_runs([exp], filter_string=f"tags.`olora.compare` = '{key}'")
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=f"compare-{key}", tags={"olora.compare": key})
    for k, v in {"compare.methods": ",".join(spec.methods), "compare.ranks": ",".join(map(str, spec.ranks)),
                 "compare.seeds": ",".join(map(str, spec.seeds)),
                 **{f"search.{k}": v for k, v in spec.search.as_dict().items()}}.items():
        c.log_param(run.info.run_id, k, v)
    return run.info.run_id


def run_searches(source_ref: str, url: str, key: str, spec: CompareSpec, alpha_per_rank: float, tracking_uri: str,
                 parent: str, deployment: str, poll: float = 2.0) -> dict[tuple[str, int], Any]:
    """Every study to its budget: rounds of trial flow runs (one per missing trial) until each holds enough finished
    trials. A crashed trial (its worker killed) is failed by heartbeat and its rate retried in a later round; a trial
    that fails on its own (an error, not a lost worker) stops the comparison with that error."""
    from prefect.deployments import run_deployment

    studies = {(m, r): search.open_study(url, study_name(key, m, r), spec.search) for m in spec.methods for r in spec.ranks}
    rounds = 0
    while True:
        for study in studies.values():
            if search.running(study):
                search.fail_stale(study)
        missing = {k: spec.search.trials - search.finished(s) for k, s in studies.items()}
        if all(n <= 0 for n in missing.values()):
            return studies
        rounds += 1
        if rounds > 2 + spec.search.max_retry * spec.search.trials:
            raise OloraError(f"the searches did not reach their budget of {spec.search.trials} trials after {rounds - 1} "
                             "rounds of trial runs (workers keep dying?); see the studies' FAIL trials and the flow runs' logs")
        launched = {}
        for (m, r), n in missing.items():
            for i in range(max(n, 0)):
                name = f"{study_name(key, m, r)}-round{rounds}-{i}"
                params = {"root": source_ref, "storage": url, "study": study_name(key, m, r), "method": m, "r": r,
                          "alpha_per_rank": alpha_per_rank, "settings": spec.search.as_dict(),
                          "tracking_uri": tracking_uri, "parent_run_id": parent, "name": name}
                launched[name] = run_deployment(deployment, parameters=params, timeout=0, flow_run_name=name).id
        log.info("search round %s: %s trial run(s) started on %s", rounds, len(launched), deployment)
        states = P.wait_final(launched, poll)
        failed = sorted(n for n, s in states.items() if s == "FAILED")
        if failed:
            raise OloraError(f"search trial run(s) {failed} failed (an error in the trial, not a lost worker); see their "
                             "flow-run logs. Finished trials are kept: run the same command again after the fix")
        if any(s != "COMPLETED" for s in states.values()):  # crashed or cancelled: heartbeat marks its trial, then retried
            time.sleep(spec.search.grace + spec.search.heartbeat)


def _recorded(tracking, name: str) -> P.VariantResult | None:
    row = P.variant_result(tracking, name)
    return row if row.run != "-" else None


def run_pipelines(tracking, key: str, spec: CompareSpec, rates: dict[tuple[str, int], float], alpha_per_rank: float,
                  parent: str, deployment: str, push: bool, poll: float = 2.0) -> dict[tuple[str, int, int], str]:
    """Each (method, rank, seed) once, as a flow run of the pipeline deployment; recorded ones are not run again."""
    want = {(m, r, s): run_name(key, m, r, s) for m in spec.methods for r in spec.ranks for s in spec.seeds}
    todo = {k: n for k, n in want.items() if _recorded(tracking, n) is None}
    log.info("pipeline runs: %s recorded, %s to run", len(want) - len(todo), len(todo))
    if todo:
        variants = [{"adapter.init": m, "adapter.r": r, "adapter.alpha": float(alpha_per_rank * r), "adapter.seed": s,
                     "train.seed": s, "train.learning_rate": rates[(m, r)], "tracking.uri": tracking.uri}
                    for (m, r, s) in todo]
        states = P.run_on_deployment(deployment, variants, list(todo.values()), push, poll=poll)
        failed = sorted(n for n, st in states.items() if st != "COMPLETED")
        if failed:
            raise OloraError(f"pipeline run(s) {failed} did not complete; the others are recorded and will not run again: "
                             "see those flow runs' logs, fix, and run the same command again")
    c = tracking.client()
    out = {}
    for k, n in want.items():
        row = _recorded(tracking, n)
        if row is None:
            raise OloraError(f"pipeline run {n} completed but no MLflow run carries its name; is tracking enabled?")
        c.set_tag(row.run, "mlflow.parentRunId", parent)
        out[k] = row.run
    return out


def collect(tracking, runs: dict[tuple[str, int, int], str]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Per run: its validation-loss curve, mean accuracy and per-question table (from MLflow)."""
    from olora import layout as L
    from olora.evaluation import samples

    c = tracking.client()
    out = {}
    for k, run_id in runs.items():
        curve = sorted((int(m.step), float(m.value)) for m in c.get_metric_history(run_id, "val/loss"))
        with tempfile.TemporaryDirectory() as tmp:
            rows = samples.read_samples(Path(c.download_artifacts(run_id, f"eval/{Path(L.samples_path('adapter')).name}", tmp)))
        out[k] = {"run": run_id, "curve": curve, "mean_acc": c.get_run(run_id).data.metrics.get("eval/mean_acc"),
                  "table": samples.table(rows, "acc")}
    return out


def analyse(spec: CompareSpec, results: dict, trials: dict[tuple[str, int], list[dict]], rates: dict) -> dict[int, dict]:
    """Per rank: bands, steps to target, the Holm-corrected paired differences, the rate curves (no I/O)."""
    from olora.core import paired, study

    alpha = 1 - spec.confidence
    out = {}
    for r in spec.ranks:
        curves = {m: [results[(m, r, s)]["curve"] for s in spec.seeds] for m in spec.methods}
        target, steps = study.steps_to_target(curves, spec.confidence)
        tables = {m: study.stack_seeds({s: results[(m, r, s)]["table"] for s in spec.seeds}) for m in spec.methods}
        first = {pair: paired.compare(tables[pair[0]], tables[pair[1]], spec.confidence) for pair in study.method_pairs(spec.methods)}
        p_values = {pair: paired.mcnemar_exact(sum(t.better for t in cmp.tasks.values()), sum(t.worse for t in cmp.tasks.values()))
                    for pair, cmp in first.items()}
        corrected = study.holm(p_values, alpha)
        pairs = {}
        for pair, h in corrected.items():
            cmp = paired.compare(tables[pair[0]], tables[pair[1]], h["confidence"])
            pairs[pair] = {"diff": cmp.diff, "low": cmp.low, "high": cmp.high, "level": h["confidence"], "p": h["p"],
                           "p_holm": h["p_holm"], "n": cmp.n, "mde": cmp.mde, "significant": h["p_holm"] <= alpha}
        acc = {m: study.t_interval([results[(m, r, s)]["mean_acc"] for s in spec.seeds], spec.confidence) for m in spec.methods}
        out[r] = {"bands": {m: study.band(c, spec.confidence) for m, c in curves.items()}, "target": target, "steps": steps,
                  "pairs": pairs, "accuracy": acc, "rates": {m: rates[(m, r)] for m in spec.methods},
                  "trials": {m: trials[(m, r)] for m in spec.methods}}
    return out


def winner(spec: CompareSpec, analysis: dict[int, dict], alpha_per_rank: float) -> dict[str, Any]:
    """The (method, rank) with the highest mean accuracy over seeds, as params.yaml keys."""
    m, r = max(((m, r) for r in spec.ranks for m in spec.methods), key=lambda k: analysis[k[1]]["accuracy"][k[0]][0])
    return {"adapter.init": m, "adapter.r": r, "adapter.alpha": float(alpha_per_rank * r),
            "train.learning_rate": analysis[r]["rates"][m]}


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:+.1f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def figures(analysis: dict[int, dict], folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for r, a in analysis.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, band in a["bands"].items():
            steps = [b[0] for b in band]
            ax.plot(steps, [b[1] for b in band], label=m)
            ax.fill_between(steps, [b[2] for b in band], [b[3] for b in band], alpha=0.25)
        ax.axhline(a["target"], color="grey", linestyle=":", label="target")
        ax.set(xlabel="step", ylabel="validation loss", title=f"r = {r}: mean and interval over seeds")
        ax.legend()
        out[f"val_loss_r{r}"] = folder / f"val_loss_r{r}.png"
        fig.savefig(out[f"val_loss_r{r}"], dpi=100, bbox_inches="tight")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, rows in a["trials"].items():
            pts = sorted((t["lr"], t["loss"]) for t in rows if t["lr"] is not None and t["loss"] is not None
                         and t["state"] in ("COMPLETE", "PRUNED"))
            done = [p for p in pts if any(t["state"] == "COMPLETE" and (t["lr"], t["loss"]) == p for t in rows)]
            line = ax.plot([p[0] for p in done], [p[1] for p in done], marker="o", label=f"{m} (complete)")[0]
            pruned = [p for p in pts if p not in done]
            ax.scatter([p[0] for p in pruned], [p[1] for p in pruned], marker="x", color=line.get_color(),
                       label=f"{m} (pruned: last loss)")
        ax.set_xscale("log")
        ax.set(xlabel="learning rate", ylabel="validation loss (search trial)", title=f"r = {r}: rate sensitivity")
        ax.legend()
        out[f"lr_r{r}"] = folder / f"lr_r{r}.png"
        fig.savefig(out[f"lr_r{r}"], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return out


def report_markdown(key: str, spec: CompareSpec, analysis: dict[int, dict], best: dict[str, Any], adopt: str) -> str:
    pct = f"{spec.confidence * 100:g} %"
    lines = [f"# Method comparison {key}", "",
             f"Methods {', '.join(spec.methods)}; ranks {', '.join(map(str, spec.ranks))}; seeds "
             f"{', '.join(map(str, spec.seeds))}; each method at the rate its search chose "
             f"({spec.search.trials} trials per study, rates in [{spec.search.lr_low:g}, {spec.search.lr_high:g}], "
             f"{spec.search.steps} steps per trial). Intervals: {pct}, t over seeds unless said otherwise."]
    for r, a in analysis.items():
        lines += ["", f"## Rank {r}", "", "### Validation loss", "", f"![validation loss, r = {r}](val_loss_r{r}.png)", "",
                  "| method | rate | final val loss | interval | mean acc | interval |", "|---|---|---|---|---|---|"]
        for m in spec.methods:
            last = a["bands"][m][-1] if a["bands"][m] else (None, None, None, None)
            acc = a["accuracy"][m]
            lines.append(f"| {m} | {a['rates'][m]:.3g} | {_num(last[1], '.4f')} | [{_num(last[2], '.4f')}, {_num(last[3], '.4f')}] "
                         f"| {_num(acc[0], '.4f')} | [{_num(acc[1], '.4f')}, {_num(acc[2], '.4f')}] |")
        lines += ["", "### Steps to the target loss", "",
                  f"Target: {a['target']:.4f}, the slowest method's final mean validation loss. A seed that never "
                  "reached it counts at its last step, and the mean is then a lower bound (\"at least\").", "",
                  "| method | steps per seed | mean | interval |", "|---|---|---|---|"]
        for m, s in a["steps"].items():
            per = ", ".join("not reached" if x is None else str(x) for x in s["steps"])
            at_least = "at least " if s["censored"] else ""
            lines.append(f"| {m} | {per} | {at_least}{_num(s['mean'])} | [{_num(s['low'])}, {_num(s['high'])}] |")
        lines += ["", "### Paired per-question accuracy differences", "",
                  "Second minus first, on the same questions under the same seed (questions x seeds pairs, stratified "
                  "paired bootstrap); intervals at Holm's step-down levels over the pairs, p from exact McNemar.", "",
                  "| pair | difference (points) | interval | level | p | p (Holm) | n | MDE (points) |",
                  "|---|---|---|---|---|---|---|---|"]
        for (m1, m2), p in a["pairs"].items():
            lines.append(f"| {m2} - {m1} | {_pct(p['diff'])} | [{_pct(p['low'])}, {_pct(p['high'])}] | {p['level'] * 100:.2f} % "
                         f"| {p['p']:.3g} | {p['p_holm']:.3g} | {p['n']} | {p['mde'] * 100:.1f} |")
        lines += ["", "### Rate sensitivity", "", f"![rate sensitivity, r = {r}](lr_r{r}.png)", "",
                  "| method | trial | rate | state | loss | at step | retry of |", "|---|---|---|---|---|---|---|"]
        for m, rows in a["trials"].items():
            for t in rows:
                lines.append(f"| {m} | {t['number']} | {_num(t['lr'], '.3g')} | {t['state']} | {_num(t['loss'], '.4f')} "
                             f"| {t['step'] if t['step'] is not None else '-'} | {t['retry_of'] if t['retry_of'] is not None else '-'} |")
    lines += ["", "## Winning configuration", "",
              "The highest mean accuracy over seeds (see the paired differences for whether its lead is more than noise):", "",
              "```yaml", adopt.rstrip(), "```", "", "Adopt it: `olora compare --adopt " + f"{REPORTS}/{key}/adopt.yaml`"]
    return "\n".join(lines) + "\n"


def adopt_yaml(best: dict[str, Any]) -> str:
    import yaml

    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in best.items():
        block, name = dotted.split(".", 1)
        nested.setdefault(block, {})[name] = value
    return yaml.safe_dump(nested, sort_keys=False)


def adopt(source: Path, path: Path) -> dict[str, Any]:
    """Write an adopt.yaml block into params.yaml (checked against the config first)."""
    import yaml

    nested = yaml.safe_load(Path(path).read_text()) or {}
    flat = {f"{b}.{k}": v for b, keys in nested.items() for k, v in keys.items()}
    edit_params(Layout(Path(source)).params, flat)
    return flat


def run(source: Path, spec: CompareSpec, trial_deployment: str = TRIAL_DEPLOYMENT, run_deployment: str = RUN_DEPLOYMENT,
        push: bool = True, storage: str | None = None, source_ref: str = ".", poll: float = 2.0) -> dict[str, Any]:
    """The whole comparison (see the module docstring); returns where the report went and the winner.

    `source_ref` is the `root` the workers' flow runs get (their clone of the team's remote: ".").
    """
    from olora.ops.envfile import stack_env
    from olora.tracking.client import Tracking

    source = Path(source).resolve()
    check(source, spec)  # bad input refused before any work
    check_prefect(trial_deployment, run_deployment)
    key = spec.key()
    with stack_env(source):
        cfg = load_config(Layout(source).params)
        tracking = Tracking.of(cfg, source)
        alpha_per_rank = cfg.adapter.alpha / cfg.adapter.r
        url = search.storage_url(source, storage)
        check_durable(source, tracking, url, push)
        parent = _parent_run(tracking, key, spec)
        studies = run_searches(source_ref, url, key, spec, alpha_per_rank, tracking.uri, parent, trial_deployment, poll)
        rates = {k: search.best_rate(s) for k, s in studies.items()}
        trials = {k: search.trials_table(s) for k, s in studies.items()}
        runs = run_pipelines(tracking, key, spec, rates, alpha_per_rank, parent, run_deployment, push, poll)
        analysis = analyse(spec, collect(tracking, runs), trials, rates)
        best = winner(spec, analysis, alpha_per_rank)
        folder = source / REPORTS / key
        folder.mkdir(parents=True, exist_ok=True)
        figures(analysis, folder)
        block = adopt_yaml(best)
        (folder / "adopt.yaml").write_text(block)
        (folder / "report.md").write_text(report_markdown(key, spec, analysis, best, block))
        (folder / "analysis.json").write_text(json.dumps(_jsonable(analysis), indent=1) + "\n")
        c = tracking.client()
        for k, v in best.items():
            c.log_param(parent, f"winner.{k}", v)
        c.log_artifacts(parent, str(folder), "compare")
        c.set_terminated(parent, "FINISHED")
    log.info("comparison %s: report %s", key, folder / "report.md")
    return {"key": key, "report": str(folder / "report.md"), "parent_run": parent, "winner": best,
            "rates": {f"{m}@r{r}": v for (m, r), v in rates.items()}, "runs": {"-".join(map(str, k)): v for k, v in runs.items()}}


def _jsonable(x):
    if isinstance(x, dict):
        return {("-".join(map(str, k)) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def spec_from_args(methods: str, ranks: str, seeds: str, lr_range: str | None = None, confidence: float = 0.95,
                   **search_kw) -> CompareSpec:
    """A CompareSpec from the CLI's (or a flow's) strings; search settings left None keep their defaults."""
    settings = SearchSettings(**{k: v for k, v in search_kw.items() if v is not None},
                              **(dict(zip(("lr_low", "lr_high"), parse_range(lr_range))) if lr_range else {}))
    return CompareSpec(parse_methods(methods), parse_ints(ranks, "--ranks"), parse_ints(seeds, "--seeds"), settings,
                       confidence)

