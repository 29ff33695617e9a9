"""vmsuper's benchmark harness: `python -m benchmarks` (or `./dev bench`).

It builds a native C plugin and a C reference, runs real VMs through `vmsuper run`, and
reports exit round trips, async and ioeventfd writes, start-up times and memory, each with and
without `[vm] low_latency`. docs/performance.md explains every figure.
"""
