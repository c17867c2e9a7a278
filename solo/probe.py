"""A probe that sees: greedy generation on held-out labelled images, every `probe.interval_steps`.

SOLO's Sec. 7.1: equal pretraining losses can hide a model that does not look at the image. So a
stage can name a folder of held-out `solo-preprocess imagenet` shards (documents `<s> IMAGE name</s>`);
every `probe.interval_steps` steps and after the last, each of its first `probe.images` images is
prompted (`probe.template`, `probe.prompt`; plain: the image alone, as in pretraining) and answered
greedily by the model being trained, and the answer scored against the label: `exact` (stage 1,
class names) or `contains` (stages 2-3: the caption names the labelled object). `solo.train` logs
the accuracy with the step (console, metrics.jsonl, wandb) and `solo-plot` draws it; the
generations of each probe are kept in `SAVE_DIR/probe/step_NNNNNNN.json`.

megatron-core runs it, under any tensor and data parallelism (pipeline parallelism is refused by
the config): the model's own forward through the same schedule as training
(`get_forward_backward_func`, forward only), the vocabulary-parallel logits of the last position
gathered over tensor parallelism (`gather_from_tensor_model_parallel_region`); data-parallel ranks
take every dp-th image and the counts are summed over the data-parallel group. Decoding re-runs the
forward on the grown sequence (no KV cache): for p prompt tokens and n new ones that is n forwards
of about p + n tokens per image, bounded by `probe.images` x `probe.max_new_tokens`. As
`solo-generate`, every id >= 32000 but the template's stop id is suppressed (`solo.templates`). The
probe changes nothing in training: no gradient, the RNG states restored, the model back in the mode
it was in.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from solo.config import ProbeConfig
from solo.data.batch import attention_inputs, collate
from solo.data.shards import PackedSample, ShardError, list_shards, open_shard
from solo.distributed import device
from solo.fileio import atomic_write_json
from solo.templates import get_template
from solo.tokenizer import TOKEN_IDS, SOLOTokenizer


@dataclass(frozen=True)
class ProbeImage:
    image_ids: list[int]  # <vision> rows ... </vision>, as preprocessed
    patches: np.ndarray  # uint8 [n, 3P²]
    answer_ids: list[int]  # the label's ids, without </s>
    label: str
    origin: str  # shard sample and document, for the generations file


def read_probe_images(folder: str, limit: int, patch_size: int) -> list[ProbeImage]:
    """The first `limit` image documents of a folder of imagenet shards, in shard order."""
    images: list[ProbeImage] = []
    tok = SOLOTokenizer.default()
    for prefix in list_shards(folder):
        shard = open_shard(prefix)
        if shard.manifest.get("patch_size") != patch_size:
            raise ShardError(f"probe.path {prefix}: patches of size {shard.manifest.get('patch_size')}, "
                             f"the model uses patch_size={patch_size}")
        for i in range(len(shard)):
            images += _image_documents(shard.sample(i), tok)
            if len(images) >= limit:
                return images[:limit]
    if not images:
        raise ShardError(f"probe.path {folder}: no image documents (`<s> IMAGE name</s>`, solo-preprocess imagenet)")
    return images


def _image_documents(sample: PackedSample, tok: SOLOTokenizer) -> list[ProbeImage]:
    found, offset, patches = [], 0, iter(sample.patches)
    for k, length in enumerate(sample.document_lengths):
        doc = sample.tokens[offset:offset + length].tolist()
        offset += length
        if TOKEN_IDS.vision_start_id not in doc:
            continue
        start, end = doc.index(TOKEN_IDS.vision_start_id), doc.index(TOKEN_IDS.vision_end_id)
        answer = doc[end + 1:]
        answer = answer[:-1] if answer and answer[-1] == TOKEN_IDS.eos_id else answer
        found.append(ProbeImage(doc[start:end + 1], next(patches), answer, tok.decode(answer).strip(),
                                f"{sample.origin} document {k}"))
    return found


def correct(match: str, generated: str, label: str) -> bool:
    """exact: the text is the label; contains: the text names the label as a word (any case)."""
    if match == "exact":
        return generated.strip() == label
    return re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", generated.lower()) is not None


def build_probe(cfg: ProbeConfig, save_dir: str, patch_size: int) -> Probe | None:
    return Probe(cfg, save_dir, patch_size) if cfg.path else None


class Probe:
    """Built once per run (reads the images); `run(training, step)` probes the current weights."""

    def __init__(self, cfg: ProbeConfig, save_dir: str, patch_size: int):
        self.cfg, self.dir = cfg, Path(save_dir) / "probe"
        self.template = get_template(cfg.template)
        self.tok = SOLOTokenizer.default()
        images = read_probe_images(cfg.path, cfg.images, patch_size)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.mine = images[parallel_state.get_data_parallel_rank()::self.dp_size]  # this data-parallel rank's share
        self.total = len(images)

    def after_step(self, training, step: int, last_step: int) -> dict:
        """`run`'s numbers when a probe is due after `step`, else {}."""
        due = step % self.cfg.interval_steps == 0 or step == last_step
        return self.run(training, step) if due else {}

    def run(self, training, step: int) -> dict:
        """{"probe_accuracy", "probe_images", "probe_s"} of the weights after `step` (every rank)."""
        started = time.perf_counter()
        prompts = [self.template.prompt(self.tok, self.cfg.prompt, im.image_ids) for im in self.mine]
        with _untouched(training.ddp):
            answers = greedy(training, prompts, [im.patches for im in self.mine], self.cfg.max_new_tokens,
                             self.template.stop_ids(), self.template.stop_id)
        rows = []
        for im, ids in zip(self.mine, answers, strict=True):
            text = self.tok.decode(ids).strip()
            rows.append({"origin": im.origin, "label": im.label, "generated": text, "generated_ids": ids,
                         "correct": correct(self.cfg.match, text, im.label)})
        hits = torch.tensor([sum(r["correct"] for r in rows), len(rows)], dtype=torch.float64, device=device())
        dist.all_reduce(hits, group=parallel_state.get_data_parallel_group())
        self._write(step, rows)
        return {"probe_accuracy": hits[0].item() / max(hits[1].item(), 1), "probe_images": int(hits[1].item()),
                "probe_s": time.perf_counter() - started}

    def _write(self, step: int, rows: list[dict]) -> None:
        """Every data-parallel rank's generations, in one file written by global rank 0."""
        gathered = [None] * self.dp_size
        dist.all_gather_object(gathered, rows, group=parallel_state.get_data_parallel_group())
        if dist.get_rank() == 0:
            ordered = [r for k in range(self.total) for r in [gathered[k % self.dp_size][k // self.dp_size]]]
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / f"step_{step:07d}.json",
                              {"step": step, "match": self.cfg.match, "generations": ordered}, indent=1)


class _untouched:
    """No gradients, eval mode, and the RNG states (torch's and megatron-core's tracker) as they were."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)
        self.no_grad.__exit__(*exc)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        tensor_parallel.get_cuda_rng_tracker().set_states(self.tracker)


def greedy(training, prompts: list[list[int]], patches: list[np.ndarray], max_new_tokens: int,
           stop_ids: list[int], allowed_special: int) -> list[list[int]]:
    """Greedy answers (stop id excluded) to `prompts`, one row each, on this model-parallel group."""
    answers: list[list[int]] = [[] for _ in prompts]
    running = [bool(prompts)] * len(prompts)
    for _ in range(max_new_tokens):
        if not any(running):
            break
        rows = [p + a for p, a in zip(prompts, answers, strict=True)]
        next_ids = _next_tokens(training, rows, patches, allowed_special)
        for r, token in enumerate(next_ids):
            if running[r]:
                if token in stop_ids:
                    running[r] = False
                else:
                    answers[r].append(token)
    return answers


def _next_tokens(training, rows: list[list[int]], patches: list[np.ndarray], allowed_special: int) -> list[int]:
    """The argmax next id after each row, one forward of the model through megatron-core's schedule."""
    from solo.train import activation_shape

    tp = parallel_state.get_tensor_model_parallel_world_size()
    seq_length = -(-max(map(len, rows)) // tp) * tp  # sequence parallelism splits the sequence over TP
    samples = [PackedSample(np.asarray(r, np.int32), np.zeros(len(r), np.uint8), [len(r)], [p])  # no loss
               for r, p in zip(rows, patches, strict=True)]
    batch = collate(samples, seq_length, TOKEN_IDS.pad_id).to(device())
    last = torch.tensor([r * seq_length + len(row) - 1 for r, row in enumerate(rows)], device=device())
    backend = training.model.backend

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        if backend != "local" and b.tokens.shape[0] > 1:
            b = b.as_one_row()
        mask, packed_seq_params = attention_inputs(b, backend)
        logits = model(b.tokens, b.position_ids, mask, patches=b.patches, packed_seq_params=packed_seq_params)
        return logits, _argmax

    def _argmax(logits):
        vocab_shard = logits.reshape(-1, logits.shape[-1])[last]  # [rows, V/TP] at each row's last token
        full = tensor_parallel.gather_from_tensor_model_parallel_region(vocab_shard).float()
        banned = torch.ones(full.shape[-1], dtype=torch.bool, device=full.device)
        banned[:TOKEN_IDS.first_special_id] = False
        banned[allowed_special] = False
        ids = full.masked_fill(banned, float("-inf")).argmax(-1)
        return full.new_zeros(()), torch.zeros((), dtype=torch.int, device=full.device), {"next": ids}

    seq, micro = activation_shape(backend, seq_length, len(rows))
    out = training.forward_backward(forward_step_func=forward_step, data_iterator=iter([batch]), model=[training.ddp],
                                    num_microbatches=1, seq_length=seq, micro_batch_size=micro, forward_only=True)
    return out[0]["next"].tolist()  # pipeline_parallel 1 (TrainConfig.validate): this stage is the last
