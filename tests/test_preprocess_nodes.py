"""solo-preprocess split across machines (solo/preprocess/nodes.py): nodes as separate processes of
the real CLI, concurrently, into one folder give the files of one run byte for byte; a folder
missing a node is named by finalize and stats; SLURM variables pick the rank; a node with another
spec is refused; a killed node resumes its own part and leaves the others' files alone.

What is canonical: the folder's data (shards and manifest.json) is identical to one run's; the
nodes' ledger `.nodes/` (the claim, which host finished when) is bookkeeping beside it."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import time

import pytest

from solo.data.shards import list_shards, open_shard, read_folder_manifest
from solo.preprocess.cli import main
from solo.preprocess.nodes import NodeSplit, block, split_from
from tests.test_preprocess import OPTS, photo

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "horse.png", "camera.png", "coins.png")


def make_pairs(root, records: int):
    """`records` caption records (a JSONL of image paths), every sixth without its image (a skip)."""
    (root / "images").mkdir(parents=True)
    lines = []
    for k in range(records):
        name = f"images/{k:03d}.jpg"
        if k % 6 != 5:
            (root / name).write_bytes(photo(PHOTOS[k % len(PHOTOS)], 96 + 8 * (k % 5)))
        lines.append(json.dumps({"image": name, "caption": f"Photo {k} of {PHOTOS[k % len(PHOTOS)]}."}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def args_for(pairs, shard_size):
    return ["captions", "--input", str(pairs), "--shard-size", str(shard_size), *OPTS]


def cli(*args):
    return main([str(a) for a in args])


def data_files(folder):
    """Every file of the folder but the ledger and the flock file, by name; never a temporary."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}
    assert not [n for n in files if n.startswith(".tmp-")]
    return files


def _exit_with_main(argv, log_path):
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os._exit(main(argv))  # no pytest teardown in the child


def node_process(args, out, num_nodes, rank, log_path):
    """A node: the CLI's main in a process of its own, forked (megatron-core is imported already;
    a fresh interpreter would spend most of the test importing it)."""
    argv = [*map(str, args), "--output", str(out), "--num-nodes", str(num_nodes), "--node-rank", str(rank)]
    proc = mp.get_context("fork").Process(target=_exit_with_main, args=(argv, log_path))
    proc.start()
    return proc


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"), 13)  # shard size 2: 7 shards, 2 skipped records


@pytest.fixture(scope="module")
def one_run(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    assert cli(*args_for(pairs, 2), "--output", out) == 0
    return data_files(out)


def test_two_and_three_concurrent_nodes_give_the_bytes_of_one_run(pairs, one_run, tmp_path):
    args = args_for(pairs, 2)
    procs = [node_process(args, tmp_path / f"n{n}", n, r, tmp_path / "log.txt") for n in (2, 3) for r in range(n)]
    for p in procs:
        p.join(timeout=300)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * 5, (tmp_path / "log.txt").read_text()[-3000:]
    assert len([n for n in one_run if n.startswith("shard-") and n.endswith(".json")]) == 7
    for n in (2, 3):
        out = tmp_path / f"n{n}"
        assert data_files(out) == one_run  # every shard file and every manifest, byte for byte
        assert read_folder_manifest(out)["complete"] is True
        ledger = sorted(p.name for p in (out / ".nodes").iterdir())
        assert ledger == sorted(["plan.json", *(f"node-{r:05d}.json" for r in range(n)),
                                 *(f"lock-{r:05d}" for r in range(n))])
        assert [json.loads((out / ".nodes" / f"node-{r:05d}.json").read_text())["shards"] for r in range(n)] \
            == [[block(7, n, r).start, block(7, n, r).stop] for r in range(n)]


def test_finalize_and_stats_name_the_missing_node_and_the_last_node_completes(pairs, one_run, tmp_path, capsys):
    args, out = args_for(pairs, 2), tmp_path / "out"
    for rank in (0, 2):
        assert cli(*args, "--output", out, "--num-nodes", 3, "--node-rank", rank) == 0
    # Until node 1 is done, manifest.json says so: training refuses the folder.
    assert read_folder_manifest(out)["complete"] is False
    assert sorted(os.path.basename(p) for p in list_shards(out, include_empty=True)) == \
        [f"shard-{k:05d}" for k in (0, 1, 4, 5, 6)]
    capsys.readouterr()
    assert cli("finalize", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"solo-preprocess: error: {out}: cannot finalize, 2 of 7 shards missing: "
                          "node 1 of 3 (not finished): shard-00002, shard-00003; rerun those nodes"), err
    assert cli("stats", out) == 0
    assert "incomplete: 2 of 7 shards missing: node 1 of 3 (not finished): shard-00002, shard-00003" \
        in capsys.readouterr().out
    assert cli(*args, "--output", out, "--num-nodes", 3, "--node-rank", 1) == 0
    assert data_files(out) == one_run
    # A folder whose last node did not see the others' shards (a lagging shared file system): finalize.
    (out / "manifest.json").unlink()
    assert cli("finalize", out) == 0
    assert data_files(out) == one_run
    assert "incomplete" not in (cli("stats", out), capsys.readouterr().out)[1]


def test_a_slurm_array_picks_the_node_rank(pairs, tmp_path, monkeypatch):
    array = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
             "SLURM_ARRAY_TASK_MAX": "2", "SLURM_ARRAY_TASK_STEP": "1", "SLURM_ARRAY_TASK_ID": "2"}
    for key, value in array.items():
        monkeypatch.setenv(key, value)
    assert cli(*args_for(pairs, 2), "--output", tmp_path / "out") == 0
    assert sorted(os.path.basename(p) for p in list_shards(tmp_path / "out", include_empty=True)) == \
        [f"shard-{k:05d}" for k in block(7, 3, 2)]
    assert json.loads((tmp_path / "out" / ".nodes" / "plan.json").read_text())["num_nodes"] == 3


@pytest.mark.parametrize("env, flags, expected", [
    ({}, (None, None), (1, 0)),
    ({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4",
      "SLURM_ARRAY_TASK_ID": "3"}, (None, None), (4, 2)),  # --array=1-4
    ({"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "8",
      "SLURM_ARRAY_TASK_STEP": "4", "SLURM_ARRAY_TASK_ID": "8"}, (None, None), (3, 2)),  # --array=0-8:4
    ({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_ID": "1"}, (8, 5), (8, 5)),
    ({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_ID": "1"}, (8, None), (8, 1)),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (None, None), (4, 3)),  # srun -n 4
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, (None, None), (1, 0)),  # a batch script's own shell
    ({"SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_ID": "5",
      "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, (None, None), (2, 1)),
])
def test_node_count_and_rank_from_flags_and_slurm(env, flags, expected):
    assert split_from(*flags, env) == NodeSplit(*expected)


@pytest.mark.parametrize("argv, message", [
    (["--num-nodes", "0"], "argument --num-nodes: must be positive, got 0"),
    (["--node-rank", "-1"], "argument --node-rank: must be >= 0, got -1"),
    (["--num-nodes", "two"], "argument --num-nodes: expected an integer, got 'two'"),
    (["--num-nodes", "2", "--node-rank", "2"], "--node-rank 2 is not below --num-nodes 2"),
    (["--node-rank", "1"], "--node-rank 1 is not below the node count 1"),
    (["--num-nodes", "3"], "--num-nodes 3 needs --node-rank"),
    (["SLURM_ARRAY_TASK_COUNT=3", "SLURM_ARRAY_TASK_MIN=1", "SLURM_ARRAY_TASK_MAX=7", "SLURM_ARRAY_TASK_ID=3"],
     "SLURM_ARRAY_TASK_ID 3 of 3 tasks 1-7: the array's indices are not a range"),  # --array=1,3,7
    (["SLURM_ARRAY_TASK_COUNT=2", "SLURM_ARRAY_TASK_MIN=0", "SLURM_ARRAY_TASK_ID=1",
      "SLURM_STEP_NUM_TASKS=2", "SLURM_PROCID=0"], "both a SLURM job array"),
])
def test_bad_node_arguments_are_argparse_errors_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    for assignment in [a for a in argv if "=" in a]:
        monkeypatch.setenv(*assignment.split("=", 1))
    with pytest.raises(SystemExit) as e:
        main(["text", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"),
              *[a for a in argv if "=" not in a]])
    assert e.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.startswith("solo-preprocess") and message in line, line
    assert not (tmp_path / "out").exists()


def test_a_node_with_another_spec_is_refused(pairs, tmp_path, capsys):
    args, out = args_for(pairs, 2), tmp_path / "out"
    assert cli(*args, "--output", out, "--num-nodes", 2, "--node-rank", 0) == 0
    before = data_files(out)
    capsys.readouterr()
    for extra, message in ((["--num-nodes", 3, "--node-rank", 1], "is split across 2 nodes"),
                           (["--num-nodes", 2, "--node-rank", 1, "--seed", 1], "seed differ"),
                           (["--num-nodes", 2, "--node-rank", 1, "--shard-size", 3], "shard_size differ"),
                           ([], "is split across 2 nodes")):
        assert cli(*args, "--output", out, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("solo-preprocess: error: ") and message in err, (extra, err)
        assert data_files(out) == before


def test_a_killed_node_resumes_its_part_and_leaves_the_other_nodes_files_alone(tmp_path):
    pairs = make_pairs(tmp_path / "in", 26)
    args, out = args_for(pairs, 1), tmp_path / "out"
    (tmp_path / "log.txt").touch()
    proc = node_process([*args[:-2], "--workers", "2"], out, 2, 0, tmp_path / "log.txt")
    deadline = time.monotonic() + 300
    while not list(out.glob("shard-*.json")) and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    killed = list_shards(out, include_empty=True)
    assert 1 <= len(killed) < 13 and all(int(p[-5:]) < 13 for p in killed), (tmp_path / "log.txt").read_text()[-2000:]
    for prefix in killed:
        open_shard(prefix, verify_checksum=True)
    mtimes = {p.name: p.stat().st_mtime_ns for prefix in killed for p in out.glob(os.path.basename(prefix) + ".*")}
    # Node 1 is writing shard 20 right now (as far as node 0 can tell): its temporary must survive.
    in_flight = out / ".tmp-shard-00020.tokens.bin"
    in_flight.write_bytes(b"node 1 at work")
    assert cli(*args, "--output", out, "--num-nodes", 2, "--node-rank", 0) == 0
    assert in_flight.read_bytes() == b"node 1 at work"
    assert {name: (out / name).stat().st_mtime_ns for name in mtimes} == mtimes  # nothing finished is rewritten
    assert read_folder_manifest(out)["complete"] is False
    assert cli(*args, "--output", out, "--num-nodes", 2, "--node-rank", 1) == 0  # its own leftover: removed
    assert cli(*args, "--output", tmp_path / "one") == 0
    assert data_files(out) == data_files(tmp_path / "one")


def test_the_slurm_array_script_passes_the_task_as_the_node(tmp_path):
    """scripts/slurm_preprocess.sbatch under a fake solo-preprocess: the array task is the node, and
    a resubmitted task keeps the first array's node count (NUM_NODES)."""
    fake = tmp_path / "bin" / "solo-preprocess"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "slurm_preprocess.sbatch")
    base = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path)}
    for extra, expected in (({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "16"}, "16 --node-rank 3"),
                            ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2", "NUM_NODES": "16"},
                             "16 --node-rank 5")):
        run = subprocess.run(["bash", script, "text", "--input", "a.jsonl", "--output", "out"],
                             env={**base, **extra}, capture_output=True, text=True, check=True)
        assert run.stdout.strip() == f"text --input a.jsonl --output out --num-nodes {expected}"
    run = subprocess.run(["bash", script, "text"], env=base, capture_output=True, text=True)
    assert run.returncode != 0 and "submit with sbatch --array" in run.stderr
