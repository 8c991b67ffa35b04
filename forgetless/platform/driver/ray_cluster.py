"""The Ray cluster a driver runs on: connect to a configured one, or start (and later end) an embedded one on this
machine; its resources checked against the run before anything is placed.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import ray
import torch

from forgetless import console, storage
from forgetless._compat import ray_core
from forgetless import process_lifetime as reaper
from forgetless.config import ConfigError, ExperimentConfig
from forgetless.console import say
from forgetless.platform.driver import cluster_versions
from forgetless.platform.driver import trainer as lean_trainer
from forgetless.platform.driver.ports import free_port
from forgetless.platform.worker import op_builds as build_locks


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Connect to cfg.ray_address / RAY_ADDRESS, or start an embedded local cluster; no-op if Ray is initialized."""
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        if not address:
            check_embedded_resources(cfg)
        init_ray(address, cfg.scaling.use_gpu)


def init_ray(address: str | None, use_gpu: bool, num_cpus: int | None = None) -> None:
    """ray.init as every forgetless driver does it (benchmarks too, so they measure the same platform)."""
    env = {"PYTHONUNBUFFERED": "1", **controller_poll_env()}
    if console.verbose():
        env[console.VERBOSE_VARIABLE] = "1"
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    say(f"starting Ray ({'connecting to ' + address if address else 'embedded local cluster'})")
    # An embedded cluster: Ray starts worker processes at nice 15, so where the training workers fill the cores Ray's
    # own processes (raylet, GCS, dashboard, the Train controller) take CPU from them first: benchmarks/overhead.py
    # measured a 1.30x slower training loop at nice 15 with 2 workers on 2 cores (1.00x with a core left free). The
    # training workers are the job here, so they run at normal priority. (A cluster started with `ray start` keeps its
    # own setting: RAY_worker_niceness=0 in the environment of `ray start` does the same there.)
    system_config = None if address else {"worker_niceness": 0}
    global _EMBEDDED_CLUSTER
    _EMBEDDED_CLUSTER = None
    if address:
        # A driver that runs as a Ray job already has its job's variables, and Ray refuses a driver runtime env that
        # sets one of them again (e.g. FORGETLESS_VERBOSE from `forgetless --verbose submit`): leave those out.
        env = {k: v for k, v in env.items() if os.environ.get(k) != v}
        with cluster_versions.same_ray_version(address), lean_trainer.handlers_kept(signal.SIGTERM, signal.SIGINT):
            # (the cluster's Ray must be this driver's: a one-line refusal)
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, logging_level="ERROR",
                     configure_logging=True)
    else:
        _EMBEDDED_CLUSTER = _init_embedded_ray(env, num_cpus, system_config)
    ray_core.never_deduplicate(console.LINE_PATTERN)  # every epoch line, also from a restarted worker
    # ray.init sets a SIGTERM handler of its own (sys.exit): the caller's handlers are put back, so that the Python API
    # leaves them as they were. (`forgetless` the command turns SIGTERM into SIGINT, so that `ray job stop` ends a run
    # as Ctrl-C does: cli.py.)


# The GCS address of the Ray cluster this process started (init_ray), None if it started none: fits on it clean their
# own placement groups up (lean_trainer) instead of starting Ray Train's cleaner process for each run. Kept after
# run() / compare() / tune() return, with the cluster itself (as ray.init keeps Ray initialised): the next call in this
# process reuses that cluster. A cluster the caller connected to afterwards (ray.shutdown, ray.init) is not it.
_EMBEDDED_CLUSTER: str | None = None


# Set in the runtime env of an embedded cluster, so its processes (a Tune trial's, which runs a fit) know it too.
EMBEDDED_VARIABLE = "FORGETLESS_EMBEDDED_CLUSTER"


def started_embedded_cluster() -> bool:
    """Whether this process started the Ray cluster it is connected to."""
    return (_EMBEDDED_CLUSTER is not None and ray.is_initialized()
            and ray.get_runtime_context().gcs_address == _EMBEDDED_CLUSTER)


def on_embedded_cluster() -> bool:
    """Whether this process runs on (or started) an embedded cluster: one machine, no autoscaler to ask."""
    return started_embedded_cluster() or os.environ.get(EMBEDDED_VARIABLE) == "1"


# Ray Train's controller collects reports (and commits checkpoints) once per health-check poll, 2 s by default; every
# epoch's checkpoint waits for its commit (so that a lost worker resumes from it), so that interval was a fixed cost
# of every epoch (benchmarks/fixed_cost.py). Polling two workers every 0.2 s costs the controller little.
CONTROLLER_POLL_VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


CONTROLLER_POLL_S = "0.2"


def controller_poll_env() -> dict[str, str]:
    """The controller's poll interval for the job's processes (a value the user set wins)."""
    return {CONTROLLER_POLL_VARIABLE: os.environ.get(CONTROLLER_POLL_VARIABLE, CONTROLLER_POLL_S)}


def _init_embedded_ray(env: dict[str, str], num_cpus: int | None, system_config: dict) -> str:
    """Start an embedded cluster that everything it starts can find without guessing: Ray Train's helper actors
    look a cluster up by address (RAY_ADDRESS, else any cluster on the machine: "Found multiple active Ray instances"
    when another one runs), so the GCS port is chosen here and RAY_ADDRESS given to every worker. DeepSpeed's C++ ops
    are built into this environment's own folder (build_locks). A watcher process ends the cluster's processes if
    this driver is killed (reaper).

    The cluster's variables (`env` and those above) are in this process's environment while `ray.init` starts the
    raylet, and so in that of every worker process the raylet starts; they are not a job runtime_env. A worker
    process with a runtime_env of its own (a job's applies to every task and actor) is started through Ray's
    setup_worker.py: one more Python start and `import ray` before the worker's own (~0.5 s wall, ~1 CPU-s each on
    2 cores, measured), and it is not given a process of the idle pool Ray starts beside the raylet. This process's
    environment is restored once the cluster runs. Returns the cluster's GCS address."""
    gcs_port = free_port()
    env = {**env, "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{gcs_port}", EMBEDDED_VARIABLE: "1",
           "TORCH_EXTENSIONS_DIR": build_locks.use_private_extensions_dir(),
           # Ray Train starts a preemption-watcher actor (one more process) for every worker group; nothing drains the
           # node of an embedded cluster, so it would only cost a process start per run (a value the user set wins)
           PREEMPTION_WATCHER_VARIABLE: os.environ.get(PREEMPTION_WATCHER_VARIABLE, "0"),
           # what Ray Train gives its controller (the Train controller runs blocking calls in its event loop by design)
           lean_trainer.BLOCKING_GET_WARNING_VARIABLE: os.environ.get(lean_trainer.BLOCKING_GET_WARNING_VARIABLE,
                                                                        lean_trainer.BLOCKING_GET_WARNING_DEFAULT)}
    dashboard = console.ray_dashboard()
    if not dashboard:
        # Nothing reads an embedded cluster's Ray metrics (no Prometheus scrapes a cluster that lives for one run);
        # collecting them kept the dashboard agent busy ingesting every process's histograms (docs/performance.md)
        system_config = {**system_config, "enable_metrics_collection": False}
    with temporary_environment({**env, GCS_PORT_VARIABLE: str(gcs_port)}):  # GCS_PORT_VARIABLE: read by ray.init
        # address="local": a new cluster, whatever RAY_ADDRESS (set above, for the workers) or another cluster on
        # this machine says
        with lean_trainer.handlers_kept(signal.SIGTERM, signal.SIGINT):  # (ray.init sets its own)
            context = ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, logging_level="ERROR",
                               configure_logging=True, _system_config=system_config, include_dashboard=dashboard)
    lean_trainer.CONTROLLER_HOSTS.cluster_environment(ray.get_runtime_context().gcs_address, env)
    if dashboard:
        say(f"Ray dashboard: http://{context.dashboard_url}")
    actual = ray.get_runtime_context().gcs_address
    if actual != env["RAY_ADDRESS"]:
        say(f"the embedded Ray cluster is at {actual}, not {env['RAY_ADDRESS']} as its workers were told; another Ray "
            f"cluster on this machine may be picked up by Ray Train's helpers")
    # the session's name (what ray.init returns: its session folder) tells this cluster's processes apart
    reaper.start(Path(context.address_info["session_dir"]).name)
    return actual


@contextmanager
def temporary_environment(variables: dict[str, str]):
    """These variables set in this process's environment inside the block, the earlier values back after it."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"


PREEMPTION_WATCHER_VARIABLE = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def check_embedded_resources(cfg: ExperimentConfig) -> None:
    """Before starting an embedded cluster: it gets this machine's CPUs (Ray's own count, which honours container
    limits) and the GPUs torch sees (CUDA_VISIBLE_DEVICES honoured, as Ray does), so a run it cannot place is refused
    before Ray starts."""
    _check_capacity(cfg, ray_core.cpu_count(), float(torch.cuda.device_count()),
                    "this machine (the embedded Ray cluster)")


def _check_capacity(cfg: ExperimentConfig, cpus: float, gpus: float, where: str) -> None:
    # an elastic run starts with what fits: only its fewest workers must fit
    workers = cfg.scaling.fewest_workers
    least = " (the range's min)" if cfg.scaling.elastic else ""
    need_cpu = workers * cfg.scaling.cpus_per_worker
    if cpus < need_cpu:
        raise ConfigError(f"scaling: {workers} workers{least} x {cfg.scaling.cpus_per_worker} CPU need "
                          f"{need_cpu:g} CPUs but {where} has {cpus:g}; lower scaling.num_workers or "
                          f"scaling.cpus_per_worker")
    if cfg.scaling.use_gpu and gpus < workers:
        raise ConfigError(f"scaling.use_gpu: {workers} workers{least} need {workers} GPUs but "
                          f"{where} has {gpus:g}; set scaling.use_gpu: false or run on a cluster with GPUs")


def check_resources(cfg: ExperimentConfig) -> None:
    """Right after connecting: a run the cluster cannot place would wait for resources forever."""
    total = ray.cluster_resources()
    _check_capacity(cfg, total.get("CPU", 0), total.get("GPU", 0), "the Ray cluster")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage.is_s3(cfg.storage):
        # Workers on other nodes would write checkpoints to their own disks, and a resumed run would not find them.
        raise ConfigError(f"storage: the Ray cluster has {len(nodes)} nodes but storage is the local folder "
                          f"{storage.normalize(cfg.storage)!r}, which the other nodes cannot read; use shared "
                          f"storage: storage: s3://BUCKET/PREFIX")
