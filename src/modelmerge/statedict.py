"""State dicts (name -> tensor): task vectors and input validation with errors that name the parameter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


class MergeInputError(ValueError):
    """Bad merge input; ``parameter`` names the offending tensor (None for whole-model problems)."""

    def __init__(self, parameter: str | None, problem: str):
        self.parameter = parameter
        self.problem = problem
        where = f"parameter {parameter!r}: " if parameter is not None else ""
        super().__init__(where + problem)


def check_same_keys(base: StateDict, models: Sequence[StateDict], what: str = "model") -> None:
    """Every model must hold exactly the base's parameter names."""
    base_keys = set(base.keys())
    for i, model in enumerate(models):
        keys = set(model.keys())
        missing = sorted(base_keys - keys)
        extra = sorted(keys - base_keys)
        if missing:
            raise MergeInputError(missing[0], f"missing from {what} {i} ({len(missing)} missing in all)")
        if extra:
            raise MergeInputError(extra[0], f"{what} {i} has it but the base model does not")


def all_finite(tensor: Tensor) -> bool:
    """Every entry finite: one reduction (a NaN or inf makes the sum NaN or inf), and the entrywise test only when
    the sum itself is not finite (an overflow of finite values)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_tensor(name: str, tensor: Tensor, like: Tensor | None = None, label: str = "tensor") -> None:
    """A tensor must be finite and, if ``like`` is given, match its shape and dtype."""
    if not isinstance(tensor, Tensor):
        raise MergeInputError(name, f"{label} is a {type(tensor).__name__}, expected a torch.Tensor")
    if like is not None:
        if tuple(tensor.shape) != tuple(like.shape):
            raise MergeInputError(
                name, f"shape mismatch: {label} has {tuple(tensor.shape)}, base has {tuple(like.shape)}"
            )
        if tensor.dtype != like.dtype:
            raise MergeInputError(name, f"dtype mismatch: {label} is {tensor.dtype}, base is {like.dtype}")
    if tensor.is_floating_point() and not all_finite(tensor):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise MergeInputError(name, f"{label} has {n_bad} non-finite value(s) (NaN or inf)")


def check_alphas(alphas: Sequence[float] | float, n_models: int, name: str = "alphas") -> list[float]:
    """Broadcast a scalar alpha to every model; a sequence must have one finite value per model."""
    if isinstance(alphas, (int, float)):
        alphas = [float(alphas)] * n_models
    alphas = [float(a) for a in alphas]
    if len(alphas) != n_models:
        raise MergeInputError(None, f"{name} has {len(alphas)} values for {n_models} models")
    if not all(torch.isfinite(torch.tensor(alphas, dtype=torch.float64))):
        raise MergeInputError(None, f"{name} must be finite, got {alphas}")
    return alphas


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic happens in at least float32 (half-precision inputs are upcast, float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def task_vector(base: StateDict, model: StateDict) -> dict[str, Tensor]:
    """tau = theta_t - theta_0, parameter by parameter (non-float buffers are skipped)."""
    check_same_keys(base, [model])
    out = {}
    for name in base.keys():
        b = base[name]
        check_tensor(name, b, label="base")
        if not b.is_floating_point():
            continue
        t = model[name]
        check_tensor(name, t, like=b, label="model")
        out[name] = t - b
    return out


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries whose names start with ``prefix``, named without it (a suite model's encoder as the encoder)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def scaled_update(base: Mapping[str, Tensor], merged: Mapping[str, Tensor], lam: float) -> dict[str, Tensor]:
    """theta_0 + lam (theta - theta_0): any task-vector merge at another scaling (TA and TIES are linear in lambda)."""
    return {n: (base[n] + lam * (merged[n] - base[n]) if base[n].is_floating_point() else base[n]) for n in base}


def task_vectors(base: StateDict, models: Sequence[StateDict]) -> list[dict[str, Tensor]]:
    """[theta_t - theta_0 for each t]."""
    return [task_vector(base, m) for m in models]


def flatten(state: StateDict) -> Tensor:
    """Concatenate every tensor (in key order) into one vector; handy for small exact tests."""
    return torch.cat([state[k].reshape(-1) for k in state.keys()])
