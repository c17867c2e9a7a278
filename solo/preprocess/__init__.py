"""solo-preprocess: the offline shard preprocessing CLI (installed as the package `solo.preprocess`).

cli.py (argparse) -> sources.py / formats.py / webdataset.py (inputs -> records) -> documents.py
(records -> token documents) -> packing.py (documents -> packed samples) -> pipeline.py (shards in
a process pool, written by solo.data.shards.ShardWriter) -> output.py (resume bookkeeping,
manifest.json), nodes.py (one folder written by several machines); stats.py summarizes an output folder.
"""

__version__ = "0.1.0"
