"""megatron_patches.apply: every patch in one idempotent call, made by init_distributed."""

import json
import subprocess
import sys

import pytest

from tests.torchrun import torchrun

PATCHED = ["DefaultLoadPlanner.load_bytes", "DistributedOptimizer._set_main_param_and_optimizer_states",
           "DistributedOptimizer.load_state_dict", "filesystem.pickle", "filesystem_async._get_write_results_queue",
           "mcore_random._get_cuda_rng_state",
           "mcore_random._set_cuda_rng_state", "torch.cuda.get_rng_state", "torch.cuda.manual_seed",
           "torch.cuda.set_rng_state"]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("patches") / "checks.json"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU backend is what is checked, on any machine
        torchrun("patch_checks.py", 1, "--out", out, fresh=True)
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_init_distributed_applies_every_patch(checks):
    assert not checks["cuda_available"]
    assert sorted(checks["ours_before"]) == PATCHED
    assert not any(checks["ours_before"].values()), checks["ours_before"]  # the control: megatron-core's own
    assert checks["ours_after_init"] == dict.fromkeys(PATCHED, True)
    assert checks["cpu_is_applied"] and checks["current_device"] == "cpu"


@pytest.mark.distributed
def test_apply_again_changes_nothing(checks):
    assert checks["changed_by_apply_again"] == []
    assert checks["modes_after_init"] == checks["modes_after_apply_again"] == 1  # one CUDA -> CPU mode, not stacked


@pytest.mark.distributed
def test_megatron_core_cuda_calls_run_on_the_cpu(checks):
    assert checks["grad_norm"] == pytest.approx(5.0) and checks["grad_norm_inf"] == pytest.approx(4.0)
    assert checks["fork_draws_from_its_seed"] and checks["fork_restores_the_default_stream"]
    assert checks["device_of_cuda_request"] == "cpu"
    assert checks["type_of_cpu_float"] == "torch.cuda.FloatTensor"
    assert "refusing to unpickle builtins.exec" in checks["metadata_payload"]


@pytest.mark.distributed
def test_the_checkpoint_writers_results_queue_starts_no_process(checks):
    # megatron-core spawns a Manager for it: a fresh interpreter that re-imports torch and
    # megatron-core (~12 s on 2 cores) before every training process's first save.
    assert checks["queue_roundtrip"] == "result"
    assert checks["queue_processes"] == []


def test_importing_solo_checkpoint_alone_makes_checkpoint_loading_safe():
    # A reader that never calls init_distributed (its own process groups, or none) is protected too.
    code = (
        "import io, pickle\n"
        "import solo.checkpoint\n"
        "from torch.distributed.checkpoint import filesystem\n"
        "class Payload:\n"
        "    def __reduce__(self):\n"
        "        return (exec, ('raise SystemExit(\"payload ran\")',))\n"
        "try:\n"
        "    filesystem.pickle.load(io.BytesIO(pickle.dumps(Payload())))\n"
        "except pickle.UnpicklingError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refusing to unpickle builtins.exec" in out.stdout, out.stdout + out.stderr[-3000:]
