"""A teacher sharded with `keras.distribution` distils into a student in one
compiled step (JAX, 8 virtual CPU devices, Keras Hub Gemma models built
from scratch).

The checks run in one process of their own (`sharded_check.py`): the
virtual devices must be configured before JAX initialises.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("keras_hub")

HERE = os.path.dirname(__file__)
pytestmark = pytest.mark.backends("jax")


@pytest.fixture(scope="module")
def result():
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_check.py")],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    return json.loads(line[-1][len("RESULT"):])


# Keras Hub's Gemma layout map on the (batch 2, model 4) mesh, for the
# teacher (4 heads of 16, width 64, vocabulary 256, `intermediate_dim=128`,
# which Gemma halves: MLP kernels of 64 x 64): each shard's shape, worked
# out from the map by hand.
GEMMA_SHARDS = {
    "token_embedding/embeddings": [256 // 4, 64 // 2],      # (model, batch)
    "attention/query/kernel": [4 // 4, 64 // 2, 16],        # (model, batch, -)
    "attention/key/kernel": [1, 32, 16],
    "attention/value/kernel": [1, 32, 16],
    "attention/attention_output/kernel": [1, 16, 32],       # (model, -, batch)
    "ffw_gating/kernel": [64 // 2, 64 // 4],                # (batch, model)
    "ffw_gating_2/kernel": [32, 16],
    "ffw_linear/kernel": [64 // 4, 64 // 2],                # (model, batch)
}


def _shards_of(shards, suffix):
    found = [v for k, v in shards.items() if k.endswith(suffix)]
    assert found, suffix
    return found


@pytest.mark.parametrize("form", ["logits", "fused"])
def test_teacher_kernels_are_split_across_the_model_axis(result, form):
    run = result["train"][form]
    assert run["devices"] == 8
    for suffix, shape in GEMMA_SHARDS.items():
        for per_device in _shards_of(run["teacher_shards"], suffix):
            # One shard shape on every device: the kernel is split evenly.
            assert per_device == [shape], suffix
    # The norms are small and replicated.
    for per_device in _shards_of(run["teacher_shards"], "norm/scale"):
        assert per_device == [[64]]


def test_each_model_keeps_its_own_layout(result):
    # Teacher and student are Gemma models, so their variable paths are the
    # same: each took the layout of the scope it was built in.
    replicated = result["train"]["logits"]["student_shards"]
    # Student: width 32, MLP kernels 32 x 32, 4 heads of 8.
    assert _shards_of(replicated, "ffw_gating/kernel") == [[[32, 32]]]
    own = result["train"]["fused"]["student_shards"]
    assert _shards_of(own, "ffw_gating/kernel") == [[[32 // 2, 32 // 4]]]
    assert _shards_of(own, "attention/query/kernel") == [[[1, 16, 8]]]


@pytest.mark.parametrize("form", ["logits", "fused"])
def test_three_steps_match_one_device(result, form):
    run = result["train"][form]
    assert len(run["loss"]) == 3
    np.testing.assert_allclose(run["loss"], run["reference_loss"],
                               rtol=0, atol=1e-5)
    # The student moved (a loss that did not train would match too).
    assert run["loss"][2] < run["loss"][0] - 1e-3
    assert run["max_weight_diff"] < 1e-5
    assert run["teacher_unchanged"]


def test_a_model_built_off_the_mesh_is_named_before_training(result):
    message = result["train"]["off_mesh_error"]
    assert message.startswith("The teacher 'gemma_causal_lm")
    assert "'token_embedding/embeddings' on 1 device(s)" in message
    assert "runs the step on 8" in message


def test_teacher_memory_per_device_falls_as_one_over_the_model_axis(result):
    rows = {row["model_axis"]: row for row in result["memory"]}
    assert sorted(rows) == [1, 2, 4, 8]
    total = rows[1]["teacher_bytes"]
    assert rows[1]["argument_bytes"] > total  # the teacher and the rest
    for m, row in rows.items():
        # XLA's per-device arguments of the compiled step: everything but
        # the teacher (the student, its optimizer, the batch) is the same
        # at every M, so the change from M = 1 is the teacher's.
        teacher = row["argument_bytes"] - rows[1]["argument_bytes"] + total
        assert teacher == row["teacher_shard_bytes"], m
        if m == 1:
            continue
        # The kernels are split M ways; only the norms (replicated) are
        # not.
        replicated = row["teacher_replicated_bytes"]
        assert replicated < 0.01 * total
        expected = (total - replicated) / m + replicated
        assert teacher == pytest.approx(expected, rel=1e-6), m
        assert teacher / total < 1 / m + 0.01, m


def test_teacher_cache_from_a_sharded_teacher(result):
    out = result["cache"]
    assert out["keys"]
    assert set(out["max_diff"]) == {"indices", "log_probs", "tail_mass"}
    assert out["max_diff"]["indices"] == 0
    assert out["max_diff"]["log_probs"] < 1e-3   # float16 storage
    assert out["max_diff"]["tail_mass"] < 1e-5


@pytest.mark.parametrize("kind", ["local_modules", "layerwise_lr"])
def test_extensions_with_a_sharded_teacher_match_one_device(result, kind):
    run = result["extensions"][kind]
    # The CNN teacher's kernels are split on their output channels.
    assert run["teacher_shards"]["t_stage1/kernel"] == [[3, 3, 1, 8 // 4]]
    assert run["teacher_shards"]["t_stage2/kernel"] == [[3, 3, 8, 16 // 4]]
    np.testing.assert_allclose(run["loss"], run["reference_loss"],
                               rtol=0, atol=1e-5)
    assert run["max_weight_diff"] < 1e-5
