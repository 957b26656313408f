"""`from_logits=False`: every loss that reads class scores as a
distribution takes probabilities (a softmax output) and then equals, in
value and gradient, the same loss on the logits; probabilities passed as
logits give another value; `from_logits` and `dtype` survive `get_config`.
On every backend."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_kd.losses
from backend_utils import to_numpy, value_and_grad
from keras_kd.losses import (
    CMKD,
    DIST,
    KD,
    ActivationMapping,
    AttentionTransfer,
    DistillationLoss,
    FeatureMSE,
    ForwardKL,
    GeneralizedJSD,
    PearsonCorrelation,
    ReverseKL,
    SkewKL,
    SpearmanCorrelation,
)
from keras_kd.ops.probabilities import as_logits

# Every loss that reads a distribution, with settings that exercise its
# options (temperature, standardization, the intra-class term, chunks).
DISTRIBUTION_LOSSES = {
    "kd": lambda **kw: KD(temperature=2.0, **kw),
    "kd_standardized": lambda **kw: KD(temperature=2.0, standardize=True,
                                       **kw),
    "pearson": lambda **kw: PearsonCorrelation(temperature=2.0, **kw),
    "spearman": lambda **kw: SpearmanCorrelation(temperature=2.0, **kw),
    "dist": lambda **kw: DIST(temperature=4.0, **kw),
    "cmkd": lambda **kw: CMKD(temperature=4.0, intra_weight=0.5, **kw),
    "cmkd_standardized": lambda **kw: CMKD(temperature=2.0, standardize=True,
                                           **kw),
    "forward_kl": lambda **kw: ForwardKL(temperature=2.0, **kw),
    "reverse_kl": lambda **kw: ReverseKL(**kw),
    "jsd": lambda **kw: GeneralizedJSD(beta=0.3, **kw),
    "skew_kl": lambda **kw: SkewKL(alpha=0.1, **kw),
    "skew_reverse_kl": lambda **kw: SkewKL(alpha=0.1, reverse=True, **kw),
    "forward_kl_chunked": lambda **kw: ForwardKL(chunk_size=2, **kw),
}
SEQUENCE_LOSSES = {"forward_kl_chunked"}  # run on (batch, time, vocab)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def scores(name):
    rng = np.random.default_rng(0)
    shape = (4, 5, 9) if name in SEQUENCE_LOSSES else (6, 9)
    # Probabilities well above epsilon: the clipping does not act.
    return [(rng.normal(size=shape) * 1.5).astype("float32")
            for _ in range(2)]


def value_and_student_grad(loss, teacher, student, to_input):
    """The loss of `to_input(teacher)`, `to_input(student)` and its gradient
    with respect to the student logits (through `to_input`)."""
    weights = np.linspace(0.5, 1.5, teacher.shape[0]).astype("float32")

    def fn(z_s):
        return loss(to_input(ops.convert_to_tensor(teacher)), to_input(z_s),
                    sample_weight=weights)

    value, (grad,) = value_and_grad(fn, student)
    return value, grad


@pytest.mark.parametrize("name", sorted(DISTRIBUTION_LOSSES))
def test_probabilities_give_the_loss_of_the_logits(name):
    teacher, student = scores(name)
    make = DISTRIBUTION_LOSSES[name]

    def softmax(z):
        return ops.softmax(z, axis=-1)

    on_logits = value_and_student_grad(make(), teacher, student, lambda z: z)
    on_probabilities = value_and_student_grad(
        make(from_logits=False), teacher, student, softmax)
    np.testing.assert_allclose(on_probabilities[0], on_logits[0],
                               rtol=1e-4, atol=1e-6)
    scale = np.abs(on_logits[1]).max()
    assert scale > 1e-4  # the gradient compared is not zero
    np.testing.assert_allclose(on_probabilities[1], on_logits[1],
                               rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("name", sorted(DISTRIBUTION_LOSSES))
def test_probabilities_read_as_logits_give_another_value(name):
    """The argument is not a no-op: probabilities passed with the default
    `from_logits=True` are other logits, hence another value."""
    teacher, student = scores(name)
    make = DISTRIBUTION_LOSSES[name]
    right = float(to_numpy(make()(teacher, student)))
    wrong = float(to_numpy(make()(np_softmax(teacher), np_softmax(student))))
    # Far above rounding (1e-6), which is all a no-op would leave.
    assert abs(wrong - right) > 1e-3 * abs(right) + 1e-5, (wrong, right)


@pytest.mark.parametrize("name", sorted(DISTRIBUTION_LOSSES))
def test_from_logits_survives_the_config(name):
    loss = DISTRIBUTION_LOSSES[name](from_logits=False)
    assert loss.reads_distribution is True
    assert loss.get_config()["from_logits"] is False
    clone = type(loss).from_config(loss.get_config())
    assert clone.from_logits is False
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.from_logits is False
    assert DISTRIBUTION_LOSSES[name]().from_logits is True


def test_feature_losses_do_not_read_distributions():
    assert DistillationLoss.reads_distribution is False
    for loss in (FeatureMSE(), AttentionTransfer(), ActivationMapping()):
        assert loss.reads_distribution is False


# Every loss class `keras_kd.losses` exports, found by introspection so that
# a loss added later is covered without editing a list.
EXPORTED_LOSSES = sorted(
    (value for value in vars(keras_kd.losses).values()
     if isinstance(value, type) and issubclass(value, keras.losses.Loss)),
    key=lambda cls: cls.__name__)
# Bases that are exported for subclassing but not registered for saving.
ABSTRACT_LOSSES = {"DistillationLoss", "TokenDivergence"}


def test_the_loss_list_is_complete():
    names = {cls.__name__ for cls in EXPORTED_LOSSES}
    assert {"KD", "FeatureMSE", "AttentionTransfer", "ActivationMapping",
            "CMKD", "DIST", "SkewKL"} <= names
    assert ABSTRACT_LOSSES <= names


@pytest.mark.parametrize("dtype", [
    "float16", "bfloat16", "mixed_bfloat16",
    keras.DTypePolicy("mixed_float16"),
], ids=["float16", "bfloat16", "mixed_bfloat16", "policy_mixed_float16"])
@pytest.mark.parametrize("cls", EXPORTED_LOSSES,
                         ids=[cls.__name__ for cls in EXPORTED_LOSSES])
def test_every_loss_keeps_its_dtype_through_its_config(cls, dtype):
    loss = cls(dtype=dtype)
    expected = keras.dtype_policies.get(dtype).compute_dtype
    assert loss.dtype == expected != keras.config.floatx()
    assert cls.from_config(loss.get_config()).dtype == expected
    if cls.__name__ not in ABSTRACT_LOSSES:
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(restored) is cls
        assert restored.dtype == expected


def test_as_logits_clips_like_keras_crossentropy():
    epsilon = keras.config.epsilon()
    p = np.array([[0.0, 0.25, 0.75, 1.0]], "float32")
    expected = np.log(np.clip(p, epsilon, 1.0 - epsilon))
    np.testing.assert_allclose(to_numpy(as_logits(p, from_logits=False)),
                               expected, rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(as_logits(p)), p)
