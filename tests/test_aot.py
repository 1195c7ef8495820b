"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (the interpreter is more lenient)."""

import json
import os
import subprocess
import sys

import pytest


def test_all_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "xwin.kernels.aot", "80", "90"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads(res.stdout)
    names = {e["kernel"].split()[0] for e in report}
    assert {"siddon", "trilinear", "fdk_backproject", "siddon_grad", "trilinear_grad"} <= names
    assert {e["cc"] for e in report} == {80, 90}
    from xwin.kernels.aot import kernel_specs

    assert len(report) == 2 * len(kernel_specs())          # every variant of every kernel module, both targets
    assert all(e["ok"] for e in report)
    # no register spills to local memory in any variant
    spills = [e for e in report if e.get("resources") and "LOCAL:0" not in e["resources"]]
    assert not spills, spills
