"""CPU backend: run megatron-core's real TP/DP/distributed-optimizer code on gloo ranks.

Written against megatron-core 0.16.1 and torch 2.13 (CPU build). megatron-core assumes CUDA in a
handful of places that have nothing to do with the maths; this module redirects exactly those to
the CPU so that tests and the CPU demo exercise the same code paths as a GPU cluster:

* tensors created with ``device='cuda'`` or ``device=torch.cuda.current_device()`` (the optimizer's
  ``_dummy_overflow_buf``, clip_grads' norm buffers, all-gather outputs in tensor_parallel): a
  ``TorchFunctionMode`` rewrites any CUDA device argument (and ``Tensor.cuda()``) to the CPU;
* ``torch.cuda.current_device()`` returns the CPU device: megatron-core passes it as ``device=``,
  also inside autograd backward functions, where torch-function modes are not active;
* ``Tensor.type()`` checks for ``'torch.cuda.FloatTensor'`` (``distrib_optimizer.py``,
  ``clip_grads.py``): a CPU tensor answers with the CUDA name of its dtype;
* the CUDA RNG (``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and
  ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state``, used by the model-parallel
  RNG tracker) is the CPU default generator, which is the one CPU kernels such as dropout draw from;
* ``torch.cuda.synchronize`` is a no-op (dist_checkpointing's async filesystem writer calls it).

Applied by ``megatron_patches.apply(cpu=True)`` (``solo.distributed.init_distributed`` on a machine
without a GPU); only when no GPU is used (``apply()`` refuses on a machine with CUDA). It is
idempotent and process-wide; worker processes started with ``spawn`` must apply it again.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_applied = False

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):  # megatron passes torch.cuda.current_device()
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Turns every request for a CUDA tensor into a CPU tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that one calls torch.cuda.manual_seed_all, i.e. back into us.
    torch.default_generator.manual_seed(seed)


def apply() -> None:
    """Redirect megatron-core's CUDA-only calls to the CPU for this process."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_patches.cpu is for machines without a GPU; CUDA is available here")

    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.random.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.random.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = _manual_seed
    mcore_random._get_cuda_rng_state = _get_rng_state
    mcore_random._set_cuda_rng_state = _set_rng_state

    # Entered for the life of the process: the mode is the process-wide CUDA -> CPU redirection.
    _CudaToCpu().__enter__()
    _applied = True

