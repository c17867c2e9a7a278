"""Every change solo-megatron makes to megatron-core behaviour lives in this package.

Each module is small, names the megatron-core version it was written against, and says why the
patch exists. Nothing here is applied on import: callers opt in (e.g. `cpu.apply()`).
"""
