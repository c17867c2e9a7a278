"""Shared by both conversion directions: errors, staged output folders, the one-process world, the
empty model. megatron-core builds the model (`SOLOModel`, local spec) and the process groups."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from solo.config import ModelConfig
from solo.fileio import replace_durably, temp_path
from solo.tokenizer import VOCAB_SIZE

SOLO_VOCAB = VOCAB_SIZE  # the HF checkpoints' vocabulary (no padding rows)


class ConversionError(ValueError):
    """Bad input to a conversion; nothing has been written when it is raised."""


def check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConversionError(f"{output}: already exists; choose a new output folder")
    if not output.parent.is_dir():
        raise ConversionError(f"{output.parent}: the output's parent folder does not exist")


@contextlib.contextmanager
def staged_output(output: Path):
    """A temporary folder beside `output`, renamed to `output` only if the block succeeds."""
    tmp = Path(f"{temp_path(output)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_durably(tmp, output)


@contextlib.contextmanager
def single_process_world(seed: int):
    """A world of one (CPU backend applied where there is no GPU), torn down afterwards if ours."""
    import torch.distributed as dist

    from solo.distributed import destroy_distributed, init_distributed

    ours = not dist.is_initialized()
    if not ours and dist.get_world_size() != 1:
        raise ConversionError("run solo-convert as a plain command (one process), not under torchrun")
    init_distributed(tensor_parallel=1, seed=seed)
    try:
        yield
    finally:
        if ours:
            destroy_distributed()


def empty_model(model: ModelConfig, dtype: torch.dtype):
    """A TP=1 SOLOModel on the CPU whose weights are uninitialized (every one is copied in)."""
    from solo.config import ParallelConfig
    from solo.model import SOLOModel, transformer_config

    config = transformer_config(model, ParallelConfig(), bf16=dtype == torch.bfloat16)
    config.params_dtype = dtype
    config.perform_initialization = False  # skip drawing 7B random numbers that are overwritten
    # The local spec, whatever the machine: the weights only pass through. Its checkpoint keys for
    # the norms are already the TE spec's fused names (megatron-core maps them in
    # sharded_state_dict), as for any checkpoint trained on the CPU.
    return SOLOModel(config, model, "local", pre_process=True, post_process=True)
