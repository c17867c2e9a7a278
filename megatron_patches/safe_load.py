"""Checkpoint loading without arbitrary pickle (torch 2.13, megatron-core 0.16.1 `torch_dist`).

Why: a checkpoint is a file users download and pass around (the authors' converted SOLO-7B, a
colleague's stage-2 run). megatron-core's `torch_dist` format is torch DCP, and DCP unpickles two
things with no restriction: the `.metadata` file (`FileSystemReader.read_metadata`, plain
`pickle.load`) and every non-tensor object, such as our RNG states (`DefaultLoadPlanner.load_bytes`,
`torch.load(weights_only=False)`). Either runs any code a crafted file names. (megatron-core's own
`common.pt` goes through `torch.load`, whose default is `weights_only=True` since torch 2.6.)

This module makes both safe: `.metadata` is read by an unpickler that builds only DCP's metadata
classes and torch's sizes, dtypes and layouts, and objects are read with `weights_only=True`
(tensors, containers, numbers, strings: all our checkpoints hold). Anything else is an
`UnpicklingError` naming the global it refused. Applied by `megatron_patches.apply`
(`solo.distributed.init_distributed`: training, solo-convert, evaluation) and again when
`solo.checkpoint` is imported, so that a reader which sets up its process groups on its own, or
reads a checkpoint's files without any, is protected as well.
"""

from __future__ import annotations

import pickle

import torch
from torch.distributed.checkpoint import default_planner, filesystem
from torch.distributed.checkpoint._traverse import set_element

# What DCP writes into `.metadata` (read off checkpoints of torch 2.13), and nothing else.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                    "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (
            module in _ALLOWED_MODULES
            or (module, name) in _ALLOWED_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                            torch.memory_format)))
        )
        if not allowed:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name} from a checkpoint's .metadata (not DCP metadata: "
                f"the file was not written by torch.distributed.checkpoint, or was tampered with)")
        return super().find_class(module, name)


class _RestrictedPickle:
    """Stands in for the `pickle` module inside torch's DCP filesystem module: `load` restricted."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file, **kwargs):
        return _MetadataUnpickler(file, **kwargs).load()


def _load_bytes_weights_only(self, read_item, value) -> None:
    # DefaultLoadPlanner.load_bytes (torch 2.13) with weights_only=True.
    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


_RESTRICTED_PICKLE = _RestrictedPickle()


def apply() -> None:
    """Idempotent."""
    filesystem.pickle = _RESTRICTED_PICKLE
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
