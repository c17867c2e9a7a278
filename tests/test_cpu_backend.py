"""megatron_patches.cpu: megatron-core's real TP/DP/distributed-optimizer code on gloo ranks."""

import json
import math

import pytest

from tests.torchrun import torchrun


@pytest.mark.distributed
def test_tp2_dp2_distributed_optimizer_matches_single_rank(tmp_path):
    single, parallel = tmp_path / "tp1dp1.json", tmp_path / "tp2dp2.json"
    torchrun("gpt_parity.py", 1, "--tp", "1", "--out", single)
    torchrun("gpt_parity.py", 4, "--tp", "2", "--out", parallel)
    a, b = json.loads(single.read_text()), json.loads(parallel.read_text())
    layout = ("world_size", "tensor_parallel_size", "data_parallel_size")
    assert [a[k] for k in layout] == [1, 1, 1], a
    assert [b[k] for k in layout] == [4, 2, 2], b

    losses = a["train_losses"]
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses}"
    assert a["heldout_loss"] < losses[0]
    single_rank, four_ranks = losses + [a["heldout_loss"]], b["train_losses"] + [b["heldout_loss"]]
    for step, (x, y) in enumerate(zip(single_rank, four_ranks, strict=True)):
        assert math.isclose(x, y, rel_tol=1e-5), f"step {step}: TP1xDP1 {x} != TP2xDP2 {y}"


def test_redirection_turns_cuda_requests_into_cpu_tensors():
    import subprocess
    import sys

    code = (
        "import torch\n"
        "import megatron_patches\n"
        "megatron_patches.apply(cpu=True)\n"
        "t = torch.zeros(2, device='cuda')\n"
        "u = torch.empty(3, device=torch.cuda.current_device())\n"
        "assert t.device.type == 'cpu' and u.device.type == 'cpu'\n"
        "assert t.type() == 'torch.cuda.FloatTensor' and t.cuda() is t\n"
        "torch.cuda.manual_seed(3); a = torch.rand(2)\n"
        "torch.cuda.set_rng_state(torch.cuda.get_rng_state()); torch.manual_seed(3); b = torch.rand(2)\n"
        "assert torch.equal(a, b)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]
