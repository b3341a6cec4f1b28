"""Fused kernels against plain torch and against the device's copy bandwidth (issue 7).

For Llama-8B-sized bf16 tensors and K = 2, 4, 8 fine-tunes: the fused merge (TIES with
per-input cuts, and task arithmetic) and the cut selection (threshold and tie end), each timed with
``triton.testing.do_bench`` (median), its bytes moved (each input read once, the output written
once) over its time as a fraction of a device-to-device copy measured in the same run, and its
speed-up over the torch reference (the merge methods' own functions on the same CUDA tensors,
which is what the engine runs without the kernels); threshold selection also against
``torch.topk`` per input, once against ``torch.kthvalue``, and as a fraction of the TIES merge
of the same tensor (issue 7 wants it below 1), exact and approximate (``tolerance`` 0.01:
a sample's exact threshold; the whole call, and its device work alone against the merge's,
both from CUDA graphs). Then decompress-and-apply of 4
BitDelta / ComPEFT / low-rank deltas against decoding them densely with torch. Every kernel
result is checked against its reference (bit-exact; low-rank within 1e-5) on the timed data.
``moves``: MeZO's three moves (+εz, −2εz, +εz with the update) as one ``kernels.zo_steps``
launch over the 201 bf16 parameters of a 1.1B Llama shape, against a copy of as many bytes
(each move reads and writes every parameter once); each move's result checked equal to the
same move applied one parameter at a time (``kernels.zo_step``).

    python benchmarks/bench_kernels.py                 # on a CUDA GPU; --json PATH saves rows
    python benchmarks/bench_kernels.py --parts merge,breakdown --ks 4   # a subset; breakdown:
        # an exact threshold selection's and a TIES merge's kernels under torch.profiler
    python benchmarks/bench_kernels.py --parts moves    # MeZO's moves (issue 16, item 1)
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke   # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mergehub import kernels
from mergehub.kernels import (
    LowRankDelta, SignDelta, TernaryDelta, reference, triton_merge, triton_select)
from mergehub.ops.selection import kth_rank
from mergehub.ops.sparsify import cut_mask
from mergehub.storage.atomic import write_file_atomic

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (1024, 4096)]  # MLP, q/o proj, k/v proj
SMOKE_SHAPES = [(37, 131)]
DENSITY = 0.2
TOLERANCE = 0.01  # approximate thresholds: kept fraction within 1% of the density


def timer(smoke: bool):
    """Median milliseconds of ``fn``: do_bench on a GPU, a few host-timed calls in --smoke."""
    if smoke:
        def run(fn, reps: int = 3) -> float:
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        return run
    import triton.testing

    def run(fn, reps: int = 100) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")
    return run


def copy_gbps(bench, dev: str, smoke: bool) -> float:
    """Device-to-device copy bandwidth, bytes read + written, of a 1 GiB tensor."""
    n = 1 << (12 if smoke else 29)
    src = torch.randn(n, device=dev).bfloat16()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e6


def inputs(shape, k: int, dev: str, seed: int):
    gen = torch.Generator(device=dev).manual_seed(seed)
    base = torch.randn(shape, device=dev, generator=gen) * 0.02
    thetas = [(base + torch.randn(shape, device=dev, generator=gen) * 0.002).bfloat16()
              for _ in range(k)]
    return base.bfloat16(), thetas


def bench_merge(bench, dev, copy, shapes, ks, rows, smoke):
    for shape in shapes:
        n = shape[0] * shape[1]
        for k in ks:
            base, thetas = inputs(shape, k, dev, seed=k)
            dens = [DENSITY] * k
            cuts = kernels.magnitude_cuts(base, thetas, dens)
            want_cuts = reference.magnitude_cuts(base, thetas, dens)
            assert cuts == want_cuts, (cuts, want_cuts)
            merge_ms, merge_args = {}, {}
            for name, kw in (("ties", {"cuts": cuts, "elect": "sum"}),
                             ("task_arithmetic", {"elect": None})):
                args = merge_args[name] = dict(weights=[1.0] * k, lam=1.0, **kw)
                got = kernels.merge_tensor(base, thetas, **args)
                want = kernels.merge_tensor(base, thetas, backend="torch", **args)
                assert torch.equal(got, want), f"{name} {shape} K={k}: kernel != reference"
                ms = bench(lambda: kernels.merge_tensor(base, thetas, **args))
                ref_ms = bench(lambda: kernels.merge_tensor(base, thetas, backend="torch",
                                                            **args), 20 if not smoke else 1)
                gbs = (k + 2) * n * 2 / ms / 1e6
                merge_ms[name] = ms
                rows.append({"op": f"merge {name}", "shape": list(shape), "K": k, "ms": ms,
                             "GB/s": gbs, "of_copy": gbs / copy, "torch_ms": ref_ms,
                             "speedup": ref_ms / ms})
            ms = bench(lambda: kernels.magnitude_cuts(base, thetas, dens))
            topk_ms = bench(lambda: [torch.topk((t.float() - base.float()).abs().reshape(-1),
                                                kth_rank(DENSITY, n)).values.min()
                                     for t in thetas], 20 if not smoke else 1)
            gbs = (k + 1) * n * 2 / ms / 1e6
            rows.append({"op": "cuts", "shape": list(shape), "K": k, "ms": ms,
                         "GB/s": gbs, "of_copy": gbs / copy, "torch_ms": topk_ms,
                         "speedup": topk_ms / ms, "torch": "topk per input",
                         "of_merge": ms / merge_ms["ties"]})
            bench_sampled(bench, base, thetas, k, merge_args["ties"], merge_ms["ties"], rows,
                          smoke)
    shape = shapes[0]
    base, (theta,) = inputs(shape, 1, dev, seed=9)
    n = base.numel()
    t = time.perf_counter()
    kth = torch.kthvalue((theta.float() - base.float()).abs().reshape(-1),
                         n - kth_rank(DENSITY, n) + 1).values.item()
    kth_ms = (time.perf_counter() - t) * 1e3
    ms = bench(lambda: kernels.magnitude_cut(base, theta, DENSITY))
    assert kth == kernels.magnitude_cut(base, theta, DENSITY).threshold
    rows.append({"op": "cuts", "shape": list(shape), "K": 1, "ms": ms,
                 "torch_ms": kth_ms, "speedup": kth_ms / ms, "torch": "kthvalue (1 call)"})


def bench_sampled(bench, base, thetas, k, ties_args, ties_ms, rows, smoke):
    """Approximate cuts (``tolerance``): the whole call as the engine makes it (launches,
    selection, the host's wait for the result; do_bench) and the device work alone, against
    the TIES merge's, both replayed from a CUDA graph (``do_bench_cudagraph``: no launch
    overhead in either). Checked equal to the reference's, kept share within the tolerance."""
    from mergehub.ops.selection import sample_positions

    tol = 0.45 if smoke else TOLERANCE
    dens = [DENSITY] * k
    cuts = kernels.magnitude_cuts(base, thetas, dens, tolerance=tol)
    assert cuts == reference.magnitude_cuts(base, thetas, dens, tol), cuts
    kept = [float(cut_mask(t.float() - base.float(), c).float().mean())
            for t, c in zip(thetas, cuts)]
    assert all(abs(f - DENSITY) <= tol for f in kept), kept
    ms = bench(lambda: kernels.magnitude_cuts(base, thetas, dens, tolerance=tol))
    positions = sample_positions(base.numel(), tol).to(base.device)
    flat = [t.reshape(-1) for t in thetas]
    ks = [kth_rank(DENSITY, positions.numel())] * k
    if smoke:
        graphed = bench
    else:
        import triton.testing

        def graphed(fn):
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    device_ms = graphed(lambda: triton_select.sample_select(base.reshape(-1), flat, positions,
                                                             ks))
    merge_device_ms = graphed(lambda: kernels.merge_tensor(base, thetas, **ties_args))
    rows.append({"op": f"cuts ~{tol}", "shape": list(base.shape), "K": k, "ms": ms,
                 "of_merge": ms / ties_ms, "device_ms": device_ms,
                 "merge_device_ms": merge_device_ms, "device_of_merge": device_ms / merge_device_ms,
                 "kept": [round(f, 5) for f in kept], "sample": positions.numel()})


def bench_blocks(bench, dev, copy, shape, rows, variants):
    """The merge kernel's block size and warps, K = 4 TIES (what MERGE_BLOCK/WARPS are set from)."""
    base, thetas = inputs(shape, 4, dev, seed=4)
    cuts = kernels.magnitude_cuts(base, thetas, [DENSITY] * 4)
    n = base.numel()
    saved = triton_merge.MERGE_BLOCK, triton_merge.MERGE_WARPS
    try:
        for block, warps in variants:
            triton_merge.MERGE_BLOCK, triton_merge.MERGE_WARPS = block, warps
            for normalize in (True, False):
                ms = bench(lambda: kernels.merge_tensor(base, thetas, weights=[1.0] * 4, lam=1.0,
                                                        cuts=cuts, elect="sum",
                                                        normalize=normalize))
                gbs = 6 * n * 2 / ms / 1e6
                rows.append({"op": f"ties {block}/{warps}w{'' if normalize else ' no-norm'}",
                             "shape": list(shape), "K": 4, "ms": ms, "GB/s": gbs,
                             "of_copy": gbs / copy})
    finally:
        triton_merge.MERGE_BLOCK, triton_merge.MERGE_WARPS = saved


def bench_apply(bench, dev, copy, shape, rows, smoke, k=4, rank=16):
    rows_, cols = shape
    n = rows_ * cols
    gen = torch.Generator(device=dev).manual_seed(0)
    base = (torch.randn(shape, device=dev, generator=gen) * 0.02).bfloat16()

    def bits():
        return torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, device=dev,
                             generator=gen)

    kinds = {
        "bit1": ([SignDelta(bits(), torch.rand(rows_, device=dev, generator=gen) * 1e-3)
                  for _ in range(k)], n // 8 * k),
        "compeft": ([TernaryDelta(bits(), bits(), 1e-3) for _ in range(k)], n // 4 * k),
        "lowrank": ([LowRankDelta(torch.randn(rows_, rank, device=dev, generator=gen) * 1e-3,
                                  torch.randn(rank, cols, device=dev, generator=gen) * 1e-3)
                     for _ in range(k)], (rows_ + cols) * rank * 4 * k),
    }
    scales = [0.5] * k
    for name, (deltas, extra) in kinds.items():
        got = kernels.apply_deltas(base, deltas, scales, out_dtype=torch.float32)
        want = kernels.apply_deltas(base, deltas, scales, out_dtype=torch.float32,
                                    backend="torch")
        if name == "lowrank":
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
        else:
            assert torch.equal(got, want), name
        ms = bench(lambda: kernels.apply_deltas(base, deltas, scales))
        ref_ms = bench(lambda: kernels.apply_deltas(base, deltas, scales, backend="torch"),
                       20 if not smoke else 1)
        gbs = (2 * n * 2 + extra) / ms / 1e6
        rows.append({"op": f"apply {name} x{k}", "shape": list(shape), "K": k, "ms": ms,
                     "GB/s": gbs, "of_copy": gbs / copy, "torch_ms": ref_ms,
                     "speedup": ref_ms / ms})


def llama_shapes(smoke: bool) -> list[tuple[int, ...]]:
    """The parameter shapes of a 1.1B Llama (hidden 2048, intermediate 5632, 22 layers, 4 KV
    heads of 64, vocab 32000, untied embeddings), or a few small ones with ``smoke``."""
    if smoke:
        return [(300, 8), (5,), (64, 33), (1000,)]
    h, inter, kv, vocab = 2048, 5632, 256, 32000
    layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return [(vocab, h), *layer * 22, (h,), (vocab, h)]


def bench_moves(bench, dev, copy, rows, smoke) -> None:
    """MeZO's moves over all parameters in one launch, against a copy of their bytes."""
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(s, device=dev, generator=gen).bfloat16().reshape(-1)
          for s in llama_shapes(smoke)]
    seeds = [7919 * t + 3 for t in range(len(xs))]
    many, table = kernels.ZoTensors(xs), kernels.seed_table(seeds, dev)  # as MeZO keeps them
    n = sum(x.numel() for x in xs)
    start = [x.clone() for x in xs]
    for name, times, update in (("+eps z", 1, None), ("-2 eps z", -2, None),
                                ("+eps z, update", 1, -1e-3)):
        kernels.zo_steps(many, table, 1e-3, times, update=update)
        for x, s0, seed in zip(xs, start, seeds):
            one = s0.clone()
            kernels.zo_step(one, seed, 1e-3, times, update=update)
            assert torch.equal(x, one), name
        ms = bench(lambda: kernels.zo_steps(many, table, 1e-3, times, update=update))
        for x, s0 in zip(xs, start):
            x.copy_(s0)
        gbs = 4 * n / ms / 1e6
        rows.append({"op": f"move {name}", "shape": [n], "K": len(xs), "ms": ms, "GB/s": gbs,
                     "of_copy": gbs / copy})


def breakdown(dev, shape, k, rows) -> None:
    """Where an exact threshold selection's time goes, against the TIES merge it serves: one
    call of each (after a warm-up) under ``torch.profiler``, its wall time (host clock, synced)
    and each kernel's device time."""
    from torch.profiler import ProfilerActivity, profile

    base, thetas = inputs(shape, k, dev, seed=k)
    dens = [DENSITY] * k
    cuts = kernels.magnitude_cuts(base, thetas, dens)
    calls = {"exact thresholds": lambda: kernels.magnitude_cuts(base, thetas, dens),
             "merge TIES": lambda: kernels.merge_tensor(base, thetas, weights=[1.0] * k, lam=1.0,
                                                        cuts=cuts, elect="sum")}
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) * 1e3
        parts = [(e.key, e.count, e.device_time_total / 1e3) for e in prof.key_averages()
                 if e.device_time_total > 0 and not e.key.startswith(("aten::", "cuda"))]
        rows.append({"op": f"breakdown {name}", "shape": list(shape), "K": k, "ms": wall,
                     "device_ms": sum(ms for _, _, ms in parts),
                     "kernels": sorted(parts, key=lambda r: -r[2])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (interpreter)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--parts", default="blocks,merge,apply",
                    help="comma-separated: blocks, merge, apply, moves, breakdown (GPU only)")
    ap.add_argument("--ks", default="2,4,8", help="numbers of fine-tunes for the merge rows")
    args = ap.parse_args()
    parts = args.parts.split(",")
    dev = "cpu" if args.smoke else "cuda"
    bench = timer(args.smoke)
    gpu = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()
    import triton

    copy = copy_gbps(bench, dev, args.smoke)
    print(f"{gpu}; torch {torch.__version__}, triton {triton.__version__}; "
          f"device-to-device copy {copy:.0f} GB/s (read + write)", flush=True)
    rows: list[dict] = []
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if "blocks" in parts:
        bench_blocks(bench, dev, copy, shapes[0], rows,
                     [(512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 8)] if not args.smoke
                     else [(64, 1)])
    if "merge" in parts:
        bench_merge(bench, dev, copy, shapes,
                    [int(k) for k in args.ks.split(",")] if not args.smoke else [2, 3], rows,
                    args.smoke)
    if "apply" in parts:
        bench_apply(bench, dev, copy, shapes[0], rows, args.smoke)
    if "moves" in parts:
        bench_moves(bench, dev, copy, rows, args.smoke)
    if "breakdown" in parts and not args.smoke:
        breakdown(dev, shapes[0], 4, rows)
    print(f"{'op':34} {'shape':>12} {'K':>2} {'ms':>8} {'GB/s':>7} {'copy':>5} "
          f"{'torch ms':>9} {'speedup':>8}")
    for r in rows:
        notes = [r["torch"]] if "torch" in r else []
        if "of_merge" in r:
            notes.append(f"{r['of_merge']:.2f}x the TIES merge")
        if "kernels" in r:
            notes.append(f"device {r['device_ms']:.3f} ms: " + "; ".join(
                f"{name[:40]} {count}x {ms:.3f}" for name, count, ms in r["kernels"][:6]))
        elif "device_ms" in r:
            notes.append(f"graphed: {r['device_ms']:.3f} ms vs merge {r['merge_device_ms']:.3f}"
                         f" = {r['device_of_merge']:.2f}x; sample {r['sample']:,}; kept "
                         f"{min(r['kept']):.4f}-{max(r['kept']):.4f}")
        print(f"{r['op']:34} {'x'.join(map(str, r['shape'])):>12} {r['K']:>2} {r['ms']:8.3f} "
              f"{r.get('GB/s', float('nan')):7.0f} {r.get('of_copy', float('nan')):5.0%} "
              f"{r.get('torch_ms', float('nan')):9.3f} {r.get('speedup', float('nan')):7.1f}x"
              f"{'  (' + ', '.join(notes) + ')' if notes else ''}")
    if args.json:
        write_file_atomic(Path(args.json), json.dumps(
            {"gpu": gpu, "copy_GBps": copy, "rows": rows}, indent=1).encode())


if __name__ == "__main__":
    main()
