"""What a flow run started from a deployment checks before it does anything.

- The worker runs the culbot the deployment was made from. `culbot deploy` records the deployer's version
  (package version + a hash of every source and shipped config file) as the deployment's version; a worker with
  other code (an old install, an uncommitted edit on either side) fails the run at once, saying both versions,
  instead of running code nobody deployed.
- A training run goes to the pool of its profile's hardware.
"""
from __future__ import annotations

import os

from culbot.tasks import _store

SKIP_ENV = "CULBOT_SKIP_VERSION_CHECK"   # =1: run whatever is installed (a developer's worker)


class VersionMismatch(RuntimeError):
    """The worker's culbot is not the one the deployment was made from."""


def culbot_version() -> str:
    """This culbot's identity (tasks/_store.py: code_version), recorded as each deployment's version."""
    return _store.code_version()


def check_version() -> None:
    """Fail a deployed run whose worker has other code than its deployment (no-op outside a deployment)."""
    from prefect.runtime import deployment

    if not deployment.id or os.environ.get(SKIP_ENV) == "1":
        return
    want = deployment.version or ""
    if "+src." not in want:   # deployed with plain `prefect deploy`: nothing recorded to compare with
        return
    have = culbot_version()
    if have != want:
        raise VersionMismatch(
            f"this worker runs culbot {have}, but deployment {deployment.name!r} was deployed from culbot {want}. "
            f"Install the deployed code on the worker (check out the deployer's commit, `pip install .`) and restart it, "
            f"redeploy from the worker's code, or deploy with `culbot deploy --git-clone URL` so each run installs the "
            f"deployed commit. {SKIP_ENV}=1 on the worker turns this check off.")


class WrongPool(RuntimeError):
    """A training run was sent to another pool than its profile's hardware."""


def check_pool(profile: str, pool: str) -> None:
    """A deployed training run must be on its profile's pool (a GPU deployment pins its profile; this is the guard)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment, flow_run

    if not deployment.id:
        return
    with get_client(sync_client=True) as client:
        here = client.read_flow_run(flow_run.id).work_pool_name
    if here and here != pool:
        raise WrongPool(f"training profile {profile!r} trains on work pool {pool!r}, but this run was sent to pool {here!r}; "
                              f"start the deployment train-stage/train-{profile} instead")
