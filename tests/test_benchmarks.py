"""The documented benchmark commands run (tiny sizes here; the numbers come from full runs)."""
import os
import subprocess
import sys

from conftest import ROOT


def test_nixl_benchmark_runs_and_prints_its_ratio_lines():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_nixl.py"),
                        "--sizes", "2MiB", "--total", "16MiB", "--repeat", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for op in ("WRITE", "READ"):
        assert f"MEMKV {op:5} {'2MiB':>6}: " in r.stdout, r.stdout
    assert r.stdout.count("x raw memkv client") == 2
