"""Speed of the ToyNORB renderer on this machine: one stereo view with its 6 lightings.

Run: ``python benchmarks/bench_toynorb.py [--repeats 3]``.

Times ``render_views`` (rasterise both cameras once, shade 6 lightings, 96x96 with 3x3
supersampling) for one training object of each category over 6 views, best of
``--repeats`` (``torch.utils.benchmark.Timer``, one process). The full dataset is 8,100
such views (5 categories x 10 instances x 9 elevations x 18 azimuths). The CPU may be
shared, so the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import platform

from torch.utils import benchmark

from capsnet.data.toynorb import CATEGORIES, build_object, render_views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (best)")
    args = parser.parse_args()
    views = [(30, 0), (40, 60), (50, 120), (60, 180), (70, 240), (45, 300)]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{platform.processor() or platform.machine()}, load average {load}")
    total = 0.0
    for category, name in enumerate(CATEGORIES):
        mesh = build_object(category, 4)
        timer = benchmark.Timer(
            stmt="render_views(mesh, views)",
            globals={"render_views": render_views, "mesh": mesh, "views": views},
        )
        best = min(timer.timeit(1).mean for _ in range(args.repeats)) / len(views)
        total += best
        print(
            f"{name:9s} {mesh.faces.shape[0]:5d} triangles  {best * 1000:6.1f} ms per stereo view"
        )
    mean = total / len(CATEGORIES)
    print(
        f"mean {mean * 1000:.1f} ms per view: {8100 * mean / 60:.1f} min for 8,100 views, one core"
    )


if __name__ == "__main__":
    main()
