"""torchrun worker for tests/test_probe.py: `solo.train.train` run in turn on several stage configs
in one world (each config its own layout: TP=2 with and without the probe, TP=1 x DP=2), the
megatron-core groups rebuilt between them; what each run leaves besides its save_dir (the RNG
states at the end) goes to --out.

    torchrun --nproc_per_node 2 tests/dist/probe_checks.py --out rng.json a.yaml b.yaml c.yaml
"""

import argparse
import hashlib
import json

import torch
from megatron.core import parallel_state, tensor_parallel

from solo.config import load_config
from solo.distributed import destroy_distributed, rank
from solo.train import train


def _digest(state: torch.Tensor) -> str:
    return hashlib.sha256(state.cpu().numpy().tobytes()).hexdigest()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()
    ends = {}
    for path in args.configs:
        cfg = load_config(path)
        train(cfg)
        tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
        ends[path] = {name: _digest(state) for name, state in [("torch", torch.get_rng_state()), *tracker.items()]}
        parallel_state.destroy_model_parallel()
    if rank() == 0:
        with open(args.out, "w") as f:
            json.dump(ends, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
