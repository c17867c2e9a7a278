"""torchrun worker for tests/test_model.py: SOLOModel checks on gloo ranks.

--check parity: loss, logits and patch-projection gradient of a fixed packed batch (compared across
               TP sizes and sequence parallelism by the test).
--check recompute: loss and every gradient of a 4-layer model under each recompute setting.
--check single: single-rank behaviour (document isolation, collate's loss mask, flex vs mask
               attention, vpatch/patch mismatch, learning one image-caption pair); results to JSON.
"""

import argparse
import json

import numpy as np
import torch

from solo.config import ModelConfig, ParallelConfig
from solo.data.batch import attention_inputs, collate
from solo.data.shards import PackedSample
from solo.distributed import destroy_distributed, init_distributed, rank
from solo.model import PATCH_ID, build_model
from solo.tokenizer import SOLOTokenizer
from solo.vision import image_token_ids

TOK = SOLOTokenizer.default()
MODEL = ModelConfig(preset="tiny", num_layers=2, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=128, patch_size=8)


def image_document(rows, cols, caption, seed):
    rng = np.random.default_rng(seed)
    text = TOK.encode(caption)
    tokens = [TOK.bos_id] + image_token_ids(rows, cols, TOK) + text + [TOK.eos_id]
    loss = [0] * (len(tokens) - len(text) - 1) + [1] * (len(text) + 1)
    patches = rng.integers(0, 256, (rows * cols, MODEL.patch_dim), dtype=np.uint8)
    return tokens, loss, patches


def text_document(text):
    tokens = [TOK.bos_id] + TOK.encode(text) + [TOK.eos_id]
    return tokens, [0] + [1] * (len(tokens) - 1), None


def standard_documents(seed=0):
    return [
        image_document(2, 3, "a small red bird on a branch", seed),
        text_document("The quick brown fox jumps over the lazy dog."),
        image_document(3, 2, "two cats sleeping", seed + 1),
    ]


def run(model, batch, backend, **kwargs):
    mask, packed = attention_inputs(batch, backend)
    return model(batch.tokens, batch.position_ids, mask, patches=batch.patches,
                 labels=batch.labels, packed_seq_params=packed, **kwargs)


def logits(model, batch, backend):
    mask, packed = attention_inputs(batch, backend)
    out = model(batch.tokens, batch.position_ids, mask, patches=batch.patches, packed_seq_params=packed)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    return gather_from_tensor_model_parallel_region(out)  # [b, s, vocab] on every rank


def check_parity(args):
    """Loss, logits and patch-projection gradient through the real DDP + finalize_model_grads path."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    parallel = ParallelConfig(tensor_parallel=args.tp, sequence_parallel=args.sp)
    model = build_model(MODEL, parallel, backend="local")
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    batch = collate([PackedSample.of_documents(standard_documents())], seq_length=96)
    per_token = run(ddp, batch, "local")
    loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
    loss.backward()
    finalize_model_grads([ddp])
    out = logits(model, batch, "local")
    full_grads = torch.cat([p.main_grad.flatten() for p in model.parameters()]).clone()

    # The same step with the loss mask handed to the model, as training does: the output layer
    # then runs at the target positions only (SOLOModel._postprocess).
    ddp.zero_grad_buffer()
    rows = []
    hook = model.output_layer.register_forward_hook(lambda _m, inputs, _o: rows.append(inputs[0].shape[:2]))
    picked = run(ddp, batch, "local", loss_mask=batch.loss_mask)
    hook.remove()
    picked_loss = (picked * batch.loss_mask).sum() / batch.loss_mask.sum()
    picked_loss.backward()
    finalize_model_grads([ddp])
    picked_grads = torch.cat([p.main_grad.flatten() for p in model.parameters()])
    if rank() == 0:
        np.savez(args.out, loss=loss.item(), grad=model.patch_projection.weight.main_grad.numpy(),
                 norm_grad=model.decoder.final_layernorm.weight.main_grad.numpy(),
                 logits=out[0, :, :MODEL.vocab_size].detach().numpy(),
                 picked_loss=picked_loss.item(), picked_per_token=picked.detach().numpy(),
                 full_per_token=per_token.detach().numpy(), loss_mask=batch.loss_mask.numpy(),
                 picked_rows=np.array(rows), full_grads=full_grads.numpy(), picked_grads=picked_grads.numpy())


RECOMPUTE = {  # name: (granularity, method, num_layers), TrainConfig's recompute_* fields
    "none": ("none", "uniform", 0),
    "full_uniform_2": ("full", "uniform", 2),
    "full_uniform_4": ("full", "uniform", 4),
    "full_block_1": ("full", "block", 1),
    "full_block_4": ("full", "block", 4),
    "selective": ("selective", "uniform", 0),
}


def check_recompute(args):
    """Same weights (copied), same batch: forward + backward under every recompute setting."""
    shape = ModelConfig(**{**MODEL.__dict__, "num_layers": 4})
    parallel = ParallelConfig(tensor_parallel=args.tp, sequence_parallel=args.sp)
    batch = collate([PackedSample.of_documents(standard_documents())], seq_length=96)
    weights, results = None, {}
    for name, (granularity, method, layers) in RECOMPUTE.items():
        model = build_model(shape, parallel, backend="local", recompute_granularity=granularity,
                            recompute_method=method, recompute_num_layers=layers)
        weights = weights or model.state_dict()
        model.load_state_dict(weights)
        loss = (run(model, batch, "local") * batch.loss_mask).sum() / batch.loss_mask.sum()
        loss.backward()
        results[f"{name}_loss"] = loss.item()
        results[f"{name}_grad"] = all_grads(model).numpy()
        results[f"{name}_settings"] = np.array([model.config.recompute_granularity or "",
                                                model.config.recompute_method or ""])
    if rank() == 0:
        np.savez(args.out, **results)


def altered(doc, tokens=True, pixels=True):
    """The same document at the same length: its text reversed and/or its pixels inverted."""
    t, mask, p = doc
    t = list(t)
    if tokens:  # text positions carry loss; the first (<s>) and last (</s>) stay
        text = [i for i in range(1, len(t) - 1) if mask[i]]
        for i, v in zip(text, [t[i] for i in text][::-1], strict=True):
            t[i] = v
    return t, mask, (255 - p if pixels and p is not None else p)


def all_grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


def check_single(args):
    results = {}
    model = build_model(MODEL, ParallelConfig(), backend="local")
    docs = standard_documents()
    seq = 96
    base = collate([PackedSample.of_documents(docs)], seq)
    lengths = [len(d[0]) for d in docs]
    bounds = np.cumsum([0] + lengths)
    results["position_restarts"] = all(int(base.position_ids[0, b]) == 0 for b in bounds[:-1]) and \
        int(base.position_ids[0, bounds[1] - 1]) == lengths[0] - 1
    with torch.no_grad():
        ref = logits(model, base, "local")[0]
        # Change one document: its own logits must move, those of every other document (and of
        # the padding) must not. Changing the first or a middle one is what causality alone does
        # not already guarantee for the documents after it.
        isolation = {}
        for case, i, change in [("first", 0, dict(tokens=True, pixels=True)),
                                ("first_pixels", 0, dict(tokens=False, pixels=True)),
                                ("middle", 1, dict(tokens=True, pixels=False))]:
            changed = list(docs)
            changed[i] = altered(docs[i], **change)
            diff = (logits(model, collate([PackedSample.of_documents(changed)], seq), "local")[0] - ref).abs().amax(-1)
            inside = torch.zeros(seq, dtype=torch.bool)
            inside[bounds[i]:bounds[i + 1]] = True
            isolation[case] = {"changed": float(diff[inside].max()),
                               "others": float(diff[~inside].max()),
                               "later": float(diff[bounds[i + 1]:].max())}
        results["isolation"] = isolation
        # Each document alone in its own row gives the same logits as inside the packed row.
        results["packed_vs_alone_max_diff"] = max(
            float((logits(model, collate([PackedSample.of_documents([d])], seq), "local")[0][:n]
                   - ref[bounds[i]:bounds[i + 1]]).abs().max())
            for i, (d, n) in enumerate(zip(docs, lengths, strict=True))
        )
        # FlexAttention backend (CPU eager) against the block-diagonal mask.
        flex = build_model(MODEL, ParallelConfig(), backend="flex")
        flex.load_state_dict(model.state_dict())
        results["flex_vs_mask_max_diff"] = float((logits(flex, base, "flex")[0] - ref).abs().max())

    # Loss mask, collate's alone: the sample marks EVERY token a target, so no loss on labels
    # >= 32000, on the first token of the next document and on padding must come from collate.
    everything = PackedSample.of_documents(docs)
    everything.loss_mask[:] = 1
    full = collate([everything], seq)
    labels, mask = full.labels[0], full.loss_mask[0]
    special = labels >= 32000
    boundary = torch.zeros(seq, dtype=torch.bool)
    boundary[torch.as_tensor(bounds[1:-1]) - 1] = True  # label = the next document's <s>
    padding = torch.arange(seq) >= bounds[-1] - 1  # label = a padding token
    excluded = special | boundary | padding
    results["excluded_counts"] = {"special": int(special.sum()), "boundary": int(boundary.sum()),
                                  "padding": int(padding.sum())}
    results["mask_on_excluded"] = float(mask[excluded].abs().sum())
    results["mask_elsewhere"] = sorted(set(mask[~excluded].tolist()))

    def loss_and_grads(batch):
        model.zero_grad()
        loss = (run(model, batch, "local") * batch.loss_mask).sum()
        loss.backward()
        return loss.item(), all_grads(model)

    loss_ref, grad_ref = loss_and_grads(full)
    g = torch.Generator().manual_seed(0)
    # Other (natural-language) labels where collate must have masked: same loss, same gradient.
    relabelled = collate([everything], seq)
    relabelled.labels[0, excluded] = torch.randint(0, 32000, (int(excluded.sum()),), generator=g)
    # Other padding, through collate: its tokens and labels differ.
    repadded = collate([everything], seq, pad_id=TOK.eos_id)
    # Control: one label that is a target changed; the loss must notice.
    control = collate([everything], seq)
    k = int((~excluded).nonzero()[0])
    control.labels[0, k] = (control.labels[0, k] + 1) % 32000
    for name, batch in [("relabelled_excluded", relabelled), ("repadded", repadded),
                        ("relabelled_target", control)]:
        loss, grad = loss_and_grads(batch)
        results[f"{name}_loss_diff"] = abs(loss - loss_ref)
        results[f"{name}_grad_diff"] = float((grad - grad_ref).abs().max())
    results["projection_grad_norm"] = float(model.patch_projection.weight.grad.norm())

    # Mismatch between <vpatch> tokens and patches, one patch too few and one too many.
    results["vpatch_count"] = int((base.tokens == PATCH_ID).sum())
    for name, cut in [("too_few", lambda p: p[:-1]), ("too_many", lambda p: torch.cat([p, p[:1]]))]:
        try:
            bad = collate([PackedSample.of_documents(docs)], seq)
            bad.patches = cut(bad.patches)
            run(model, bad, "local")
            results[f"mismatch_{name}"] = ""
        except ValueError as e:
            results[f"mismatch_{name}"] = str(e)

    # A few optimizer steps on one image-caption pair drive its loss down.
    torch.manual_seed(0)
    fresh = build_model(MODEL, ParallelConfig(), backend="local")
    pair = collate([PackedSample.of_documents([image_document(3, 3, "a photograph of a lighthouse at dusk", 5)])], 48)
    optimizer = torch.optim.Adam(fresh.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (run(fresh, pair, "local") * pair.loss_mask).sum() / pair.loss_mask.sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    results["pair_losses"] = losses
    with open(args.out, "w") as f:
        json.dump(results, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", choices=["parity", "single", "recompute"], required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(tensor_parallel=args.tp, seed=11)
    {"parity": check_parity, "single": check_single, "recompute": check_recompute}[args.check](args)
    destroy_distributed()


if __name__ == "__main__":
    main()
