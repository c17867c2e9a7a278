"""solo.data.dataset: a stage's blend of shard folders, on megatron-core's BlendedDataset.

The per-shard weights and the length of an epoch come from the shard manifests, never typed by
hand: these tests build real shard folders (tests/shard_fixtures.py) of unequal shard sizes and
check what the blend actually draws.
"""

import math
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest

from solo.config import DataConfig, DataSource
from solo.data.dataset import StageData
from solo.data.shards import ShardError, list_shards, open_shard
from solo.tokenizer import SOLOTokenizer
from tests.shard_fixtures import text_documents, write_blend_sources, write_source

SEQ = 256


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_blend_sources(tmp_path_factory.mktemp("blend"), SEQ)


def data_config(folders, fractions: dict, seed: int = 1234) -> DataConfig:
    return DataConfig(sources=tuple(DataSource(name, str(folders[name]), f) for name, f in fractions.items()),
                      seq_length_tokens=SEQ, seed=seed)


def shard_sizes(folder) -> list[int]:
    return [len(open_shard(p)) for p in list_shards(folder)]


def test_one_epoch_is_derived_from_the_manifests(folders):
    data = StageData(data_config(folders, {"text": 0.7, "images": 0.3}), global_batch_size=8, train_steps=0)
    total = sum(shard_sizes(folders["text"])) + sum(shard_sizes(folders["images"]))
    assert data.samples_per_epoch == total
    assert data.train_steps == math.ceil(total / 8)
    assert {s.name: s.samples for s in data.sources} == {
        "text": sum(shard_sizes(folders["text"])), "images": sum(shard_sizes(folders["images"]))}
    # An explicit step count wins.
    assert StageData(data_config(folders, {"text": 1.0}), 8, train_steps=3).train_steps == 3


@pytest.mark.parametrize("fractions", [{"text": 0.7, "images": 0.3}, {"text": 0.2, "images": 0.8}])
def test_blend_draws_each_source_by_its_fraction_and_each_shard_by_its_size(folders, fractions):
    data = StageData(data_config(folders, fractions), global_batch_size=4, train_steps=1000)
    text_shards = shard_sizes(folders["text"])
    assert len(set(text_shards)) > 1, "the fixture needs shards of unequal sizes"
    drawn = Counter(int(i) for i in data.blend.dataset_index)
    assert sum(drawn.values()) == 4000
    # Datasets are the shards in source order: text shards first, then image shards.
    n_text = len(text_shards)
    text_draws = sum(drawn[i] for i in range(n_text))
    assert abs(text_draws / 4000 - fractions["text"]) < 0.005
    for k, size in enumerate(text_shards):  # within a source, a shard's share is its share of samples
        assert abs(drawn[k] / text_draws - size / sum(text_shards)) < 0.01


def test_a_sample_is_a_function_of_its_index_and_ranks_split_the_global_batch(folders):
    config = data_config(folders, {"text": 0.5, "images": 0.5})
    a, b = StageData(config, 4, 20), StageData(config, 4, 20)
    for step in (0, 7, 19):
        batch = a.global_batch(step)
        assert [s.tokens.tolist() for s in batch] == [s.tokens.tolist() for s in b.global_batch(step)]
        halves = a.rank_batch(step, 0, 2) + a.rank_batch(step, 1, 2)
        assert [s.tokens.tolist() for s in halves] == [s.tokens.tolist() for s in batch]
    other_seed = StageData(data_config(folders, {"text": 0.5, "images": 0.5}, seed=99), 4, 20)
    assert any(x.tokens.tolist() != y.tokens.tolist()
               for step in range(5) for x, y in zip(a.global_batch(step), other_seed.global_batch(step), strict=True))


def test_a_shard_read_past_its_end_is_read_again_in_a_new_order(folders):
    # 400 samples from 76 text samples: every shard is drawn for several epochs.
    data = StageData(data_config(folders, {"text": 1.0}), global_batch_size=4, train_steps=100)
    reordered = 0
    for ds in data.blend.datasets:
        n = len(ds.dataset)
        epochs = [[ds[e * n + i]["sample"].tokens.tobytes() for i in range(n)] for e in range(3)]
        own = sorted(ds.dataset.sample(i).tokens.tobytes() for i in range(n))
        assert all(sorted(epoch) == own for epoch in epochs)  # each epoch reads every sample once
        reordered += any(epochs[e] != epochs[0] for e in (1, 2))
    assert reordered >= len(data.blend.datasets) // 2


def test_missing_or_empty_sources_are_clear_errors(folders, tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        StageData(DataConfig(sources=(DataSource("x", str(tmp_path / "nope"), 1.0),), seq_length_tokens=SEQ), 4, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="'x': no complete shards"):
        StageData(DataConfig(sources=(DataSource("x", str(tmp_path / "empty"), 1.0),), seq_length_tokens=SEQ), 4, 1)
    with pytest.raises(ShardError, match="packed for seq_length 256"):
        StageData(DataConfig(sources=(DataSource("t", str(folders["text"]), 1.0),), seq_length_tokens=512), 4, 1)


@pytest.mark.parametrize("hard_limit, ok", [(None, True), (64, False)])
def test_open_file_limit_is_raised_for_many_shards_or_a_clear_error(folders, hard_limit, ok):
    """~8 descriptors per open shard: 35 shards need more than a soft limit of 64."""
    script = textwrap.dedent(f"""
        import resource, sys
        from solo.config import DataConfig, DataSource
        from solo.data.dataset import StageData
        from solo.data.shards import ShardError
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, {hard_limit} or hard))
        config = DataConfig(sources=(DataSource("t", {str(folders["text"])!r}, 0.5),
                                     DataSource("i", {str(folders["images"])!r}, 0.5)), seq_length_tokens={SEQ})
        try:
            data = StageData(config, 4, 2)
        except ShardError as e:
            print("ERROR", e)
            sys.exit(0)
        print("OK", len(data.global_batch(1)), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = len(list_shards(folders["text"])) + len(list_shards(folders["images"]))
    if ok:
        _, batch, soft = proc.stdout.split()[-3:]
        assert int(batch) == 4 and int(soft) >= 8 * shards
    else:
        assert f"the stage's {shards} shards need about" in proc.stdout and "ulimit -Hn" in proc.stdout, proc.stdout


def test_weights_do_not_depend_on_how_a_source_is_split_into_shards(folders, tmp_path):
    """The same documents in shards of 5 or of 2: each source keeps its fraction of the blend."""
    tok = SOLOTokenizer.default()
    fine = write_source(tmp_path / "text2", text_documents(tok, SEQ, count=40), SEQ, samples_per_shard=2)
    data = StageData(DataConfig(sources=(DataSource("text", str(fine), 0.7),
                                         DataSource("images", str(folders["images"]), 0.3)),
                                seq_length_tokens=SEQ), 4, 1000)
    n_text = len(list_shards(fine))
    share = np.isin(np.asarray(data.blend.dataset_index), np.arange(n_text)).mean()
    assert abs(share - 0.7) < 0.005
