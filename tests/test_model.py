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


def test_documents_in_a_packed_row_do_not_see_each_other(single):
    assert single["doc0_unchanged_max_diff"] == 0.0
    assert single["doc2_changed_max_diff"] > 1e-3  # the check is sensitive: pixels do matter
    assert single["packed_vs_alone_max_diff"] < 1e-4
    assert single["position_restarts"]


def test_flex_attention_backend_matches_block_diagonal_mask(single):
    assert single["flex_vs_mask_max_diff"] < 1e-4


def test_no_loss_or_gradient_from_special_ids_or_padding(single):
    assert single["loss_on_special_ids"] == 0.0
    assert single["loss_on_padding"] == 0.0
    assert single["masked_labels_loss_diff"] == 0.0
    assert single["masked_labels_grad_diff"] == 0.0


def test_patch_projection_learns(single):
    assert single["projection_grad_norm"] > 0
    losses = single["pair_losses"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_vpatch_patch_mismatch_is_a_clear_error(single):
    assert "<vpatch> tokens" in single["mismatch_error"] and "image patches" in single["mismatch_error"]
