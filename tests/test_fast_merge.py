"""The fast path of the elementwise merges (memory-mapped inputs, in-place chunks) equals the reference driver bit
for bit, for every method and dtype, across chunk boundaries; bad inputs are refused by name as the reference does."""

from __future__ import annotations

import pytest
import torch

from modelmerge.io import LazySafetensors, save_state_dict
from modelmerge.merge import average, dare, task_arithmetic, ties, weighted_average
from modelmerge.merge.fast import MappedSafetensors, fast_merge
from modelmerge.statedict import MergeInputError


def _files(tmp_path, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = {"emb.weight": torch.randn(37, 5, generator=gen), "ln.bias": torch.randn(11, generator=gen),
            "half.weight": torch.randn(6, 7, generator=gen).to(torch.bfloat16), "step": torch.tensor([4, 2]),
            "zero": torch.tensor([-0.0, 0.0, -0.0])}  # signed zeros: a reordered sum would flip their bits
    save_state_dict(base, tmp_path / "base.safetensors")
    paths = []
    for i in range(n):
        m = {k: (v + 0.1 * torch.randn(v.shape, generator=gen).to(v.dtype) if k != "zero" else -v.abs())
             if v.is_floating_point() else v for k, v in base.items()}
        m["emb.weight"][i, :] = base["emb.weight"][i, :]  # exact zeros in the task vector (TIES ties, DARE)
        save_state_dict(m, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    return tmp_path / "base.safetensors", paths


def _bits(state):
    return {k: v.contiguous().view(torch.uint8) if v.is_floating_point() else v for k, v in state.items()}


def _same_bits(a, b):
    a, b = _bits(dict(a)), _bits(dict(b))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


CASES = {
    "average": (lambda base, ms: average(ms), {}),
    "weighted_average": (lambda base, ms: weighted_average(ms, [0.5, 2.0, 1.25]), {"weights": [0.5, 2.0, 1.25]}),
    "task_arithmetic": (lambda base, ms: task_arithmetic(base, ms, [0.3, -0.7, 1.1]), {"alphas": [0.3, -0.7, 1.1]}),
    "ties": (lambda base, ms: ties(base, ms, k=0.3, lam=0.8), {"k": 0.3, "lam": 0.8}),
    "ties/tensor": (lambda base, ms: ties(base, ms, k=0.5, lam=1.2, scope="tensor"), {"k": 0.5, "lam": 1.2, "scope": "tensor"}),
    "ties/weighted": (lambda base, ms: ties(base, ms, k=[0.3, 0.6, 1.0], weights=[1.0, 2.5, 0.5], scope="tensor"),
                      {"k": [0.3, 0.6, 1.0], "weights": [1.0, 2.5, 0.5], "scope": "tensor"}),
    "ties/sum": (lambda base, ms: ties(base, ms, k=1.0, weights=[0.7, 0.2, 0.4], normalize=False),
                 {"k": 1.0, "weights": [0.7, 0.2, 0.4], "normalize": False}),
}


@pytest.mark.parametrize("with_dare", [False, True], ids=["plain", "dare"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_the_fast_path_is_the_reference_bit_for_bit(tmp_path, case, with_dare, chunk):
    base_path, paths = _files(tmp_path)
    reference, params = CASES[case]
    lazy_base, lazy = LazySafetensors(base_path), [LazySafetensors(p) for p in paths]
    mapped_base, mapped = MappedSafetensors(base_path), [MappedSafetensors(p) for p in paths]
    if with_dare:
        lazy, mapped = dare(lazy_base, lazy, 0.4, seed=3), dare(mapped_base, mapped, 0.4, seed=3)
    expected = reference(lazy_base, lazy)
    threads = 3 if chunk == 7 else 1  # small chunks shared by three workers, or one worker for everything
    got = fast_merge(case.split("/")[0], mapped_base, mapped, {}, chunk=chunk, threads=threads, progress=False, **params)
    _same_bits(got, expected)


def test_mapped_tensors_equal_the_read_ones_and_survive_release(tmp_path):
    base_path, _ = _files(tmp_path)
    lazy, mapped = LazySafetensors(base_path), MappedSafetensors(base_path)
    assert list(lazy) == list(mapped) and all(mapped.info(k) == lazy.info(k) for k in lazy)
    for k in lazy:
        mapped.prefetch(k)
        assert torch.equal(mapped[k], lazy[k])
        mapped.release(k)
        assert torch.equal(mapped[k], lazy[k])  # re-read from the page cache after the pages were dropped


def test_bad_inputs_are_refused_by_name_as_the_reference_refuses_them(tmp_path):
    base_path, paths = _files(tmp_path, n=2)
    bad = dict(LazySafetensors(paths[1]))
    bad["ln.bias"] = bad["ln.bias"].clone()
    bad["ln.bias"][3] = float("nan")
    save_state_dict(bad, tmp_path / "bad.safetensors")
    models = [MappedSafetensors(paths[0]), MappedSafetensors(tmp_path / "bad.safetensors")]
    with pytest.raises(MergeInputError, match=r"ln\.bias.*model 1 has 1 non-finite"):
        fast_merge("task_arithmetic", MappedSafetensors(base_path), models, {}, progress=False)
    with pytest.raises(MergeInputError, match="weights sum to zero"):
        fast_merge("weighted_average", None, models[:1], {}, weights=[0.0], progress=False)
    with pytest.raises(MergeInputError, match="needs the base model"):
        fast_merge("ties", None, models, {}, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        fast_merge("fisher_average", None, models, {}, progress=False)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # the GPU case runs where there is one


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["average", "task_arithmetic", "ties/weighted"])
def test_the_fast_path_on_a_device_is_the_reference(tmp_path, device, case):
    base_path, paths = _files(tmp_path)
    reference, params = CASES[case]
    expected = reference(LazySafetensors(base_path), [LazySafetensors(p) for p in paths])
    got = fast_merge(case.split("/")[0], MappedSafetensors(base_path), [MappedSafetensors(p) for p in paths], {},
                     chunk=7, device=device, progress=False, **params)
    if case == "ties/weighted" and device != "cpu":  # a GPU sums the stacked task vectors in its own order
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6)
    else:  # elementwise operations round the same on every device
        _same_bits(got, expected)
    assert all(v.device.type == "cpu" for v in got.values())
