"""`make up` / `make down` services: a real Ray head and MLflow server, real `ray job submit` pretraining jobs.

One head for the module (started through jobs/services.py on free ports, in a private services dir);
two tiny jobs, without and with `--working-dir .`, submitted from a shell that does NOT carry
MLFLOW_TRACKING_URI: their runs must land in the server's store through the head's environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mlpscale import ray_cluster, services
from mlpscale.errors import MlpscaleError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
EXPERIMENT = "services-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client_env(**extra: str) -> dict[str, str]:
    """A shell's environment without any tracking or cluster address of the test session."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLPSCALE_SERVICES_DIR")
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def head():
    """`jobs/services.py up` on free ports; always `down` at the end."""
    # Ray's unix sockets live under its temp dir: keep the path short (pytest's tmp dirs are long).
    state_dir = Path(tempfile.mkdtemp(prefix="mlps-svc-", dir="/tmp"))
    ports = {
        "RAY_PORT": free_port(),
        "DASHBOARD_PORT": free_port(),
        "AGENT_PORT": free_port(),
        "MLFLOW_PORT": free_port(),
        "RAY_CLIENT_PORT": free_port(),
    }
    env = client_env(**{k: str(v) for k, v in ports.items()})
    try:
        started = subprocess.run(
            [PY, "jobs/services.py", "up", "--num-cpus", "2", "--services-dir", str(state_dir), "--timeout", "300"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"state_dir": state_dir, "ports": ports, "up_output": started.stdout}
    finally:
        subprocess.run(
            [PY, "jobs/services.py", "down", "--services-dir", str(state_dir)],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(state_dir, ignore_errors=True)


def test_up_waits_until_usable_and_prints_the_exports(head):
    record = services.load_services(head["state_dir"])
    assert record is not None
    assert record.ports.dashboard == head["ports"]["DASHBOARD_PORT"]
    assert services.health_problems(record) == []
    dashboard = f"http://127.0.0.1:{head['ports']['DASHBOARD_PORT']}"
    mlflow_url = f"http://127.0.0.1:{head['ports']['MLFLOW_PORT']}"
    assert f"RAY_API_SERVER_ADDRESS={dashboard}" in head["up_output"]
    assert f"MLFLOW_TRACKING_URI={mlflow_url}" in head["up_output"]
    env_file = (head["state_dir"] / services.ENV_FILE).read_text()
    assert f"export MLFLOW_TRACKING_URI={mlflow_url}\n" in env_file
    assert f"export RAY_ADDRESS={record.gcs_address}\n" in env_file
    assert services.ui_command(head["ports"]["MLFLOW_PORT"], head["state_dir"]) == (mlflow_url, None)
    # a second `up` finds the running services instead of starting new ones
    again = services.up(
        services.Ports(**{f: head["ports"][v] for f, v in services.PORT_VARIABLES.items()}), state_dir=head["state_dir"]
    )
    assert (again.ray_session, again.mlflow_session) == (record.ray_session, record.mlflow_session)


def test_driver_address_maps_the_dashboard_url_to_the_head(head, monkeypatch):
    record = services.load_services(head["state_dir"])
    monkeypatch.setenv("RAY_ADDRESS", record.dashboard_url)
    assert ray_cluster.driver_ray_address(head["state_dir"]) == record.gcs_address
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_cluster.driver_ray_address(head["state_dir"]) == record.gcs_address
    monkeypatch.setenv("RAY_ADDRESS", record.gcs_address)
    assert ray_cluster.driver_ray_address(head["state_dir"]) is None  # ray.init() reads RAY_ADDRESS itself
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MlpscaleError, match="RAY_ADDRESS=http://127.0.0.1:.*ray job submit"):
        ray_cluster.driver_ray_address(head["state_dir"])


def test_submitted_jobs_log_to_the_server_with_and_without_working_dir(head, digits_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    record = services.load_services(head["state_dir"])
    env = client_env(RAY_AUTH_MODE="token", MLPSCALE_DATA=str(digits_dir))
    job_args = [
        "python",
        "jobs/pretrain.py",
        "--arch",
        "B_2-Wi_32",
        "--epochs",
        "1",
        "--schedule",
        "none",
        "--n-train",
        "300",
        "--batch-size",
        "64",
        "--loader-workers",
        "1",
        "--data-dir",
        str(digits_dir),
        "--storage-path",
        str(tmp_path / "ray_results"),
        "--experiment",
        EXPERIMENT,
        "--log-model",
        "false",
    ]
    names = {"plain": [], "uploaded": ["--working-dir", "."]}
    # Both submitted at once, as users do: the second job's worker waits for the head's CPUs.
    jobs = {
        name: subprocess.Popen(
            [
                RAY,
                "job",
                "submit",
                "--address",
                record.dashboard_url,
                *extra,
                "--",
                *job_args,
                "--run-name",
                f"svc-{name}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, extra in names.items()
    }
    for name, job in jobs.items():
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, f"{name} job failed:\n{stdout[-4000:]}\n{stderr[-2000:]}"
        assert "val top-1:" in stdout

    client = MlflowClient(tracking_uri=record.mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "the jobs' experiment is not in the server's store"
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {f"svc-{name}" for name in names}
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlpscale.job"] == "pretrain"
        history = client.get_metric_history(run.info.run_id, "val_top1")
        assert [m.step for m in history] == [1]
        assert 0.0 <= history[0].value <= 1.0
        # artifacts go through the server into its artifact root under the services dir
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    stored = list((head["state_dir"] / "mlflow" / "artifacts").rglob("config.yaml"))
    assert len(stored) == 2
    assert (head["state_dir"] / "mlflow" / "mlflow.db").is_file()


def test_port_in_use_is_named_with_the_variable_to_change(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = services.Ports(
            ray=free_port(), dashboard=free_port(), agent=free_port(), mlflow=port, client=free_port()
        )
        with pytest.raises(MlpscaleError, match=f"port {port} \\(MLFLOW_PORT\\).*MLFLOW_PORT={port + 1}"):
            services.up(ports, state_dir=tmp_path / "svc")
    assert services.load_services(tmp_path / "svc") is None


def test_ui_without_server_runs_mlflow_ui_on_the_default_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url, command = services.ui_command(5123, tmp_path / "no-services")
    assert url == "http://127.0.0.1:5123"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{services.repo_root() / 'mlflow.db'}"
    assert command[command.index("--port") + 1] == "5123"


def test_bad_port_variable_is_a_user_error():
    with pytest.raises(MlpscaleError, match="DASHBOARD_PORT='http'"):
        services.Ports.from_env({"DASHBOARD_PORT": "http"})
    assert services.Ports.from_env({"MLFLOW_PORT": "5001"}).mlflow == 5001


def test_down_stops_every_process_and_is_idempotent(head):
    record = services.load_services(head["state_dir"])
    assert record.processes("ray") and record.processes("mlflow")
    assert sorted(services.down(head["state_dir"])) == ["mlflow", "ray"]
    assert not record.processes()
    assert services.status(head["state_dir"])["running"] is False
    assert services.down(head["state_dir"]) == []
    for port in head["ports"].values():  # all ports can be bound again
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))


def test_gpu_workers_share_the_cpus_up_to_eight_each():
    """Pretraining, sweeps and transfer grids size a one-GPU worker's CPUs (its decoder threads) by this rule."""
    assert ray_cluster.cpus_per_gpu_worker(16, 1) == 8
    assert ray_cluster.cpus_per_gpu_worker(16, 4) == 4
    assert ray_cluster.cpus_per_gpu_worker(2, 4) == 1
    assert ray_cluster.cpus_per_gpu_worker(6, 0) == 6


def test_a_missing_ray_token_is_made_once_readable_by_its_owner_only(tmp_path, monkeypatch):
    path = tmp_path / "ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert services.ray_auth_token() is None
    token = services.ensure_ray_auth_token()
    assert len(token) == 64 and int(token, 16) >= 0  # Ray's own format: 32 random bytes in hex
    assert path.read_text() == token and (path.stat().st_mode & 0o777) == 0o600
    assert services.ensure_ray_auth_token() == token == services.ray_auth_token()
