"""The summary artifact of a parent flow run: one place in the UI that links every artifact its stages made.

Prefect shows a subflow's and a deployed child run's artifacts only on those runs; a `culbot` run showed 3 of its
artifacts. This collects the artifacts of the run, its subflows (data-refresh) and the training runs it started
(tagged culbot-parent:<id>), and writes them as a markdown table with links into the UI.
"""
from __future__ import annotations

from culbot.tasks.contracts import ChainResult, short_hash

CHILD_TAG = "culbot-parent:"  # + parent flow run id; set on the training runs a chain starts


def _family(client, root_id) -> dict:
    """flow run id -> name of the run and every run below it (subflows, tagged children), breadth first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterTags

    names, todo = {}, [root_id]
    while todo and len(names) < 100:
        rid = todo.pop(0)
        if rid in names:
            continue
        names[rid] = client.read_flow_run(rid).name
        kids = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[rid])))
        kids += client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{CHILD_TAG}{rid}"])))
        todo += [k.id for k in kids if k.id not in names]
    return names


def collect(flow_run_id) -> list[dict]:
    """Every keyed artifact of the run and the runs below it: {run, task, key, type, description, id}, in the order made.
    Prefect's own result records (no key) are left out: they say nothing a reader can use."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        runs = _family(client, flow_run_id)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=list(runs))),
                                     sort=ArtifactSort.CREATED_DESC, limit=200)[::-1]
        tasks = {t.id: t.name for t in client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=list(runs))))}
    return [{"run": runs.get(a.flow_run_id, ""), "task": tasks.get(a.task_run_id, "") if a.task_run_id else "",
             "key": a.key, "type": a.type or "", "description": a.description or "", "id": str(a.id)} for a in arts if a.key]


def markdown(title: str, result: ChainResult | None, error: BaseException | None, arts: list[dict], ui_url: str | None) -> str:
    """The summary: what ran, then each run's artifacts as a list (a line each, readable at any width)."""
    lines = [f"# {title}", ""]
    if error is not None:
        lines += [f"**Failed**: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", ""]
    if result is not None:
        parts = [("dataset", result.data.dataset.content_hash and short_hash(result.data.dataset.content_hash)),
                 ("run", result.run.run_dir.name if result.run else None),
                 ("eval", (f"{'passed' if result.eval.passed else 'failed'}, loss {result.eval.eval_loss:.4f}") if result.eval else None),
                 ("model", result.model.path.name if result.model else None),
                 ("published", str(result.publish.path) if result.publish else None)]
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in parts if v] + [""]
    lines += [f"## Artifacts of this run and the runs below it ({len(arts)})", ""]
    for run in dict.fromkeys(a["run"] for a in arts):
        lines += [f"**{run}**", ""]
        for a in (x for x in arts if x["run"] == run):
            link = f"[{a['key']}]({ui_url.rstrip('/')}/artifacts/artifact/{a['id']})" if ui_url else f"`{a['key']}`"
            made_by = f" (task {a['task']})" if a["task"] else ""
            lines.append(f"- {link}{made_by}: {a['description']}")
        lines.append("")
    return "\n".join(lines)


def write_summary(key: str, title: str, result: ChainResult | None = None, error: BaseException | None = None) -> None:
    """The summary artifact of the current flow run; a failure to write it is logged, never raised (it would hide the run's own)."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings

    try:
        arts = [a for a in collect(flow_run.id) if a["key"] != key]
        create_markdown_artifact(markdown(title, result, error, arts, get_current_settings().ui_url), key=key,
                                 description=f"{title}: links to every stage's artifacts")
    except Exception as e:
        get_run_logger().warning("could not write the summary artifact: %s", e)
