"""megatron_patches.safe_load: loading a checkpoint never runs code named by its files."""

import io
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint import default_planner, filesystem

import megatron_patches


class Payload:
    """What a crafted file would carry: unpickling it calls `exec`."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('payload ran')",))


@pytest.fixture(scope="module", autouse=True)
def applied():
    megatron_patches.apply(cpu=False)  # the safe-load patch; the CPU backend is not needed here


def test_metadata_unpickler_refuses_anything_but_dcp_metadata():
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.exec"):
        filesystem.pickle.load(io.BytesIO(pickle.dumps(Payload())))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        filesystem.pickle.load(io.BytesIO(pickle.dumps(SimpleNamespace(a=1))))


def test_real_dcp_metadata_still_loads():
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    meta = Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        TensorProperties(dtype=torch.bfloat16), torch.Size([4, 2]),
        [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([4, 2]))])},
        storage_data={MetadataIndex("w", torch.Size([0, 0])): "__0_0.distcp"})
    again = filesystem.pickle.load(io.BytesIO(pickle.dumps(meta)))
    assert again.state_dict_metadata["w"].properties.dtype == torch.bfloat16
    assert again.state_dict_metadata["w"].size == torch.Size([4, 2])


def test_checkpoint_objects_load_weights_only():
    planner = SimpleNamespace(flatten_state_dict=False, state_dict={})
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="rng_state"))
    rng = {"torch": torch.get_rng_state(), "cuda": None, "tracker": {"model-parallel-rng": torch.get_rng_state()}}
    buffer = io.BytesIO()
    torch.save(rng, buffer)
    default_planner.DefaultLoadPlanner.load_bytes(planner, item, io.BytesIO(buffer.getvalue()))
    assert torch.equal(planner.state_dict["rng_state"]["torch"], rng["torch"])
    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        default_planner.DefaultLoadPlanner.load_bytes(planner, item, io.BytesIO(buffer.getvalue()))
