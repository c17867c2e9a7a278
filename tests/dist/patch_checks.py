"""torchrun worker for tests/test_megatron_patches.py: what init_distributed leaves patched, on the CPU.

Records which megatron-core / torch attributes are solo-megatron's after `init_distributed`, whether
two more `megatron_patches.apply(cpu=True)` calls change anything, and what real megatron-core
functions that ask for CUDA tensors and the CUDA RNG do now; results to JSON. The test hides any
GPU (CUDA_VISIBLE_DEVICES=""), so the CPU backend is what is checked on every machine.
"""

import argparse
import io
import json
import pickle

import psutil
import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import random as mcore_random
from torch.distributed.checkpoint import default_planner, filesystem
from torch.overrides import _get_current_function_mode_stack

import megatron_patches
from megatron_patches import cpu, optimizer_state, safe_load, writer_queue
from solo.distributed import destroy_distributed, init_distributed


def patched_attributes() -> dict:
    """Every attribute a patch replaces, as the object it holds now."""
    return {
        "torch.cuda.current_device": torch.cuda.current_device,
        "torch.cuda.synchronize": torch.cuda.synchronize,
        "torch.cuda.get_rng_state": torch.cuda.get_rng_state,
        "torch.cuda.set_rng_state": torch.cuda.set_rng_state,
        "torch.cuda.manual_seed": torch.cuda.manual_seed,
        "mcore_random._get_cuda_rng_state": mcore_random._get_cuda_rng_state,
        "mcore_random._set_cuda_rng_state": mcore_random._set_cuda_rng_state,
        "DistributedOptimizer.load_state_dict": DistributedOptimizer.load_state_dict,
        "DistributedOptimizer._set_main_param_and_optimizer_states":
            DistributedOptimizer._set_main_param_and_optimizer_states,
        "filesystem.pickle": filesystem.pickle,
        "DefaultLoadPlanner.load_bytes": default_planner.DefaultLoadPlanner.load_bytes,
        "filesystem_async._get_write_results_queue": filesystem_async._get_write_results_queue,
    }


def ours(attributes: dict) -> dict:
    expected = {
        "mcore_random._get_cuda_rng_state": cpu._get_rng_state,
        "mcore_random._set_cuda_rng_state": cpu._set_rng_state,
        "torch.cuda.get_rng_state": cpu._get_rng_state,
        "torch.cuda.set_rng_state": cpu._set_rng_state,
        "torch.cuda.manual_seed": cpu._manual_seed,
        "DistributedOptimizer.load_state_dict": optimizer_state._load_state_dict_with_own_steps,
        "DistributedOptimizer._set_main_param_and_optimizer_states": optimizer_state._set_states_keeping_step,
        "DefaultLoadPlanner.load_bytes": safe_load._load_bytes_weights_only,
        "filesystem_async._get_write_results_queue": writer_queue._in_process_results_queue,
    }
    flags = {name: attributes[name] is fn for name, fn in expected.items()}
    flags["filesystem.pickle"] = isinstance(attributes["filesystem.pickle"], safe_load._RestrictedPickle)
    return flags


class Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('payload ran')",))


def megatron_core_on_the_cpu() -> dict:
    results = {}
    # clip_grads allocates its norm buffers with device='cuda' and all-reduces them over the world.
    results["grad_norm"] = get_grad_norm_fp32([torch.tensor([3.0, 4.0])], norm_type=2)
    results["grad_norm_inf"] = get_grad_norm_fp32([torch.tensor([3.0, -4.0])], norm_type=float("inf"))
    # The model-parallel RNG tracker saves, seeds and restores "the CUDA RNG".
    tracker = mcore_random.CudaRNGStatesTracker()
    tracker.add("check", 3)
    torch.manual_seed(5)
    with tracker.fork("check"):
        forked = torch.rand(4)
    after_fork = torch.rand(4)
    results["fork_draws_from_its_seed"] = torch.equal(forked, torch.rand(4, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(5)
    results["fork_restores_the_default_stream"] = torch.equal(after_fork, torch.rand(4))
    results["current_device"] = str(torch.cuda.current_device())
    results["device_of_cuda_request"] = str(torch.zeros(2, device="cuda").device)
    results["type_of_cpu_float"] = torch.zeros(2).type()
    # The checkpoint writer's results queue, as the first save gets it: no process of its own
    # (megatron-core's spawned Manager re-imports torch and megatron-core; a forked one would
    # outlive a killed trainer holding its save-dir lock).
    before = {c.pid for c in psutil.Process().children()}
    queue = filesystem_async._get_write_results_queue()
    queue.put("result")
    results["queue_roundtrip"] = queue.get(timeout=30)
    started = [c for c in psutil.Process().children() if c.pid not in before]
    results["queue_processes"] = [" ".join(c.cmdline()) for c in started]
    try:
        filesystem.pickle.load(io.BytesIO(pickle.dumps(Payload())))
        results["metadata_payload"] = "loaded"
    except pickle.UnpicklingError as e:
        results["metadata_payload"] = str(e)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {"cuda_available": torch.cuda.is_available(), "ours_before": ours(patched_attributes())}
    init_distributed(seed=3)
    after_init = patched_attributes()
    results["ours_after_init"] = ours(after_init)
    results["cpu_is_applied"] = cpu._applied
    results["modes_after_init"] = len(_get_current_function_mode_stack())
    megatron_patches.apply(cpu=True)
    megatron_patches.apply(cpu=True)
    again = patched_attributes()
    results["changed_by_apply_again"] = sorted(name for name in after_init if again[name] is not after_init[name])
    results["modes_after_apply_again"] = len(_get_current_function_mode_stack())
    results.update(megatron_core_on_the_cpu())
    destroy_distributed()
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
