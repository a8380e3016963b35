"""benchmarks/bench_distributed.py at toy size: both families, VKD and full-model GA_Diff, one JSON row per mode."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_distributed.py"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_bench_distributed_runs_vkd_and_ga_diff(arch, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_distributed as bench
    finally:
        sys.path.pop(0)
    adapter = bench.build(arch, "tiny", "cpu", torch.float32, seed=0)
    mlp = sum(p.numel() for p in adapter.scope_params("mlp").values())
    everything = sum(p.numel() for p in adapter.model.parameters())
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--arch", arch, "--size", "tiny", "--modes", "plain,ga_diff",
                          "--steps", "1", "--rows", "4", "--json", str(out)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert (rows["plain"]["method"], rows["plain"]["scope"], rows["plain"]["trainable_weights"]) == ("vkd", "mlp", mlp)
    assert (rows["ga_diff"]["method"], rows["ga_diff"]["scope"]) == ("ga_diff", "full")
    assert rows["ga_diff"]["trainable_weights"] == everything
    assert all(r["step_s"] > 0 and r["peak_bytes"] > 0 for r in rows.values())
    assert "| ga_diff | ga_diff (full) |" in res.stdout
