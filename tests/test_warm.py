"""tests/warm.py's ranks against real torchrun's: the environment solo reads, the sessions, and a
failing rank ending the job."""

import json
import time

import pytest

from tests.torchrun import torchrun


def _envs(out, nproc: int) -> list[dict]:
    return [json.loads(out.with_name(f"{out.name}.{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.distributed
def test_warm_ranks_get_the_environment_and_sessions_of_torchruns(tmp_path):
    torchrun("rank_env.py", 2, "--out", tmp_path / "real", fresh=True)
    torchrun("rank_env.py", 2, "--out", tmp_path / "warm")
    real, warm = _envs(tmp_path / "real", 2), _envs(tmp_path / "warm", 2)
    assert [e["RANK"] for e in real] == ["0", "1"] and all(e["own_session"] and e["has_run_id"] for e in real)
    assert warm == real


@pytest.mark.distributed
def test_a_failing_warm_rank_ends_the_job(tmp_path):
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"failed \(3\)"):
        torchrun("rank_env.py", 2, "--out", tmp_path / "warm", "--fail-rank", "1", timeout=120)
    assert time.monotonic() - started < 60  # not gloo's 30-minute timeout: the other rank was killed
