"""Logits or probabilities, never silently wrong: a model whose output ends
in a softmax or sigmoid is refused by every loss and diagnostic that reads
logits, unless it is given `from_logits=False`, and then it trains as on
the logits."""

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import Distiller, Term
from keras_kd.losses import CMKD, DIST, KD, FeatureMSE, ForwardKL
from keras_kd.metrics import TeacherKL

from conftest import make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def with_softmax(model, layer=True):
    """`model` followed by a softmax: a `Softmax` layer, or (`layer=False`)
    a copy whose classifier has `activation="softmax"`."""
    if layer:
        return keras.Model(model.inputs,
                           keras.layers.Softmax(name=f"{model.name}_probs")(
                               model.outputs[0]), name=f"{model.name}_p")
    config = model.get_config()
    for item in config["layers"]:
        if item["config"]["name"] == f"{model.name}_logits":
            item["config"]["activation"] = "softmax"
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


@pytest.mark.parametrize("loss", [KD(), DIST(), CMKD(), ForwardKL()],
                         ids=lambda loss: type(loss).__name__)
def test_probability_outputs_are_refused_with_logit_losses(loss):
    teacher = with_softmax(make_cnn("t", 8), layer=False)
    with pytest.raises(ValueError) as err:
        Distiller(teacher, make_cnn("s", 4), terms=[Term(loss)])
    message = str(err.value)
    assert "teacher 't'" in message and "'t_logits'" in message
    assert "softmax" in message and "from_logits=False" in message
    assert "activation=None" in message


def test_a_softmax_layer_on_the_student_is_named():
    student = with_softmax(make_cnn("s", 4))
    with pytest.raises(ValueError, match="student 's_p'.*'s_probs'"):
        Distiller(make_cnn("t", 8), student)


def test_feature_terms_and_diagnostics_follow_the_same_rule():
    teacher = with_softmax(make_cnn("t", 8))
    student = with_softmax(make_cnn("s", 4))
    feature = Term(FeatureMSE(), teacher_layer="t_stage2",
                   student_layer="s_stage2")
    # A feature term reads no distribution.
    Distiller(teacher, student, terms=[feature])
    with pytest.raises(ValueError, match="diagnostic 'teacher_kl'"):
        Distiller(teacher, student, terms=[feature],
                  diagnostics=["teacher_kl"])
    Distiller(teacher, student, terms=[feature],
              diagnostics=[TeacherKL(from_logits=False), "top1_agreement"])


@pytest.mark.parametrize("loss", [KD(temperature=4.0), DIST(), CMKD()],
                         ids=lambda loss: type(loss).__name__)
def test_from_logits_false_trains_as_on_the_logits(loss, data):
    x, _ = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4, batchnorm=False)
    config = loss.get_config()
    on_logits = Distiller(teacher, student, terms=[Term(loss)])
    on_probs = Distiller(
        with_softmax(teacher), with_softmax(student), terms=[
            Term(type(loss).from_config(dict(config, from_logits=False)))])
    name = on_logits.term_names[0]
    values = []
    for d in (on_logits, on_probs):
        d.compile(optimizer="sgd")
        values.append(d.evaluate(x, batch_size=16, return_dict=True,
                                 verbose=0)[f"{name}_loss"])
    np.testing.assert_allclose(values[1], values[0], rtol=2e-4, atol=1e-6)
    # Read as logits, the probabilities give another value (what the
    # refusal prevents).
    plain = loss.__class__.from_config(config)
    t = keras.ops.softmax(teacher(x))
    s = keras.ops.softmax(student(x))
    wrong = float(keras.ops.convert_to_numpy(plain(t, s)))
    assert abs(wrong - values[0]) > 0.02 * abs(values[0])
