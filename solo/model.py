"""SOLOModel: megatron-core's GPTModel whose input embedding also reads image patches.

megatron-core does the heavy lifting: `GPTModel` (embedding, decoder, output layer, vocab-parallel
cross entropy), tensor/sequence parallelism and the layer implementations, chosen by module spec:

* ``"te"``: TransformerEngine layers, packed documents through TE's THD attention (GPU);
* ``"flex"``: local layers, packed documents through FlexAttention (GPU without TE,
  `solo.layers.FlexDocumentAttention`);
* ``"local"``: local layers, packed documents through a block-diagonal causal mask (CPU,
  `solo.layers.LocalDocumentAttention`).

A sliding attention window (`ModelConfig.attention_window_tokens`) becomes megatron-core's
`TransformerConfig.window_size`, which all three backends honour inside each document.

Both local variants take their norms from `solo.layers.SequenceParallelTorchNorm`.

The one addition (SOLO, Sec. 2.1; the authors' ``inputs_embeds += vision_embeds``): at every
``<vpatch>`` position the input embedding is the ``<vpatch>`` token embedding plus a bias-free
``Linear(3 * patch_size**2 -> hidden)`` projection of the normalized patch (raw uint8 patches are
normalized on the model's device).

One saving: given a `loss_mask`, training and validation run the output layer and its cross
entropy only at the target positions (SOLO takes no loss on image patches, `<s>` or padding), through
megatron-core's own output layer and `compute_language_model_loss`; the loss there is the one the
full output layer gives, and every other position reads 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig

from solo.config import ModelConfig, ParallelConfig
from solo.layers import FlexDocumentAttention, LocalDocumentAttention, SequenceParallelTorchNorm
from solo.tokenizer import TOKEN_IDS
from solo.vision import IMAGENET_MEAN, IMAGENET_STD

BACKENDS = ("local", "flex", "te")
PATCH_ID = TOKEN_IDS.patch_id


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 3P²] -> float32 on their device: the float32 arithmetic of
    `solo.vision.normalize_patches` (x/255, then ImageNet mean/std per channel), bit for bit. Done
    here, on the GPU, because the data path then moves and holds a quarter of the bytes."""
    n, dim = patches.shape
    mean = torch.as_tensor(IMAGENET_MEAN, device=patches.device)[:, None]
    std = torch.as_tensor(IMAGENET_STD, device=patches.device)[:, None]
    x = patches.view(n, 3, dim // 3).to(torch.float32) / 255.0
    return ((x - mean) / std).view(n, dim)


def default_backend() -> str:
    if not torch.cuda.is_available():
        return "local"
    try:
        import transformer_engine  # noqa: F401

        return "te"
    except ImportError:
        return "flex"


def layer_spec(backend: str, config: TransformerConfig):
    """The decoder's module spec: which layer implementation runs where (no if-else in the model)."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    if backend not in ("local", "flex"):
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = SequenceParallelTorchNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    attention = FlexDocumentAttention if backend == "flex" else LocalDocumentAttention
    layer.submodules.self_attention.submodules.core_attention = attention
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=SequenceParallelTorchNorm
    )


def gradient_accumulation_fusion(backend: str, cuda: bool, fused_wgrad_kernel: bool) -> bool:
    """Accumulate weight gradients into the fp32 grad buffer inside the wgrad GEMM (Megatron-LM's
    default): saves a bf16 gradient per weight and an add per micro batch (32 of them per step in the
    paper's recipe). It needs fused kernels: TransformerEngine's own (its layers, the "te" spec) and
    apex's `fused_weight_gradient_mlp_cuda` for the rest (megatron-core's ColumnParallelLinear output
    layer raises without it), both CUDA only. The local layers (CPU, "flex") stay unfused."""
    return backend == "te" and cuda and fused_wgrad_kernel


def _fused_wgrad_kernel_available() -> bool:
    from megatron.core.tensor_parallel import layers

    return layers._grad_accum_fusion_available  # megatron-core 0.16: apex's kernel imported


def window_size(model: ModelConfig) -> tuple[int, int] | None:
    """megatron-core's (left, right) window from `attention_window_tokens` w: a query sees the w-1
    tokens before it and itself, as HF Mistral's `sliding_window=w` (`kv > q - w`). TE's attention
    takes the tuple as it is (flash-attn's convention); the local layers read it in `solo.layers`."""
    w = model.attention_window_tokens
    return None if w is None else (w - 1, 0)


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    bf16: bool = False,
    recompute_num_layers: int = 0,
    recompute_granularity: str = "full",
    recompute_method: str = "block",
    use_cpu_initialization: bool = True,
    backend: str = "local",
) -> TransformerConfig:
    """Mistral-style decoder (SwiGLU, RMSNorm, GQA, no biases, no dropout) as megatron-core sees it.
    Recompute (TrainConfig's recompute_*): `full` with recompute_num_layers 0 is off."""
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        # Weights are initialized whole on the CPU and then split, so every TP size starts from
        # the same model (and the TP=1 vs TP=2 parity tests are exact). False (on the GPU) is for
        # models too big to initialize on the CPU in reasonable time (the 7B benchmark).
        use_cpu_initialization=use_cpu_initialization,
        calculate_per_token_loss=True,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # The dtype of the activations sent between pipeline stages (megatron-core refuses PP > 1 without it).
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=gradient_accumulation_fusion(
            backend, torch.cuda.is_available(), _fused_wgrad_kernel_available()),
        window_size=window_size(model),
        **recompute_settings(recompute_granularity, recompute_method, recompute_num_layers),
    )


def recompute_settings(granularity: str, method: str, num_layers: int) -> dict:
    """TrainConfig's recompute_* as TransformerConfig fields; megatron-core does the recomputing."""
    if granularity == "selective":  # megatron-core's default recompute_modules: core attention
        return dict(recompute_granularity="selective")
    if granularity == "full" and num_layers:
        return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=num_layers)
    return {}


class SOLOModel(GPTModel):
    """GPTModel + linear patch embedding. Call with a packed batch (see `solo.data.batch`)."""

    def __init__(self, config: TransformerConfig, model: ModelConfig, backend: str, **kwargs):
        super().__init__(
            config=config,
            transformer_layer_spec=layer_spec(backend, config),
            vocab_size=model.padded_vocab_size,
            max_sequence_length=model.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rope_theta),
            share_embeddings_and_output_weights=False,
            **kwargs,
        )
        self.backend = backend
        self.model_config = model
        if self.pre_process:
            self.patch_projection = torch.nn.Linear(
                model.patch_dim, config.hidden_size, bias=False, dtype=config.params_dtype
            )
            with torch.no_grad():
                torch.nn.init.normal_(self.patch_projection.weight, std=config.init_method_std)
            # Under sequence parallelism each TP rank projects only the patches of its sequence
            # slice, so the weight's gradient is a partial sum: megatron-core's
            # finalize_model_grads all-reduces parameters marked like this across TP.
            self.patch_projection.weight.sequence_parallel = config.sequence_parallel

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        patches: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Returns the per-token loss [b, s] when `labels` are given (megatron convention), else logits."""
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
            decoder_input = self._add_patch_embeddings(decoder_input, input_ids, patches)
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            packed_seq_params=packed_seq_params, **kwargs,
        )

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, loss_mask=None, **kwargs):
        """megatron-core's output layer and loss, at the target positions only when `loss_mask` is
        given. Those are a small share of a SOLO batch (image patches, `<s>` and padding carry no
        loss), and the output layer over the 33k-id vocabulary is the biggest matmul of a small model."""
        if (labels is None or loss_mask is None or not self.post_process or self.mtp_process
                or self.config.mtp_num_layers is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args,
                                        loss_mask=loss_mask, **kwargs)
        targets = loss_mask.t() > 0  # [s, b], the layout of hidden_states
        layer = self.output_layer
        sequence_parallel = layer.sequence_parallel
        if sequence_parallel:
            # Every TP rank needs every target's hidden state; the output layer then all-reduces
            # their gradient over TP (as without sequence parallelism), and the gather's backward
            # keeps this rank's slice of it.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp)
        picked = hidden_states[targets].unsqueeze(1)  # [n, 1, h]
        layer.sequence_parallel = False
        try:
            weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
            logits, _ = layer(picked, weight=weight)
        finally:
            layer.sequence_parallel = sequence_parallel
        picked_loss = self.compute_language_model_loss(labels.t()[targets].unsqueeze(0), logits)  # [1, n]
        loss = picked_loss.new_zeros(targets.shape)
        loss[targets] = picked_loss[0]
        return loss.t().contiguous()

    def _add_patch_embeddings(self, embeddings, input_ids, patches):
        """embeddings: [s_local, b, h] (sequence-parallel slice), patches: [n, patch_dim] in the
        order their <vpatch> tokens appear in input_ids read row by row, either raw uint8 (as
        `solo.data.batch.collate` gives them; normalized here) or already normalized floats."""
        is_patch = input_ids == PATCH_ID  # [b, s]
        count = int(is_patch.sum())
        given = 0 if patches is None else patches.shape[0]
        if count != given:
            raise ValueError(
                f"the batch has {count} <vpatch> tokens (id {PATCH_ID}) but {given} image patches"
            )
        if count == 0:
            # Touch the projection so its (zero) gradient exists on every step and rank.
            return embeddings + 0.0 * self.patch_projection.weight.sum()
        if patches.shape[1] != self.model_config.patch_dim:
            raise ValueError(
                f"patches have {patches.shape[1]} values, the model expects {self.model_config.patch_dim} "
                f"(3 x patch_size {self.model_config.patch_size}^2)"
            )
        if patches.dtype == torch.uint8:
            patches = normalize_patches(patches)
        patch_index = (is_patch.flatten().cumsum(0) - 1).view_as(is_patch).t()  # [s, b]
        is_patch = is_patch.t()
        if self.config.sequence_parallel:
            local = embeddings.shape[0]
            start = parallel_state.get_tensor_model_parallel_rank() * local
            is_patch, patch_index = is_patch[start:start + local], patch_index[start:start + local]
        seq_idx, batch_idx = is_patch.nonzero(as_tuple=True)
        weight = self.patch_projection.weight
        projected = self.patch_projection(patches[patch_index[seq_idx, batch_idx]].to(weight.dtype))
        return embeddings.index_put((seq_idx, batch_idx), projected.to(embeddings.dtype), accumulate=True)


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    backend: str | None = None,
    bf16: bool = False,
    recompute_num_layers: int = 0,
    recompute_granularity: str = "full",
    recompute_method: str = "block",
    use_cpu_initialization: bool = True,
) -> SOLOModel:
    """Build this rank's SOLOModel (model-parallel groups must be initialized)."""
    backend = backend or default_backend()
    config = transformer_config(model, parallel, bf16=bf16, recompute_num_layers=recompute_num_layers,
                                recompute_granularity=recompute_granularity, recompute_method=recompute_method,
                                use_cpu_initialization=use_cpu_initialization, backend=backend)
    solo = SOLOModel(
        config, model, backend,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if torch.cuda.is_available():
        solo.cuda(torch.cuda.current_device())
    return solo
