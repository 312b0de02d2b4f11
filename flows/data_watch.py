"""Prefect flow: the data watcher. Each run looks at the branch it was cloned from (prefect.yaml's
`data-watch` deployment, every minute) and announces each new data version there with one
`olora.data.published` event, which the `on-new-data` deployment's trigger turns into one pipeline
run on that commit. A thin wrapper of `olora.orchestration.publish.announce_new_versions`.

    prefect deployment run 'olora-data-watch/data-watch'      # look now instead of waiting for the schedule
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from olora.ops.envfile import stack_env
from olora.orchestration.pipeline import library_logs_to_prefect
from olora.orchestration.publish import announce_new_versions

library_logs_to_prefect()  # the library's lines (what the watcher looked at, and why) in the flow run's logs


@flow(name="olora-data-watch", log_prints=True)
def olora_data_watch(root: str = ".", ref: str = "HEAD", depth: int = 100) -> list[dict]:
    """Announce every data version on `ref` (the cloned branch) that was not announced before, whose content is in
    the DVC remote; the first run on a server only records what is there."""
    source = Path(root).resolve()
    with stack_env(source):
        rows = announce_new_versions(source, ref, depth)
    for row in rows:  # a summary in the flow run's log
        print(f"commit {row['commit'][:12]}: data version {row['data_version'][:16]} announced" if row["announced"] else
              f"commit {row['commit'][:12]}: the DVC remote {row['dvc_remote']} lacks {row['missing']}; not announced")
    if not rows:
        print("no new data version")
    return rows


if __name__ == "__main__":
    print(olora_data_watch())
