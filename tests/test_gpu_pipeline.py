"""The pipeline on a GPU: kernels and ops on CUDA give the CPU reference path's saliency; bf16 end to end."""
import json

import pytest
import torch
from click.testing import CliRunner

from surgery.cli import main
from surgery.data import SPLITS, load_splits
from surgery.distributed import checkpoint_llm, checkpoint_vision
from surgery.models import load
from surgery.saliency import collect

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def collected(model_dir, data, device, checkpointed=False):
    adapter = load(str(model_dir), device=device)
    params = adapter.scope_params("mlp")
    adapter.train_only(params)
    if checkpointed:
        checkpoint_llm(adapter)
        checkpoint_vision(adapter)
    return collect(adapter, load_splits(*data), params, batch_size=4, progress=False)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_cuda_collect_matches_cpu_reference(name, tiny_dirs, data):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu, gpu = collected(tiny_dirs[name], data, "cpu"), collected(tiny_dirs[name], data, "cuda")
    for s in SPLITS:
        for layer, ref in cpu.stats[s].items():
            got = gpu.stats[s][layer].cpu()
            torch.testing.assert_close(got[:3], ref[:3], rtol=1e-4, atol=1e-3)
            assert (got[3] - ref[3]).abs().max() <= 2  # a value at 0 may flip sign under other rounding
        for n, ref in cpu.fisher[s].items():
            torch.testing.assert_close(gpu.fisher[s][n].cpu(), ref, rtol=1e-3, atol=1e-9)


def test_prune_and_mask_bf16_on_cuda(tiny_dirs, data, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune-and-mask", "--model", str(tiny_dirs["tiny-llava"]), "--forget",
                                    str(data[0]), "--retain", str(data[1]), "--out", str(out), "--device", "cuda",
                                    "--steps", "3", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["dtype"] == "bfloat16" and report["environment"]["gpu"]
    # the fp32 checkpoint's weights the run left alone stay fp32, bit for bit; what it trained is bf16
    assert report["checkpoint"]["saved_dtypes"] == ["BF16", "F32"] and report["checkpoint"]["restored"] > 0
    assert all(torch.isfinite(torch.tensor(h["loss_rvqa"])) for h in report["losses"])


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_cuda_collect_with_checkpointing_counts_each_batch_once(name, tiny_dirs, data):
    """On CUDA the recompute runs on autograd's device thread: the statistics hooks must still see it as a recompute."""
    plain, checkpointed = (collected(tiny_dirs[name], data, "cuda", c) for c in (False, True))
    for s in SPLITS:
        assert checkpointed.tokens[s] == plain.tokens[s], s
        for layer, ref in plain.stats[s].items():
            torch.testing.assert_close(checkpointed.stats[s][layer], ref, rtol=1e-5, atol=1e-6)  # twice: 2x
        for n, ref in plain.fisher[s].items():
            torch.testing.assert_close(checkpointed.fisher[s][n], ref, rtol=1e-5, atol=1e-12)
