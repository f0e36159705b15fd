"""Cost of a merge: FLOPs by 002 App. E.1's accounting, and measured wall time and peak memory."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch

# --- FLOPs (002 App. E.1) -------------------------------------------------------------------------------------------
# Conventions of 002: a forward pass costs p T FLOPs and a gradient 3 p T (Kaplan et al. 2020); a product of an
# a x b and a b x c matrix costs a b c; an elementwise operation on p numbers costs p. ``layers`` lists the
# (d_in, d_out) of every linear layer whose weight RegMean / K-FAC treat as a matrix; ``T`` and ``N`` are the
# tokens and examples each model's statistics are computed on (002: "the total number of tokens and examples used
# to compute the model statistics"), so statistics of M models cost M times one model's.


def flops_average(M: int, p: int) -> float:
    """M p: sum M models ((M - 1) p) and divide (p)."""
    return M * p


def flops_task_arithmetic(M: int, p: int) -> float:
    """2 M p + p: task vectors (M p), their sum ((M - 1) p), scaling (p), adding the base (p)."""
    return 2 * M * p + p


def flops_ties(M: int, p: int) -> float:
    """9.8 M p + M p log2 p - 2 p: trim (1.8 M p + M p log p), elect (6 M p - p), disjoint mean (2 M p - p)."""
    return 9.8 * M * p + M * p * math.log2(p) - 2 * p


def flops_diagonal_fisher(M: int, p: int, T: int, N: int) -> float:
    """3 M p - p + M (3 p T + N p): per-example gradients and their squares, then the elementwise weighted mean."""
    return 3 * M * p - p + M * (3 * p * T + N * p)


def flops_regmean(M: int, p: int, T: int, layers: Sequence[tuple[int, int]]) -> float:
    """M p T + sum_l [M T d^2 + (M - 1) d^2 + 2/3 d^3 + M d^2 k + (M - 1) d k + d^2 k]: forward passes, Grams,
    their sum, the Cholesky inverse, the Gram-weighted models and the final product. (002's printed formula has
    N d^2 for the Grams; its text derives T d^2 per model, which is what is counted here.)"""
    return M * p * T + sum(M * T * d * d + (M - 1) * d * d + 2 / 3 * d**3 + M * d * d * k + (M - 1) * d * k + d * d * k
                           for d, k in layers)


def flops_mats_regmean(M: int, p: int, T: int, layers: Sequence[tuple[int, int]], iterations: int) -> float:
    """002 App. E.1's MaTS (RegMean objective): as RegMean without the inverse, plus I (d^2 k + 12 d k) for I CG
    iterations (one product with the summed Gram and 12 vector operations per iteration)."""
    return M * p * T + sum(M * T * d * d + (M - 1) * d * d + M * d * d * k + (M - 1) * d * k
                           + iterations * (d * d * k + 12 * d * k) for d, k in layers)


def flops_mats_kfac(M: int, p: int, T: int, layers: Sequence[tuple[int, int]], iterations: int,
                    preconditioned: bool = False) -> float:
    """MaTS with the K-FAC objective (not costed in 002; same accounting): gradients (3 M p T), factors
    (M T (d^2 + k^2)), b = sum_m B_m W_m A_m (M (d^2 k + d k^2) + (M - 1) d k), then ``flops_kfac_cg``."""
    per_product = sum(d * d * k + d * k * k for d, k in layers)
    return (3 * M * p * T + sum(M * T * (d * d + k * k) + (M - 1) * d * k for d, k in layers) + M * per_product
            + flops_kfac_cg(M, layers, iterations, preconditioned))


def flops_kfac_cg(M: int, layers: Sequence[tuple[int, int]], iterations: int, preconditioned: bool = False) -> float:
    """I CG iterations on sum_m B_m (x) A_m: per iteration the M Kronecker products, their sum and at most 12 vector
    operations (the rescaling of H p, five inner products, three updates, with room to spare), I (M (d^2 k + d k^2) +
    (M - 1) d k + 12 d k). Preconditioned (``SumCurvature.preconditioner``): once, the factor sums (M - 1)(d^2 + k^2)
    and their eigendecompositions 9 (d^3 + k^3) (Golub & Van Loan's count for a symmetric eigensolver with vectors,
    in flops that count a multiply and an add apiece, so about twice 002's multiply-add unit: an upper bound that
    disfavours PCG); per iteration four products into and out of the eigenbases 2 (d^2 k + d k^2), the eigenvalue
    scaling d k and 3 more vector operations (z and r^T z): I (2 (d^2 k + d k^2) + 4 d k)."""
    total = iterations * sum(M * (d * d * k + d * k * k) + (M - 1) * d * k + 12 * d * k for d, k in layers)
    if preconditioned:
        total += sum((M - 1) * (d * d + k * k) + 9 * (d**3 + k**3) for d, k in layers)
        total += iterations * sum(2 * (d * d * k + d * k * k) + 4 * d * k for d, k in layers)
    return total


def flops_training(p: int, tokens: int) -> float:
    """3 p T over the T tokens seen in training (002's multitask baseline)."""
    return 3 * p * tokens


def peak_memory_eq6(parameters: int, trainable: int, models_at_once: int, task_vector_parameters: int) -> float:
    """004 App. A.2 Eq. 6, in bytes: 4 N_para (weights) + 4 N_train (gradients) + 8 N_train (Adam's two moments)
    + 4 k N_tv (the task vectors of the k models merged at once; k = 0 for fine-tuning)."""
    return 4 * parameters + 4 * trainable + 8 * trainable + 4 * models_at_once * task_vector_parameters


# --- measured cost ---------------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    """Wall time and the peak memory above the level at the start (host RSS; on CUDA also device memory)."""

    seconds: float = 0.0
    peak_host_mb: float = 0.0
    peak_device_mb: float = 0.0


def pin_malloc_threshold(threshold: int = 128 * 1024) -> bool:
    """glibc only: serve every allocation above ``threshold`` bytes by its own mapping, returned to the system when
    freed (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc from raising the threshold as large blocks are
    freed). Resident memory then follows the tensors alive rather than what the allocator keeps; call it once at the
    start of a process whose peak memory is measured. Returns False where it does not apply."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_MMAP_THRESHOLD = -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


@contextmanager
def measure(interval: float = 0.005) -> Iterator[Measurement]:
    """Time the block and sample the process's resident memory every ``interval`` s in a background thread.

    The peak is reported above the RSS at entry, i.e. what the block itself allocated at its worst (inputs
    already in memory are not counted). On CUDA the device's peak allocation above its level at entry is added.
    """
    m = Measurement()
    proc = psutil.Process()
    start_rss = proc.memory_info().rss
    peak = [start_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(interval)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_dev = torch.cuda.memory_allocated()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        if cuda:
            torch.cuda.synchronize()
            m.peak_device_mb = (torch.cuda.max_memory_allocated() - start_dev) / 2**20
        m.seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        m.peak_host_mb = (peak[0] - start_rss) / 2**20
