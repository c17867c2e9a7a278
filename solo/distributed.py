"""Process-group set-up shared by training, tests and conversion.

torch.distributed does the communication (NCCL on GPU, gloo on CPU); megatron-core's
`parallel_state` builds the tensor/pipeline/data-parallel groups on top. `init_distributed` first
applies `megatron_patches` (with its CPU backend on a machine without a GPU, so the same
megatron-core code runs on gloo ranks).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's --master_port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Apply megatron_patches, join the torchrun world (or a world of one), build megatron-core's groups, seed RNGs.

    The model-parallel RNG tracker gets the same seed on every rank of a pipeline stage so that
    `use_cpu_initialization` gives TP-independent weights; pipeline stage k adds 100 * k.
    """
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mcore_tp

    import megatron_patches

    megatron_patches.apply(cpu=not use_gpu())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        if use_gpu():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(
            backend="nccl" if use_gpu() else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = dist.get_world_size()
    model_parallel = tensor_parallel * pipeline_parallel * context_parallel
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = "
            f"{tensor_parallel} x {pipeline_parallel} x {context_parallel}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            context_parallel_size=context_parallel,
        )
    # As Megatron-LM's `_set_random_seed`: every pipeline stage its own seed (its layers are other
    # layers), the same across tensor and data parallelism.
    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    mcore_tp.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu() else torch.device("cpu")
