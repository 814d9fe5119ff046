"""A sweep on a real two-node Ray cluster logging to one real `mlflow server` on PostgreSQL; the worker node dies.

Everything is a real process on this machine: a private PostgreSQL (Debian's postgresql, installed
here when missing), the MLflow server started by cluster/mlflow_server.sh on that database, a Ray
head (`ray start --head`) and a second Ray node (`ray start --address`, its own raylet, in its own
process session), and the sweep driver `python jobs/tune.py` connected with RAY_ADDRESS. With two
trials at a time on 4 CPUs each trial's worker takes 2 CPUs, so the two run on different nodes.
Once a trial on the worker node has logged an epoch, that node's whole session is SIGKILLed; the
sweep must finish on the head: every trial FINISHED in MLflow, one child run per trial, every
epoch logged exactly once (restarted trials continue from their checkpoint and their run).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from mlpscale import services, tracking
from mlpscale.tracking import sweeps

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EPOCHS = 6  # a wide window to catch a trial mid-run on the worker node
TRIALS = 2
TRIAL_ARGS = {
    "arch": "B_2-Wi_32",
    "epochs": EPOCHS,
    "warmup_epochs": 0.5,
    "n_train": 600,
    "loader_workers": 1,
    "checkpoint_every": 1,
    "log_model": False,
}
EXPERIMENT = "cluster"
SWEEP = "two-nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def postgres_bin() -> Path:
    """The newest Debian PostgreSQL's bin dir, installing the postgresql package when it is missing."""

    def found():
        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
        return Path(dirs[-1]).parent if dirs else None

    if found() is None:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail("PostgreSQL is missing: run `apt-get install -y postgresql` as root")
        install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
            run(["apt-get", "update"], env=env)
            subprocess.run(install, env=env, check=True, capture_output=True, timeout=600)
    return found()


class Postgres:
    """A private PostgreSQL cluster in a temp dir (as the `postgres` user when run as root)."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        run(["runuser", "-u", "postgres", "--", *command] if self.as_root else command, cwd=self.root)

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"), "-w", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.SubprocessError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_ray_node(command: list[str], log: Path, env: dict) -> int:
    """Run `ray start ...` in a new process session; the session id (its pid) names the node's processes."""
    with open(log, "ab") as out:
        starter = subprocess.Popen(
            [str(BIN / "ray"), "start", *command, "--disable-usage-stats"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        code = starter.wait(timeout=180)
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        services.stop_sessions([starter.pid])
        pytest.fail(f"`ray start {' '.join(command)}` failed ({code}):\n{log.read_text()[-3000:]}")
    return starter.pid


def ray_nodes(address: str, env: dict) -> list[dict]:
    probe = (
        f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'resources': n['Resources']} "
        "for n in ray.nodes()]))"
    )
    out = run([sys.executable, "-c", probe], env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def wait_for(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s} s")


def trial_nodes(run) -> list[str]:
    return [n for n in run.data.tags.get(sweeps.TAG_NODE_IDS, "").split(",") if n]


@pytest.mark.integration
def test_sweep_survives_losing_the_worker_node(digits_dir, tmp_path):
    postgres = Postgres()
    mlflow_dir = tmp_path / "mlflow"
    mlflow_env = dict(
        os.environ,
        MLFLOW_BIN=str(BIN / "mlflow"),
        MLPSCALE_MLFLOW_DIR=str(mlflow_dir),
        MLPSCALE_MLFLOW_HOST="127.0.0.1",
        MLPSCALE_MLFLOW_PORT=str(free_port()),
        MLPSCALE_MLFLOW_ARTIFACTS=str(tmp_path / "artifacts"),
        MLPSCALE_MLFLOW_WORKERS="1",
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
    )
    ray_temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    ray_port = free_port()
    address = f"127.0.0.1:{ray_port}"
    uri = f"http://127.0.0.1:{mlflow_env['MLPSCALE_MLFLOW_PORT']}"
    # Node death noticed within seconds, not Ray's default ~30 s.
    ray_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_env.update(
        RAY_health_check_period_ms="1000",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
        MLFLOW_TRACKING_URI=uri,
        RAY_AUTH_MODE="token",
    )
    sessions: list[int] = []
    driver = None
    try:
        mlflow_env["MLPSCALE_MLFLOW_BACKEND_URI"] = postgres.start()
        run(["bash", str(REPO / "cluster" / "mlflow_server.sh")], env=mlflow_env)
        wait_for(f"{uri}/health")

        services.ensure_ray_auth_token()  # `ray start` with token auth needs it; a fresh machine has none
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", "100000000"]
        sessions.append(
            start_ray_node(
                [
                    "--head",
                    "--port",
                    str(ray_port),
                    "--temp-dir",
                    str(ray_temp),
                    "--include-dashboard",
                    "false",
                    "--resources",
                    '{"head": 1}',
                    *common,
                ],
                tmp_path / "ray-head.log",
                ray_env,
            )
        )
        worker_session = start_ray_node(
            ["--address", address, "--resources", '{"worker_node": 1}', *common], tmp_path / "ray-worker.log", ray_env
        )
        sessions.append(worker_session)
        nodes = ray_nodes(address, ray_env)
        assert len([n for n in nodes if n["alive"]]) == 2, nodes
        head_id = next(n["id"] for n in nodes if "head" in n["resources"])
        worker_id = next(n["id"] for n in nodes if "worker_node" in n["resources"])

        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump({"lr": {"distribution": "loguniform", "low": 1e-3, "high": 3e-3}}))
        command = [
            sys.executable,
            str(REPO / "jobs" / "tune.py"),
            "--space",
            str(space),
            "--num-samples",
            str(TRIALS),
            "--max-concurrent",
            "2",
            "--trial-retries",
            "2",
            "--name",
            SWEEP,
            "--storage-path",
            str(tmp_path / "ray"),
            "--data-dir",
            str(digits_dir),
            "--experiment",
            EXPERIMENT,
            "--tracking-uri",
            uri,
            *[f"--{k.replace('_', '-')}={v}" for k, v in TRIAL_ARGS.items()],
        ]
        driver_log = tmp_path / "driver.log"
        with open(driver_log, "w") as out:
            driver = subprocess.Popen(
                command,
                cwd=REPO,
                env=dict(ray_env, RAY_ADDRESS=address),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        client = tracking.client(uri)
        killed_run = None
        deadline = time.monotonic() + 240
        while killed_run is None and driver.poll() is None and time.monotonic() < deadline:
            parent_id = sweeps.find_sweep_run(uri, EXPERIMENT, SWEEP)
            for child in sweeps.trial_runs(uri, parent_id) if parent_id else []:
                if (
                    trial_nodes(child) == [worker_id]
                    and child.info.status == "RUNNING"
                    and 1 <= tracking.last_logged_epoch(client, child.info.run_id) < EPOCHS
                ):
                    killed_run = child.info.run_id
                    break
            else:
                time.sleep(0.3)
        assert killed_run, f"no trial ran on the worker node mid-sweep:\n{driver_log.read_text()[-3000:]}"
        assert services.kill_sessions(
            [worker_session], wait_s=10
        )  # the node dies: raylet, its workers and agents SIGKILLed at once

        assert driver.wait(timeout=300) == 0, driver_log.read_text()[-5000:]
        parent_id = sweeps.find_sweep_run(uri, EXPERIMENT, SWEEP)
        assert client.get_run(parent_id).info.status == "FINISHED"
        children = sweeps.trial_runs(uri, parent_id)
        trial_ids = [run.data.tags[sweeps.TAG_TRIAL_ID] for run in children]
        assert len(children) == TRIALS and len(set(trial_ids)) == TRIALS, trial_ids
        for child in children:
            assert child.info.status == "FINISHED", (child.info.run_id, child.data.tags)
            for name in tracking.EPOCH_METRICS:
                steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, name))
                assert steps == list(range(1, EPOCHS + 1)), (child.info.run_id, name, steps)
        placed = {child.info.run_id: trial_nodes(child) for child in children}
        assert any(head_id in nodes for nodes in placed.values()) and any(
            worker_id in nodes for nodes in placed.values()
        ), placed
        # The killed trial restarted on the head; nothing ran on the dead node afterwards.
        assert placed[killed_run][0] == worker_id and placed[killed_run][-1] == head_id, placed[killed_run]
        alive = {n["id"]: n["alive"] for n in ray_nodes(address, ray_env)}
        assert alive == {head_id: True, worker_id: False}, alive
    finally:
        if driver is not None and driver.poll() is None:
            services.stop_sessions([driver.pid], grace_s=3.0)
        services.stop_sessions(sessions, grace_s=3.0)
        mlflow_pid = mlflow_dir / "mlflow.pid"
        mlflow_session = int(mlflow_pid.read_text()) if mlflow_pid.is_file() else 0
        subprocess.run(
            ["bash", str(REPO / "cluster" / "mlflow_server.sh"), "stop"],
            env=mlflow_env,
            capture_output=True,
            timeout=60,
        )
        services.stop_sessions([mlflow_session], grace_s=15.0)  # waits until the server has exited
        postgres.stop()
        shutil.rmtree(ray_temp, ignore_errors=True)
