"""`Term`: one distillation loss, where it reads, and how much it weighs."""

from __future__ import annotations

import keras

from keras_kd import _checks
from keras_kd.outputs import check_choice
from keras_kd._typing import Config


@keras.saving.register_keras_serializable(package="keras_kd")
class Term:
    """Binds a distillation loss to the outputs it compares.

    A term reads the final outputs of the teacher and the student by default,
    or the outputs of named layers (`teacher_layer` and `student_layer`,
    given together). Its contribution to the training loss is
    `weight * loss(teacher_output, student_output, sample_weight)`, logged in
    the `fit` history as `<name>_loss` (the value before weighting).

    A model with several outputs (a list or a dict) needs the term on its
    final outputs to pick one: `teacher_output` and `student_output` name it
    (the key of a dict output, or an output name of a Functional model,
    `model.output_names`) or give its index. The `Distiller` refuses a term
    on the final outputs of a multi-output model without that choice. The
    compiled student loss still sees all the student's outputs.

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
            `"attention_transfer"`, ...). The `Distiller` logs terms that
            share a name under unique names, without renaming the term.
        teacher_output: for a term on the final outputs, which output of a
            multi-output teacher it reads: an output name or an index.
            `None` (the default) for a single-output teacher.
        student_output: the same for the student.

    Example:

    >>> keras_kd.Term(keras_kd.losses.KD(temperature=4.0), weight=0.9)
    >>> keras_kd.Term(keras_kd.losses.AttentionTransfer(), weight=1000.0,
    ...               teacher_layer="t_stage2", student_layer="s_stage2")
    >>> # Models with outputs {"cls": logits, "box": boxes}:
    >>> keras_kd.Term(keras_kd.losses.KD(), teacher_output="cls",
    ...               student_output="cls")
    """

    def __init__(
        self,
        loss: keras.losses.Loss,
        weight: float = 1.0,
        teacher_layer: str | None = None,
        student_layer: str | None = None,
        name: str | None = None,
        teacher_output: str | int | None = None,
        student_output: str | int | None = None,
    ) -> None:
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
        check_choice(teacher_output, "teacher_output")
        check_choice(student_output, "student_output")
        if teacher_layer is not None and (
                teacher_output is not None or student_output is not None):
            raise ValueError(
                "`teacher_output` and `student_output` pick final outputs; "
                "a feature term reads `teacher_layer` and `student_layer` "
                f"instead. Got teacher_layer={teacher_layer!r}, "
                f"teacher_output={teacher_output!r}, "
                f"student_output={student_output!r}."
            )
        self.loss = loss
        self.weight = weight
        self.teacher_layer = teacher_layer
        self.student_layer = student_layer
        self.name = name or loss.name
        self.teacher_output = teacher_output
        self.student_output = student_output

    @property
    def reads_features(self) -> bool:
        """Whether the term reads named layers rather than final outputs."""
        return self.teacher_layer is not None

    def get_config(self) -> Config:
        return {
            "loss": keras.saving.serialize_keras_object(self.loss),
            "weight": self.weight,
            "teacher_layer": self.teacher_layer,
            "student_layer": self.student_layer,
            "name": self.name,
            "teacher_output": self.teacher_output,
            "student_output": self.student_output,
        }

    @classmethod
    def from_config(cls, config: Config) -> Term:
        config = dict(config)
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)

    def __repr__(self) -> str:
        where = (
            f", teacher_layer={self.teacher_layer!r}, "
            f"student_layer={self.student_layer!r}"
            if self.reads_features else ""
        )
        for argument in ("teacher_output", "student_output"):
            if getattr(self, argument) is not None:
                where += f", {argument}={getattr(self, argument)!r}"
        return (
            f"Term({type(self.loss).__name__}, weight={self.weight}{where}, "
            f"name={self.name!r})"
        )
