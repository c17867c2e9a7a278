"""Peak memory of one forward + backward of a tiny SOLOModel on the CPU, for tests/test_plan.py.

    python tests/dist/memory_peak.py --config CONFIG.yaml --out peak.json [key=value ...]

Measured as the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
over the resident set of the built model with its gradients already allocated, so it is the
activations' peak, as the plan counts them. Run it with MALLOC_MMAP_THRESHOLD_ set low (the test
does) so freed tensors go back to the system instead of staying in malloc's heap.
"""

import argparse
import gc
import json
import re

import numpy as np
import torch

from solo.config import load_config
from solo.data.batch import attention_inputs, collate
from solo.data.shards import PackedSample
from solo.distributed import destroy_distributed, init_distributed
from solo.model import build_model


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def text_row(seq: int, vocab: int, rng) -> PackedSample:
    """Documents of random token ids (no images) filling the row."""
    docs, left = [], seq
    while left > 0:
        n = min(int(rng.integers(seq // 4, seq // 2)), left)
        docs.append((rng.integers(3, vocab, n).tolist(), [1] * n, None))
        left -= n
    return PackedSample.of_documents(docs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    init_distributed(seed=cfg.seed)
    model = build_model(cfg.model, cfg.parallel, backend="local", recompute_num_layers=cfg.recompute_num_layers,
                        recompute_granularity=cfg.recompute_granularity, recompute_method=cfg.recompute_method)
    seq = cfg.data.seq_length_tokens
    batch = collate([text_row(seq, cfg.model.vocab_size, np.random.default_rng(0))], seq)

    def step():
        mask, packed = attention_inputs(batch, "local")
        loss = (model(batch.tokens, batch.position_ids, mask, labels=batch.labels, packed_seq_params=packed)
                * batch.loss_mask).sum()
        loss.backward()
        return loss.item()

    step()  # allocates the .grad tensors, which the plan counts as the gradient buffer
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    peak = _status("VmHWM") - before
    with open(args.out, "w") as f:
        json.dump({"activation_peak_bytes": peak, "seq": seq,
                   "params": sum(p.numel() for p in model.parameters())}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
