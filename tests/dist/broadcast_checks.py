"""torchrun worker (2 ranks, TP=2): `solo.data.batch.broadcast_batch` hands TP rank 0's collated micro
batches to TP rank 1, which reads nothing (`StepPrefetcher(reads=False)`); rank 1 writes whether
what it received equals what it would have collated itself, field by field, dtype included."""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import torch
from megatron.core import parallel_state

from solo.data.batch import broadcast_batch, collate
from solo.data.prefetch import StepPrefetcher
from solo.distributed import destroy_distributed, init_distributed

SEQ, PATCH_DIM = 64, 3 * 4 * 4


def samples(with_images: bool) -> list:
    rng = np.random.default_rng(7 if with_images else 8)
    rows = []
    for n in (50, 64):
        patches = [rng.integers(0, 256, (5, PATCH_DIM), dtype=np.uint8)] if with_images else []
        rows.append(SimpleNamespace(tokens=rng.integers(3, 33000, n).astype(np.int32),
                                    loss_mask=rng.integers(0, 2, n).astype(np.uint8),
                                    document_lengths=[n - 20, 20], patches=patches))
    return rows


class NoReads:
    """Stage data that fails if anything reads it."""
    seq_length, global_batch_size, train_steps = SEQ, 4, 2

    def rank_batch(self, *args, **kwargs):
        raise AssertionError("a receiving rank read its data")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(tensor_parallel=2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    expected = [collate(samples(images), SEQ) for images in (True, False)]
    with StepPrefetcher(NoReads(), 0, 1, 2, 0, reads=False) as prefetch:
        received_nothing = prefetch.get(0) == [None, None]
    results = []
    for batch in expected:
        got = broadcast_batch(batch if tp_rank == 0 else None, torch.device("cpu"),
                              parallel_state.get_tensor_model_parallel_src_rank(),
                              parallel_state.get_tensor_model_parallel_group())
        results.append({name: bool(torch.equal(getattr(got, name), want) and getattr(got, name).dtype == want.dtype
                                   and getattr(got, name).shape == want.shape)
                        for name, want in batch.__dict__.items()})
    if tp_rank == 1:
        with open(args.out, "w") as f:
            json.dump({"received_nothing": received_nothing, "fields": results,
                       "patches": [int(b.patches.shape[0]) for b in expected]}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
