"""solo-megatron: single-transformer vision-language pretraining (SOLO) on megatron-core."""

__version__ = "0.1.0"
