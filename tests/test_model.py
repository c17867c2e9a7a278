"""SOLOModel on megatron-core (CPU, gloo ranks launched with torchrun)."""

import json

import numpy as np
import pytest

from tests.torchrun import torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "single.json"
    torchrun("model_checks.py", 1, "--check", "single", "--out", out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    runs = {}
    for name, nproc, extra in [("tp1", 1, []), ("tp2", 2, []), ("tp2sp", 2, ["--sp"])]:
        torchrun("model_checks.py", nproc, "--check", "parity", "--tp", str(nproc), *extra,
                 "--out", folder / f"{name}.npz")
        runs[name] = dict(np.load(folder / f"{name}.npz"))
    return runs


@pytest.mark.parametrize("layout", ["tp2", "tp2sp"])
def test_tensor_parallel_gives_same_loss_logits_and_projection_gradient(parity, layout):
    ref, other = parity["tp1"], parity[layout]
    assert float(ref["loss"]) > 0
    np.testing.assert_allclose(other["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(other["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
    assert np.abs(ref["grad"]).max() > 0
    np.testing.assert_allclose(other["grad"], ref["grad"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(other["norm_grad"], ref["norm_grad"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp2sp"])
def test_with_the_loss_mask_the_output_layer_runs_at_target_positions_only(parity, layout):
    # Training hands the loss mask to the model, which then computes logits and cross entropy at
    # the target positions only: the same loss there, 0 elsewhere, the same gradient everywhere.
    run = parity[layout]
    mask = run["loss_mask"] > 0
    assert 0 < mask.sum() < mask.size  # the batch has positions without loss (patches, <s>, padding)
    assert run["picked_rows"].tolist() == [[mask.sum(), 1]]  # [n, 1] rows into the output layer, once
    np.testing.assert_allclose(run["picked_per_token"][mask], run["full_per_token"][mask], rtol=1e-5)
    assert np.all(run["picked_per_token"][~mask] == 0)
    np.testing.assert_allclose(run["picked_loss"], run["loss"], rtol=1e-6)
    assert np.abs(run["full_grads"]).max() > 0
    np.testing.assert_allclose(run["picked_grads"], run["full_grads"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", ["first", "first_pixels", "middle"])
def test_documents_in_a_packed_row_do_not_see_each_other(single, case):
    # One document's text and/or pixels changed: the other documents' (and the padding's) logits
    # stay, the later ones included, which causality alone would not guarantee.
    diffs = single["isolation"][case]
    assert diffs["changed"] > 1e-3  # the change is felt: the check is sensitive
    assert diffs["later"] == 0.0 and diffs["others"] == 0.0, diffs


def test_a_document_gives_the_same_logits_packed_and_alone(single):
    assert single["packed_vs_alone_max_diff"] < 1e-4
    assert single["position_restarts"]


def test_flex_attention_backend_matches_block_diagonal_mask(single):
    assert single["flex_vs_mask_max_diff"] < 1e-4


def test_collate_masks_special_ids_boundaries_and_padding(single):
    # The sample marked every token a target; collate must drop these and keep everything else.
    counts = single["excluded_counts"]
    assert counts["special"] > 0 and counts["boundary"] == 2 and counts["padding"] > 1, counts
    assert single["mask_on_excluded"] == 0.0
    assert single["mask_elsewhere"] == [1.0]


def test_no_loss_or_gradient_from_special_ids_or_padding(single):
    for name in ("relabelled_excluded", "repadded"):
        assert single[f"{name}_loss_diff"] == 0.0, name
        assert single[f"{name}_grad_diff"] == 0.0, name
    # Control: relabelling one real target moves both.
    assert single["relabelled_target_loss_diff"] > 1e-3
    assert single["relabelled_target_grad_diff"] > 0


def test_patch_projection_learns(single):
    assert single["projection_grad_norm"] > 0
    losses = single["pair_losses"]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("case, delta", [("too_few", -1), ("too_many", 1)])
def test_vpatch_patch_mismatch_is_a_clear_error(single, case, delta):
    n = single["vpatch_count"]
    assert n == 2 * 3 + 3 * 2  # the two images of standard_documents
    message = single[f"mismatch_{case}"]
    assert f"{n} <vpatch> tokens" in message and f"{n + delta} image patches" in message, message


def test_device_side_normalization_is_the_vision_modules_bit_for_bit():
    """collate hands the model raw uint8 patches; the model's normalization must be exactly the one
    the processor (and so the exported HF model) uses."""
    import torch

    from solo.model import normalize_patches as on_device
    from solo.vision import normalize_patches

    patches = np.random.default_rng(0).integers(0, 256, (300, 3 * 32 * 32), dtype=np.uint8)
    patches[0], patches[1] = 0, 255
    assert np.array_equal(on_device(torch.from_numpy(patches)).numpy(), normalize_patches(patches))


def test_every_recompute_setting_gives_the_loss_and_gradients_of_no_recompute(tmp_path):
    """TP=2 with sequence parallel on 2 gloo ranks, fp32: recomputation changes memory, not numbers."""
    out = tmp_path / "recompute.npz"
    torchrun("model_checks.py", 2, "--check", "recompute", "--tp", "2", "--sp", "--out", out)
    runs = dict(np.load(out))
    ref_loss, ref_grad = float(runs["none_loss"]), runs["none_grad"]
    assert ref_loss > 0 and np.abs(ref_grad).max() > 0
    assert list(runs["full_uniform_2_settings"]) == ["full", "uniform"]  # reached megatron-core
    assert list(runs["full_block_1_settings"]) == ["full", "block"]
    assert list(runs["selective_settings"]) == ["selective", ""]
    assert list(runs["none_settings"]) == ["", ""]
    for name in ("full_uniform_2", "full_uniform_4", "full_block_1", "full_block_4", "selective"):
        np.testing.assert_allclose(runs[f"{name}_loss"], ref_loss, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(runs[f"{name}_grad"], ref_grad, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("backend,cuda,kernel,fused", [
    ("te", True, True, True),  # TransformerEngine on a GPU with apex's wgrad kernel: Megatron-LM's default
    ("te", True, False, False),  # without apex the output layer (ColumnParallelLinear) would raise
    ("te", False, True, False),  # the kernels are CUDA only
    ("flex", True, True, False),  # local layers: unfused
    ("local", False, False, False),
])
def test_gradient_accumulation_fusion_only_where_the_fused_kernels_exist(backend, cuda, kernel, fused):
    from solo.model import gradient_accumulation_fusion

    assert gradient_accumulation_fusion(backend, cuda, kernel) is fused


def test_gradient_accumulation_fusion_is_off_in_the_cpu_config():
    from solo.config import MODEL_PRESETS, ParallelConfig
    from solo.model import transformer_config

    for backend in ("local", "te"):
        config = transformer_config(MODEL_PRESETS["tiny"], ParallelConfig(), backend=backend)
        assert config.gradient_accumulation_fusion is False
