"""vmsuper's benchmark harness: `python -m benchmarks` (or `./dev bench`).

It builds a native C plugin and a C reference, runs real VMs through `vmsuper run`, and
reports exit round trips, async and ioeventfd writes, start-up times and memory, each with and
without `[vm] low_latency`; round trips and CPU profiles also along the exit paths other than
the default one (`context.PATHS`). docs/performance.md explains every figure.
"""
