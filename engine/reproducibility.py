"""The same config and seed give the same numbers: seeding, the deterministic switch, and
a workaround for a oneMKL race in torch's CPU build (see warm_up_vector_math)."""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed every generator a run draws from (CUDA included, through torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def determinism(deterministic: bool, device: str) -> Iterator[None]:
    """Deterministic kernels when asked (slower on CUDA); otherwise let cuDNN pick the fastest.

    On CPU, deterministic also means one intra-op thread: oneMKL promises the same results
    only for a fixed thread count and with its reproducibility mode, which torch does not
    set, so bit-for-bit resume and reruns run on one thread. The thread count and the
    deterministic switch are given back on the way out."""
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        if device == "cpu":
            torch.set_num_threads(1)
    # The call imports torch._dynamo (~1 s) even when it changes nothing.
    if deterministic != was_deterministic:
        torch.use_deterministic_algorithms(deterministic)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if deterministic != was_deterministic:
            torch.use_deterministic_algorithms(was_deterministic)


# torch sends float unary ops (sin, exp, sqrt, tanh, ...) on CPU to oneMKL's vector math
# (VML), which picks each function's kernel on its first call. oneMKL 2024.2, bundled with
# torch 2.13, races when that first call runs on several intra-op threads at once: one
# thread's chunk can come from a low-accuracy kernel (pytorch/pytorch#188792). Here it hit
# about one process in ten: the shipped data's sin(4πx) was off by up to 1.5e-4 on half
# of the points, so two processes (or two DDP ranks) trained on different data. A
# one-element call per function and precision, on one thread, settles every choice first.
# It runs when this module is imported, which RunConfig.load_data (and util.py) do before
# any data is built: every run, analysis, preflight and benchmark gets it first. A torch
# without MKL (Apple Silicon, aarch64) has no such first-call choice: nothing to warm up.
# Drop it once torch bundles oneMKL 2025.0 or newer.
_VECTOR_MATH = (torch.acos, torch.asin, torch.atan, torch.cos, torch.erf, torch.erfc, torch.erfinv, torch.exp,
                torch.log, torch.log2, torch.log10, torch.sin, torch.sqrt, torch.tan, torch.tanh, torch.trunc)


def warm_up_vector_math(mkl: bool | None = None) -> int:
    """Call every VML-backed function once per precision; returns how many calls it made.
    `mkl`: whether this torch uses MKL (default: ask torch)."""
    if not (torch.backends.mkl.is_available() if mkl is None else mkl):
        return 0
    calls = 0
    for dtype in (torch.float32, torch.float64):
        one = torch.full((1,), 0.5, dtype=dtype)
        for function in _VECTOR_MATH:
            function(one)
            calls += 1
    return calls


warm_up_vector_math()
