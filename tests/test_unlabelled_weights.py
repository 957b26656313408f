"""`fit(x, sample_weight=w)` and `evaluate(x, sample_weight=w)` without
labels honour the weights (Keras' own array packing drops them when `y` is
None): zero weights leave the student unchanged, and weighted distillation
without labels equals the labelled path that Keras weighs itself."""

import keras
import numpy as np
import pytest

from keras_kd import Distiller, Term
from keras_kd.losses import KD, ForwardKL

from backend_utils import to_numpy
from conftest import make_cnn
from test_language_models import padded_tokens, token_model


def clone(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def distiller(teacher, student):
    d = Distiller(teacher, clone(student), terms=[Term(KD(temperature=2.0))],
                  student_loss_weight=0.0)
    # The compiled loss is only used with labels; its weight is 0.
    d.compile(optimizer=keras.optimizers.SGD(0.1), loss=SCCE)
    return d


SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def weights_of(model):
    return [to_numpy(w) for w in model.weights]


def test_zero_weights_leave_the_student_unchanged(data):
    x, _ = data
    teacher = make_cnn("t", 8)
    student = make_cnn("s", 4, batchnorm=False)
    d = distiller(teacher, student)
    before = weights_of(d.student)
    history = d.fit(x, sample_weight=np.zeros(len(x), "float32"),
                    batch_size=8, epochs=1, verbose=0)
    assert history.history["kd_loss"][0] == 0.0
    for a, b in zip(before, weights_of(d.student)):
        np.testing.assert_array_equal(a, b)
    # The same call with unit weights trains (the check above would pass
    # if nothing ever trained).
    d.fit(x, sample_weight=np.ones(len(x), "float32"), batch_size=8,
          epochs=1, verbose=0)
    assert any(np.any(a != b) for a, b in zip(before, weights_of(d.student)))


def test_unlabelled_weights_equal_the_labelled_path(data):
    x, y = data
    teacher = make_cnn("t", 8)
    student = make_cnn("s", 4, batchnorm=False)
    w = np.linspace(0.0, 2.0, len(x)).astype("float32")

    # evaluate: the weighted KD value, as Keras weighs it with labels.
    d = distiller(teacher, student)
    unlabelled = d.evaluate(x, sample_weight=w, batch_size=8,
                            return_dict=True, verbose=0)["kd_loss"]
    labelled = d.evaluate(x, y, sample_weight=w, batch_size=8,
                          return_dict=True, verbose=0)["kd_loss"]
    plain = d.evaluate(x, batch_size=8, return_dict=True,
                       verbose=0)["kd_loss"]
    np.testing.assert_allclose(unlabelled, labelled, rtol=1e-6)
    assert abs(unlabelled - plain) > 1e-3 * abs(plain)

    # fit: the same updates as the labelled path (the student loss has
    # weight 0), and the validation tuple `(x, None, w)` is weighted too.
    a, b = distiller(teacher, student), distiller(teacher, student)
    ha = a.fit(x, sample_weight=w, batch_size=8, epochs=2, shuffle=False,
               validation_data=(x, None, w), verbose=0)
    b.fit(x, y, sample_weight=w, batch_size=8, epochs=2, shuffle=False,
          verbose=0)
    for u, v in zip(weights_of(a.student), weights_of(b.student)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    expected = b.evaluate(x, y, sample_weight=w, batch_size=8,
                          return_dict=True, verbose=0)["kd_loss"]
    np.testing.assert_allclose(ha.history["val_kd_loss"][-1], expected,
                               rtol=1e-5)


@pytest.mark.parametrize("weights", ["zeros", "padding"])
def test_token_weights_without_labels(weights):
    """Per-token weights (padding at 0) of a sequence model, as the
    language-model docs pass them: zero weights move nothing, and the
    logged value is the weighted token mean."""
    teacher, student = token_model("t", 8), token_model("s", 4)
    tokens = padded_tokens([8, 6, 3, 8, 5, 2])
    w = (tokens != 0).astype("float32")
    if weights == "zeros":
        w = np.zeros_like(w)
    else:
        w[:, :2] = 0.0  # a "prompt" the mask alone does not hide
    d = Distiller(teacher, clone(student), terms=[Term(ForwardKL())])
    d.compile(optimizer=keras.optimizers.SGD(0.5))
    before = weights_of(d.student)
    logs = d.evaluate(tokens, sample_weight=w, batch_size=6,
                      return_dict=True, verbose=0)
    d.fit(tokens, sample_weight=w, batch_size=3, epochs=1, verbose=0)
    moved = any(np.any(a != b) for a, b in
                zip(before, weights_of(d.student)))
    if weights == "zeros":
        assert logs["forward_kl_loss"] == 0.0
        assert not moved
        return
    assert moved

    def log_softmax(z):
        z = z.astype("float64") - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt = log_softmax(to_numpy(teacher(tokens)))
    ls = log_softmax(to_numpy(student(tokens)))
    per_token = (np.exp(lt) * (lt - ls)).sum(-1)
    expected = (per_token * w).sum() / w.sum()
    np.testing.assert_allclose(logs["forward_kl_loss"], expected, rtol=1e-4)
