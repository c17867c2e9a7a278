"""SOLOModel checks on one GPU (world of one): FlexAttention document masking, flex vs dense-mask parity.

    python3 benchmarks/gpu_checks.py            # GPU if there is one, else the CPU smoke version
    python3 benchmarks/gpu_checks.py --cpu-smoke

Checks (one PASS/FAIL line each, exit status 1 if any fails):

(a) isolation  — flex backend: later documents' logits in a packed row do not change when the
                 first documents' tokens or pixels change; a document's logits inside the packed row equal
                 its logits alone in a row (fp32, and bf16 with a looser tolerance).
(b) parity     — flex backend vs the local backend (dense block-diagonal causal mask) with the same
                 weights (load_state_dict), fp32 and bf16; also at a length that is no multiple of
                 FlexAttention's 128-token block.
(c) backward   — forward + backward through flex reaches patch_projection (and every parameter), and
                 the gradients agree with the local backend's.

No tokenizer file is needed: documents are random text ids plus the real SOLO image-token layout
(ids from `solo.tokenizer`'s constants), so mistral-common need not be installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solo.config import ModelConfig, ParallelConfig  # noqa: E402
from solo.data.batch import attention_inputs, collate  # noqa: E402
from solo.data.shards import PackedSample  # noqa: E402
from solo.distributed import destroy_distributed, device, init_distributed  # noqa: E402
from solo.model import build_model  # noqa: E402
from solo.tokenizer import SP_VOCAB_SIZE, TOKEN_IDS  # noqa: E402
from solo.vision import image_token_ids  # noqa: E402

IDS = TOKEN_IDS  # the ids SOLOTokenizer gives, without loading its sentencepiece model

MODEL = ModelConfig(preset="tiny", num_layers=2, hidden_size=256, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=512, patch_size=32)

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def text_document(rng, n):
    tokens = [IDS.bos_id] + rng.integers(3, SP_VOCAB_SIZE, n - 2).tolist() + [IDS.eos_id]
    return tokens, [0] + [1] * (n - 1), None


def image_document(rng, rows, cols, caption_len, patch_dim):
    caption = rng.integers(3, SP_VOCAB_SIZE, caption_len).tolist()
    tokens = [IDS.bos_id] + image_token_ids(rows, cols, IDS) + caption + [IDS.eos_id]
    loss = [0] * (len(tokens) - caption_len - 1) + [1] * (caption_len + 1)
    patches = rng.integers(0, 256, (rows * cols, patch_dim), dtype=np.uint8)
    return tokens, loss, patches


def documents(seed=0):
    rng = np.random.default_rng(seed)
    return [
        image_document(rng, 4, 4, 40, MODEL.patch_dim),   # 62 tokens
        text_document(rng, 150),
        image_document(rng, 3, 5, 60, MODEL.patch_dim),   # 80 tokens
        text_document(rng, 97),
        image_document(rng, 6, 2, 30, MODEL.patch_dim),   # 50 tokens
    ]


def batch_of(docs, seq):
    return collate([PackedSample.of_documents(docs)], seq, pad_id=IDS.pad_id).to(device())


def logits(model, batch, backend):
    mask, packed = attention_inputs(batch, backend)
    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, mask, patches=batch.patches, packed_seq_params=packed)
    return out[0, :, :MODEL.vocab_size].float()  # [s, vocab]


def loss_and_grads(model, batch, backend):
    model.zero_grad(set_to_none=True)
    mask, packed = attention_inputs(batch, backend)
    per_token = model(batch.tokens, batch.position_ids, mask, patches=batch.patches,
                      labels=batch.labels, packed_seq_params=packed)
    loss = (per_token.float() * batch.loss_mask).sum() / batch.loss_mask.sum()
    loss.backward()
    grads = {n: (p.grad.float().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    return loss.item(), grads


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def build(backend, bf16, seed=7):
    torch.manual_seed(seed)
    return build_model(MODEL, ParallelConfig(), backend=backend, bf16=bf16).eval()


def check_isolation(dtype_name, bf16, tol, seq):
    docs = documents()
    lengths = [len(d[0]) for d in docs]
    bounds = np.cumsum([0] + lengths)
    model = build("flex", bf16)
    base = batch_of(docs, seq)
    ref = logits(model, base, "flex")

    # Change the FIRST document (text and pixels): causal attention alone would let every later
    # document see it, so only the document mask keeps documents 1..4 unchanged.
    altered = list(docs)
    t, l, p = docs[0]
    altered[0] = (t[:-5] + [7, 8, 9, 10, IDS.eos_id], l, 255 - p)  # other pixels, other caption tail
    t, l, p = docs[1]
    altered[1] = ([t[0]] + t[1:-1][::-1] + [t[-1]], l, p)  # same length, other text
    out = logits(model, batch_of(altered, seq), "flex")
    later = max_diff(out[bounds[2]:bounds[-1]], ref[bounds[2]:bounds[-1]])
    moved = max_diff(out[:bounds[1]], ref[:bounds[1]])
    report(f"isolation[{dtype_name}] docs 2-4 unchanged when docs 0 and 1 change", later <= tol and moved > tol,
           f"max|diff| docs 2-4 = {later:.3e} (tol {tol:g}); the changed doc0 moved by {moved:.3e}")

    worst = 0.0
    for k in (0, 2, 3):
        alone = logits(model, batch_of([docs[k]], seq), "flex")
        worst = max(worst, max_diff(alone[:lengths[k]], ref[bounds[k]:bounds[k + 1]]))
    report(f"isolation[{dtype_name}] packed == alone (docs 0, 2, 3)", worst <= tol,
           f"max|diff| = {worst:.3e} (tol {tol:g})")
    del model


def check_parity(dtype_name, bf16, tol, seq):
    local = build("local", bf16)
    flex = build("flex", bf16, seed=99)  # other init, then the local weights are loaded
    missing = flex.load_state_dict(local.state_dict(), strict=True)
    batch = batch_of(documents(), seq)
    a, b = logits(local, batch, "local"), logits(flex, batch, "flex")
    d = max_diff(a, b)
    scale = float(a.abs().max())
    report(f"parity[{dtype_name}, seq {seq}] flex vs local (dense mask) logits", d <= tol,
           f"max|diff| = {d:.3e} (tol {tol:g}; max|logit| {scale:.3f}; load_state_dict {missing})")
    return local, flex, batch


def check_backward(dtype_name, local, flex, batch, tol):
    loss_l, grads_l = loss_and_grads(local.train(), batch, "local")
    loss_f, grads_f = loss_and_grads(flex.train(), batch, "flex")
    missing = [n for n, g in grads_f.items() if g is None]
    nonfinite = [n for n, g in grads_f.items() if g is not None and not torch.isfinite(g).all()]
    proj = grads_f.get("patch_projection.weight")
    proj_norm = float(proj.norm()) if proj is not None else 0.0
    ok = not missing and not nonfinite and proj_norm > 0 and np.isfinite(loss_f)
    report(f"backward[{dtype_name}] flex: gradients reach patch_projection and every parameter", ok,
           f"loss {loss_f:.5f}, |grad patch_projection| = {proj_norm:.3e}, "
           f"params without grad {missing or 'none'}, non-finite {nonfinite or 'none'}")
    rel = max(max_diff(grads_f[n], g) / max(float(g.abs().max()), 1e-12) for n, g in grads_l.items())
    report(f"backward[{dtype_name}] flex vs local gradients and loss", rel <= tol and abs(loss_f - loss_l) <= tol,
           f"max over params of max|dg|/max|g| = {rel:.3e}, |dloss| = {abs(loss_f - loss_l):.3e} (tol {tol:g})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (automatic without a GPU)")
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    if args.cpu_smoke:
        torch.cuda.is_available = lambda: False  # everything (init_distributed, build_model) takes the CPU path
    init_distributed(seed=11)
    gpu = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if gpu else "CPU (smoke: eager FlexAttention, fp32 only)"
    print(f"device: {where}; torch {torch.__version__}; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}; "
          f"model {MODEL.num_layers} layers, hidden {MODEL.hidden_size}, heads {MODEL.num_attention_heads}/"
          f"{MODEL.num_query_groups} groups, patch {MODEL.patch_size}; packed row of {args.seq} tokens", flush=True)

    check_isolation("fp32", bf16=False, tol=1e-5, seq=args.seq)
    local, flex, batch = check_parity("fp32", bf16=False, tol=1e-4, seq=args.seq)
    if gpu:
        check_backward("fp32", local, flex, batch, tol=1e-3)
    else:
        print("SKIP backward[fp32]: FlexAttention has no backward on the CPU (GPU only)", flush=True)
    del local, flex
    check_parity("fp32", bf16=False, tol=1e-4, seq=args.seq - 12)  # no multiple of 128
    if gpu:
        check_isolation("bf16", bf16=True, tol=3e-2, seq=args.seq)
        local, flex, batch = check_parity("bf16", bf16=True, tol=5e-2, seq=args.seq)
        check_backward("bf16", local, flex, batch, tol=1e-1)
        del local, flex

    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{'ALL PASS' if not failed else 'FAILED'}: {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed"
          + (f"; failed: {failed}" if failed else ""), flush=True)
    destroy_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
