"""`solo-preprocess stats DIR [--per-shard] [--tokens N]`: a Table-1-like summary of a shard folder
(its totals; a row per shard with --per-shard: a folder holds thousands), its pixel storage in bytes
per vision token, and the disk that N tokens like this folder's would take, from the manifests only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from solo.data.shards import PixelStorage, ShardError, list_shards, read_shard_manifest

COLUMNS = (("documents", "documents"), ("sequences", "sequences"), ("samples", "samples"),
           ("text_tokens", "text tokens"), ("vision_tokens", "vision tokens"), ("images", "images"),
           ("loss_tokens", "loss tokens"), ("truncated", "truncated"), ("padded_images", "padded images"))


def _incomplete(folder, planned, present: set) -> list[str]:
    from solo.preprocess.nodes import missing_summary  # what is missing, by node of a split folder

    gaps = missing_summary(Path(folder), planned, present) if isinstance(planned, int) else None
    return [f"incomplete: {gaps}"] if gaps else []


# The paper's three stages: 1525 + 3480 + 300 steps of 128 x 32,768 tokens, about 22B.
PAPER_TOKENS = 22_000_000_000


def render(folder: str | Path, per_shard: bool = False, tokens: int = PAPER_TOKENS) -> str:
    """The folder's totals (a row per shard above them with `per_shard`), skips by reason, storage."""
    return report(folder, per_shard, tokens)[0]


def report(folder: str | Path, per_shard: bool = False, tokens: int = PAPER_TOKENS) -> tuple[str, int]:
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
    lines += storage_lines(manifests, total["vision_tokens"], total["tokens"], tokens)
    return "\n".join(lines), total["documents"]


def storage_lines(manifests: list[tuple[str, dict]], vision_tokens: int, all_tokens: int, tokens: int) -> list[str]:
    """Pixel bytes per vision token (pixels .bin + .idx) and the folder's bytes per token (every file),
    projected onto `tokens`: the disk a run of that many tokens with this folder's mix would read."""
    kinds = sorted({describe(PixelStorage.of_manifest(m, name)) for name, m in manifests})
    pixel_bytes = sum(f["bytes"] for _, m in manifests for name, f in m["files"].items() if ".pixels." in name)
    folder_bytes = sum(f["bytes"] for _, m in manifests for f in m["files"].values())
    lines = [f"pixels: {' + '.join(kinds)}, "
             + (f"{pixel_bytes / vision_tokens:,.1f} bytes per vision token" if vision_tokens else "no images")]
    if all_tokens:
        per_token = folder_bytes / all_tokens
        lines.append(f"size: {human_bytes(folder_bytes)}, {per_token:,.1f} bytes per token; {tokens:,} tokens "
                     f"like these: {human_bytes(per_token * tokens)}")
    return lines


def describe(storage: PixelStorage) -> str:
    if storage.kind == "jpeg":
        return f"jpeg (quality {storage.jpeg_quality}, {storage.jpeg_subsampling})"
    return storage.kind


def human_bytes(n: float) -> str:
    """Decimal units, as disks are sold: 1 TB = 10^12 bytes."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
