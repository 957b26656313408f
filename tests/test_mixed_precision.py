"""Training under Keras' mixed-precision policies, on every backend.

Each configuration trains a few steps under `mixed_float16` (Keras wraps the
optimizer in a `LossScaleOptimizer`) and `mixed_bfloat16`, from the same
initial weights as a float32 run: the loss must fall, nothing may be NaN,
and the (float32) weights must stay close to the float32 run's.
"""

import keras
import numpy as np
import pytest

from keras_kd import Distiller, LayerwiseLearningRate, LocalModules, Term
from keras_kd.losses import CMKD, DIST, KD, AttentionTransfer, FeatureMSE

from conftest import make_cnn

POLICIES = ("mixed_float16", "mixed_bfloat16")
STEPS = 6
# After 6 SGD steps at lr 0.05: the largest difference between a mixed run's
# student weights and the float32 run's, relative to the largest weight.
# Measured on TensorFlow, JAX and PyTorch (CPU), the largest of the three:
# - core (KD, two feature terms, DIST, CMKD): mixed_float16 0.054,
#   mixed_bfloat16 0.080. The rank-based CMKD reads half-precision logits,
#   whose ties move with rounding, and six terms compound;
# - local modules: 1e-4 and 0.005; ensemble with diagnostics: 1e-4, 0.0043;
# - layer-wise learning rates (Jacobian signal): 2.2e-4 and 0.0025.
TOLERANCE = {
    ("core", "mixed_float16"): 0.1, ("core", "mixed_bfloat16"): 0.15,
    ("lakd", "mixed_float16"): 1e-3, ("lakd", "mixed_bfloat16"): 0.02,
    ("ensemble", "mixed_float16"): 1e-3, ("ensemble", "mixed_bfloat16"): 0.02,
    ("layerwise", "mixed_float16"): 1e-3, ("layerwise", "mixed_bfloat16"): 0.02,
}
SETUPS = ["core", "lakd", "ensemble", "layerwise"]


def build(setup, optimizer=None):
    teachers = [make_cnn("t", 8)]
    student = make_cnn("s", 4)
    terms = [Term(KD(4.0), 0.9)]
    kwargs = {}
    if setup == "core":
        terms += [
            Term(FeatureMSE(), 1.0, teacher_layer="t_stage1",
                 student_layer="s_stage1"),
            Term(AttentionTransfer(), 10.0, teacher_layer="t_stage2",
                 student_layer="s_stage2"),
            Term(DIST(), 0.5), Term(CMKD(), 0.5),
        ]
    elif setup == "lakd":
        kwargs["local_modules"] = LocalModules(["s_stage1", "s_stage2"],
                                               ["t_stage1", "t_stage2"])
    elif setup == "layerwise":
        # The Jacobian signal differentiates the half-precision models;
        # scales are re-estimated on steps 0, 2, 4.
        kwargs["layerwise_lr"] = LayerwiseLearningRate(
            [("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")],
            signal="jacobian", update_every=2, min_scale=0.5, max_scale=2.0)
    else:  # an ensemble with diagnostics
        teachers.append(make_cnn("u", 8))
        kwargs["diagnostics"] = ["top1_agreement", "teacher_kl"]
    d = Distiller(teachers if len(teachers) > 1 else teachers[0], student,
                  terms=terms, student_loss_weight=0.1, **kwargs)
    d.compile(optimizer=optimizer or keras.optimizers.SGD(0.05),
              loss=keras.losses.SparseCategoricalCrossentropy(
                  from_logits=True))
    return d


def train(setup, policy, x, y, weights=None, optimizer=None, steps=STEPS):
    """Trains `steps` steps under `policy`; returns the initial weights of
    the whole distiller, the training losses, and the student's weights
    before and after."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        d = build(setup, optimizer)
        if weights is None:
            weights = d.get_weights()
        d.set_weights(weights)
        before = [keras.ops.convert_to_numpy(w) for w in d.student.weights]
        losses = [float(d.train_on_batch(x, y, return_dict=True)["loss"])
                  for _ in range(steps)]
        after = [keras.ops.convert_to_numpy(w) for w in d.student.weights]
        return weights, losses, before, after, d.optimizer
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("policy", POLICIES)
def test_trains_under_mixed_precision_close_to_float32(data, setup,
                                                       policy):
    x, y = data
    weights, _, initial, reference, _ = train(setup, "float32", x, y)
    # A loss scale that does not overflow from the first step, so that the
    # mixed run takes the same steps as the float32 one (the automatic
    # scale skips steps while it halves from 2**15; see the next test).
    optimizer = (keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.05), initial_scale=2.0**10)
        if policy == "mixed_float16" else None)
    _, losses, _, mixed, _ = train(setup, policy, x, y, weights, optimizer)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(np.all(np.isfinite(w)) for w in mixed)
    scale = max(float(np.abs(w).max()) for w in reference)
    gap = max(float(np.abs(a - b).max()) for a, b in zip(mixed, reference))
    assert gap / scale < TOLERANCE[setup, policy], gap / scale
    # The weights moved much further than the two runs differ.
    moved = max(float(np.abs(a - b).max()) for a, b in zip(mixed, initial))
    assert moved > 5 * gap, (moved, gap)


@pytest.mark.parametrize("setup", ["core", "lakd", "layerwise"])
def test_automatic_loss_scaling_under_mixed_float16(data, setup):
    x, y = data
    _, losses, before, after, optimizer = train(setup, "mixed_float16", x,
                                                y, steps=12)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    assert all(np.all(np.isfinite(w)) for w in after)


def test_distiller_computes_in_half_precision_under_the_policy(data):
    x, _ = data
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        d = build("core")
        assert keras.backend.standardize_dtype(
            d.student(x[:2]).dtype) == "bfloat16"
        assert all(keras.backend.standardize_dtype(w.dtype) == "float32"
                   for w in d.student.weights)
    finally:
        keras.mixed_precision.set_global_policy("float32")
