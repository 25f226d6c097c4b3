"""Times numpy's matmul (its BLAS) for the sizes given on the command line; prints one JSON line.

Used by `shoal bench kernels` as the peer measured in the same run.
"""
import json
import sys
import time

import numpy as np


def best_time(fn, min_reps=3, min_seconds=0.5):
    fn()  # warm-up
    best = float("inf")
    reps = 0
    start = time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def blas_name():
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f'{blas.get("name", "?")} {blas.get("version", "")}'.strip()
    except Exception:  # older numpy: no dict mode
        return "unknown"


def main():
    sizes = [int(s) for s in sys.argv[1:]]
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        t = best_time(lambda: a @ b)
        rows.append({"n": n, "seconds": t, "gflops": 2.0 * n**3 / t / 1e9})
    print(json.dumps({"numpy": np.__version__, "blas": blas_name(), "rows": rows}))


if __name__ == "__main__":
    main()
