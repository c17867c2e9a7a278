"""Writes this rank's torchrun environment to OUT.RANK.json; `--fail-rank R` exits 3 on rank R while
the others sleep for 10 minutes: only the launcher killing them ends them sooner."""

import argparse
import json
import os
import sys
import time

import torch.distributed as dist

KEYS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
        "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS"]

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--fail-rank", type=int, default=None)
args = parser.parse_args()
rank = int(os.environ["RANK"])
env = {key: os.environ.get(key) for key in KEYS}
env["has_run_id"] = bool(os.environ.get("TORCHELASTIC_RUN_ID"))
env["own_session"] = os.getsid(0) == os.getpid()
with open(f"{args.out}.{rank}.json", "w") as f:
    json.dump(env, f)
dist.init_process_group("gloo")
if args.fail_rank is not None:
    if rank == args.fail_rank:
        sys.exit(3)
    time.sleep(600)
dist.barrier()
dist.destroy_process_group()
