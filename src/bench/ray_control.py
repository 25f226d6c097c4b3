"""Ray's side of `shoal bench control`: synchronous actor calls per second, and the time from
creating an actor to its first method call returning. Prints one JSON object on stdout.

Usage: python -c "$(cat ray_control.py)" CALLS WARMUP LAUNCHES GAP_S CPUS CAP_S
(CALLS timed calls, or as many as fit in CAP_S seconds; the warm-up gets a fifth of that.)
"""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402


def main():
    calls, warmup, launches = (int(a) for a in sys.argv[1:4])
    gap = float(sys.argv[4])
    cpus = int(sys.argv[5])
    cap = float(sys.argv[6])
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Echo:
        def ping(self):
            return 1

    # Synchronous round trips to one live actor, after warm-up.
    a = Echo.remote()

    def timed(n, limit):
        t = time.perf_counter()
        done = 0
        while done < n and time.perf_counter() - t < limit:
            ray.get(a.ping.remote())
            done += 1
        return done, done / (time.perf_counter() - t)

    timed(warmup, cap / 5)
    calls, calls_per_s = timed(calls, cap)
    ray.kill(a)

    # Creating an actor to its first method call returning, one at a time.
    start_ms = []
    for _ in range(launches):
        time.sleep(gap)
        t = time.perf_counter()
        b = Echo.remote()
        ray.get(b.ping.remote())
        start_ms.append((time.perf_counter() - t) * 1e3)
        ray.kill(b)
    ray.shutdown()
    print(
        json.dumps(
            {
                "ray": ray.__version__,
                "calls": calls,
                "calls_per_s": calls_per_s,
                "actor_start_ms": start_ms,
                "actor_start_median_ms": statistics.median(start_ms) if start_ms else None,
            }
        )
    )


if __name__ == "__main__":
    main()
