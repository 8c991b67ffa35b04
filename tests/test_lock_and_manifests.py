"""The locked environment: requirements.lock is complete, hashed, CPU-only and within pyproject.toml's ranges; the
environment the tests run in is the lock; the cluster's image and manifests name the lock's Ray, DeepSpeed and MLflow
(parsed as YAML / Dockerfile here, independently of tools/sync_cluster_versions.py's patterns)."""
from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import load_repo_script

REPO = Path(__file__).resolve().parent.parent
LOCK_TEXT = (REPO / "requirements.lock").read_text()
DOCKERFILE = (REPO / "cluster" / "Dockerfile").read_text()
MANIFESTS = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml", "cluster/aws/cluster.yaml"]


SYNC = load_repo_script("tools/sync_cluster_versions.py")
LOCKED = SYNC.locked_versions(LOCK_TEXT)


def _makefile_torch_version() -> str:
    return re.search(r"^TORCH_VERSION := (\S+)", (REPO / "Makefile").read_text(), flags=re.MULTILINE).group(1)


def _walk(node, key):
    """Every value of `key` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def test_the_lock_pins_every_package_with_hashes_and_no_cuda_torch():
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK_TEXT.split("\n", 2)[2])
    pinned = [e for e in entries if re.match(r"[A-Za-z0-9][\w.-]*==", e)]
    assert len(pinned) == len(LOCKED) > 100
    unhashed = [e.split()[0] for e in pinned if "--hash=sha256:" not in e]
    assert not unhashed, f"pins without a hash: {unhashed}"
    # torch is installed apart (TORCH_SPEC, a CPU build here); its CUDA build's packages must not ride in the lock
    cuda = sorted(n for n in LOCKED if n == "torch" or n.startswith(("nvidia-", "triton", "cuda-")))
    assert not cuda, f"requirements.lock holds {cuda}: re-lock against the CPU torch (make relock)"


def test_the_lock_satisfies_pyproject_ranges_and_holds_every_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    outside = []
    for req in wanted:
        name = req.name.lower()
        if name == "torch":
            assert req.specifier.contains(_makefile_torch_version()), f"Makefile's torch is outside {req}"
            continue
        assert name in LOCKED, f"{req} is in pyproject.toml but not in requirements.lock: make relock"
        if not req.specifier.contains(LOCKED[name], prereleases=True):
            outside.append(f"{name} {LOCKED[name]} not in {req.specifier}")
    assert not outside, f"locked versions outside pyproject.toml's ranges: {outside}; make relock"


def test_ray_deepspeed_and_mlflow_are_capped_in_pyproject():
    """forgetless uses their private APIs (forgetless/_compat): a newer minor release must be a deliberate step."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    caps = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    for name in ("ray", "deepspeed", "mlflow"):
        assert any(s.operator in ("<", "<=", "~=", "==") for s in caps[name]), f"{name} has no upper bound"
        assert caps[name].contains(LOCKED[name])


def test_this_environment_is_the_lock():
    """What `make setup` installed is what the lock says (a package installed by hand beside it is not checked)."""
    differ = {}
    for name, version in LOCKED.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            differ[name] = "missing"
            continue
        if Version(installed) != Version(version):
            differ[name] = installed
    assert not differ, f"installed versions differ from requirements.lock {differ}: make setup"
    assert Version(importlib.metadata.version("torch")).base_version == _makefile_torch_version()


def test_the_manifests_name_the_locked_ray():
    ray = LOCKED["ray"]
    for manifest in MANIFESTS:
        docs = [d for d in yaml.safe_load_all((REPO / manifest).read_text()) if d]
        images = [i for d in docs for i in _walk(d, "image")]
        assert images, f"{manifest}: no image"
        for image in images:
            assert image.endswith(f"-ray{ray}"), f"{manifest}: image {image} is not the one built with Ray {ray}"
        for version in (v for d in docs for v in _walk(d, "rayVersion")):
            assert version == ray, f"{manifest}: rayVersion {version}, requirements.lock has Ray {ray}: make relock"
    assert "rayVersion" in (REPO / "cluster/kuberay/raycluster.yaml").read_text()


def test_the_dockerfile_installs_the_lock_and_names_its_versions():
    args = SYNC.dockerfile_args(DOCKERFILE)
    for package, arg in SYNC.CLUSTER_PACKAGES.items():
        assert args[arg] == LOCKED[package], f"cluster/Dockerfile {arg}={args[arg]}, lock {LOCKED[package]}"
    assert args["TORCH_VERSION"] == _makefile_torch_version()
    install = re.search(r"pip install [^\n]*-r requirements\.lock", DOCKERFILE)
    assert install and "--require-hashes" in install.group(0) and "COPY requirements.lock" in DOCKERFILE
    assert f"-ray{LOCKED['ray']} ." in DOCKERFILE  # the build command's image tag
    assert SYNC.mismatches(LOCKED) == []


def test_the_sync_tool_rewrites_stale_pins_to_the_lock():
    stale = ('rayVersion: "2.51.0"\nimage: REGISTRY/forgetless:0.1.0-ray2.51.0\nARG RAY_VERSION=2.51.0\n'
             "ARG DEEPSPEED_VERSION=0.16.0\nARG MLFLOW_VERSION=3.0.0\n")
    synced = SYNC.rewrite(stale, LOCKED)
    assert "2.51.0" not in synced and f'rayVersion: "{LOCKED["ray"]}"' in synced
    assert f"ARG DEEPSPEED_VERSION={LOCKED['deepspeed']}" in synced and f"-ray{LOCKED['ray']}" in synced


@pytest.mark.parametrize("target", ["setup", "relock"])
def test_make_has_the_documented_targets(target):
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE)
    assert "make test" in (REPO / ".ci" / "run").read_text()


def _seam_range(module: str) -> tuple[str, str]:
    """(LOW, BELOW) a library seam in forgetless/_compat/ was written and tested for (read from its source)."""
    text = (REPO / "forgetless" / "_compat" / f"{module}.py").read_text()
    low, below = re.search(r'^LOW, BELOW = "([^"]+)", "([^"]+)"', text, flags=re.MULTILINE).groups()
    return low, below


@pytest.mark.parametrize("package, seams", [("ray", ["ray_core", "ray_train"]), ("deepspeed", ["deepspeed"]),
                                            ("mlflow", ["mlflow"])])
def test_the_caps_end_where_the_seams_ranges_end_and_the_lock_is_inside_them(package, seams):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    spec = next(Requirement(r).specifier for r in project["dependencies"] if Requirement(r).name == package)
    caps = [s.version for s in spec if s.operator == "<"]
    for seam in seams:
        low, below = _seam_range(seam)
        assert caps == [below], f"pyproject.toml caps {package} at {caps}, its seam _compat/{seam}.py ends at {below}"
        assert Version(low) <= Version(LOCKED[package]) < Version(below), f"the locked {package} is outside {seam}"


def test_the_torch_setup_installs_is_the_one_its_seam_was_written_for():
    low, below = _seam_range("torch")
    assert Version(low) <= Version(_makefile_torch_version()) < Version(below)
