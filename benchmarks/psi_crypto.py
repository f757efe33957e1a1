"""Benchmark the PSI crypto: per-op costs of the libsodium calls, the GIL check, and a local run of both sides.

Run with `python -m benchmarks.psi_crypto --ids 100000`. Three parts, all measured in this one run:
1. per-op costs (one core, a Python loop through rbcl): SHA-512, hash-to-group, scalar multiplication,
   point validation;
2. whether rbcl releases the GIL: the same multiplications on 1 and 2 threads;
3. `--ids` x `--ids` ids with 50% overlap through two `PsiParty`s in this process, once per `--threads`,
   timed per phase and per party. Both parties share this machine's cores here, so a party's ids/s is its ids
   over its own phases' time (what it would get with the cores to itself), not over the whole run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import time
from collections.abc import Callable

import numpy as np
import rbcl

from vfl_cli.psi import PsiParty, psi_tag
from vfl_cli.psi.group import parallel_map

TAG = psi_tag("bench0123456789a")


def per_op_us(fn: Callable[[bytes], object], inputs: list[bytes]) -> float:
    started = time.perf_counter()
    for x in inputs:
        fn(x)
    return (time.perf_counter() - started) / len(inputs) * 1e6


def op_costs(samples: int) -> tuple[dict[str, float], list[bytes], bytes]:
    digests = [hashlib.sha512(os.urandom(16)).digest() for _ in range(samples)]
    points = [rbcl.crypto_core_ristretto255_from_hash(d) for d in digests]
    k = rbcl.crypto_core_ristretto255_scalar_random()
    costs = {
        "sha512 (tag || id)": per_op_us(lambda d: hashlib.sha512(TAG + d[:16]).digest(), digests),
        "hash-to-group (from_hash)": per_op_us(rbcl.crypto_core_ristretto255_from_hash, digests),
        "scalar multiplication": per_op_us(lambda p: rbcl.crypto_scalarmult_ristretto255(k, p), points),
        "point validation": per_op_us(rbcl.crypto_core_ristretto255_is_valid_point, points),
    }
    return costs, points, k


def threads_rate(points: list[bytes], k: bytes, threads: int) -> tuple[float, float]:
    """Best of 3: (multiplications per second, CPU seconds per wall second: ~threads if they ran in parallel)."""
    best = (0.0, 0.0)
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        parallel_map(lambda p: rbcl.crypto_scalarmult_ristretto255(k, p), points, threads)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = max(best, (len(points) / wall, cpu / wall))
    return best


def as_ids(numbers: np.ndarray) -> np.ndarray:
    return np.char.encode(np.char.add("cust-", numbers.astype(str)), "ascii")  # S [n]: b"cust-123", ...


def local_run(n: int, batch_size: int, threads: int) -> dict[str, dict[str, float]]:
    """n x n ids, half shared; seconds per phase per party, and the intersection size as a check."""
    rng = np.random.default_rng(0)
    universe = rng.permutation(2 * n)[: n + n // 2]  # leader: the first n, follower: the last n (n // 2 shared)
    parties = {
        "leader": PsiParty("leader", as_ids(universe[:n]), TAG, threads=threads),
        "follower": PsiParty("follower", as_ids(universe[-n:]), TAG, threads=threads),
    }
    phases = ("blind own", "reblind peer's", "validate returned", "intersect")
    spent = {role: dict.fromkeys(phases, 0.0) for role in parties}
    kept: dict[str, list[np.ndarray]] = {role: [] for role in parties}
    for sender, receiver in (("leader", "follower"), ("follower", "leader")):
        batches = parties[sender].blinded_batches(batch_size)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            spent[sender]["blind own"] += time.perf_counter() - started
            if batch is None:
                break
            started = time.perf_counter()
            returned = parties[receiver].reblind(batch)
            spent[receiver]["reblind peer's"] += time.perf_counter() - started
            kept[receiver].append(returned)
            started = time.perf_counter()
            parties[sender].add_my_double_blinded(returned)
            spent[sender]["validate returned"] += time.perf_counter() - started
    for role, party in parties.items():
        started = time.perf_counter()
        result = party.intersect(kept[role])
        spent[role]["intersect"] += time.perf_counter() - started
        assert result.size == n // 2, (result.size, n // 2)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=100_000, help="ids per party (half of them shared)")
    parser.add_argument("--batch-size", type=int, default=50_000, help="ids per batch (psi.batch_size)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="blinding threads per party")
    parser.add_argument("--samples", type=int, default=20_000, help="calls per op for the per-op costs")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, rbcl through ctypes, one Python loop per thread")

    costs, points, k = op_costs(args.samples)
    for name, us in costs.items():
        print(f"  {name:<28} {us:6.1f} us/op   ({1e6 / us:>9,.0f} ops/s, one core)")
    per_id = costs["hash-to-group (from_hash)"] + 2 * costs["scalar multiplication"] + 2 * costs["point validation"]
    print(f"  per id per party (from_hash + 2 mult + 2 validations): {per_id:.0f} us -> {1e6 / per_id:,.0f} ids/s/core")

    (one, _), (two, busy) = threads_rate(points, k, 1), threads_rate(points, k, 2)
    verdict = "releases the GIL" if two > 1.5 * one else "does NOT release the GIL (or the cores are busy)"
    print(f"GIL: scalar mult {one:,.0f}/s on 1 thread, {two:,.0f}/s on 2 threads ({two / one:.2f}x, "
          f"{busy:.2f} CPU s per wall s): rbcl {verdict}; load average {os.getloadavg()[0]:.2f}")

    for threads in args.threads:
        started = time.perf_counter()
        spent = local_run(args.ids, args.batch_size, threads)
        wall = time.perf_counter() - started
        print(f"local PSI {args.ids:,} x {args.ids:,} ids (50% overlap), batch {args.batch_size:,}, "
              f"threads {threads}: {wall:.1f} s wall for both parties in one process")
        for role, phases in spent.items():
            total = sum(phases.values())
            detail = ", ".join(f"{name} {s:.1f} s" for name, s in phases.items())
            print(f"  {role:<8} {total:6.1f} s = {args.ids / total:8,.0f} ids/s   ({detail})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process (both parties): {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
