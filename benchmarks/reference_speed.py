"""Time the torch reference alone (forward and adjoint, Siddon and trilinear) on one CT, and print checksums.

A quick A/B tool for changes to ``kernels/reference.py``: run it on two revisions; equal checksums mean the
same numbers (to the printed digits), the medians compare the speed. float32, 1 torch thread by default.

    python benchmarks/reference_speed.py [--ct real|sample|PATH] [--size 200] [--reps 3] [--threads 1]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # passive OpenMP waiting, before torch is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", default="auto", help="real | sample | auto | a path (as drr_speed.py)")
    ap.add_argument("--size", type=int, default=200, help="detector size (pixels of 200/size·2 mm)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from xwin.kernels import backproject, project

    vol, src = C.load_ct(args.ct)
    g = C.make_geometry(vol, args.size, 2.0 * 200 / args.size, 1)
    aff = torch.tensor(vol.affine)
    w = torch.rand(1, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"{src['name']} {vol.spatial_shape}, detector {args.size}², {args.threads} thread(s), float32, median of {args.reps}")
    for method in ("siddon", "trilinear"):
        tf, ta = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            p = project(vol.data, g, affine=aff, method=method)
            tf.append(time.perf_counter() - t)
            t = time.perf_counter()
            v = backproject(w, g, vol.spatial_shape, affine=aff, method=method)
            ta.append(time.perf_counter() - t)
        print(f"{method:9s} forward {C.median(tf):.2f} s, adjoint {C.median(ta):.2f} s, "
              f"checksums {p.double().sum().item():.6f} {v.double().sum().item():.6f}")


if __name__ == "__main__":
    sys.exit(main())
