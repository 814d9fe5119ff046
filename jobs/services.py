"""Start, stop and inspect the local Ray head and MLflow tracking server (`make up`, `make down`, `make ui`).

    python jobs/services.py up [--num-cpus N]    # prints the exports for `ray job submit`
    python jobs/services.py status
    python jobs/services.py down
    python jobs/services.py ui                   # the server if up, else `mlflow ui` on the default store

Ports come from RAY_PORT, DASHBOARD_PORT, AGENT_PORT, MLFLOW_PORT, RAY_CLIENT_PORT (defaults 6379, 8265,
52365, 5000, 10001); the state lives in .services/ ($MLPSCALE_SERVICES_DIR overrides).
"""

from __future__ import annotations

import argparse
import json
import subprocess

from mlpscale import services
from mlpscale.cli import MESSAGE_LOGS, job_main
from mlpscale.errors import MlpscaleError


@job_main(MESSAGE_LOGS)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status", "ui"])
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs the Ray head offers (default: all)")
    parser.add_argument("--services-dir", default=None, help="state directory (default: <repo>/.services)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the services")
    args = parser.parse_args(argv)

    if args.action == "up":
        started = services.up(
            services.Ports.from_env(),
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            state_dir=args.services_dir,
            timeout_s=args.timeout,
        )
        print(f"Ray dashboard:   {started.dashboard_url}  (GCS {started.gcs_address})")
        print(f"MLflow server:   {started.mlflow_url}  (store {started.state_dir}/mlflow)")
        print("To submit jobs, run scripts on this head and log to the server from this shell:")
        print(f"  {started.export_line()}")
        print(f"  (or: source {started.state_dir}/{services.ENV_FILE})")
        print("then e.g.: ray job submit -- python jobs/pretrain.py --epochs 2")
        print(
            f"      or: ray job submit --address {started.dashboard_url} --working-dir . -- "
            "python jobs/pretrain.py --epochs 2"
        )
        return 0
    if args.action == "down":
        stopped = services.down(args.services_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else "no services were running")
        return 0
    if args.action == "status":
        report = services.status(args.services_dir)
        print(json.dumps(report, indent=2))
        return 0 if report["running"] else 1
    url, command = services.ui_command(services.Ports.from_env().mlflow, args.services_dir)
    print(f"MLflow UI: {url}")
    if command is None:
        return 0
    print("(Ctrl-C stops it)")
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
    except FileNotFoundError as error:
        raise MlpscaleError(f"cannot start the MLflow UI ({error}); run `make setup` first") from None


if __name__ == "__main__":
    raise SystemExit(main())
