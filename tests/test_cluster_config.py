"""cluster.yaml / cluster-onprem.yaml against Ray's own schema, their set-up against the Makefile, and the
head's MLflow start script run for real (sqlite backend, proxied artifacts, loopback)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from mlpscale.paths import repo_root

REPO = repo_root()
CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]
SHARED_KEYS = [
    "file_mounts",
    "rsync_exclude",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
]


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_rays_schema_and_launcher_preparation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    jsonschema.validate(config, _ray_schema())
    prepared = prepare_config(config)  # what `ray up` does: defaults merged, node types filled in
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_catches_a_misspelt_key():
    config = _load("cluster.yaml")
    config["available_node_types"]["gpu_24gb"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, _ray_schema())


def test_aws_cluster_has_a_cpu_head_and_autoscaling_one_gpu_workers():
    config = _load("cluster.yaml")
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    workers = [spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]]
    assert len(workers) == 1
    worker = workers[0]
    assert worker["resources"]["GPU"] == 1
    assert 0 <= worker["min_workers"] < worker["max_workers"] <= config["max_workers"]
    assert worker["node_config"]["InstanceType"] == "g5.xlarge"  # A10G 24 GB, named in the file's comments


def test_onprem_variant_runs_the_same_commands():
    aws, onprem = _load("cluster.yaml"), _load("cluster-onprem.yaml")
    assert onprem["provider"]["type"] == "local"
    assert onprem["provider"]["worker_ips"] and onprem["provider"]["head_ip"]
    for key in SHARED_KEYS:
        assert onprem[key] == aws[key], key


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_the_project_exactly_as_make_setup(name):
    makefile = (REPO / "Makefile").read_text()
    deb_packages = re.search(r"^DEB_PACKAGES\s*:=\s*(.+)$", makefile, re.M).group(1).split()
    commands = _load(name)["setup_commands"]
    assert "cd ~/mlpscale && make setup" in commands
    make_index = commands.index("cd ~/mlpscale && make setup")
    apt = [c for c in commands[:make_index] if "apt-get install" in c]
    assert apt and all(package in apt[0].split() for package in deb_packages)  # as root, before make needs them
    assert not any("pip install" in c for c in commands)  # nothing beside make setup installs the project


@pytest.mark.parametrize("name", CONFIGS)
def test_services_listen_only_inside_the_cluster(name):
    config = _load(name)
    text = (REPO / name).read_text()
    assert "0.0.0.0" not in text
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "cluster/mlflow_server.sh" in head
    assert re.search(r"MLFLOW_TRACKING_URI=\"http://\$\(hostname -I", head)
    assert 'MLFLOW_TRACKING_URI="http://$RAY_HEAD_IP:' in " ".join(config["worker_start_ray_commands"])
    assert config["file_mounts"] == {"~/mlpscale": "."}
    assert not re.search(r"://[^/\s:]+:[^@\s]+@", text), "credentials in a URI"


def test_the_settings_file_with_credentials_is_never_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", "cluster/cluster.env"], cwd=REPO)
    assert ignored.returncode == 0
    assert (REPO / "cluster" / "cluster.env.example").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_mlflow_server_script_serves_runs_and_proxied_artifacts(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    port = _free_port()
    state = tmp_path / "mlflow-state"
    venv_bin = Path(os.sys.executable).parent
    env = dict(
        os.environ,
        MLPSCALE_MLFLOW_DIR=str(state),
        MLPSCALE_MLFLOW_HOST="127.0.0.1",
        MLPSCALE_MLFLOW_PORT=str(port),
        MLPSCALE_MLFLOW_WORKERS="1",
        MLFLOW_BIN=str(venv_bin / "mlflow"),
    )
    env.pop("MLPSCALE_MLFLOW_BACKEND_URI", None)
    env.pop("MLPSCALE_MLFLOW_ARTIFACTS", None)
    script = ["bash", str(REPO / "cluster" / "mlflow_server.sh")]
    try:
        started = subprocess.run(script, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr + (state / "mlflow.log").read_text()
        assert f"http://127.0.0.1:{port}" in started.stdout and "backend sqlite" in started.stdout
        again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stdout

        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("cluster-smoke")
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "val_top1", 0.5, step=1)
        note = tmp_path / "note.txt"
        note.write_text("proxied")
        client.log_artifact(run.info.run_id, str(note))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        stored = list((state / "artifacts").rglob("note.txt"))
        assert [p.read_text() for p in stored] == ["proxied"]
        assert (state / "mlflow.db").exists()
        assert mlflow.get_run(run.info.run_id).data.metrics["val_top1"] == 0.5
    finally:
        subprocess.run(script + ["stop"], env=env, capture_output=True, timeout=60)
    pid_file = state / "mlflow.pid"
    assert not pid_file.exists()


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_command_is_valid_bash(name):
    config = _load(name)
    for key in SHARED_KEYS[2:]:
        for command in config[key]:
            checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert checked.returncode == 0, f"{key}: {command}\n{checked.stderr}"
    assert subprocess.run(["bash", "-n", str(REPO / "cluster" / "mlflow_server.sh")]).returncode == 0
