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


def test_live_at_peak_replays_an_allocator_trace():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from bench_distributed import live_at_peak
    finally:
        sys.path.pop(0)
    torch_frame = {"filename": "/opt/torch/venv/torch/nn/functional.py", "line": 9, "name": "linear"}

    def alloc(addr, size, filename=None):
        frames = [torch_frame] + ([{"filename": filename, "line": 7, "name": "forward"}] if filename else [])
        # a frame of transformers' in a venv whose path holds "/torch/" counts; only torch's own files are skipped
        return {"action": "alloc", "addr": addr, "size": size, "frames": frames + [
            {"filename": "/opt/torch/venv/transformers/loop.py", "line": 1, "name": "outer"}]}

    def free(addr, size):
        return [{"action": "free_requested", "addr": addr, "size": size},
                {"action": "free_completed", "addr": addr, "size": size}]

    trace = [*free(99, 40),  # memory allocated before the recording (last step's gradients), freed first: -40
             alloc(1, 100, "/opt/torch/venv/transformers/modeling_a.py"), alloc(2, 50, "/m/modeling_b.py"),
             *free(1, 100),
             alloc(1, 120, "/opt/torch/venv/transformers/modeling_a.py"), alloc(3, 30),
             alloc(4, 5, "/m/modeling_b.py"),  # the peak: 205 allocated here and live, net 165
             *free(3, 30), *free(98, 10),  # earlier memory again, after the peak
             alloc(5, 40, "/m/modeling_c.py")]  # net 165 again (the first peak is kept); 215 without the frees
    out = live_at_peak(trace, top=3, skip="/opt/torch/venv/torch")
    assert (out["net_peak_bytes"], out["earlier_freed_bytes"], out["transient_peak_bytes"], out["event"]) == \
        (165, 40, 205, 8)
    assert out["by_place"] == [{"place": "modeling_a.py:7 forward", "bytes": 120},
                               {"place": "modeling_b.py:7 forward", "bytes": 55},
                               {"place": "loop.py:1 outer", "bytes": 30}]  # called from transformers' loop.py only
    assert out["other_bytes"] == 0 and live_at_peak(trace, top=1, skip="/opt/torch/venv/torch")["other_bytes"] == 85
