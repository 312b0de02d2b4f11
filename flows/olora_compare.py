"""Prefect flows of `olora compare`: one learning-rate search trial, and the whole comparison, thin over
`olora.orchestration.search` and `olora.orchestration.compare`.

    olora compare --methods olora,lora --ranks 8 --seeds 0,1          # from a checkout (PREFECT_API_URL set)
    prefect deployment run 'olora-compare/compare' --param methods=olora,lora --param ranks=8 --param seeds=0,1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from olora.orchestration import compare, search
from olora.orchestration.pipeline import library_logs_to_prefect

library_logs_to_prefect()  # the library's lines in the flow run's logs (the deployments also set the env, prefect.yaml)


@flow(name="olora-search-trial", log_prints=False)  # off: dill's disassembly (flows/olora_pipeline.py)
def olora_search_trial(root: str, storage: str, study: str, method: str, r: int, alpha_per_rank: float,
                       settings: dict[str, Any], tracking_uri: str, parent_run_id: str | None = None,
                       name: str = "trial") -> dict[str, Any]:
    """One trial of the (method, rank) study, in a workspace cloned from `root` (a worker's clone of the team's remote)."""
    return search.run_trial(Path(root).resolve(), storage, study, method, r, alpha_per_rank,
                            search.SearchSettings(**settings), tracking_uri, parent_run_id, name)


@flow(name="olora-compare", log_prints=False)
def olora_compare(root: str = ".", methods: str = "olora,lora", ranks: str = "8", seeds: str = "0,1",
                  lr_range: str | None = None, trials: int | None = None, startup_trials: int | None = None,
                  steps: int | None = None, eval_steps: int | None = None, storage: str | None = None,
                  trial_deployment: str = compare.TRIAL_DEPLOYMENT, run_deployment: str = compare.RUN_DEPLOYMENT,
                  push: bool = True) -> dict[str, Any]:
    """methods x ranks x seeds, each method at the rate its search chose; the report as a markdown artifact."""
    spec = compare.spec_from_args(methods, ranks, seeds, lr_range, trials=trials, startup_trials=startup_trials,
                                  steps=steps, eval_steps=eval_steps)
    out = compare.run(Path(root), spec, trial_deployment, run_deployment, push, storage)
    create_markdown_artifact(Path(out["report"]).read_text(), key="olora-compare", description="method comparison")
    return out
