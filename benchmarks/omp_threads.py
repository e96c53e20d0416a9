"""OpenMP teams and threads: why `qkv serve` loads its models on a thread of their own.

    python benchmarks/omp_threads.py [--threads N] [--repeats 5]

Times a short parallel torch op (an elementwise multiply of 200k floats, the size of a small
model's activations) on a worker thread in two fresh processes: one whose main thread never ran a
multi-threaded op (what `qkv.threads.in_own_thread` leaves behind), and one whose main thread ran
one first, so that it holds an OpenMP team. Also the same op on the main thread. Prints each time
and the ratio; the process per case keeps the OpenMP state of one from leaking into the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, threading, time
import torch
threads, repeats, main_first = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
x = torch.randn(200_000)
def best():
    for _ in range(50):
        x.mul(2.0)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(2000):
            x.mul(2.0)
        runs.append((time.perf_counter() - start) / 2000)
    return min(runs)
torch.set_num_threads(threads if main_first else 1)
main = best()
out = {}
def worker():
    torch.set_num_threads(threads)
    out["worker"] = best()
t = threading.Thread(target=worker)
t.start()
t.join()
print(json.dumps({"main": main, "worker": out["worker"]}))
"""


def run(threads: int, repeats: int, main_first: bool) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(repeats), "1" if main_first else "0"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    clean = run(args.threads, args.repeats, main_first=False)
    held = run(args.threads, args.repeats, main_first=True)
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}; x.mul(2.0) on 200k floats, best of "
          f"{args.repeats} x 2000")  # fmt: skip
    print(f"main thread (its own team):                  {held['main'] * 1e6:7.1f} us")
    print(f"worker thread, main thread holds no team:    {clean['worker'] * 1e6:7.1f} us")
    print(f"worker thread, main thread holds a team:     {held['worker'] * 1e6:7.1f} us")
    print(f"slowdown from the main thread's team: {held['worker'] / clean['worker']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
