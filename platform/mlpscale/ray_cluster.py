"""Join or start Ray from a job's driver, and the resource rules for the workers every job starts.

`ensure_ray` joins the running cluster (RAY_ADDRESS, or the head `make up` started, found through
the services record) and otherwise starts Ray locally; `cpus_per_gpu_worker` sizes a one-GPU
worker's CPUs the same way for pretraining, sweeps and transfer grids.
"""

from __future__ import annotations

import logging
import os

from mlpscale.errors import MlpscaleError
from mlpscale.services import load_services, local_ray_address

logger = logging.getLogger(__name__)


def driver_ray_address(state_dir: str | os.PathLike | None = None) -> str | None:
    """The address a script's ray.init() should use; None means ray.init()'s own choice (RAY_ADDRESS, else local).

    - RAY_ADDRESS set to a cluster address (what `ray job submit` gives its jobs): None, ray.init() reads it.
    - RAY_ADDRESS set to the dashboard URL of the `make up` head (as Ray's job docs suggest): ray.init()
      would take it for a Ray Client address and fail, so it maps to that head's GCS address.
    - RAY_ADDRESS unset: the `make up` head when it runs (its address is not in /tmp/ray, so plain ray.init()
      would not find it), else None (a local Ray).
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and not address.startswith(("http://", "https://")):
        return None
    services = load_services(state_dir)
    head = local_ray_address(state_dir)
    if not address:
        return head
    if services is not None and head and address.rstrip("/") == services.dashboard_url:
        return head
    raise MlpscaleError(
        f"RAY_ADDRESS={address} is a dashboard URL (for `ray job submit`), not a cluster address for a "
        "script: submit the job with `ray job submit -- python jobs/<job>.py ...`, or unset RAY_ADDRESS "
        "to run it on a local Ray, or start the local services with `make up`"
    )


def ensure_ray() -> None:
    """Join the running cluster (RAY_ADDRESS, or the `make up` head), else start Ray locally; what every job does."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=driver_ray_address())
    except ConnectionError as error:  # a stale record of a head that is gone
        logger.warning("no reachable Ray cluster (%s); starting Ray locally", error)
        ray.init(address="local")


def cpus_per_gpu_worker(cpus: int, gpu_workers: int) -> int:
    """CPUs for each of `gpu_workers` one-GPU workers sharing `cpus`: decoder threads to feed its GPU, at most 8."""
    return max(1, min(8, cpus // max(1, gpu_workers)))
