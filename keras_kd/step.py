"""The loss assembly: from a batch and the teachers' outputs to the total
loss and its named parts.

Everything here is `keras.ops` and reads or assigns Keras variables only, so
that every backend trainer (`keras_kd.trainers`) runs the same code and only
differentiates and applies. The end-to-end step, each LAKD local module and
the test step compute their losses with `LossAssembly`, so the rule "the
student loss times its weight, plus each term times its weight, plus the
regularization losses" is written once.
"""

from typing import NamedTuple

import keras
from keras import ops

from keras_kd.augment import apply_checked
from keras_kd.cache.reader import CacheReader, model_inputs
from keras_kd.distribution import scale_for_replicas
from keras_kd.teachers.topk import TopKDistribution
from keras_kd.outputs import OutputChoice, check_same_shape
from keras_kd.teachers import ensemble_loss


class BoundTerm:
    """A user's `Term` as one distiller uses it.

    The distiller gives each term a name that is unique among its logs
    without renaming the user's object, and may own an adapter for it. A
    term on the final outputs also knows which output of each model it
    reads (`bind_outputs`).

    Args:
        term: the user's `keras_kd.Term` (never modified).
        name: the name of the term in this distiller's logs
            (`<name>_loss`).
        adapter: a layer applied to the student value before the loss
            (a channel adapter), or `None`.
    """

    def __init__(self, term, name, adapter=None):
        self.term = term
        self.name = name
        self.adapter = adapter
        self.teacher_choices = []
        self.student_choice = None

    def bind_outputs(self, teachers, student):
        """Resolves the term's `teacher_output` and `student_output`
        against the models (a term on the final outputs).

        Raises:
            ValueError: where the models' outputs are known, an output
                choice that names no output, a multi-output model without
                a choice, or chosen outputs of different shapes.
        """
        several = len(teachers) > 1
        self.teacher_choices = [
            OutputChoice(teacher, self.term.teacher_output,
                         f"teacher {i}" if several else "teacher",
                         "teacher_output", self.name)
            for i, teacher in enumerate(teachers)
        ]
        self.student_choice = OutputChoice(
            student, self.term.student_output, "student", "student_output",
            self.name)
        self._check_shapes(self.teacher_choices[0].shape,
                           self.student_choice.shape)

    def final_outputs(self, teacher_outputs, student_outputs, per_teacher):
        """The teacher and student outputs this term compares, chosen
        among the models' outputs; checks their shapes (at trace time, so
        subclassed models get the error at the first batch).

        Args:
            teacher_outputs: the teachers' combined outputs, or, when
                `per_teacher`, the list of each teacher's outputs.
            student_outputs: the student's outputs.
            per_teacher: whether `teacher_outputs` has one entry per
                teacher (`ensemble="losses"`).

        Returns:
            `(teacher_value, student_value)`; `teacher_value` is a list
            (one per teacher) when `per_teacher`.
        """
        if per_teacher:
            teacher_value = [_choose(choice, o) for choice, o in
                             zip(self.teacher_choices, teacher_outputs)]
            reference = teacher_value[0]
        else:
            teacher_value = reference = _choose(self.teacher_choices[0],
                                                teacher_outputs)
        student_value = self.student_choice(student_outputs)
        # A sparse teacher from a per-token top-k cache was checked
        # against the student when the cache was (`cache.verify`).
        if not isinstance(reference, TopKDistribution):
            self._check_shapes(tuple(reference.shape),
                               tuple(student_value.shape))
        return teacher_value, student_value

    def _check_shapes(self, teacher_shape, student_shape):
        teacher = self.teacher_choices[0].model_name
        student = self.student_choice.model_name
        # A loss that compares outputs of different shapes (the
        # divergences: vocabulary sizes, LM heads, `vocab_mapping`) checks
        # them itself.
        check = getattr(self.loss, "check_output_shapes", None)
        if check is not None:
            if None not in (teacher_shape, student_shape):
                check(teacher_shape, student_shape, teacher, student)
            return
        message = (f"The teacher '{teacher}' outputs shape {teacher_shape} "
                   f"but the student '{student}' outputs shape "
                   f"{student_shape}")
        if (teacher_shape is not None and student_shape is not None
                and len(teacher_shape) == len(student_shape) >= 3
                and tuple(teacher_shape[1:-1]) == tuple(student_shape[1:-1])):
            message += (f": vocabularies (last axis) of {teacher_shape[-1]} "
                        f"and {student_shape[-1]} entries. For one tokenizer "
                        "with padded embedding tables, use a divergence with "
                        "`vocab_mapping='truncate'` (e.g. "
                        "`keras_kd.losses.ForwardKL`)")
        check_same_shape(
            teacher_shape, student_shape,
            f"{message}; the term '{self.name}' compares final outputs, "
            "which need equal shapes.")

    @property
    def loss(self):
        return self.term.loss

    @property
    def weight(self):
        return self.term.weight

    @property
    def teacher_layer(self):
        return self.term.teacher_layer

    @property
    def student_layer(self):
        return self.term.student_layer

    @property
    def reads_features(self):
        return self.term.reads_features

    def __call__(self, teacher_value, student_value, sample_weight=None):
        """The term's unweighted loss; averaged over teachers when
        `teacher_value` is a list (one value per teacher)."""
        if self.adapter is not None:
            student_value = self.adapter(student_value)
        return ensemble_loss(self.loss, teacher_value, student_value,
                             sample_weight)

    def __repr__(self):
        return f"BoundTerm({self.name!r}, {self.term!r})"


def _choose(choice, outputs):
    """A teacher's chosen output; a cached `TopKDistribution` is the
    output itself (a cache stores one output per teacher)."""
    if isinstance(outputs, TopKDistribution):
        return outputs
    return choice(outputs)


class StepLosses(NamedTuple):
    """The loss of one step (or of one local module) and its parts.

    Attributes:
        total: the scalar that is differentiated: the weighted student loss,
            the weighted terms and the regularization losses.
        student_loss: the compiled student loss (unweighted), or `None` when
            it is not part of this loss (no labels, or a local module other
            than the last).
        terms: `{log name: unweighted value}` for every term in this loss,
            in order.
        term_weights: `{log name: weight}` for the terms whose value weighs
            more than the batch size in an epoch's mean (the token-mean
            divergences: their token count), or `None`.
    """

    total: object
    student_loss: object
    terms: dict
    term_weights: dict | None = None


class StudentForward(NamedTuple):
    """One forward pass of the student.

    Attributes:
        outputs: the student's final outputs.
        features: per feature term, the tapped student feature.
        diagnostic_features: the extra features the diagnostics read.
    """

    outputs: object
    features: list
    diagnostic_features: list


class StepOutcome(NamedTuple):
    """What a step computed: the student's forward pass and its losses."""

    student: StudentForward
    losses: StepLosses


class LossAssembly:
    """`student_loss_weight * student loss + sum(weight * term) +
    regularization`, each a mean over the batch.

    A part whose weight is 0 is computed and logged but left out of the
    total, so that its value (even NaN) cannot reach the total or the
    gradient.

    Args:
        student_loss_weight: weight of the compiled student loss.
        student_loss: a callable `(y, y_pred, sample_weight)` returning the
            compiled student loss (the distiller's `compute_loss`).
    """

    def __init__(self, student_loss_weight, student_loss):
        self.student_loss_weight = student_loss_weight
        self._student_loss = student_loss

    def __call__(self, pairs, sample_weight=None, y=None, y_pred=None,
                 regularization=()):
        """Assembles one loss.

        Args:
            pairs: a list of `(bound_term, teacher_value, student_value)`.
            sample_weight: per-sample weights or `None`.
            y: labels, or `None` (no student loss).
            y_pred: the student's final outputs when this loss includes the
                student loss (with labels), else `None`.
            regularization: the regularization losses to add (those of the
                layers this loss trains).

        Returns:
            A `StepLosses`.
        """
        total = ops.zeros((), dtype="float32")
        student_loss = None
        if y is not None and y_pred is not None:
            student_loss = self._student_loss(y, y_pred, sample_weight)
            if self.student_loss_weight:
                total = total + self.student_loss_weight * ops.cast(
                    student_loss, "float32")
        values, log_weights = {}, {}
        for bound, teacher_value, student_value in pairs:
            value = bound(teacher_value, student_value, sample_weight)
            values[bound.name] = value
            if bound.weight:
                total = total + bound.weight * ops.cast(value, "float32")
            log_weight = getattr(bound.loss, "log_weight", None)
            if log_weight is not None:
                log_weight = log_weight(student_value, sample_weight)
            if log_weight is not None:
                log_weights[bound.name] = log_weight
        if regularization:
            total = total + scale_for_replicas(
                ops.cast(ops.sum(regularization), "float32"))
        return StepLosses(total, student_loss, values, log_weights or None)


class DistillationStep:
    """Everything a training or test step computes, for any backend.

    Args:
        teachers: the `keras_kd.teachers.Teachers`.
        student_tap: a `keras_kd.taps.Tap` over the student that returns its
            outputs, the features of the feature terms, then the features
            of the diagnostics.
        terms: the `BoundTerm`s, in order.
        assembly: the `LossAssembly`.
        student_augmentation: `None` or the student's augmentation.
        num_diagnostic_features: how many of the student tap's features the
            diagnostics read (the last ones).
        regularization: a callable returning the student's regularization
            losses.
    """

    def __init__(self, teachers, student_tap, terms, assembly,
                 student_augmentation=None, num_diagnostic_features=0,
                 regularization=None):
        self.teachers = teachers
        self.student_tap = student_tap
        self.terms = list(terms)
        self.assembly = assembly
        self.student_augmentation = student_augmentation
        self.num_diagnostic_features = num_diagnostic_features
        self._regularization = regularization or (lambda: [])
        self.cache_reader = CacheReader(
            teachers, [t for t in self.terms if t.reads_features])

    def teacher_outputs(self, x, augment=False):
        """The teachers' `TeacherOutputs` on `x`, in inference mode, with
        their gradients stopped (each teacher on its own augmentation of `x`
        when `augment`); read from the batch, with no teacher run, when `x`
        carries a teacher cache (`keras_kd.cache`): the two
        `keras_kd.teachers.source.TeacherSource`s, asked in that order."""
        for source in (self.cache_reader, self.teachers):
            outputs = source.outputs(x, augment=augment)
            if outputs is not None:
                return outputs
        raise AssertionError("the live teachers always answer")

    def student_inputs(self, x, augment=False):
        """`x` as the student sees it (without a teacher cache it may
        carry; its augmentation when `augment`)."""
        x = model_inputs(x)
        if not augment:
            return x
        return apply_checked(self.student_augmentation, x,
                             "The student augmentation")

    def student_forward(self, x, training):
        """The student's one forward pass: outputs and tapped features."""
        outputs, features = self.student_tap(x, training=training)
        cut = len(features) - self.num_diagnostic_features
        return StudentForward(outputs, list(features[:cut]),
                              list(features[cut:]))

    def __call__(self, x, y, sample_weight, teacher, training):
        """One student forward on `x` and every loss against `teacher` (a
        `TeacherOutputs`).

        Returns:
            A `StepOutcome`.
        """
        student = self.student_forward(x, training)
        pairs = []
        feature = 0
        for bound in self.terms:
            if bound.reads_features:
                pairs.append((bound, teacher.features[feature],
                              student.features[feature]))
                feature += 1
            else:
                pairs.append((bound,) + bound.final_outputs(
                    teacher.outputs, student.outputs,
                    self.teachers.per_teacher))
        losses = self.assembly(
            pairs, sample_weight, y=y, y_pred=student.outputs,
            regularization=self._regularization())
        return StepOutcome(student, losses)


def batch_size(x):
    """The batch size of a (possibly nested) batch of inputs."""
    return ops.shape(keras.tree.flatten(x)[0])[0]
