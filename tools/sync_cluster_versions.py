"""Carry the locked versions of Ray, DeepSpeed and MLflow (requirements.lock) into the files that build and run a
cluster: cluster/Dockerfile (its version ARGs and the image tag), the KubeRay manifests (rayVersion, image) and the
cluster launcher's (image). A cluster whose Ray differs from its drivers' fails in ways no test has seen, so these
must say what the lock says; `make relock` runs this after re-resolving the lock, and tests/test_lock_and_manifests.py
fails when they disagree.

    python tools/sync_cluster_versions.py           # rewrite the pins from the lock
    python tools/sync_cluster_versions.py --check   # list the mismatches, exit 1 if any
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
MANIFESTS = [REPO / "cluster" / "kuberay" / "raycluster.yaml", REPO / "cluster" / "kuberay" / "rayjob.yaml",
             REPO / "cluster" / "aws" / "cluster.yaml"]
# the packages the cluster's image and the drivers must agree on, and the Dockerfile ARG that names each
CLUSTER_PACKAGES = {"ray": "RAY_VERSION", "deepspeed": "DEEPSPEED_VERSION", "mlflow": "MLFLOW_VERSION"}
# every place in the cluster files that names a version: (pattern with the version as group 2, the package)
IMAGE_TAG = re.compile(r"(REGISTRY/forgetless:[\w.]+-ray)([\w.]+)")
RAY_VERSION_FIELD = re.compile(r"(rayVersion:\s*\")([^\"]+)(\")")


def locked_versions(lock_text: str) -> dict[str, str]:
    """name -> version of every package pinned in a requirements lock (`name==version \\` lines)."""
    return {m.group(1).lower(): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", lock_text, flags=re.MULTILINE)}


def dockerfile_args(text: str) -> dict[str, str]:
    """ARG name -> default value in a Dockerfile."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.MULTILINE))


def version_pins(path: Path) -> list[tuple[str, str, str]]:
    """(what, package, version) for every version named in one cluster file."""
    text = path.read_text()
    pins = [(f"image tag {m.group(0)}", "ray", m.group(2)) for m in IMAGE_TAG.finditer(text)]
    pins += [("rayVersion", "ray", m.group(2)) for m in RAY_VERSION_FIELD.finditer(text)]
    if path == DOCKERFILE:
        args = dockerfile_args(text)
        pins += [(f"ARG {arg}", package, args.get(arg, "(missing)")) for package, arg in CLUSTER_PACKAGES.items()]
    return pins


def mismatches(locked: dict[str, str]) -> list[str]:
    """One line per version in the cluster files that is not the lock's."""
    return [f"{path.relative_to(REPO)}: {what} says {package} {version}, requirements.lock {locked.get(package)}"
            for path in [DOCKERFILE, *MANIFESTS] for what, package, version in version_pins(path)
            if version != locked.get(package)]


def rewrite(text: str, locked: dict[str, str]) -> str:
    """The text of a cluster file with every version pin set to the lock's."""
    ray = locked["ray"]
    text = IMAGE_TAG.sub(lambda m: m.group(1) + ray, text)
    text = RAY_VERSION_FIELD.sub(lambda m: m.group(1) + ray + m.group(3), text)
    for package, arg in CLUSTER_PACKAGES.items():
        text = re.sub(rf"^ARG {arg}=\S+", f"ARG {arg}={locked[package]}", text, flags=re.MULTILINE)
    return text


def main(argv: list[str]) -> int:
    locked = locked_versions(LOCK.read_text())
    if "--check" in argv:
        problems = mismatches(locked)
        print("\n".join(problems) or "the cluster files name the locked versions")
        return 1 if problems else 0
    for path in [DOCKERFILE, *MANIFESTS]:
        path.write_text(rewrite(path.read_text(), locked))
    print("cluster files set to " + ", ".join(f"{p} {locked[p]}" for p in CLUSTER_PACKAGES))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
