"""How a flow runs a stage: the cache, verification, pulling a hit made on another host, pushing what it made.

Every flow calls :func:`run_stage` for each stage, so the rules live here once:
- a cached result is trusted only when its folder still verifies against its manifest;
- a cached result whose folder is not on this host is pulled from the artifact root, else rebuilt;
- with an artifact root, every finished output is pushed there (a no-op when it is there already).

Single-stage flows start from folders the user names: :func:`existing` and :func:`existing_run`.
Importing it also sends culbot's INFO lines to the flow runs' logs (bottom of the module).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import TypeVar

from prefect import get_run_logger

from culbot.tasks import _store
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks.contracts import RunOutput, RunRef, StageOutput, StageRef
from culbot.tasks.quiet import quiet
from culbot.tasks.run_folder import finished_result, require_profile, run_output

O = TypeVar("O", bound=StageOutput)


def verified(out: StageOutput | None) -> bool:
    """The output's folder is here, its manifest is the one the result names, and every file matches."""
    if out is None:
        return False
    m = _store.read_manifest(out.path)
    return m is not None and m.content_hash == out.content_hash and _store.is_complete(out.path)


def _pull(out: StageOutput, root: str) -> bool:
    if isinstance(out, RunOutput):
        return _artifact_root.pull_run(out.run_dir, root)
    return _artifact_root.pull(out.path, root)


def _push(out: StageOutput, root: str) -> None:
    if isinstance(out, RunOutput):
        _artifact_root.push_run(out.run_dir, root)
    else:
        _artifact_root.push(out.path, root)


def pulled(out: StageOutput | None, root: str | None) -> bool:
    """A cached output made on another host, fetched from the artifact root and verified here."""
    if not root or out is None:
        return False
    try:
        _pull(out, root)
    except (_artifact_root.TransferError, FileNotFoundError) as e:
        get_run_logger().info("not in the artifact root (%s); rebuilding", e)
        return False
    return verified(out)


def _made_by(task_name: str) -> tuple[str, str] | None:
    """(key, UI link or id) of the newest artifact that a run of ``task_name`` made when it did the work (not a cache hit)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterTaskRunId, TaskRunFilter, TaskRunFilterName,
                                                TaskRunFilterState, TaskRunFilterStateName)
    from prefect.client.schemas.sorting import ArtifactSort, TaskRunSort
    from prefect.settings import get_current_settings

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=task_name),
                                                                   state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["Completed"]))),
                                     sort=TaskRunSort.END_TIME_DESC, limit=20)
        ids = [r.id for r in runs if r.name.rsplit("-", 1)[0] == task_name][:5]
        arts = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=ids)),
                                                 sort=ArtifactSort.CREATED_DESC, limit=20) if a.key] if ids else []
    if not arts:
        return None
    ui = get_current_settings().ui_url
    return arts[0].key, f"{ui.rstrip('/')}/artifacts/artifact/{arts[0].id}" if ui else f"artifact id {arts[0].id}"


def say_cached(task_name: str, out: StageOutput) -> None:
    """A stage served from the cache says what it served (Prefect's own line is only "Finished in state Cached"), and
    where the artifact of the run that made it is."""
    from prefect.artifacts import create_markdown_artifact

    from culbot.tasks._prefect import artifact_key
    from culbot.tasks.contracts import short_hash

    try:
        made = _made_by(task_name)
    except Exception as e:   # the run goes on without the link
        get_run_logger().debug("no artifact link for %s: %s", task_name, e)
        made = None
    where = f"; its artifact: {made[0]} ({made[1]})" if made else ""
    get_run_logger().info("%s: served from the cache: %s (hash %s)%s", task_name, out.path, short_hash(out.content_hash), where)
    link = (f"[{made[0]}]({made[1]})" if made[1].startswith("http") else f"{made[0]} ({made[1]})") if made else "none found"
    create_markdown_artifact(f"# {task_name}: served from the cache\n\n- output: `{out.path}`\n- hash: `{short_hash(out.content_hash)}`\n"
                             f"- the artifact of the run that made it: {link}\n", key=artifact_key(f"{task_name}-cached"),
                             description=f"{task_name} was served from the cache: the output folder and the run that made it")


def run_stage(task, *, force: bool = False, root: str | None = None, **inputs) -> O:
    """Run one stage task and return its typed output, rebuilt if its cached folder is gone or altered."""
    state = (task.with_options(refresh_cache=True) if force else task)(**inputs, return_state=True)
    out = state.result()   # raises what the task raised
    if state.name == "Cached" and verified(out):
        say_cached(task.name, out)
    if not verified(out) and not pulled(out, root):
        get_run_logger().warning("%s: cached output %s is missing or changed; rebuilding it", task.name, out.path if out else None)
        out = task.with_options(refresh_cache=True)(**inputs)
        if not verified(out):
            raise RuntimeError(f"{task.name}: output {out.path} does not verify against its manifest")
    if root:
        _push(out, root)
    return out


def existing(path: str | Path, root: str | None = None) -> StageRef:
    """A finished stage folder the user named (pulled from the artifact root if this host lacks it)."""
    path = Path(path)
    if root and _store.read_manifest(path) is None:
        _artifact_root.pull(path, root)
    problems = _store.verify(path)
    if problems:
        raise FileNotFoundError(f"{path}: not a finished stage output ({problems[0]})"
                                + ("" if root else "; set artifact_root if it was made on another host"))
    return StageRef(path=path.resolve(), content_hash=_store.read_manifest(path).content_hash)


def existing_run(run_dir: str | Path, root: str | None = None, profile: str | None = None, stage: str = "") -> RunRef:
    """A finished training run the user named (pulled with its data if this host lacks it); with ``profile``, refused
    unless it was trained with that training profile."""
    if root and finished_result(Path(run_dir)) is None:
        _artifact_root.pull_run(Path(run_dir), root)
    if profile is not None:
        require_profile(Path(run_dir), profile, stage)
    return run_output(run_dir).ref()


# ----- locks across flow runs -------------------------------------------------------------------

RAW_LOCK = "culbot-raw"   # held by a data refresh: one at a time writes raw/ and the dataset folders


def full_lock(train_profile: str) -> str:
    """Held by a culbot/full run: one chain per training profile at a time."""
    return f"culbot-full-{train_profile}"


LOCK_CHECK_S = float(os.environ.get("CULBOT_LOCK_CHECK_S", "30"))   # how often a waiting run checks on the holder and says so


def _process_start(pid: int) -> str | None:
    """The start time of a process on this host (from /proc), so a reused pid is not taken for the holder; None: gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_variable(name: str) -> str:
    return f"culbot-lock-{name}"


def _this_holder() -> dict:
    from prefect.runtime import flow_run

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "flow_run": str(flow_run.id or ""),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _holder_is_gone(holder: dict | None) -> bool:
    """A recorded holder on this host whose process no longer runs (killed, crashed). One on another host is never
    judged from here: its lease (Prefect's, renewed while it lives) lapses on a server that runs the lease service."""
    return bool(holder) and holder.get("host") == socket.gethostname() and _process_start(int(holder["pid"])) != holder.get("start")


@contextlib.contextmanager
def exclusive(name: str):
    """Hold one slot of the global concurrency limit ``name`` (created with limit 1 by `culbot deploy`); runs queue
    behind it. Where the limit does not exist (an ephemeral server: `culbot run`, CI) this waits for nothing.

    The holder is recorded in a Prefect variable (culbot-lock-<name>: host, pid, flow run, since). A waiting run says
    every CULBOT_LOCK_CHECK_S (30) seconds what it waits for and for how long, and releases a slot whose holder's
    process is gone from this host: after a `kill -9` the slot stayed taken (an ephemeral server keeps no lease), and
    the next refresh waited until someone released it by hand."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound
    from prefect.variables import Variable

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        yield   # not deployed with `culbot deploy`: nothing to wait for, and no warning about it
        return
    log, t0 = get_run_logger(), time.monotonic()
    with contextlib.ExitStack() as held:
        while True:
            try:
                held.enter_context(concurrency(name, occupy=1, strict=True, timeout_seconds=LOCK_CHECK_S))
                break
            except TimeoutError:
                holder = Variable.get(_holder_variable(name))
                if _holder_is_gone(holder):
                    # (a holder that took the slot a moment ago has written its record within that moment)
                    with get_client(sync_client=True) as client:
                        client.release_concurrency_slots(names=[name], slots=1, occupancy_seconds=1)   # the API wants > 0
                    Variable.unset(_holder_variable(name))
                    log.warning("released %s: its holder, process %s on %s (flow run %s, since %s), is gone", name, holder["pid"],
                                holder["host"], holder.get("flow_run") or "?", holder.get("since", "?"))
                    continue
                who = (f"process {holder['pid']} on {holder['host']} (flow run {holder.get('flow_run') or '?'}, since "
                       f"{holder.get('since', '?')})" if holder else "a run that left no record")
                log.info("waiting for %s, held by %s: %.0f s so far", name, who, time.monotonic() - t0)
        waited = time.monotonic() - t0
        if waited > 1:
            log.info("waited %.0f s for %s (another run held it)", waited, name)
        Variable.set(_holder_variable(name), _this_holder(), overwrite=True)
        try:
            yield
        finally:
            Variable.unset(_holder_variable(name))


# ----- culbot's log lines in the flow runs' logs -------------------------------------------------
# Every flow module imports this one, so a worker that runs a deployment sends culbot's INFO lines to the flow run's
# logs. Prefect attaches its API handler to the `culbot` logger only when PREFECT_LOGGING_EXTRA_LOGGERS names it, and
# leaves the logger at the root's WARNING: the training loss lines, the launch command and the QA ledger never reached
# the UI.

def _in_a_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _culbot_logs_to_the_flow_run() -> None:
    from prefect.logging.handlers import APILogHandler

    log = logging.getLogger("culbot")
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in log.handlers):
        handler = APILogHandler()
        handler.addFilter(_in_a_run)   # a CLI command outside any run logs to the console only, without Prefect's warning
        log.addHandler(handler)


_culbot_logs_to_the_flow_run()
quiet()   # a worker's flow process drops the libraries' known noise too (tasks/quiet.py)
