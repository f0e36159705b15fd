"""The parameter-by-parameter driver every merge rule runs on: validate, upcast, merge, cast back, emit."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from modelmerge.statedict import MergeInputError, StateDict, all_finite, check_same_keys, check_tensor, compute_dtype

#: merge one parameter: (name, base tensor, model tensors) -> merged tensor, all in the compute dtype
ParameterRule = Callable[[str, Tensor, list[Tensor]], Tensor]


def merge_parameters(
    base: StateDict,
    models: Sequence[StateDict],
    rule: ParameterRule,
    out: MutableMapping[str, Tensor] | None = None,
    desc: str = "merge",
) -> MutableMapping[str, Tensor]:
    """out[name] = rule(name, base[name], [m[name] for m in models]) for every floating-point parameter.

    Only one parameter of each input is touched at a time, so lazily loaded inputs (``LazySafetensors``)
    and a streaming ``out`` (``SafetensorsWriter``) keep peak memory at one tensor per model. Non-float
    tensors (integer buffers) must agree across models and are copied from the base. The merged tensor is
    computed in at least float32 and stored in the base's dtype.
    """
    if not models:
        raise MergeInputError(None, "no models to merge")
    check_same_keys(base, models)
    out = {} if out is None else out
    names = list(base.keys())
    for name in tqdm(names, desc=desc, disable=len(names) < 20, mininterval=1.0):
        b = base[name]
        check_tensor(name, b, label="base model")
        ts = [m[name] for m in models]
        for i, t in enumerate(ts):
            check_tensor(name, t, like=b, label=f"model {i}")
        if not b.is_floating_point():
            if not all(torch.equal(t, b) for t in ts):
                raise MergeInputError(name, "non-float tensor differs between models; cannot merge it")
            out[name] = b
            continue
        cd = compute_dtype(b.dtype)
        merged = rule(name, b.to(cd), [t.to(cd) for t in ts]).to(b.dtype)
        if not all_finite(merged):  # after the cast: a half-precision overflow counts too
            raise MergeInputError(name, "merged tensor is not finite (check curvature and damping)")
        out[name] = merged
    return out
