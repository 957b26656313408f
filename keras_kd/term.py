"""`Term`: one distillation loss, where it reads, and how much it weighs."""

import keras

from keras_kd import _checks


@keras.saving.register_keras_serializable(package="keras_kd")
class Term:
    """Binds a distillation loss to the outputs it compares.

    A term reads the final outputs of the teacher and the student by default,
    or the outputs of named layers (`teacher_layer` and `student_layer`,
    given together). Its contribution to the training loss is
    `weight * loss(teacher_output, student_output, sample_weight)`, logged in
    the `fit` history as `<name>_loss` (the value before weighting).

    Args:
        loss: a `keras.losses.Loss` called as
            `loss(teacher_output, student_output, sample_weight=None)`, such as
            `keras_kd.losses.KD()`.
        weight: non-negative factor of this term in the total loss.
        teacher_layer: name of the teacher layer whose output is read, or
            `None` for the teacher's final output.
        student_layer: name of the student layer whose output is read, or
            `None` for the student's final output.
        name: name in logs; defaults to the loss's name (`"kd"`,
            `"attention_transfer"`, ...). The `Distiller` makes names unique.

    Example:

    >>> keras_kd.Term(keras_kd.losses.KD(temperature=4.0), weight=0.9)
    >>> keras_kd.Term(keras_kd.losses.AttentionTransfer(), weight=1000.0,
    ...               teacher_layer="t_stage2", student_layer="s_stage2")
    """

    def __init__(
        self, loss, weight=1.0, teacher_layer=None, student_layer=None,
        name=None,
    ):
        if not isinstance(loss, keras.losses.Loss):
            raise TypeError(
                "`loss` must be a `keras.losses.Loss` instance such as "
                f"`keras_kd.losses.KD()`, got {loss!r}."
            )
        if (teacher_layer is None) != (student_layer is None):
            raise ValueError(
                "Give `teacher_layer` and `student_layer` together (a feature "
                "term) or neither (a term on the final outputs); got "
                f"teacher_layer={teacher_layer!r}, "
                f"student_layer={student_layer!r}."
            )
        weight = _checks.non_negative("weight", weight)
        self.loss = loss
        self.weight = weight
        self.teacher_layer = teacher_layer
        self.student_layer = student_layer
        self.name = name or loss.name

    @property
    def reads_features(self):
        """Whether the term reads named layers rather than final outputs."""
        return self.teacher_layer is not None

    def get_config(self):
        return {
            "loss": keras.saving.serialize_keras_object(self.loss),
            "weight": self.weight,
            "teacher_layer": self.teacher_layer,
            "student_layer": self.student_layer,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)

    def __repr__(self):
        where = (
            f", teacher_layer={self.teacher_layer!r}, "
            f"student_layer={self.student_layer!r}"
            if self.reads_features else ""
        )
        return (
            f"Term({type(self.loss).__name__}, weight={self.weight}{where}, "
            f"name={self.name!r})"
        )
