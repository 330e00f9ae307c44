"""How often a fresh process computes the shipped data wrongly, with and without
engine.reproducibility.warm_up_vector_math (see its comment: oneMKL's first-call race,
pytorch/pytorch#188792).

    python bench/vml_race.py [--processes 100] [--parallel 1]

Each child is a fresh Python process with torch's default thread count; it builds
sin(4πx) and sin(10πx) for the shipped task's 10,000 points in float32, as
util.load_data does, and compares them with float64. A child is "wrong" when any point
is off by more than 1e-5 (float32 rounding is below 1e-6 here). Children with and without
the warm-up are interleaved, `--parallel` at a time, so both see the same load.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import math, sys
sys.path.insert(0, {root!r})
import torch
if {warm}:
    from engine import reproducibility  # imported, it warms up (and a second call costs nothing)
    reproducibility.warm_up_vector_math()
x = torch.rand(10_000, 1, generator=torch.Generator().manual_seed(0))
wrong = 0
for k in (4, 10):
    error = (torch.sin(k * math.pi * x).double() - torch.sin(k * math.pi * x.double())).abs()
    wrong += int((error > 1e-5).sum())
print(wrong)
"""


def child(warm: bool) -> int:
    code = CHILD.format(root=str(ROOT), warm=warm)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=100, help="children of each kind")
    parser.add_argument("--parallel", type=int, default=1,
                        help="children running at once (the race shows most on an idle machine)")
    args = parser.parse_args()
    kinds = [False, True] * args.processes  # interleaved
    with ThreadPoolExecutor(args.parallel) as pool:
        wrong_points = list(pool.map(child, kinds))
    for warm in (False, True):
        counts = [w for w, k in zip(wrong_points, kinds) if k == warm]
        bad = [w for w in counts if w]
        label = "with warm_up_vector_math" if warm else "without (torch as it is)"
        print(f"{label:26s}: {len(bad)} of {len(counts)} processes wrong"
              + (f" (median {sorted(bad)[len(bad) // 2]} wrong points of 20,000)" if bad else ""))


if __name__ == "__main__":
    main()
