"""The frozen teachers: one or several, each with its own augmentation, run
once per step in inference mode and combined for the distillation terms."""

import difflib
from typing import NamedTuple

import keras
from keras import ops

from keras_kd.augment import apply_checked, check_augmentation
from keras_kd.augment import check_augmentation_shape
from keras_kd.outputs import describe, is_tensor_like, outputs_as_list
from keras_kd.outputs import same_shape
from keras_kd.outputs import symbolic_outputs
from keras_kd.taps import Tap, find_layer

ENSEMBLE_MODES = ("logits", "losses")


class TeacherOutputs(NamedTuple):
    """What the teachers give one step.

    Attributes:
        outputs: the averaged final output (one teacher, or
            `ensemble="logits"`), or the list of the teachers' outputs
            (`ensemble="losses"`).
        features: per feature term, the teacher feature it reads (one
            teacher has the layer) or the list of them (several do).
        mean_logits: the teachers' averaged final output.
        diagnostic_features: per teacher, the outputs of the extra layers
            the diagnostics read.
    """

    outputs: object
    features: list
    mean_logits: object
    diagnostic_features: list


class LayerTaps(NamedTuple):
    """Taps over named teacher layers (`Teachers.layer_taps`).

    Attributes:
        taps: per teacher, a `keras_kd.taps.Tap` over the named layers it
            has.
        sources: per name, the `(teacher index, position in that teacher's
            tap)` of every teacher that has the layer (empty when none
            has it).
    """

    taps: list
    sources: list


def as_teacher_list(teacher):
    """`teacher` as a non-empty list of `keras.Model`s, or a `TypeError`."""
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) \
        else [teacher]
    if not teachers:
        raise ValueError("`teacher` must be a model or a non-empty list of "
                         "models, got an empty list.")
    for index, model in enumerate(teachers):
        if not isinstance(model, keras.Model):
            where = "`teacher`" if len(teachers) == 1 \
                else f"`teacher[{index}]`"
            raise TypeError(f"{where} must be a `keras.Model`, got {model!r}.")
    return teachers


def _nested_layers(model):
    """`model` and every layer inside it, following `layers` of nested
    models."""
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        if any(layer is seen for seen in found):
            continue
        found.append(layer)
        stack.extend(getattr(layer, "layers", None) or [])
    return found


def check_teachers_apart(teachers, student):
    """Raises a `ValueError` when the student is a teacher, or shares a
    layer or a variable with one: training the student would then train
    that teacher too. Layers without weights (an input layer, an
    activation) may be shared.

    Args:
        teachers: the list of teacher models.
        student: the student model.
    """
    student_layers = {id(layer): layer for layer in _nested_layers(student)}
    student_variables = {id(v): v for v in student.weights}
    several = len(teachers) > 1
    for index, teacher in enumerate(teachers):
        which = (f"teacher {index} '{teacher.name}'" if several
                 else f"teacher '{teacher.name}'")
        if teacher is student:
            raise ValueError(
                f"The student '{student.name}' is also the {which}: the "
                "teacher must be a separate, frozen model, or training the "
                "student would train it. Pass a copy (e.g. "
                "`keras.models.clone_model(model)` with "
                "`set_weights(model.get_weights())`) as the teacher."
            )
        shared = next((layer for layer in _nested_layers(teacher)
                       if id(layer) in student_layers and layer.weights),
                      None)
        if shared is not None:
            raise ValueError(
                f"The student '{student.name}' and the {which} share the "
                f"layer '{shared.name}'; training the student would train "
                "the teacher. Build the student from its own layers."
            )
        variable = next((v for v in teacher.weights
                         if id(v) in student_variables), None)
        if variable is not None:
            raise ValueError(
                f"The student '{student.name}' and the {which} share the "
                f"variable '{variable.path}'; training the student would "
                "train the teacher. Build the student from its own layers."
            )


def _outputs_text(outputs):
    if isinstance(outputs, (list, tuple, dict)):
        return f"[{describe(outputs, _keys(outputs))}]"
    return f"shape {tuple(outputs.shape)}"


def _keys(outputs):
    return list(outputs) if isinstance(outputs, dict) else None


def _same_outputs(a, b):
    """Whether two teachers' outputs have the same structure (one tensor,
    a list of as many, or a dict with the same keys) and shapes."""
    if isinstance(a, dict) != isinstance(b, dict) or (
            is_tensor_like(a) != is_tensor_like(b)):
        return False
    if isinstance(a, dict):
        if set(a) != set(b):
            return False
        pairs = [(a[key], b[key]) for key in a]
    else:
        a, b = outputs_as_list(a), outputs_as_list(b)
        if len(a) != len(b):
            return False
        pairs = zip(a, b)
    return all(same_shape(tuple(x.shape), tuple(y.shape)) for x, y in pairs)


def check_teacher_outputs(teachers, outputs=None):
    """Raises a `ValueError` naming the first teacher whose outputs
    differ in structure or shape from the first teacher's.

    Args:
        teachers: the teacher models.
        outputs: per teacher, its computed outputs (at the first batch), or
            `None` to check the symbolic outputs of the teachers whose
            outputs are known before they run.
    """
    if outputs is None:
        outputs = [symbolic_outputs(t) for t in teachers]
    known = [(i, t, o) for i, (t, o) in enumerate(zip(teachers, outputs))
             if o is not None]
    if len(known) < 2:
        return
    _, reference, ref_outputs = known[0]
    for index, teacher, value in known[1:]:
        if not _same_outputs(ref_outputs, value):
            raise ValueError(
                f"Teacher {index} '{teacher.name}' outputs "
                f"{_outputs_text(value)} but teacher '{reference.name}' "
                f"outputs {_outputs_text(ref_outputs)}; the teachers of an "
                "ensemble must produce outputs of equal shape."
            )


def _teacher_has_layer(teacher, layer_name):
    try:
        return any(layer.name == layer_name for layer in teacher.layers)
    except AttributeError:
        return False


def ensemble_loss(loss, teacher_value, student_value, sample_weight=None):
    """`loss(teacher_value, student_value)`, or its mean over teachers when
    `teacher_value` is a list (one entry per teacher; a tuple, such as a
    `keras_kd.losses.TopKDistribution`, is one teacher's value)."""
    if isinstance(teacher_value, list):
        values = [loss(t, student_value, sample_weight=sample_weight)
                  for t in teacher_value]
        return ops.mean(ops.stack(values), axis=0)
    return loss(teacher_value, student_value, sample_weight=sample_weight)


class Teachers:
    """Runs every teacher once per step (inference mode) and combines them.

    Each teacher runs through one multi-output forward pass returning its
    outputs, the features the distillation terms read from it, and the
    features the diagnostics read (class activation maps).

    - Final outputs: with `ensemble="logits"` the teachers' outputs are
      averaged and every term compares the student with that average; with
      `ensemble="losses"` every term on the final outputs is computed against
      each teacher and the losses are averaged.
    - Features: a feature term reads its `teacher_layer` from every teacher
      that has a layer of that name; when several do, their features must
      have equal shapes and the term's loss is averaged over them.

    Args:
        teachers: list of `keras.Model`.
        feature_terms: the `Term`s that read named layers, in order.
        ensemble: `"logits"` or `"losses"`.
        augmentation: `None`, one augmentation for every teacher (the
            teachers then share one augmented batch), or a list with one
            augmentation (or `None`) per teacher.
        extra_layers: per teacher, names of further layers to return (for
            the diagnostics).
    """

    def __init__(self, teachers, feature_terms, ensemble="logits",
                 augmentation=None, extra_layers=None):
        if ensemble not in ENSEMBLE_MODES:
            raise ValueError(
                f"`ensemble` must be one of {ENSEMBLE_MODES}, got "
                f"{ensemble!r}."
            )
        self.teachers = list(teachers)
        self.ensemble = ensemble
        self.shared_augmentation = not isinstance(augmentation, (list, tuple))
        if self.shared_augmentation:
            self.augmentations = check_augmentation(
                augmentation, "`teacher_augmentation`")
        else:
            if len(augmentation) != len(self.teachers):
                raise ValueError(
                    f"`teacher_augmentation` has {len(augmentation)} entries "
                    f"but there are {len(self.teachers)} teachers; give one "
                    "augmentation (or None) per teacher, or a single "
                    "augmentation for all."
                )
            self.augmentations = [
                check_augmentation(a, f"`teacher_augmentation[{i}]`")
                for i, a in enumerate(augmentation)
            ]
        for index, teacher in enumerate(self.teachers):
            check_augmentation_shape(
                self.augmentations if self.shared_augmentation
                else self.augmentations[index],
                teacher, "The augmentation of the teacher")
        extra_layers = extra_layers or [[] for _ in self.teachers]

        # Which teachers each feature term reads.
        self.term_teachers = [
            self._resolve(term) for term in feature_terms
        ]
        self.extra_counts = [len(names) for names in extra_layers]
        self._taps = []
        for index, teacher in enumerate(self.teachers):
            names = [term.teacher_layer
                     for term, users in zip(feature_terms, self.term_teachers)
                     if index in users]
            self._taps.append(
                Tap(teacher, names + list(extra_layers[index]), "teacher"))
        self.feature_shapes = [
            self._term_shape(term_index, term, users)
            for term_index, (term, users)
            in enumerate(zip(feature_terms, self.term_teachers))
        ]

    @property
    def per_teacher(self):
        """Whether `TeacherOutputs.outputs` holds one entry per teacher
        (several teachers, `ensemble="losses"`) rather than one combined
        output."""
        return self.ensemble == "losses" and len(self.teachers) > 1

    def _resolve(self, term):
        users = [i for i, t in enumerate(self.teachers)
                 if _teacher_has_layer(t, term.teacher_layer)]
        if users:
            return users
        if len(self.teachers) == 1:
            find_layer(self.teachers[0], term.teacher_layer, "teacher")
        close = {
            t.name: difflib.get_close_matches(
                term.teacher_layer, [layer.name for layer in t.layers],
                n=3, cutoff=0.0)
            for t in self.teachers
        }
        raise ValueError(
            f"Layer '{term.teacher_layer}' of term '{term.name}' was not "
            f"found in any teacher. Closest layer names per teacher: {close}."
        )

    def _tap_index(self, term_index, teacher_index):
        """Position of a term's feature among a teacher's tapped layers."""
        return sum(
            1 for users in self.term_teachers[:term_index]
            if teacher_index in users
        )

    def _term_shape(self, term_index, term, users):
        shapes = {
            index: self._taps[index].feature_shapes[
                self._tap_index(term_index, index)]
            for index in users
        }
        first = users[0]
        for index in users[1:]:
            if tuple(shapes[index][1:]) != tuple(shapes[first][1:]):
                raise ValueError(
                    f"Term '{term.name}' reads layer '{term.teacher_layer}' "
                    f"from teachers '{self.teachers[first].name}' "
                    f"{shapes[first]} and '{self.teachers[index].name}' "
                    f"{shapes[index]}: features read by one term must have "
                    "equal shapes. Use one term per teacher with distinct "
                    "layer names."
                )
        return shapes[first]

    def outputs(self, x, augment=False):
        """The `TeacherSource` interface: every teacher run on `x` in
        inference mode (see `__call__`)."""
        return self(x, training=False, augment=augment)

    def with_features(self, feature_terms, extra_layers=None):
        """The same teachers, ensemble mode and augmentations, reading other
        layers: what a training extension (local modules) asks for instead
        of wrapping the teacher models again.

        Args:
            feature_terms: the terms (with `teacher_layer` and `name`) whose
                teacher features to read, in order.
            extra_layers: per teacher, names of further layers to return.

        Returns:
            A `Teachers`.
        """
        return Teachers(self.teachers, feature_terms, ensemble=self.ensemble,
                        augmentation=self.augmentations,
                        extra_layers=extra_layers)

    def layer_taps(self, layer_names):
        """Taps over the teachers' named layers, read without the teachers'
        augmentations (what the layer-wise measurement asks for instead of
        tapping the models itself).

        Args:
            layer_names: teacher layer names, in order. With several
                teachers, each name is read from every teacher that has a
                layer of that name; one teacher must have them all.

        Returns:
            A `LayerTaps`.
        """
        sources = [[] for _ in layer_names]
        taps = []
        for t, model in enumerate(self.teachers):
            names = []
            for p, name in enumerate(layer_names):
                if len(self.teachers) == 1 or _teacher_has_layer(model, name):
                    sources[p].append((t, len(names)))
                    names.append(name)
            taps.append(Tap(model, names, "teacher"))
        return LayerTaps(taps, sources)

    def augment(self, x, index=0):
        """`x` as teacher `index` sees it in a training step (its
        augmentation, or the shared one)."""
        if self.shared_augmentation:
            return apply_checked(self.augmentations, x,
                                 "The teachers' augmentation")
        return apply_checked(
            self.augmentations[index], x,
            f"The augmentation of the teacher '{self.teachers[index].name}'")

    def __call__(self, x, training=False, augment=False):
        """Runs every teacher on `x` (its own augmentation of `x` when
        `augment`).

        Returns:
            A `TeacherOutputs`, each tensor with its gradient stopped.
        """
        shared = None
        if augment and self.shared_augmentation:
            shared = self.augment(x)
        outputs, tapped = [], []
        for index, tap in enumerate(self._taps):
            if not augment:
                x_in = x
            elif self.shared_augmentation:
                x_in = shared
            else:
                x_in = self.augment(x, index)
            out, feats = tap(x_in, training=training)
            outputs.append(out)
            tapped.append(feats)
        if len(outputs) == 1:
            mean = outputs[0]
        else:
            # Checked on static shapes: at the first batch (trace) for
            # teachers whose outputs are only known when they run.
            check_teacher_outputs(self.teachers, outputs)
            mean = keras.tree.map_structure(
                lambda *values: ops.mean(ops.stack(values), axis=0),
                *outputs)
        combined = outputs if self.per_teacher else mean

        features = []
        for term_index, users in enumerate(self.term_teachers):
            values = [
                tapped[i][self._tap_index(term_index, i)] for i in users
            ]
            features.append(values[0] if len(values) == 1 else values)
        extras = [
            list(feats[len(feats) - count:]) if count else []
            for feats, count in zip(tapped, self.extra_counts)
        ]
        return keras.tree.map_structure(
            ops.stop_gradient,
            TeacherOutputs(combined, features, mean, extras))
