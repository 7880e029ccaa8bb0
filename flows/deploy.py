"""`culbot deploy`: create the work pools and deploy everything in deploy/prefect.yaml, idempotently.

Run as: PREFECT_API_URL=http://HOST:4200/api CULBOT_HOME=/srv/culbot culbot deploy

Pools are process pools: `cpu` for the data stages and the orchestrating flows, and one
per GPU host kind, named by the training profiles' hardware.work_pool, with concurrency 1.
"""
from __future__ import annotations

import json
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


def locks() -> dict[str, str]:
    """The global concurrency limits (limit 1 each) the flows hold, with what each is for: raw/ for data refreshes, one
    per training profile for culbot/full (flows/runner.py). Prefect 3.8's limits have no description field, so
    `culbot deploy` prints these."""
    from culbot.flows.runner import RAW_LOCK, full_lock

    return {RAW_LOCK: "one data refresh at a time writes raw/ and the dataset folders (the weekly one and a chain's)",
            **{full_lock(p.stem): f"one culbot/full chain at a time trains profile {p.stem}" for p in train_profiles()}}


def ensure_locks(log=print) -> list[str]:
    """Create the missing locks (a limit of 1 each), hold existing ones at 1, and say what each is for; returns the names
    created."""
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
    for name, purpose in locks().items():
        log(f"concurrency limit {name} (1{', created' if name in created else ''}): {purpose}")
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


# ----- after `prefect deploy`: version, pinned parameters, code pull ------------------------------------

PINNED = {"train-stage": ("train_profile",)}   # flow -> parameters each of its deployments pins to its own value


def pin_parameters(schema: dict, values: dict, names: tuple[str, ...]) -> dict:
    """The deployment's parameter schema with ``names`` fixed to the deployment's values: a one-choice enum in the form,
    refused by the server otherwise (enforce_parameter_schema); the matching custom-file parameter is removed."""
    schema = json.loads(json.dumps(schema))
    props = schema.get("properties", {})
    for name in names:
        if name not in values or name not in props:
            continue
        value = values[name]
        props[name] = {**props[name], "enum": [value], "default": value,
                       "description": f"Pinned to {value} by this deployment (its work pool); another profile has its own deployment."}
        props.pop(f"{name}_file", None)
    return schema


def pull_steps(repository: str, commit: str, home: str, install: str = "python -m pip install --quiet .") -> list[dict]:
    """Pull steps that check out the deployed commit and install it, for workers without culbot installed (or with another
    version), then work in CULBOT_HOME."""
    return [
        {"prefect.deployments.steps.git_clone": {"id": "clone", "repository": repository, "commit_sha": commit}},
        {"prefect.deployments.steps.run_shell_script": {"script": install, "directory": "{{ clone.directory }}"}},
        {"prefect.deployments.steps.set_working_directory": {"directory": home}},
    ]


def git_head(repo: Path) -> str:
    """The commit to deploy: HEAD of the checkout, which must be clean (the workers would install something else)."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise ConfigError(f"--git-clone: {repo} is not a git checkout ({r.stderr.strip()})")
        return r.stdout.strip()

    if git("status", "--porcelain", "--untracked-files=no"):
        raise ConfigError(f"--git-clone: {repo} has uncommitted changes; commit and push them, so the workers install what you deploy")
    return git("rev-parse", "HEAD")


_DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def describe_schedule(cron: str, timezone: str | None) -> str:
    """A cron schedule in words with its timezone, e.g. 'every Monday at 03:00 Asia/Seoul (cron 0 3 * * 1)'."""
    tz = timezone or "UTC"
    minute, hour, dom, month, dow = (cron.split() + ["?"] * 5)[:5]
    when = f"cron {cron}"
    if minute.isdigit() and hour.isdigit() and dom == "*" and month == "*":
        at = f"{int(hour):02d}:{int(minute):02d}"
        if dow == "*":
            return f"every day at {at} {tz} (cron {cron})"
        if all(d.isdigit() and int(d) < 8 for d in dow.split(",")):
            days = " and ".join(_DAYS[int(d)] for d in dow.split(","))
            return f"every {days} at {at} {tz} (cron {cron})"
    return f"on {when} in {tz}"


def next_runs(cron: str, timezone: str | None, n: int = 2) -> list[str]:
    """The next ``n`` times the schedule comes due, in its own timezone (Prefect's own cron arithmetic)."""
    import asyncio

    from prefect.server.schemas.schedules import CronSchedule

    dates = asyncio.run(CronSchedule(cron=cron, timezone=timezone or "UTC").get_dates(n=n))
    return [d.strftime("%a %Y-%m-%d %H:%M %Z") for d in dates]


def schedule_lines(deployment) -> list[str]:
    """What each active cron schedule of a deployment means, for its description and for `culbot deploy`'s output."""
    out = []
    for s in deployment.schedules or []:
        cron = getattr(s.schedule, "cron", None)
        if cron and s.active:
            out.append(f"{describe_schedule(cron, s.schedule.timezone)}; next {', '.join(next_runs(cron, s.schedule.timezone))}")
    return out


def finish_deployments(names: list[str], log=print, git: tuple[str, str, str] | None = None) -> dict[str, str]:
    """Record this culbot's version on every deployment, pin the training deployments' profiles, enforce the parameter
    schemas, write each schedule (with its timezone) into the description, and (with ``git``: repository, commit, home)
    set the git pull steps. Returns name -> deployment id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    from culbot.flows.deployed import culbot_version

    version, ids = culbot_version(), {}
    with get_client(sync_client=True) as client:
        for name in names:
            d = client.read_deployment_by_name(name)
            ids[name] = str(d.id)
            flow = name.split("/")[0]
            update = {"version": version, "enforce_parameter_schema": True}
            if flow in PINNED:
                update["parameter_openapi_schema"] = pin_parameters(d.parameter_openapi_schema or {}, d.parameters, PINNED[flow])
            if git:
                update["pull_steps"] = pull_steps(*git)
            schedules = schedule_lines(d)
            if schedules:
                # `prefect deploy` has just reset the description from prefect.yaml, so this never doubles
                update["description"] = f"{(d.description or '').rstrip()} Scheduled: {'; '.join(schedules)}."
                for line in schedules:
                    log(f"schedule of {name}: {line}")
            client.update_deployment(d.id, DeploymentUpdate(**update))
    log(f"version {version} on {len(names)} deployments" + (f"; workers install {git[0]} at {git[1][:12]}" if git else ""))
    return ids


# ----- automations: alerts, and a training run on new data ---------------------------------------------

FAILED_AUTOMATION = "culbot: a run failed"
NEW_DATA_AUTOMATION = "culbot: train on a new dataset version"


def _block_id(client, block: str):
    from prefect.exceptions import ObjectNotFound

    if "/" not in block:
        raise ConfigError(f"--notify {block!r}: name a notification block as TYPE/NAME, e.g. slack-webhook/lab-alerts "
                          f"(`prefect block ls` lists them)")
    kind, name = block.split("/", 1)
    try:
        return client.read_block_document_by_name(name, kind).id
    except ObjectNotFound:
        raise ConfigError(f"--notify {block!r}: no such block; create it in the UI (Blocks) or with its class's .save()") from None


def ensure_automations(deployments: dict[str, str], notify: str | None, run_on_new_data: str | None, log=print) -> list[str]:
    """Replace culbot's automations: notify ``notify`` (a block TYPE/NAME) when a run of any culbot deployment fails or
    crashes; start ``run_on_new_data`` (a deployment) when data-refresh emits a new dataset version, with that profile."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import RunDeployment, SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    from culbot.flows.data_refresh import NEW_VERSION_EVENT

    made = []
    with get_client(sync_client=True) as client:
        for old in client.read_automations():
            if old.name in (FAILED_AUTOMATION, NEW_DATA_AUTOMATION):
                client.delete_automation(old.id)
        if notify:
            ids = [f"prefect.deployment.{d}" for d in deployments.values()]
            client.create_automation(AutomationCore(
                name=FAILED_AUTOMATION, description="A run of a culbot deployment ended Failed or Crashed.",
                trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                                     match_related={"prefect.resource.role": "deployment", "prefect.resource.id": ids},
                                     posture=Posture.Reactive, threshold=1, within=0),
                actions=[SendNotification(
                    block_document_id=_block_id(client, notify),
                    subject="culbot: {{ flow_run.name }} {{ flow_run.state.name }}",
                    body="Flow run {{ flow_run.name }} of deployment {{ deployment.name }} ended {{ flow_run.state.name }}: "
                         "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}")]))
            made.append(FAILED_AUTOMATION)
        if run_on_new_data:
            target = client.read_deployment_by_name(run_on_new_data)
            refresh = [f"prefect.deployment.{d}" for n, d in deployments.items() if n.startswith("data-refresh/")]
            client.create_automation(AutomationCore(
                name=NEW_DATA_AUTOMATION, description=f"data-refresh made a new dataset version: start {run_on_new_data} on it.",
                # only a run of the data-refresh deployment (the schedule), not the refresh inside a culbot chain
                trigger=EventTrigger(expect={NEW_VERSION_EVENT}, match={"prefect.resource.id": "culbot.dataset.*"},
                                     match_related={"prefect.resource.role": "deployment", "prefect.resource.id": refresh},
                                     posture=Posture.Reactive, threshold=1, within=0),
                # the refresh's own data parameters (flows/data_refresh.py: announce_new_version), so the run rebuilds
                # the same version; the overrides travel as JSON in the payload
                actions=[RunDeployment(source="selected", deployment_id=target.id, parameters={
                    "data_profile": "{{ event.resource['culbot.data-profile'] }}",
                    "data_profile_file": "{{ event.resource['culbot.data-profile-file'] }}",
                    "data_overrides": {"__prefect_kind": "json", "value": {
                        "__prefect_kind": "jinja", "template": "{{ event.payload.data_overrides | tojson }}"}}})]))
            made.append(NEW_DATA_AUTOMATION)
    if made:
        log(f"automations: {'; '.join(made)}")
    return made


def deploy(prefect_file: Path, home: Path, log=print, artifact_root: str | None = None, notify: str | None = None,
           run_on_new_data: str | None = None, git_clone: str | None = None) -> list[str]:
    """Create missing pools, set GPU pools to concurrency 1, deploy all, record the version and pin the training
    profiles; returns the deployment names.

    With an artifact root, every pool's flow runs get it and the shared result storage in their env. ``notify``,
    ``run_on_new_data``: ensure_automations. ``git_clone``: a repository URL the workers clone at this checkout's HEAD.
    """
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("culbot deploy needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    if not Path(prefect_file).is_file():
        raise ConfigError(f"{prefect_file}: deployment file not found (run from the repository root or pass --prefect-file)")
    env = {**os.environ, "CULBOT_HOME": str(Path(home).resolve())}
    git = (git_clone, git_head(Path(prefect_file).resolve().parent.parent), env["CULBOT_HOME"]) if git_clone else None
    env_defaults = pool_env(artifact_root)
    ensure_pools(log, env_defaults)
    ensure_locks(log)
    if env_defaults:
        log(f"artifact root {artifact_root}; Prefect results in {env_defaults['PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK']}")
    r = _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file), env=env)
    names = [line.split("'")[1] for line in r.stdout.splitlines() if "prefect deployment run '" in line]
    log(f"deployed {len(names)}: {', '.join(names)} (working directory {env['CULBOT_HOME']})")
    ensure_automations(finish_deployments(names, log, git), notify, run_on_new_data, log)
    return names
