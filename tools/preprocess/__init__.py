"""solo-preprocess: the offline shard preprocessing CLI (installed as the package `solo_preprocess`)."""
