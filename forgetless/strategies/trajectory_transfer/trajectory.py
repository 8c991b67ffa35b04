"""The source trajectory θ₁⁰ … θ₁ᵀ: the interpolation schedule, the stop points it is built from, and the checks that
θ₁ and θ₂ are the same network."""
from __future__ import annotations

import math
from typing import Literal

import torch

from forgetless.strategies.base import check_trajectory_ends
from forgetless.strategies.permutations import State


def schedule(T: int, kind: Literal["linear", "cosine"]) -> list[float]:
    """λ_0..λ_T with λ_0 = 0 and λ_T = 1: θ₁ᵗ = θ₁⁰ + λ_t (θ₁ᵀ − θ₁⁰).

    linear: t/T (the paper's default, found the more stable). cosine: (1 − cos(π t/T)) / 2, this project's reading of
    the official code's cosine-shaped option: small steps at both ends, where the loss changes fastest and settles.
    """
    if T < 1:
        raise ValueError("the trajectory needs at least one step (T >= 1)")
    if kind == "linear":
        return [t / T for t in range(T + 1)]
    return [(1.0 - math.cos(math.pi * t / T)) / 2.0 for t in range(T + 1)]


def interpolated_trajectory(theta_0: State, theta_T: State, lambdas: list[float]) -> list[State]:
    return [{k: theta_0[k] + lam * (theta_T[k] - theta_0[k]) for k in theta_0} for lam in lambdas]


def check_compatible(theta1: State, theta2: State, what: str = "θ₂⁰") -> None:
    """Same entries, same shapes: otherwise no permutation can map one network onto the other."""
    missing = [k for k in theta1 if k not in theta2]
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} parameter(s) of the source trajectory, e.g. {missing[:3]}; "
                         f"it must be the same architecture as the pre-trained model")
    for k, v in theta1.items():
        if tuple(theta2[k].shape) != tuple(v.shape):
            raise ValueError(f"{what}: parameter {k!r} has shape {tuple(theta2[k].shape)} but the source trajectory "
                             f"has {tuple(v.shape)}; θ₁ and θ₂ must be the same architecture with the same widths")


def trajectory_states(trajectory: list[tuple[int, dict[str, torch.Tensor]]] | None, final_epoch: int,
                      keys: list[str]) -> list[State]:
    """The stop points up to `final_epoch`, in epoch order, restricted to `keys` (float32, on the CPU); θ⁰ and θᵀ must be
    among them (the platform checked that before training started; Python API users get the same error here)."""
    if not trajectory:
        raise ValueError("trajectory_transfer needs the source pre-training trajectory; the platform gave none")
    check_trajectory_ends([e for e, _ in trajectory], final_epoch)
    ordered = sorted(trajectory, key=lambda es: es[0])
    states = [{k: sd[k].float().cpu() for k in keys} for e, sd in ordered if e <= final_epoch]
    for sd in states[1:]:
        check_compatible(states[0], sd, "a stop point of the trajectory")
    return states
