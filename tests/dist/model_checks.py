"""torchrun worker for tests/test_model.py: SOLOModel checks on gloo ranks.

--check parity: loss, logits and patch-projection gradient of a fixed packed batch (compared across
               TP sizes and sequence parallelism by the test).
--check single: single-rank behaviour (document isolation, loss mask, flex vs mask attention,
               vpatch/patch mismatch, learning one image-caption pair); results to JSON.
"""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import torch

from solo.config import ModelConfig, ParallelConfig
from solo.data.batch import attention_inputs, collate
from solo.distributed import destroy_distributed, init_distributed, rank
from solo.model import build_model
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


def pack(documents):
    tokens, loss, lengths, patches = [], [], [], []
    for t, l, p in documents:
        tokens += t
        loss += l
        lengths.append(len(t))
        if p is not None:
            patches.append(p)
    return SimpleNamespace(tokens=np.array(tokens, dtype=np.int32), loss_mask=np.array(loss, dtype=np.uint8),
                           document_lengths=lengths, patches=patches)


def standard_documents(seed=0):
    return [
        image_document(2, 3, "a small red bird on a branch", seed),
        text_document("The quick brown fox jumps over the lazy dog."),
        image_document(3, 2, "two cats sleeping", seed + 1),
    ]


def run(model, batch, backend):
    mask, packed = attention_inputs(batch, backend)
    return model(batch.tokens, batch.position_ids, mask, patches=batch.patches,
                 labels=batch.labels, packed_seq_params=packed)


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
    batch = collate([pack(standard_documents())], seq_length=96)
    per_token = run(ddp, batch, "local")
    loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
    loss.backward()
    finalize_model_grads([ddp])
    out = logits(model, batch, "local")
    if rank() == 0:
        np.savez(args.out, loss=loss.item(), grad=model.patch_projection.weight.main_grad.numpy(),
                 norm_grad=model.decoder.final_layernorm.weight.main_grad.numpy(),
                 logits=out[0, :, :MODEL.vocab_size].detach().numpy())


def check_single(args):
    results = {}
    model = build_model(MODEL, ParallelConfig(), backend="local")
    docs = standard_documents()
    seq = 96
    base = collate([pack(docs)], seq)
    lengths = [len(d[0]) for d in docs]
    bounds = np.cumsum([0] + lengths)
    results["position_restarts"] = all(int(base.position_ids[0, b]) == 0 for b in bounds[:-1]) and \
        int(base.position_ids[0, bounds[1] - 1]) == lengths[0] - 1
    with torch.no_grad():
        ref = logits(model, base, "local")[0]
        # Change the text of document 1 and the pixels of document 2: document 0 must not notice;
        # changing document 0's pixels must change document 0 only up to its end.
        altered = list(docs)
        t, l, p = docs[1]
        altered[1] = ([t[0]] + t[1:-1][::-1] + [t[-1]], l, p)  # same length, other tokens
        t, l, p = docs[2]
        altered[2] = (t, l, 255 - p)
        changed = collate([pack(altered)], seq)
        out = logits(model, changed, "local")[0]
        results["doc0_unchanged_max_diff"] = float((out[:bounds[1]] - ref[:bounds[1]]).abs().max())
        results["doc2_changed_max_diff"] = float((out[bounds[2]:bounds[3]] - ref[bounds[2]:bounds[3]]).abs().max())
        # The same document alone in its own row gives the same logits as inside the packed row.
        alone = collate([pack([docs[2]])], seq)
        out_alone = logits(model, alone, "local")[0]
        results["packed_vs_alone_max_diff"] = float((out_alone[:lengths[2]] - ref[bounds[2]:bounds[3]]).abs().max())
        # FlexAttention backend (CPU eager) against the block-diagonal mask.
        flex = build_model(MODEL, ParallelConfig(), backend="flex")
        flex.load_state_dict(model.state_dict())
        results["flex_vs_mask_max_diff"] = float((logits(flex, base, "flex")[0] - ref).abs().max())

    # Loss mask: targets >= 32000 and padding never carry loss or gradient.
    labels, mask = base.labels[0], base.loss_mask[0]
    results["loss_on_special_ids"] = float(mask[labels >= 32000].sum())
    results["loss_on_padding"] = float(mask[bounds[-1] - 1:].sum())
    def masked_loss_and_grad(batch):
        model.zero_grad()
        loss = (run(model, batch, "local") * batch.loss_mask).sum()
        loss.backward()
        return loss.item(), model.output_layer.weight.grad.clone()

    loss_a, grad_a = masked_loss_and_grad(base)
    # Scrambling every label that carries no loss must change neither the loss nor the gradient.
    scrambled = collate([pack(docs)], seq)
    off = scrambled.loss_mask == 0
    scrambled.labels[off] = torch.randint(0, MODEL.vocab_size, (int(off.sum()),))
    loss_b, grad_b = masked_loss_and_grad(scrambled)
    results["masked_labels_loss_diff"] = abs(loss_a - loss_b)
    results["masked_labels_grad_diff"] = float((grad_a - grad_b).abs().max())
    masked_loss_and_grad(base)
    results["projection_grad_norm"] = float(model.patch_projection.weight.grad.norm())

    # Mismatch between <vpatch> tokens and patches.
    try:
        bad = collate([pack(docs)], seq)
        bad.patches = bad.patches[:-1]
        run(model, bad, "local")
        results["mismatch_error"] = ""
    except ValueError as e:
        results["mismatch_error"] = str(e)

    # A few optimizer steps on one image-caption pair drive its loss down.
    torch.manual_seed(0)
    fresh = build_model(MODEL, ParallelConfig(), backend="local")
    pair = collate([pack([image_document(3, 3, "a photograph of a lighthouse at dusk", 5)])], 48)
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
    parser.add_argument("--check", choices=["parity", "single"], required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(tensor_parallel=args.tp, seed=11)
    (check_parity if args.check == "parity" else check_single)(args)
    destroy_distributed()


if __name__ == "__main__":
    main()
