"""Ahead-of-time compile check of every Triton kernel for named GPU targets, without a GPU.

The Triton interpreter accepts code that the GPU compiler rejects, so the test suite compiles every kernel
variant for sm_80 and sm_90 with this module (in a process where ``TRITON_INTERPRET`` is not set) and
reads registers / spills from the cubin.

    python -m xwin.kernels.aot            # prints a JSON report, exit status 1 if any variant fails

A kernel module takes part by being listed in ``KERNEL_MODULES`` and defining ``aot_specs()``: a list of
dicts with ``name``, ``fn``, ``signature`` (argument name -> Triton type string, e.g. ``"*fp32"``,
``"i32"``), ``constexprs`` (name -> value) and optionally ``num_warps``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile

__all__ = ["kernel_specs", "compile_spec", "main"]


#: the modules holding Triton kernels; each defines ``aot_specs()``
KERNEL_MODULES = ("siddon", "trilinear", "fdk", "geomgrad_triton")


def _with_size_one(specs):
    """Triton's JIT turns integer arguments equal to 1 into constexprs (a 1-view geometry, a one-slice
    volume, a single detector row): add that specialisation of every int32, float32 variant."""
    extra = []
    for base in specs:
        sig = base["signature"]
        if base["constexprs"].get("INT64") or next(iter(sig.values())) != "*fp32":
            continue
        ints = [k for k, t in sig.items() if t == "i32"]
        extra.append(dict(base, name=base["name"] + " all-sizes=1",
                          signature={k: t for k, t in sig.items() if k not in ints},
                          constexprs=dict(base["constexprs"], **{k: 1 for k in ints})))
    return specs + extra


def kernel_specs():
    specs = []
    for mod in KERNEL_MODULES:
        specs.extend(importlib.import_module(f"{__package__}.{mod}").aot_specs())
    return _with_size_one(specs)


def compile_spec(spec, cc: int):
    """Compile one kernel variant for compute capability ``cc`` (e.g. 80, 90); returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = dict(spec["signature"])
    for k in spec["constexprs"]:
        sig[k] = "constexpr"
    src = triton.compiler.ASTSource(fn=spec["fn"], signature=sig, constexprs=dict(spec["constexprs"]))
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": spec.get("num_warps", 4)})


def resource_usage(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60)
        return " ".join(l.strip() for l in out.stdout.splitlines() if "REG:" in l)
    finally:
        os.unlink(f.name)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    ccs = [int(a) for a in (argv if argv is not None else sys.argv[1:])] or [80, 90]
    report, failed = [], 0
    for spec in kernel_specs():
        for cc in ccs:
            entry = {"kernel": spec["name"], "cc": cc}
            try:
                k = compile_spec(spec, cc)
                entry.update(ok="cubin" in k.asm and len(k.asm["cubin"]) > 0, resources=resource_usage(k.asm["cubin"]))
            except Exception as exc:  # report every failing variant, not just the first
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            failed += not entry["ok"]
            report.append(entry)
    print(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
