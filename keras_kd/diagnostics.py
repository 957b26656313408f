"""Feeding the diagnostic metrics (`keras_kd.metrics`) inside a `Distiller`:
which inputs each metric reads, which layers must be tapped for attention
maps, and the per-step update."""

import difflib

import keras

from keras_kd import metrics as kd_metrics
from keras_kd.outputs import describe, output_names, outputs_as_list
from keras_kd.outputs import symbolic_outputs
from keras_kd.taps import find_layer, static_shape


class _Side:
    """One model compared by an `AttentionIoU`: where its feature comes from
    and its classifier layer."""

    def __init__(self, role, index, model, feature_layer, classifier_layer):
        self.role = role  # "teacher" or "student"
        self.index = index  # teacher index (None for the student)
        self.model = model
        self.feature_layer = feature_layer
        self.classifier = classifier_layer
        self.position = None  # index among that model's extra taps


class Diagnostics:
    """Binds diagnostic metrics to the teachers and the student.

    Checks, before training, that the metric names are unique, that every
    `AttentionIoU` names existing models and layers, and that each classifier
    is a `Dense` layer whose kernel matches the channels of its feature map.

    Args:
        metrics: list of `keras.metrics.Metric` or names accepted by
            `keras_kd.metrics.get`.
        teachers: list of teacher models.
        student: the student model.
        reserved: log names the metrics must not take (the distiller's own).
    """

    def __init__(self, metrics, teachers, student, reserved=()):
        self.metrics = [kd_metrics.get(m) for m in (metrics or [])]
        self.teachers = list(teachers)
        self.student = student
        seen = set(reserved)
        for metric in self.metrics:
            if metric.name in seen:
                raise ValueError(
                    f"Two diagnostics, or a diagnostic and a loss, are both "
                    f"named '{metric.name}'; give the metric another `name=`."
                )
            seen.add(metric.name)
        self.teacher_layers = [[] for _ in self.teachers]
        self.student_layers = []
        self.sides = {}
        num_classes = self._num_classes()
        for metric in self.metrics:
            kind = getattr(metric, "inputs", "logits")
            if isinstance(metric, kd_metrics.MutualInformation):
                if metric.num_classes is None and num_classes is None:
                    raise ValueError(
                        "Pass `num_classes` to `MutualInformation`: the "
                        "teachers' output shape is not known before training."
                    )
                if num_classes is not None:
                    metric.set_num_classes(num_classes)
            if kind == "attention":
                self.sides[id(metric)] = self._bind_attention(metric)
        self.input_size = self._input_size()

    def _num_classes(self):
        for model in self.teachers + [self.student]:
            shape = static_shape(model, "outputs")
            if shape is not None and shape[-1] is not None:
                return int(shape[-1])
        return None

    def _input_size(self):
        for model in self.teachers + [self.student]:
            shape = static_shape(model, "inputs")
            if shape is not None and len(shape) == 4 \
                    and None not in shape[1:3]:
                return shape[1:3]
        return None

    def _model(self, name, metric):
        teacher_names = [t.name for t in self.teachers]
        if teacher_names.count(name) > 1:
            raise ValueError(
                f"`{metric.name}` names the model '{name}', but several "
                f"teachers share that name ({teacher_names}); give the "
                "teachers distinct names."
            )
        if name in teacher_names:
            index = teacher_names.index(name)
            return "teacher", index, self.teachers[index]
        if name in ("student", self.student.name):
            return "student", None, self.student
        if name == "teacher" and len(self.teachers) == 1:
            return "teacher", 0, self.teachers[0]
        known = teacher_names + [self.student.name, "student"]
        raise ValueError(
            f"`{metric.name}` names the model '{name}', which is neither a "
            f"teacher nor the student. Known names: {known}. Closest: "
            f"{difflib.get_close_matches(name, known, n=3, cutoff=0.0)}."
        )

    def _bind_attention(self, metric):
        if not (metric.models and metric.feature_layers
                and metric.classifier_layers):
            raise ValueError(
                f"`AttentionIoU` '{metric.name}' needs `models`, "
                "`feature_layers` and `classifier_layers` (one entry per "
                "compared model) to be used as a diagnostic."
            )
        sides = []
        for name, feature_name, classifier_name in zip(
            metric.models, metric.feature_layers, metric.classifier_layers
        ):
            role, index, model = self._model(name, metric)
            feature = find_layer(model, feature_name, role)
            classifier = find_layer(model, classifier_name, role)
            kernel = getattr(classifier, "kernel", None)
            if kernel is None or len(kernel.shape) != 2:
                raise ValueError(
                    f"`{metric.name}`: the classifier layer "
                    f"'{classifier_name}' of the {role} '{model.name}' must "
                    "be a `Dense` layer with a 2D kernel (channels, classes), "
                    f"got {type(classifier).__name__}."
                )
            try:
                f_shape = tuple(feature.output.shape)
            except (AttributeError, ValueError):
                f_shape = None
            if f_shape is not None and (
                len(f_shape) != 4 or f_shape[-1] != kernel.shape[0]
            ):
                raise ValueError(
                    f"`{metric.name}`: the feature layer '{feature_name}' of "
                    f"the {role} '{model.name}' outputs {f_shape}, but a "
                    "class activation map needs a (batch, height, width, "
                    f"channels) map with channels == {kernel.shape[0]}, the "
                    f"input size of the classifier '{classifier_name}'. Name "
                    "the last convolutional layer before the global pooling."
                )
            side = _Side(role, index, model, feature_name, classifier)
            layers = (self.student_layers if role == "student"
                      else self.teacher_layers[index])
            if feature_name not in layers:
                layers.append(feature_name)
            side.position = layers.index(feature_name)
            sides.append(side)
        return sides

    @property
    def unlabelled_metrics(self):
        """The metrics that need no labels."""
        return [m for m in self.metrics
                if getattr(m, "inputs", "logits") != "labels"]

    def _map(self, side, teacher_features, student_features):
        if side.role == "student":
            feature = student_features[side.position]
        else:
            feature = teacher_features[side.index][side.position]
        return kd_metrics.class_activation_map(
            feature, side.classifier.kernel, size=self.input_size
        )

    def update(self, teacher, student_logits, student_features, y,
               sample_weight):
        """Updates every metric with one step's values.

        Args:
            teacher: the step's `keras_kd.teachers.TeacherOutputs`.
            student_logits: the student outputs of the step.
            student_features: the student's extra tapped features, in the
                order of `student_layers`.
            y: labels or `None`.
            sample_weight: per-sample weights or `None`.
        """
        mean_logits = teacher.mean_logits
        for metric in self.metrics:
            kind = getattr(metric, "inputs", "logits")
            if kind == "labels":
                if y is not None:
                    metric.update_state(y, student_logits,
                                        sample_weight=sample_weight)
            elif kind == "attention":
                side_a, side_b = self.sides[id(metric)]
                maps = [
                    self._map(side, teacher.diagnostic_features,
                              student_features)
                    for side in (side_a, side_b)
                ]
                metric.update_state(maps[0], maps[1],
                                    sample_weight=sample_weight)
            else:
                metric.update_state(mean_logits, student_logits,
                                    sample_weight=sample_weight)

    def get_config(self):
        return [keras.saving.serialize_keras_object(m) for m in self.metrics]


def check_single_outputs(teachers, student):
    """The diagnostics compare the models' logits: refuses a model with
    several outputs."""
    for role, model in [("teacher", t) for t in teachers] + [
            ("student", student)]:
        outputs = symbolic_outputs(model)
        if outputs is not None and len(outputs_as_list(outputs)) > 1:
            raise ValueError(
                f"`diagnostics` compare the models' logits, but the {role} "
                f"'{model.name}' has several outputs "
                f"({describe(outputs, output_names(model, outputs))}); "
                "leave `diagnostics` out for multi-output models."
            )
