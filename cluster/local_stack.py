#!/usr/bin/env python
"""A whole forgetless cluster on one machine, from real processes on loopback:

* an S3-compatible endpoint (moto in server mode; authenticated like real S3: an IAM user and its key are created, and
  requests signed with any other key are rejected),
* a Ray head and N worker nodes started with `ray start` (the head has no CPUs, so training workers land on the
  worker nodes and checkpoints really have to travel through S3),
* an MLflow tracking server with a SQLite backend store and proxied artifacts in s3://BUCKET/mlflow.

    python cluster/local_stack.py up   [--dir DIR] [--workers 2] [--cpus-per-worker 1]
    source ~/.cache/forgetless/stack/env.sh   # AWS_*, MLFLOW_TRACKING_URI, RAY_ADDRESS, RAY_AUTH_TOKEN of this stack
    python cluster/local_stack.py status [--dir DIR]
    python cluster/local_stack.py down [--dir DIR] [--drop-data]

The MLflow store and the S3 data are kept together across `down` and `up` (or dropped together): cluster/stack_data.py.

Why not `ray stop`: it kills every Ray process on the machine (other clusters, other users' embedded `ray.init()`s).
Every process here is started with `--block` in its own process group, recorded by PID, and stopped by that PID.
Each stack also has its own Ray temp dir, so a plain `ray.init()` elsewhere on the machine does not attach to it (Ray
writes the "current cluster" file into the temp dir) and nothing uses the default ports (6379, 8265, 52365, ...).

The same class is used by the tests (tests/test_cluster.py).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stack_data.py beside this script
import stack_data  # noqa: E402

BIN = Path(sys.executable).parent  # ray, mlflow and moto_server of the same environment
STATE_FILE = "stack.json"
MLFLOW_CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                         "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes this Python process started (to reap them when stopped)
# Variables a stack sets for its clients; the Ray and MLflow processes get only what they need.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting:\n{tail}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f}s" + (f" (log: {log})" if log else ""))


def _http_ok(url: str, token: str | None = None) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=2) as r:
        return r.status == 200


def _tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The server processes' environment: the caller's, minus any AWS/MLflow/Ray settings it had (so a job works only
    because it was given what it needs), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class Proc:
    name: str
    pid: int
    log: str


@dataclass
class LocalStack:
    dir: str
    workers: int = 2
    cpus_per_worker: float = 1
    bucket: str = "forgetless"
    region: str = "us-east-1"
    # filled by up()
    s3_port: int = 0
    ray_port: int = 0
    dashboard_port: int = 0
    mlflow_port: int = 0
    ray_temp_dir: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    ray_token: str = ""
    procs: list[Proc] = field(default_factory=list)
    # how many times each worker node was started ("n" -> count): a node started again gets a temp dir of its own, as
    # a replacement machine has one. In the old one, the new node's log monitor read the killed workers' log files
    # again from their start, and their lines reached the job's driver a second time (tests/faults/test_node_loss.py)
    node_starts: dict[str, int] = field(default_factory=dict)

    # -- addresses ----------------------------------------------------------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def client_env(self) -> dict[str, str]:
        """What a user (or a test) exports to talk to this stack."""
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_DEFAULT_REGION": self.region,
                "MLFLOW_TRACKING_URI": self.mlflow_uri, "RAY_ADDRESS": self.dashboard,
                # MLflow 3 downloads large artifacts through presigned multipart URLs, which moto (and other
                # S3-compatible stores) answer with 500; off, downloads go through the server like uploads
                "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
                # MLflow's clients retry a failing request for minutes by default (7 retries, backoff factor 2); an
                # artifact that is gone is an error within ~30 s, naming the run and the path, and a server that
                # restarts is still waited for: 3 retries 2-4-8 s apart, 20 s per request at most
                **MLFLOW_CLIENT_RETRIES,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_token}

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def up(self, timeout: float = 420, ray: bool = True) -> "LocalStack":
        """Start the stack (`ray=False`: S3 and MLflow only); the data a `down` kept comes back with it."""
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        if Path(self.dir, stack_data.MLFLOW_DB).exists() and not stack_data.snapshot_dir(self.dir).joinpath(
                stack_data.MANIFEST).exists():
            stack_data.orphan_mlflow_store(self.dir, "the S3 data of the last stack in this folder was not saved")
        try:
            self._start_s3(timeout)
            restored = stack_data.restore_bucket(self._s3(), self.bucket, self.dir)
            if restored is not None:
                print(f"S3: {restored} objects of the last stack put back into s3://{self.bucket}", file=sys.stderr)
            mlflow = self._spawn_mlflow()  # starts while Ray does (both take a while on a busy machine)
            if ray:
                self._start_ray(timeout)
            _wait("MLflow server", lambda: _http_ok(f"{self.mlflow_uri}/health"), timeout, mlflow,
                  Path(self.dir, "mlflow.log"))
        except BaseException:
            self.down(keep_ray_logs=True)
            raise
        self.save()
        return self

    def up_s3_only(self, timeout: float = 120) -> "LocalStack":
        """Just the S3 endpoint (unit tests of storage need no Ray and no MLflow)."""
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        try:
            self._start_s3(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], log_name: str | None = None) -> subprocess.Popen:
        log = Path(self.dir, log_name or f"{name}.log")
        # Own session = own process group: down() can signal the whole group (gunicorn/uvicorn workers, raylet, ...).
        p = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=self.dir)
        self.procs.append(Proc(name, p.pid, str(log)))
        _CHILDREN[p.pid] = p
        self.save()
        return p

    def _start_s3(self, timeout: float) -> None:
        self.s3_port = free_port()
        # moto checks signatures once its first N requests (the IAM bootstrap below) are done.
        p = self._spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
                        _clean_env({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}))
        _wait("moto server", lambda: _tcp_open(self.s3_port), timeout, p, Path(self.dir, "s3.log"))
        self.access_key_id, self.secret_access_key = stack_data.create_user(self.s3_endpoint, self.region)
        self._s3().create_bucket(Bucket=self.bucket)

    def _s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)

    def _node_ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]

    def _start_ray(self, timeout: float) -> None:
        # Short path: Ray puts Unix sockets under it (108-byte limit).
        self.ray_temp_dir = tempfile.mkdtemp(prefix="flray-", dir="/tmp")
        self.ray_port, self.dashboard_port = free_port(), free_port()
        # Token authentication (Ray's default for new clusters) with this stack's own token, so that neither the
        # token file of the user (~/.ray/auth_token) nor another cluster's token is involved.
        self.ray_token = secrets.token_hex(32)
        env = self._ray_env()
        common = ["--block", "--disable-usage-stats"]

        def head_cmd() -> list[str]:
            # The head runs the job drivers and the Ray Train controller (0 CPUs each) but no training worker.
            return [str(BIN / "ray"), "start", "--head", "--port", str(self.ray_port), "--num-cpus", "0",
                    "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                    *self._node_ports(), "--temp-dir", self.ray_temp_dir, *common]

        def head_up() -> bool:
            # Jobs API answering and the head's raylet registered (a worker node asks the GCS for the head's record)
            return _http_ok(f"{self.dashboard}/api/version", self.ray_token) and self.alive_nodes() >= 1

        self._start_node("ray-head", head_cmd, env, head_up, timeout)
        for i in range(self.workers):
            self.start_worker_node(i + 1, timeout, env)

    def _ray_env(self) -> dict[str, str]:
        return _clean_env({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_token,
                           # a busy laptop/CI box can take more than Ray's default 60 s to register a node
                           "RAY_raylet_start_wait_time_s": "180", "RAY_agent_register_timeout_ms": "180000",
                           # nothing to drain on a local stack: stop promptly on SIGTERM
                           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
                           # training workers at normal priority, as in forgetless's embedded cluster
                           # (ray_cluster.init_ray)
                           "RAY_worker_niceness": "0"})

    def start_worker_node(self, n: int, timeout: float = 420, env: dict[str, str] | None = None) -> None:
        """Start (or start again, after `stop_worker_node`) worker node n (1-based): `ray start` joining the head."""
        alive_before = self.alive_nodes()
        self.node_starts[str(n)] = self.node_starts.get(str(n), 0) + 1
        self._start_node(
            f"ray-worker-{n}",
            # a temp dir of its own: nodes sharing one collide on the object store's Unix socket
            lambda: [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{self.ray_port}",
                     "--num-cpus", f"{self.cpus_per_worker:g}", *self._node_ports(),
                     "--temp-dir", self.node_temp_dir(n), "--block", "--disable-usage-stats"],
            env or self._ray_env(), lambda: self.alive_nodes() >= alive_before + 1, timeout)
        self.save()

    def node_temp_dir(self, n: int) -> str:
        """Worker node n's Ray temp dir, that of its latest start (w2, then w2-2, ...)."""
        starts = self.node_starts.get(str(n), 1)
        return f"{self.ray_temp_dir}/w{n}" + (f"-{starts}" if starts > 1 else "")

    def stop_worker_node(self, n: int) -> list[int]:
        """Lose worker node n as a machine is lost (a reclaimed spot node): SIGKILL to its `ray start` process group
        (raylet, object store, agents), then to every process left that belongs to the node (its command line names
        the node's temp dir: Ray's workers there). Returns the pids killed; the head learns of it by itself."""
        import psutil

        procs = [p for p in self.procs if p.name == f"ray-worker-{n}"]
        killed = []
        for proc in procs:
            try:
                killed += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] + [proc.pid]
            except psutil.NoSuchProcess:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
        marker = self.node_temp_dir(n) + "/"
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.info["pid"] not in killed and marker in " ".join(p.info["cmdline"] or []):
                try:
                    p.kill()
                    killed.append(p.info["pid"])
                except psutil.NoSuchProcess:
                    pass
        for pid in killed:
            if pid in _CHILDREN:
                _CHILDREN.pop(pid).wait(timeout=30)
        self.procs = [p for p in self.procs if p.name != f"ray-worker-{n}"]
        self.save()
        return killed

    def _start_node(self, name: str, make_cmd, env: dict[str, str], is_up, timeout: float, attempts: int = 3) -> None:
        """Start one Ray node; on a machine under heavy load a raylet can give up waiting for its agents and exit
        during start-up (a fixed 15 s limit inside Ray), so a node that dies while starting is started again."""
        for attempt in range(1, attempts + 1):
            # each attempt its own log: a retry must not overwrite the log that says why the previous one died
            log_name = f"{name}.log" if attempt == 1 else f"{name}.attempt{attempt}.log"
            p = self._spawn(name, make_cmd(), env, log_name)
            try:
                _wait(name, is_up, timeout, p, Path(self.dir, log_name))
                return
            except RuntimeError:
                cause = start_failure_cause(Path(self.dir, log_name), self.ray_temp_dir)
                if attempt == attempts:
                    raise RuntimeError(f"{name} exited while starting, {attempts} times; last cause: {cause}") \
                        from None
                print(f"{name} exited while starting ({cause}); starting it again ({attempt + 1}/{attempts}); "
                      f"its log: {Path(self.dir, log_name)}, Ray's own logs: {self.ray_temp_dir}", file=sys.stderr)
                _signal_group(p.pid, signal.SIGKILL)
                self.procs = [q for q in self.procs if q.pid != p.pid]

    def alive_nodes(self) -> int:
        req = urllib.request.Request(f"{self.dashboard}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {self.ray_token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            summary = json.loads(r.read())["data"]["summary"]
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def _spawn_mlflow(self) -> subprocess.Popen:
        self.mlflow_port = free_port()
        db = Path(self.dir, "mlflow.db").resolve()
        # The server (not the clients) writes artifacts to S3: proxied artifacts, so clients need no S3 access.
        env = _clean_env({"AWS_ENDPOINT_URL": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                          "AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
                          "AWS_DEFAULT_REGION": self.region, "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
                          # no job runner (huey consumers for MLflow's GenAI jobs; eight processes forgetless never uses)
                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        p = self._spawn("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                                   str(self.mlflow_port), "--workers", "1",
                                   "--backend-store-uri", f"sqlite:///{db}",
                                   "--artifacts-destination", f"s3://{self.bucket}/mlflow", "--serve-artifacts"], env)
        return p

    def down(self, grace: float = 45, keep_ray_logs: bool = False, keep_data: bool = True) -> None:
        """Stop every process of this stack (by recorded PID and its process group), newest first; the S3 server
        last, once the bucket is saved beside the MLflow store (`keep_data`; else both are dropped)."""
        s3 = [p for p in self.procs if p.name == "s3"]
        self._stop([p for p in self.procs if p.name != "s3"], grace)  # nothing writes to S3 any more
        if keep_data:
            self._save_data()
        self._stop(s3, grace)
        if not keep_data:
            stack_data.drop(self.dir)
        self.procs = []
        if self.ray_temp_dir and keep_ray_logs:
            print(f"Ray's own logs are kept in {self.ray_temp_dir}", file=sys.stderr)
        elif self.ray_temp_dir:
            shutil.rmtree(self.ray_temp_dir, ignore_errors=True)
        state = Path(self.dir, STATE_FILE)
        if state.exists():
            state.unlink()

    @staticmethod
    def _stop(procs: list[Proc], grace: float) -> None:
        for proc in reversed(procs):
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(procs):
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.3)
            _signal_group(proc.pid, signal.SIGKILL)

    def _save_data(self) -> None:
        stack_data.save_or_orphan(self._s3, self.bucket, self.dir)

    # -- state on disk (for `status` / `down` from another shell) -----------------------------------------------------
    def save(self) -> None:
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        Path(self.dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=1))
        env = "".join(f"export {k}={v}\n" for k, v in self.client_env().items())
        # The local stack's own throw-away key; readable by the owner only all the same.
        path = Path(self.dir, "env.sh")
        path.write_text(env)
        path.chmod(0o600)

    @classmethod
    def load(cls, directory: str) -> "LocalStack":
        data = json.loads(Path(directory, STATE_FILE).read_text())
        data["procs"] = [Proc(**p) for p in data["procs"]]
        return cls(**data)


def start_failure_cause(log: Path, ray_temp_dir: str) -> str:
    """Why a Ray node died while starting: the last fatal line of its `ray start` log or of the raylet's and GCS's own
    logs (a raylet `Check failed: ...` is written there, not to the `ray start` output)."""
    candidates = [log]
    if ray_temp_dir:
        candidates += sorted(Path(ray_temp_dir).glob("**/logs/raylet.out"), key=lambda p: p.stat().st_mtime)[-1:]
        candidates += sorted(Path(ray_temp_dir).glob("**/logs/gcs_server.out"), key=lambda p: p.stat().st_mtime)[-1:]
    found = []
    for path in candidates:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        fatal = [line.strip() for line in lines if "Check failed" in line or "FATAL" in line or "Error" in line]
        if fatal:
            found.append(f"{path.name}: {fatal[-1][:300]}")
    return "; ".join(found) or f"no error line in {log.name}; see it and Ray's logs"


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each process was started as the leader of its own session/group
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pid: int) -> bool:
    if pid in _CHILDREN:
        _CHILDREN[pid].poll()  # reap our own child: a zombie leader would keep its group "alive"
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "status"])
    # Outside the project on purpose: `forgetless submit` uploads the current folder, and env.sh holds the stack's key.
    ap.add_argument("--dir", default=str(Path.home() / ".cache" / "forgetless" / "stack"),
                    help="folder for logs, the MLflow database and env.sh (default: ~/.cache/forgetless/stack)")
    ap.add_argument("--workers", type=int, default=2, help="Ray worker nodes")
    ap.add_argument("--cpus-per-worker", type=float, default=1)
    ap.add_argument("--bucket", default="forgetless")
    ap.add_argument("--drop-data", action="store_true",
                    help="down: drop the MLflow store and the S3 data too (default: both are kept for the next up)")
    args = ap.parse_args(argv)
    directory = str(Path(args.dir).resolve())
    if args.action == "up":
        if Path(directory, STATE_FILE).exists():
            print(f"a stack is already recorded in {directory}; run `down` first", file=sys.stderr)
            return 1
        s = LocalStack(directory, args.workers, args.cpus_per_worker, args.bucket).up()
        print(f"S3 (moto):      {s.s3_endpoint}   bucket s3://{s.bucket}\n"
              f"Ray dashboard:  {s.dashboard}   ({s.workers} worker nodes x {s.cpus_per_worker:g} CPU)\n"
              f"MLflow:         {s.mlflow_uri}   artifacts in s3://{s.bucket}/mlflow\n"
              f"logs:           {directory}/*.log\n\n"
              f"next:  source {directory}/env.sh")
        return 0
    if not Path(directory, STATE_FILE).exists():
        print(f"no stack recorded in {directory}", file=sys.stderr)
        return 1 if args.action == "status" else 0
    s = LocalStack.load(directory)
    if args.action == "status":
        for p in s.procs:
            print(f"{p.name:14s} pid {p.pid:7d}  {'running' if _group_alive(p.pid) else 'STOPPED'}  log {p.log}")
        try:
            print(f"Ray nodes alive: {s.alive_nodes()}")
        except OSError as e:
            print(f"Ray dashboard not reachable: {e}")
        return 0
    s.down(keep_data=not args.drop_data)
    print("stopped; MLflow store and S3 data " + ("dropped" if args.drop_data else f"kept in {directory}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
