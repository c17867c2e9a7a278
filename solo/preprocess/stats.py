"""`solo-preprocess stats DIR [--per-shard]`: a Table-1-like summary of a shard folder (its totals;
a row per shard with --per-shard: a folder holds thousands), from the manifests only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from solo.data.shards import ShardError, list_shards, read_shard_manifest

COLUMNS = (("documents", "documents"), ("sequences", "sequences"), ("samples", "samples"),
           ("text_tokens", "text tokens"), ("vision_tokens", "vision tokens"), ("images", "images"),
           ("loss_tokens", "loss tokens"), ("truncated", "truncated"), ("padded_images", "padded images"))


def _incomplete(folder, planned, present: set) -> list[str]:
    from solo.preprocess.nodes import missing_summary  # what is missing, by node of a split folder

    gaps = missing_summary(Path(folder), planned, present) if isinstance(planned, int) else None
    return [f"incomplete: {gaps}"] if gaps else []


def render(folder: str | Path, per_shard: bool = False) -> str:
    """The folder's totals (a row per shard above them with `per_shard`) and skips by reason."""
    return report(folder, per_shard)[0]


def report(folder: str | Path, per_shard: bool = False) -> tuple[str, int]:
    """(the table `render` prints, the folder's document count)."""
    prefixes = list_shards(folder, include_empty=True)
    if not prefixes:
        raise ShardError(f"{folder}: no complete shards")
    manifests = [(Path(p).name, read_shard_manifest(p)) for p in prefixes]
    rows, total, skipped, capacity = [], Counter(), Counter(), 0
    for name, m in manifests:
        counts = m.get("counts", {})
        rows.append((name, counts, sum(m.get("skipped", {}).values())))
        total.update({k: counts.get(k, 0) for k, _ in COLUMNS + (("tokens", ""),)})
        skipped.update(m.get("skipped", {}))
        capacity += counts.get("samples", 0) * m.get("seq_length", 0)
    total_fill = total["tokens"] / capacity if capacity else 0.0
    rows = rows if per_shard else []
    rows.append(("total", {**total, "fill": total_fill}, sum(skipped.values())))
    header = ["shard" if per_shard else ""] + [title for _, title in COLUMNS] + ["fill", "skipped"]
    table = [header] + [[name] + [f"{c.get(k, 0):,}" for k, _ in COLUMNS] + [f"{100 * c.get('fill', 0):.2f}%", f"{s:,}"]
                        for name, c, s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    if per_shard:
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
    first = manifests[0][1]
    source = first.get("source", {}).get("kind", "?")
    lines.insert(0, f"{folder}: {source}, seq_length {first.get('seq_length')}, patch {first.get('patch_size')}, "
                    f"max side {first.get('max_side')}, {len(manifests)} shards"
                    + (f" of {first['shards_planned']} planned" if "shards_planned" in first else ""))
    if total["images"]:
        lines.append(f"padded images: {total['padded_images']:,} of {total['images']:,} "
                     f"({100 * total['padded_images'] / total['images']:.1f}%; uniform bands on two opposite sides)")
    lines.append("skipped: " + (", ".join(f"{r} {n:,}" for r, n in sorted(skipped.items())) or "none"))
    lines.extend(_incomplete(folder, first.get("shards_planned"), {m.get("shard") for _, m in manifests}))
    return "\n".join(lines), total["documents"]
