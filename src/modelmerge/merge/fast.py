"""A fast path for the elementwise merges (average, weighted average, task arithmetic, TIES, DARE'd models) over
safetensors files, bit for bit the reference driver's result.

The reference (``merge_parameters`` with a method's rule) reads each tensor into a fresh buffer and builds every
intermediate as a new tensor. Here the inputs are memory-mapped (``MappedSafetensors``: no copy, and each tensor's
pages are released from the process once it is merged), the arithmetic runs in place on chunks of at most ``CHUNK``
entries in buffers allocated once, with the same operations in the same order as the rules (so the same rounding),
while the output is written tensor by tensor. The next tensor's pages are asked for ahead (``madvise(WILLNEED)``)
while the current one is computed, and torch's own threads split every chunk operation.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from modelmerge.files import read_safetensors_header
from modelmerge.merge.ties import _kth_largest, ties_merge_tensor, ties_settings, ties_thresholds
from modelmerge.statedict import MergeInputError, StateDict, all_finite, check_alphas, check_same_keys, compute_dtype

#: the methods of this path and the reference function each reproduces
METHODS = ("average", "weighted_average", "task_arithmetic", "ties")
CHUNK = 1 << 18  # entries per chunk: 1 MB of float32 per buffer, so a chunk's inputs and outputs stay in cache
_PAGE = mmap.PAGESIZE


class MappedSafetensors(Mapping):
    """Read-only tensors over a memory-mapped safetensors file, without copying (a private mapping: writes never reach
    the file). ``release(name)`` drops a tensor's pages from this process's resident memory (they stay in the page
    cache); ``prefetch(name)`` asks the kernel to read them ahead."""

    def __init__(self, path: str | os.PathLike):
        from modelmerge.io import _ST_TO_TORCH

        self.path = Path(path)
        header, self._start = read_safetensors_header(self.path)
        header.pop("__metadata__", None)
        self._info = {k: (_ST_TO_TORCH[v["dtype"]], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def __getitem__(self, name: str) -> Tensor:
        dtype, shape, begin, end = self._info[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=self._start + begin).reshape(shape)

    def _advise(self, name: str, advice: int) -> None:
        _, _, begin, end = self._info[name]
        if end > begin and self._mm is not None:
            first = (self._start + begin) // _PAGE * _PAGE
            self._mm.madvise(advice, first, self._start + end - first)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (re-read from the page cache if indexed again)."""
        self._advise(name, mmap.MADV_DONTNEED)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read the tensor's pages ahead."""
        self._advise(name, mmap.MADV_WILLNEED)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) without touching the data."""
        return self._info[name][:2]

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, name: object) -> bool:
        return name in self._info


def _sources(state: StateDict) -> list:
    """The mapped files behind an input (a DARE'd model's ``base`` and ``model``, a sharded checkpoint's
    ``shards``), to release and prefetch their pages."""
    if isinstance(state, MappedSafetensors):
        return [state]
    inner = [getattr(state, a) for a in ("base", "model") if isinstance(getattr(state, a, None), Mapping)]
    return [s for m in [*inner, *getattr(state, "shards", [])] for s in _sources(m)]


def _name_bad_input(name: str, tensors: Sequence[Tensor], labels: Sequence[str]) -> None:
    """Raise the reference's error for the first input with a non-finite entry."""
    for tensor, label in zip(tensors, labels):
        if not all_finite(tensor):
            raise MergeInputError(name, f"{label} has {int((~torch.isfinite(tensor)).sum())} non-finite value(s) (NaN "
                                        "or inf)")


class _Writer:
    """Hands merged tensors to ``out`` on a thread of its own (one tensor queued), so that writing one parameter
    overlaps merging the next; an error on the thread is raised on the next put or at ``close``."""

    def __init__(self, out: MutableMapping[str, Tensor]):
        import queue
        import threading

        self.out, self.error = out, None
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.out[item[0]] = item[1]
                except BaseException as err:  # noqa: BLE001  (re-raised on the merging thread)
                    self.error = err

    def put(self, name: str, tensor: Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((name, tensor))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def fast_merge(
    method: str,
    base: StateDict | None,
    models: Sequence[StateDict],
    out: MutableMapping[str, Tensor],
    *,
    alphas: Sequence[float] | float = 1.0,
    weights: Sequence[float] | None = None,
    k: float | Sequence[float] = 0.2,
    lam: float = 1.0,
    scope: str = "model",
    normalize: bool = True,
    chunk: int = CHUNK,
    threads: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> MutableMapping[str, Tensor]:
    """``method``'s merge written to ``out`` parameter by parameter, equal bit for bit to the library function of the
    same name (``average``, ``weighted_average``: ``weights``; ``task_arithmetic``: ``alphas``; ``ties``: ``k``,
    ``lam``, ``scope``, ``weights``, ``normalize``) on the same inputs (DARE'd models included). ``base`` gives the
    layout for the averages.
    ``threads`` (default: torch's thread count) workers each merge every ``threads``-th chunk of a parameter, with
    torch single-threaded inside them (restored after), while another thread writes the previous parameter.
    ``device`` (e.g. "cuda") runs the chunks' arithmetic there, one worker, larger chunks; inputs and output stay
    on the host."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not models:
        raise MergeInputError(None, "no models to merge")
    ref = base if base is not None else models[0]
    check_same_keys(ref, models)
    n = len(models)
    a = w = total = None
    if method == "average":
        w, total = [1.0] * n, float(n)
    elif method == "weighted_average":
        w = check_alphas(weights if weights is not None else [1.0] * n, n, name="weights")
        total = sum(w)
        if total == 0:
            raise MergeInputError(None, "weights sum to zero")
    elif method == "task_arithmetic":
        a = check_alphas(alphas, n)
    else:
        k, weights = ties_settings(k, weights, scope, n)
    uses_base = method in ("task_arithmetic", "ties")
    if uses_base and base is None:
        raise MergeInputError(None, f"{method} needs the base model")
    global_thr = ties_thresholds(base, models, k) if method == "ties" and scope == "model" else None
    mapped = [s for m in [ref, *models] for s in _sources(m)]
    names = list(ref.keys())
    settings = {"a": a, "w": w, "total": total, "k": k, "lam": lam, "global_thr": global_thr, "uses_base": uses_base,
                "ties_weights": weights if method == "ties" else None, "normalize": normalize}
    device = torch.device(device) if device is not None else torch.device("cpu")
    settings["device"] = device
    if device.type != "cpu":  # one stream of chunks, each big enough to amortise a host-device copy
        threads, chunk = 1, max(chunk, CHUNK * 16)
    threads = max(1, threads or torch.get_num_threads())
    buffers: list[dict] = [{} for _ in range(threads)]  # per worker, per compute dtype: allocated once
    writer = _Writer(out)
    torch_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the workers are the parallelism: a chunk's operations run in the worker's thread
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for i, name in enumerate(tqdm(names, desc=f"{method} (fast path)", disable=not progress or len(names) < 20,
                                      mininterval=1.0)):
            if i + 1 < len(names):
                for src in mapped:
                    if names[i + 1] in src:
                        src.prefetch(names[i + 1])
            merged = _merge_one(name, ref[name], [m[name] for m in models], method, buffers, chunk, settings, pool)
            writer.put(name, merged)
            for src in mapped:
                if name in src:
                    src.release(name)
    finally:
        if pool is not None:
            pool.shutdown()
        torch.set_num_threads(torch_threads)
        writer.close()
    return out


def _merge_one(name: str, b: Tensor, ts: list[Tensor], method: str, buffers: list[dict], chunk: int, p: dict,
               pool: ThreadPoolExecutor | None) -> Tensor:
    """One parameter of ``fast_merge`` (``p``: its prepared settings): worker i merges chunks i, i + workers, ..."""
    n = len(ts)
    for j, t in enumerate(ts):
        if tuple(t.shape) != tuple(b.shape):
            raise MergeInputError(name, f"shape mismatch: model {j} has {tuple(t.shape)}, base has {tuple(b.shape)}")
        if t.dtype != b.dtype:
            raise MergeInputError(name, f"dtype mismatch: model {j} is {t.dtype}, base is {b.dtype}")
    if not b.is_floating_point():
        if not all(torch.equal(t, b) for t in ts):
            raise MergeInputError(name, "non-float tensor differs between models; cannot merge it")
        return b.clone()
    cd = compute_dtype(b.dtype)
    merged = torch.empty(b.numel(), dtype=b.dtype)
    flat0, flats = b.reshape(-1), [t.reshape(-1) for t in ts]
    thr = p["global_thr"]
    if method == "ties" and thr is None:
        thr = [_kth_largest((t.to(cd) - b.to(cd)).abs().reshape(-1), kt) for t, kt in zip(ts, p["k"])]
    labels = (["base model"] if p["uses_base"] else []) + [f"model {j}" for j in range(n)]
    starts = list(range(0, flat0.numel(), chunk))
    workers = 1 if pool is None else min(len(buffers), len(starts))

    def work(worker: int) -> None:
        dev = p["device"]
        if cd not in buffers[worker]:
            buffers[worker][cd] = (torch.empty(chunk, dtype=cd, device=dev), torch.empty(chunk, dtype=cd, device=dev),
                                   torch.empty((n, chunk) if method == "ties" else 0, dtype=cd, device=dev))
        acc_buf, tmp_buf, stack_buf = buffers[worker][cd]
        direct = merged.dtype == cd and dev.type == "cpu"  # the result goes straight into the output tensor
        for s in starts[worker::workers]:
            e = min(s + chunk, flat0.numel())
            m = e - s
            b_c = flat0[s:e].to(dev, cd)
            t_c = [f[s:e].to(dev, cd) for f in flats]
            acc, tmp = acc_buf[:m], tmp_buf[:m]
            dst = merged[s:e] if direct else tmp
            if method == "task_arithmetic":  # theta0 + sum_t a_t (theta_t - theta0), summed left to right
                a = p["a"]
                torch.sub(t_c[0], b_c, out=acc).mul_(a[0])
                for at, x in zip(a[1:], t_c[1:]):
                    acc.add_(torch.sub(x, b_c, out=tmp).mul_(at))
                torch.add(b_c, acc, out=dst)
            elif method == "ties":  # the rule's chunk: theta0 + lam * TIES(stacked task vectors)
                taus = stack_buf[:, :m]
                for j, x in enumerate(t_c):
                    torch.sub(x, b_c, out=taus[j])
                if not all_finite(taus):  # TIES trims a NaN away: check what it reads
                    _name_bad_input(name, [flat0, *flats], labels)
                torch.add(b_c, p["lam"] * ties_merge_tensor(taus, thr, p["ties_weights"], p["normalize"]), out=dst)
            else:  # sum_t w_t theta_t / sum_t w_t, summed left to right
                w = p["w"]
                torch.mul(t_c[0], w[0], out=acc)
                for wt, x in zip(w[1:], t_c[1:]):
                    acc.add_(torch.mul(x, wt, out=tmp))
                torch.div(acc, p["total"], out=dst)
            if not direct:
                merged[s:e] = dst  # back to the host, in the inputs' dtype
            if not all_finite(merged[s:e]):  # a non-finite input makes the sums non-finite: name it, else the merge
                _name_bad_input(name, [flat0, *flats] if p["uses_base"] else flats, labels)
                raise MergeInputError(name, "merged tensor is not finite (check curvature and damping)")

    if workers == 1:
        work(0)
    else:
        list(pool.map(work, range(workers)))
    return merged.reshape(b.shape)
