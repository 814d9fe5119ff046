"""Local services: a Ray head (dashboard + job submission) and an MLflow tracking server.

`up` starts both detached, each in its own process session, waits until they are
usable (MLflow /health, the Ray dashboard /api/version and the dashboard agent's
/api/healthz, without which `ray job submit` fails with "No available agent"),
and records what it started under the services directory (<repo>/.services):

    services.json           ports, session ids, URLs, the Ray GCS address
    env                     the shell exports for `ray job submit` and MLflow clients
    ray.log, mlflow.log     the services' own output
    raytmp/                 Ray's temp dir (sessions, logs)
    mlflow/mlflow.db        the tracking store; mlflow/artifacts the artifact root

The Ray head is started with MLFLOW_TRACKING_URI pointing at the server, so jobs
submitted with or without `--working-dir` and all their workers log to it; its
working directory is the repository root, so `ray job submit -- python jobs/x.py`
finds the job without `--working-dir`. `down` stops exactly the processes of the
recorded sessions (and their descendants), never other Ray instances on the machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlpscale.errors import MlpscaleError
from mlpscale.paths import repo_root

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
STATE_FILE = "services.json"
ENV_FILE = "env"


@dataclass(frozen=True)
class Ports:
    """The TCP ports of the local services; the Makefile variable that overrides each is in PORT_VARIABLES."""

    ray: int = 6379
    dashboard: int = 8265
    agent: int = 52365
    mlflow: int = 5000
    client: int = 10001

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Ports:
        """Ports from RAY_PORT, DASHBOARD_PORT, AGENT_PORT, MLFLOW_PORT, RAY_CLIENT_PORT where set."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, variable in PORT_VARIABLES.items():
            raw = environ.get(variable)
            if raw:
                values[field] = _parse_port(raw, variable)
        return cls(**values)


PORT_VARIABLES = {
    "ray": "RAY_PORT",
    "dashboard": "DASHBOARD_PORT",
    "agent": "AGENT_PORT",
    "mlflow": "MLFLOW_PORT",
    "client": "RAY_CLIENT_PORT",
}


@dataclass
class Services:
    """What `up` started: enough to reach the services and to stop them."""

    state_dir: str
    ports: Ports
    ray_session: int
    mlflow_session: int
    gcs_address: str
    started_at: float
    boot_id: str = ""

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ports.dashboard}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports.mlflow}"

    @property
    def agent_url(self) -> str:
        return f"http://{HOST}:{self.ports.agent}"

    def exports(self) -> dict[str, str]:
        """What a shell needs to use these services.

        RAY_API_SERVER_ADDRESS (the dashboard) is what `ray job submit` and the state API read first;
        RAY_ADDRESS (the GCS) is what ray.init() in a script reads, so `python jobs/pretrain.py` joins
        the head; RAY_AUTH_MODE=token because the head runs with token authentication.
        """
        return {
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_ADDRESS": self.gcs_address,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_AUTH_MODE": "token",
        }

    def export_line(self) -> str:
        return "export " + " ".join(f"{key}={value}" for key, value in self.exports().items())

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record.update(dashboard_url=self.dashboard_url, mlflow_url=self.mlflow_url)
        return record

    @classmethod
    def from_json(cls, record: dict) -> Services:
        return cls(
            state_dir=record["state_dir"],
            ports=Ports(**record["ports"]),
            ray_session=int(record["ray_session"]),
            mlflow_session=int(record["mlflow_session"]),
            gcs_address=record["gcs_address"],
            started_at=float(record["started_at"]),
            boot_id=record.get("boot_id", ""),
        )

    def processes(self, which: str = "all") -> set[int]:
        """Live pids of 'ray', 'mlflow' or 'all'; none after a reboot (session ids are then someone else's)."""
        if self.boot_id != _boot_id():
            return set()
        sessions = {"ray": [self.ray_session], "mlflow": [self.mlflow_session]}.get(
            which, [self.ray_session, self.mlflow_session]
        )
        return session_processes(sessions)


def services_dir(override: str | os.PathLike | None = None) -> Path:
    """The explicit override, else $MLPSCALE_SERVICES_DIR, else .services at the repository root."""
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get("MLPSCALE_SERVICES_DIR"):
        return Path(os.environ["MLPSCALE_SERVICES_DIR"]).expanduser().resolve()
    return repo_root() / ".services"


def load_services(state_dir: str | os.PathLike | None = None) -> Services | None:
    """The record of the last `up` in this services directory, or None."""
    path = services_dir(state_dir) / STATE_FILE
    if not path.exists():
        return None
    return Services.from_json(json.loads(path.read_text()))


def up(
    ports: Ports | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    state_dir: str | os.PathLike | None = None,
    timeout_s: float = 180.0,
) -> Services:
    """Start the Ray head and the MLflow server (or find them already running) and wait until both are usable."""
    ports = ports or Ports.from_env()
    root = services_dir(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    running = load_services(root)
    if running is not None:
        problems = health_problems(running)
        if not problems:
            logger.info("services already running (%s, %s)", running.dashboard_url, running.mlflow_url)
            return running
        logger.warning("stale services record (%s); stopping its leftovers", "; ".join(problems))
        down(root)

    _check_ports_free(ports)
    mlflow_dir = root / "mlflow"
    (mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    mlflow_url = f"http://{HOST}:{ports.mlflow}"
    mlflow_process = _start_mlflow(mlflow_dir, ports.mlflow, root / "mlflow.log")
    try:
        ray_session, gcs_address = _start_ray_head(root, ports, mlflow_url, num_cpus, num_gpus)
    except BaseException:
        stop_sessions([mlflow_process.pid])
        raise
    services = Services(
        state_dir=str(root),
        ports=ports,
        ray_session=ray_session,
        mlflow_session=mlflow_process.pid,
        gcs_address=gcs_address,
        started_at=time.time(),
        boot_id=_boot_id(),
    )
    _write_state(root, services)
    try:
        _wait_until_healthy(services, mlflow_process, timeout_s)
    except BaseException:
        down(root)
        raise
    logger.info("services up: Ray dashboard %s, MLflow %s", services.dashboard_url, services.mlflow_url)
    return services


def down(state_dir: str | os.PathLike | None = None, *, grace_s: float = 6.0) -> list[str]:
    """Stop the recorded services (idempotent); returns the names of what was running."""
    root = services_dir(state_dir)
    services = load_services(root)
    if services is None:
        return []
    stopped = [name for name in ("ray", "mlflow") if services.processes(name)]
    if stopped:
        stop_sessions([services.ray_session, services.mlflow_session], grace_s=grace_s)
    for name in (STATE_FILE, ENV_FILE):
        (root / name).unlink(missing_ok=True)
    return stopped


def status(state_dir: str | os.PathLike | None = None) -> dict:
    """Whether the recorded services run and answer: {'running': bool, 'problems': [...], ...URLs}."""
    services = load_services(state_dir)
    if services is None:
        return {"running": False, "problems": ["no services started (run `make up`)"]}
    problems = health_problems(services)
    return {"running": not problems, "problems": problems, **services.to_json()}


def health_problems(services: Services) -> list[str]:
    """What does not answer yet: each entry names the service and the URL probed."""
    problems = []
    if not services.processes("ray"):
        problems.append("the Ray head's processes are gone")
    if not services.processes("mlflow"):
        problems.append("the MLflow server's process is gone")
    for name, url, ray_auth in (
        ("MLflow", f"{services.mlflow_url}/health", False),
        ("Ray dashboard", f"{services.dashboard_url}/api/version", True),
        ("Ray dashboard agent", f"{services.agent_url}/api/healthz", True),
    ):
        if not _answers(url, ray_auth=ray_auth):
            problems.append(f"{name} does not answer at {url}")
    return problems


def local_ray_address(state_dir: str | os.PathLike | None = None) -> str | None:
    """The GCS address (host:port) of the head `make up` started, when it is running; for ray.init()."""
    services = load_services(state_dir)
    if services is None or not services.processes("ray"):
        return None
    return services.gcs_address


def ui_command(port: int, state_dir: str | os.PathLike | None = None) -> tuple[str, list[str] | None]:
    """The MLflow UI to open: the running server's URL (no command), else `mlflow ui` on the default store."""
    services = load_services(state_dir)
    if services is not None and _answers(f"{services.mlflow_url}/health"):
        return services.mlflow_url, None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        return uri, None
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port)]
    return f"http://{HOST}:{port}", command


def write_env_file(services: Services) -> Path:
    """Write `<services-dir>/env`: the exports, for `source .services/env`."""
    path = Path(services.state_dir) / ENV_FILE
    path.write_text("".join(f"export {key}={value}\n" for key, value in services.exports().items()))
    return path


# --- starting ---------------------------------------------------------------------------------------------


def _parse_port(raw: str, variable: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise MlpscaleError(f"{variable}={raw!r} is not a TCP port; use a number in 1..65535, e.g. {variable}=5001")
    return port


def _check_ports_free(ports: Ports) -> None:
    for field, port in dataclasses.asdict(ports).items():
        variable = PORT_VARIABLES[field]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                probe.bind(("0.0.0.0" if field in ("ray", "client") else HOST, port))
            except OSError:
                raise MlpscaleError(
                    f"port {port} ({variable}) is already in use; stop what listens there or pick another "
                    f"port, e.g. `make up {variable}={port + 1}`"
                ) from None


def _start_mlflow(mlflow_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination",
        str(mlflow_dir / "artifacts"),
        "--serve-artifacts",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    logger.info("starting MLflow: %s", " ".join(command))
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=mlflow_dir,
            start_new_session=True,
        )


def _start_ray_head(
    root: Path, ports: Ports, mlflow_url: str, num_cpus: int | None, num_gpus: int | None
) -> tuple[int, str]:
    temp_dir = root / "raytmp"
    temp_dir.mkdir(exist_ok=True)
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
    ray = Path(sys.executable).with_name("ray")
    command = [
        str(ray) if ray.exists() else "ray",
        "start",
        "--head",
        "--node-ip-address",
        HOST,
        "--port",
        str(ports.ray),
        "--dashboard-host",
        HOST,
        "--dashboard-port",
        str(ports.dashboard),
        "--dashboard-agent-listen-port",
        str(ports.agent),
        "--ray-client-server-port",
        str(ports.client),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    # Token auth explicitly on: the GCS listens on all interfaces. `ray start` needs the token to exist already.
    ensure_ray_auth_token()
    # RAY_API_SERVER_ADDRESS: Ray's state API inside jobs (Train's placement-group cleaner) finds this head
    # without scanning for GCS processes, which fails when other Ray instances run on the machine.
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=mlflow_url,
        MLPSCALE_REPO=str(repo_root()),
        RAY_AUTH_MODE="token",
        RAY_API_SERVER_ADDRESS=f"http://{HOST}:{ports.dashboard}",
    )
    # `ray job submit -- python ...` runs `python` from the head's PATH: make it this environment's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    logger.info("starting Ray head: %s", " ".join(command))
    log_path = root / "ray.log"
    with open(log_path, "ab") as log:
        starter = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=repo_root(),
            env=env,
            start_new_session=True,
        )
        try:
            returncode = starter.wait(timeout=300)
        except subprocess.TimeoutExpired:
            returncode = None
    if returncode != 0:
        stop_sessions([starter.pid])
        raise MlpscaleError(
            f"`ray start --head` failed (exit {returncode}); its output is in {log_path}:\n" + _tail(log_path)
        )
    address_file = temp_dir / "ray_current_cluster"
    gcs_address = address_file.read_text().strip() if address_file.exists() else f"{HOST}:{ports.ray}"
    return starter.pid, gcs_address


def _wait_until_healthy(services: Services, mlflow_process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if mlflow_process.poll() is not None:
            log = Path(services.state_dir) / "mlflow.log"
            raise MlpscaleError(
                f"the MLflow server exited (status {mlflow_process.returncode}); its output is in {log}:\n{_tail(log)}"
            )
        problems = health_problems(services)
        if not problems:
            write_env_file(services)
            return
        if time.monotonic() > deadline:
            raise MlpscaleError(
                f"services not ready after {timeout_s:.0f} s: {'; '.join(problems)}; "
                f"see the logs in {services.state_dir}"
            )
        time.sleep(0.5)


def _write_state(root: Path, services: Services) -> None:
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(services.to_json(), indent=2))
    tmp.replace(root / STATE_FILE)


def _ray_auth_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ray_auth_token() -> str | None:
    """Ray's token, where Ray's own clients look: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = _ray_auth_token_path()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ensure_ray_auth_token() -> str:
    """Ray's token, made (as `ray get-auth-token --generate` does) where Ray looks when there is none yet.

    `ray start` with token authentication refuses to start without one (unlike `ray.init`), so a fresh
    machine's first `make up` needs it made first. The file is readable by its owner only.
    """
    token = ray_auth_token()
    if token:
        return token
    path = _ray_auth_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another `make up` made it first: use theirs
        return ray_auth_token() or ""
    with os.fdopen(descriptor, "w") as file:
        file.write(token)
    logger.info("made Ray's authentication token in %s", path)
    return token


def _answers(url: str, *, ray_auth: bool = False) -> bool:
    request = urllib.request.Request(url)
    token = ray_auth_token() if ray_auth else None
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- stopping ---------------------------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def session_processes(sessions: list[int]) -> set[int]:
    """Live processes of the given sessions plus all their descendants (Ray job drivers run in new sessions)."""
    parents: dict[int, int] = {}
    members: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid, session = fields[0], int(fields[1]), int(fields[3])
        if state in ("Z", "X"):
            continue
        pid = int(entry.name)
        parents[pid] = ppid
        if session in sessions:
            members.add(pid)
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in members and pid not in members}
        members |= children
        grew = bool(children)
    members.discard(os.getpid())
    return members


def _signal_sessions(sessions: list[int], sig: int, wait_s: float) -> bool:
    """Send `sig` to every process of the sessions; True once none is left (waiting up to wait_s)."""
    for pid in session_processes(sessions):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait_s
    while session_processes(sessions) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not session_processes(sessions)


def kill_sessions(sessions: list[int], *, wait_s: float = 30.0) -> bool:
    """SIGKILL every process of the sessions at once (what a crash looks like); True once all are gone."""
    sessions = [session for session in sessions if session > 1]
    return _signal_sessions(sessions, signal.SIGKILL, wait_s) if sessions else True


def stop_sessions(sessions: list[int], *, grace_s: float = 8.0) -> None:
    """SIGTERM every process of the sessions, then SIGKILL what is left after the grace period."""
    sessions = [session for session in sessions if session > 1]
    if not sessions or _signal_sessions(sessions, signal.SIGTERM, grace_s) or kill_sessions(sessions, wait_s=5.0):
        return
    left = sorted(session_processes(sessions))
    if left:
        logger.warning("processes still alive after SIGKILL: %s", left)
