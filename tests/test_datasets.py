"""solo-preprocess on datasets as they are published: the layouts of img2dataset, webdataset's
TarWriter, Megatron-LM's and timm's webdataset shards, megatron-energon's prepared folders,
ImageNet-21K's per-synset tars and ImageNet-21K-P's tree, LLaVA conversation JSON and JSON Lines.
Each goes through the CLI unchanged; the decoded shard text and images are compared with the inputs."""

import logging
import tarfile

import numpy as np

from solo.data.shards import read_folder_manifest
from tests.test_preprocess import OPTS, PATCH, SIDE, add_members, cli, documents_of, photo, tok  # noqa: F401

from solo.vision import encode_image  # isort: skip


def captions_of(tokenizer, folder):
    """caption -> the patches of its image(s), for every document of `folder`."""
    return {tokenizer.decode(t[loss == 1]): p for t, loss, p in documents_of(folder)}


def same_image(patches, image_bytes):
    np.testing.assert_array_equal(patches, encode_image(image_bytes, PATCH, SIDE).patches)


# -- runs that yield nothing, and skip warnings ------------------------------------------------

def test_a_run_without_documents_exits_2_with_the_skip_summary_and_stats_refuses_it(tmp_path, capsys, caplog):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for k in range(15):
            add_members(tar, [(f"{k:09d}.jpg", photo("moon.png", 64)), (f"{k:09d}.txt", b"  ")])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="solo.preprocess"):
        assert cli("captions", "--input", tmp_path / "00000.tar", "--output", out, *OPTS) == 2
    err = capsys.readouterr().err
    assert f"solo-preprocess: error: --output {out}: no documents from 15 records " \
           "(skipped 15 records: empty_text 15)" in err
    # One warning per skipped record up to the limit, then only the count.
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skip ")]
    assert len(skips) == 10 and skips[-1].endswith("further skips for this reason are counted, not shown")
    assert cli("stats", out) == 2
    captured = capsys.readouterr()
    assert "empty_text 15" in captured.out
    assert f"solo-preprocess: error: {out}: its shards hold no documents" in captured.err


def test_stats_shows_truncated_documents(tmp_path, capsys):
    long_html = "<html><body>" + "<p>Some paragraph text here.</p>" * 400 + "</body></html>"
    with tarfile.open(tmp_path / "web.tar", "w") as tar:
        add_members(tar, [("a.png", photo("page.png", 200, "PNG")), ("a.html", b"<h1>Title</h1>"),
                          ("b.png", photo("text.png", 200, "PNG")), ("b.html", long_html.encode())])
    assert cli("html", "--input", tmp_path / "web.tar", "--output", tmp_path / "out", *OPTS) == 0
    capsys.readouterr()
    assert cli("stats", tmp_path / "out") == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split("  ")
    header = [h.strip() for h in header if h.strip()]
    [total] = [line.split() for line in lines if line.startswith("total")]
    assert total[1 + header.index("truncated")] == "1"
    assert read_folder_manifest(tmp_path / "out")["totals"]["truncated"] == 1
