"""`culbot deploy`: create the work pools and deploy everything in deploy/prefect.yaml, idempotently.

Run as: PREFECT_API_URL=http://HOST:4200/api CULBOT_HOME=/srv/culbot culbot deploy

Pools are process pools: `cpu` for the data stages and the orchestrating flows, and one
per GPU host kind, named by the training profiles' hardware.work_pool, with concurrency 1.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from culbot.pipeline_config.schema import ConfigError
from culbot.pipeline_config.train_schema import load_train_profile, train_profiles


def pools() -> dict[str, int | None]:
    """Pool name -> concurrency limit (None: unlimited)."""
    out: dict[str, int | None] = {"cpu": None}
    for p in train_profiles():
        pool = load_train_profile(p).hardware.work_pool
        if pool != "cpu":
            out[pool] = 1
    return out


def _prefect(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed ({r.returncode}):\n{(r.stdout + r.stderr)[-2000:]}")
    return r


RESULTS_BLOCK = "culbot-results"


def save_result_storage(artifact_root: str) -> str:
    """Save the Prefect result storage block at <artifact_root>/prefect-results; returns its slug.

    With it as every worker's default result storage, a task cached on one host is a cache
    hit on another, and the `culbot` run can read the result of its training run.
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    base = f"{artifact_root.rstrip('/')}/prefect-results"
    if "://" in base:
        RemoteFileSystem(basepath=base).save(RESULTS_BLOCK, overwrite=True)
        return f"remote-file-system/{RESULTS_BLOCK}"
    LocalFileSystem(basepath=str(Path(base).resolve())).save(RESULTS_BLOCK, overwrite=True)
    return f"local-file-system/{RESULTS_BLOCK}"


def pool_env(artifact_root: str | None) -> dict[str, str]:
    """Environment every flow run gets from its pool: the artifact root and the shared result storage."""
    if not artifact_root:
        return {}
    return {"CULBOT_ARTIFACT_ROOT": artifact_root, "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": save_result_storage(artifact_root)}


def _template(env: dict[str, str]) -> dict:
    from prefect.workers.process import ProcessWorker

    t = ProcessWorker.get_default_base_job_template()
    t["variables"]["properties"]["env"]["default"] = env
    return t


def locks() -> list[str]:
    """The global concurrency limits (limit 1 each) the flows hold: raw/ for data refreshes, one per training profile
    for culbot/full (flows/runner.py)."""
    from culbot.flows.runner import RAW_LOCK, full_lock

    return [RAW_LOCK] + [full_lock(p.stem) for p in train_profiles()]


def ensure_locks(log=print) -> list[str]:
    """Create the missing locks (a limit of 1 each) and hold existing ones at 1; returns the names created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in locks():
            try:
                have = client.read_global_concurrency_limit_by_name(name)
                if have.limit != 1 or not have.active:
                    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                created.append(name)
    if created:
        log(f"created concurrency limits {', '.join(created)} (1 each)")
    return created


def ensure_pools(log=print, env: dict[str, str] | None = None) -> list[str]:
    """Create missing process pools, set their concurrency limits and default env; returns the names created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    created = []
    env = env or {}
    with get_client(sync_client=True) as client:
        for name, limit in pools().items():
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=limit, base_job_template=_template(env)))
                created.append(name)
                log(f"created work pool {name}" + (f" (concurrency {limit})" if limit else ""))
                continue
            have = pool.base_job_template.get("variables", {}).get("properties", {}).get("env", {}).get("default", {})
            if pool.concurrency_limit != limit or (env and have != env):
                client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit,
                                                             base_job_template=_template(env) if env else pool.base_job_template))
    return created


def deploy(prefect_file: Path, home: Path, log=print, artifact_root: str | None = None) -> list[str]:
    """Create missing pools, set GPU pools to concurrency 1, deploy all; returns the deployment names.

    With an artifact root, every pool's flow runs get it and the shared result storage in their env.
    """
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("culbot deploy needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    if not Path(prefect_file).is_file():
        raise ConfigError(f"{prefect_file}: deployment file not found (run from the repository root or pass --prefect-file)")
    env = {**os.environ, "CULBOT_HOME": str(Path(home).resolve())}
    env_defaults = pool_env(artifact_root)
    ensure_pools(log, env_defaults)
    ensure_locks(log)
    if env_defaults:
        log(f"artifact root {artifact_root}; Prefect results in {env_defaults['PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK']}")
    r = _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file), env=env)
    names = [line.split("'")[1] for line in r.stdout.splitlines() if "prefect deployment run '" in line]
    log(f"deployed {len(names)}: {', '.join(names)} (working directory {env['CULBOT_HOME']})")
    return names
