#!/usr/bin/env python
"""Where a fresh `hub merge --device cuda` process spends its fixed start-up time.

Times, in one new process: importing torch and mergehub's CLI, creating the CUDA context,
importing the Triton kernels, the first and second call of each kernel on a 4096x4096 bf16
tensor with K = 4 (the first compiles, or loads from Triton's on-disk cache), and page-locking
1 GiB of host memory in 64 MiB blocks, twice (torch caches pinned blocks). Run it twice, the
first time after `rm -rf ~/.triton/cache`, to see a cold and a warm kernel cache.

    python benchmarks/bench_gpu_startup.py      # on a CUDA machine
"""

import time

t0 = time.perf_counter()


def lap(label: str) -> None:
    """Print the seconds since the previous lap."""
    global t0
    t = time.perf_counter()
    print(f"{label}: {t - t0:.2f} s", flush=True)
    t0 = t


import torch  # noqa: E402  (timed)

lap("import torch")
import mergehub.hub.cli  # noqa: E402,F401

lap("import mergehub.hub.cli")
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
lap("CUDA context")
from mergehub import kernels  # noqa: E402
import mergehub.kernels.triton_merge  # noqa: E402,F401

lap("import kernels + triton")
base = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
thetas = [base + 0.01 * torch.randn_like(base) for _ in range(4)]
torch.cuda.synchronize()
lap("test tensors")
for call in ("first", "second"):
    kernels.merge_tensor(base, thetas, weights=[1.0] * 4, lam=1.0)
    torch.cuda.synchronize()
    lap(f"{call} merge_tensor, task arithmetic")
for call in ("first", "second"):
    cuts = kernels.magnitude_cuts(base, thetas, [0.2] * 4)
    torch.cuda.synchronize()
    lap(f"{call} magnitude_cuts")
    kernels.merge_tensor(base, thetas, weights=[1.0] * 4, lam=1.0, cuts=cuts, elect="sum")
    torch.cuda.synchronize()
    lap(f"{call} merge_tensor, TIES")
for call in ("first", "second"):
    pinned = [torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(16)]
    lap(f"{call} page-locking of 1 GiB in 64 MiB blocks")
    del pinned
