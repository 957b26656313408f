"""Distillation diagnostics as streaming Keras metrics.

Each metric accumulates sums over every batch it sees and computes its value
from those sums in `result()`, so an epoch's value is the value on the whole
epoch (not a mean of per-batch values). They work alone, like any Keras
metric:

```python
agreement = keras_kd.metrics.TopOneAgreement()
agreement.update_state(teacher_logits, student_logits)
agreement.result()
```

and inside a `keras_kd.Distiller` (`diagnostics=[...]`), which feeds them the
teacher logits (averaged over the ensemble), the student logits, the labels
and class activation maps, and logs them in the `fit` history with their
`val_` forms.
"""

import typing

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.ops.probabilities import as_logits

# The annotations' names are imported for type checkers only (and the
# annotations are strings): the module's public names are its metrics.
if typing.TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from keras_kd._typing import Config, Tensor

_EPSILON = 1e-12


def _as_float(x, dtype):
    return ops.cast(ops.convert_to_tensor(x), dtype)


def _weighted_sum_and_count(values, sample_weight, dtype):
    """`(sum_i w_i v_i, sum_i w_i)` over the batch axis of `values`
    (`w = 1` when `sample_weight` is `None`)."""
    if sample_weight is None:
        return (ops.sum(values, axis=0),
                ops.cast(ops.shape(values)[0], dtype))
    w = ops.reshape(_as_float(sample_weight, dtype), (-1,))
    w = ops.broadcast_to(w, ops.shape(values)[:1])
    w_shaped = ops.reshape(w, (-1,) + (1,) * (len(values.shape) - 1))
    return ops.sum(values * w_shaped, axis=0), ops.sum(w)


def _check_logits(teacher_logits, student_logits, metric):
    t_shape, s_shape = teacher_logits.shape, student_logits.shape
    if len(t_shape) != 2 or len(s_shape) != 2 or (
        t_shape[-1] is not None and s_shape[-1] is not None
        and t_shape[-1] != s_shape[-1]
    ):
        raise ValueError(
            f"`{metric}` expects teacher and student logits of shape "
            f"(batch, classes) with equal class counts; got {tuple(t_shape)} "
            f"and {tuple(s_shape)}."
        )


class DistillationMetric(keras.metrics.Metric):
    """Base class of the diagnostics (a `keras.metrics.Metric`).

    Subclasses set `inputs`, which tells the `Distiller` what to pass to
    `update_state`:

    - `"logits"`: `update_state(teacher_logits, student_logits,
      sample_weight)`, the teacher logits being averaged over the ensemble;
    - `"labels"`: `update_state(y_true, student_logits, sample_weight)`;
    - `"attention"`: `update_state(map_a, map_b, sample_weight)` with class
      activation maps of two models (see `AttentionIoU`).

    Any other `keras.metrics.Metric` given to `Distiller(diagnostics=...)` is
    treated as a `"logits"` metric.

    Subclasses also set `reads_distribution`: `True` for a metric that
    reads the class scores as a distribution (`TeacherKL`,
    `ExpectedCalibrationError`); it then has a `from_logits` attribute
    (part of its config), `False` when it is given probabilities, so that
    the `Distiller` can refuse a softmax output read as logits. `False` for
    metrics that only compare the top class (`TopOneAgreement`,
    `MutualInformation`: logits and probabilities give the same value) or
    read attention maps.
    """

    inputs = "logits"
    reads_distribution = False


@keras.saving.register_keras_serializable(package="keras_kd")
class TopOneAgreement(DistillationMetric):
    """Fraction of samples where teacher and student predict the same class.

    `mean_i 1[argmax z_t,i == argmax z_s,i]`, the "top-1 agreement" measure
    of fidelity (Stanton et al. 2021). With several teachers the `Distiller`
    passes their averaged logits.

    Args:
        name: name in logs.
        dtype: dtype of the accumulators.

    Returns (from `result()`):
        A scalar in [0, 1]; 0 before any update.

    Example:

    >>> m = keras_kd.metrics.TopOneAgreement()
    >>> m.update_state([[2.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]])
    >>> float(m.result())
    0.5
    """

    def __init__(self, name: str = "top1_agreement",
                 dtype: str | None = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.matches = self.add_variable((), "zeros", name="matches")
        self.count = self.add_variable((), "zeros", name="count")

    def update_state(self, teacher_logits: "Tensor", student_logits: "Tensor",
                     sample_weight: "Tensor | None" = None) -> None:
        teacher_logits = _as_float(teacher_logits, self.dtype)
        student_logits = _as_float(student_logits, self.dtype)
        _check_logits(teacher_logits, student_logits, type(self).__name__)
        same = ops.cast(
            ops.equal(ops.argmax(teacher_logits, axis=-1),
                      ops.argmax(student_logits, axis=-1)),
            self.dtype,
        )
        total, count = _weighted_sum_and_count(same, sample_weight,
                                               self.dtype)
        self.matches.assign_add(total)
        self.count.assign_add(count)

    def result(self) -> "Tensor":
        return ops.divide_no_nan(self.matches, self.count)


@keras.saving.register_keras_serializable(package="keras_kd")
class TeacherKL(DistillationMetric):
    """Mean KL divergence KL(p_teacher || p_student) over samples.

    `p = softmax(logits / temperature)`; lower means higher fidelity. Unlike
    the `KD` loss it is not multiplied by `temperature**2`.

    Args:
        temperature: softening temperature. Defaults to 1 (the models'
            predictive distributions).
        from_logits: `True` (default) when the scores are logits; `False`
            when they are probabilities (e.g. a softmax output), read as
            `log(clip(p, epsilon, 1 - epsilon))`
            (`keras_kd.ops.probabilities.as_logits`).
        name: name in logs.
        dtype: dtype of the accumulators.

    Returns (from `result()`):
        A non-negative scalar (nats); 0 before any update.

    Example:

    >>> m = keras_kd.metrics.TeacherKL()
    >>> m.update_state(teacher_logits, student_logits)
    >>> m.result()
    """

    reads_distribution = True

    def __init__(self, temperature: float = 1.0, from_logits: bool = True,
                 name: str = "teacher_kl", dtype: str | None = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.temperature = _checks.positive("temperature", temperature)
        self.from_logits = bool(from_logits)
        self.total = self.add_variable((), "zeros", name="total")
        self.count = self.add_variable((), "zeros", name="count")

    def update_state(self, teacher_logits: "Tensor", student_logits: "Tensor",
                     sample_weight: "Tensor | None" = None) -> None:
        teacher_logits = _as_float(teacher_logits, self.dtype)
        student_logits = _as_float(student_logits, self.dtype)
        _check_logits(teacher_logits, student_logits, type(self).__name__)
        teacher_logits = as_logits(teacher_logits, self.from_logits)
        student_logits = as_logits(student_logits, self.from_logits)
        log_p_t = ops.log_softmax(teacher_logits / self.temperature, axis=-1)
        log_p_s = ops.log_softmax(student_logits / self.temperature, axis=-1)
        kl = ops.sum(ops.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
        total, count = _weighted_sum_and_count(kl, sample_weight, self.dtype)
        self.total.assign_add(total)
        self.count.assign_add(count)

    def result(self) -> "Tensor":
        return ops.divide_no_nan(self.total, self.count)

    def get_config(self) -> "Config":
        config = super().get_config()
        config.update(temperature=self.temperature,
                      from_logits=self.from_logits)
        return config


@keras.saving.register_keras_serializable(package="keras_kd")
class MutualInformation(DistillationMetric):
    """Mutual information between teacher and student top-1 labels.

    Accumulates the `classes x classes` joint count matrix
    `n[i, j] = #{samples: argmax z_t = i, argmax z_s = j}` over every batch
    and returns the plug-in estimate
    `sum_ij p_ij log(p_ij / (p_i. p_.j))` with `p = n / n.sum()` (natural
    log, nats), which equals `sklearn.metrics.mutual_info_score` on the two
    label vectors of the whole epoch.

    Args:
        num_classes: number of classes. When `None`, the `Distiller` sets it
            from the teacher's output shape; used alone, the metric then
            creates its count matrix at the first `update_state` (eagerly).
        name: name in logs.
        dtype: dtype of the accumulators.

    Returns (from `result()`):
        A non-negative scalar (nats), at most `log(num_classes)`; 0 before
        any update.

    Example:

    >>> m = keras_kd.metrics.MutualInformation(num_classes=10)
    >>> for t, s in batches:
    ...     m.update_state(t, s)
    >>> m.result()  # == mutual_info_score(all teacher labels, all student's)
    """

    def __init__(self, num_classes: int | None = None,
                 name: str = "mutual_information",
                 dtype: str | None = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.num_classes: int | None = None
        self.joint: Any = None
        if num_classes is not None:
            self.set_num_classes(num_classes)

    def set_num_classes(self, num_classes: int) -> None:
        """Creates the count matrix for `num_classes` classes (once)."""
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(
                f"`num_classes` must be a positive integer, got {num_classes}."
            )
        if self.num_classes is not None:
            if self.num_classes != num_classes:
                raise ValueError(
                    f"The metric '{self.name}' counts {self.num_classes} "
                    f"classes, but the logits have {num_classes}."
                )
            return
        self.num_classes = num_classes
        self.joint = self.add_variable(
            (num_classes, num_classes), "zeros", name="joint"
        )

    def update_state(self, teacher_logits: "Tensor", student_logits: "Tensor",
                     sample_weight: "Tensor | None" = None) -> None:
        teacher_logits = _as_float(teacher_logits, self.dtype)
        student_logits = _as_float(student_logits, self.dtype)
        _check_logits(teacher_logits, student_logits, type(self).__name__)
        classes = teacher_logits.shape[-1]
        if self.joint is None:
            if classes is None:
                raise ValueError(
                    "Pass `num_classes` to `MutualInformation`: the class "
                    "count of the logits is not known statically."
                )
            self.set_num_classes(classes)
        elif classes is not None and classes != self.num_classes:
            self.set_num_classes(classes)  # raises the mismatch error
        t = ops.one_hot(ops.argmax(teacher_logits, axis=-1), self.num_classes,
                        dtype=self.dtype)
        s = ops.one_hot(ops.argmax(student_logits, axis=-1), self.num_classes,
                        dtype=self.dtype)
        if sample_weight is not None:
            w = ops.reshape(_as_float(sample_weight, self.dtype), (-1, 1))
            t = t * w
        self.joint.assign_add(ops.matmul(ops.transpose(t), s))

    def result(self) -> "Tensor":
        if self.joint is None:
            return ops.zeros((), dtype=self.dtype)
        joint = ops.convert_to_tensor(self.joint)
        total = ops.sum(joint)
        p = ops.divide_no_nan(joint, total)
        p_t = ops.sum(p, axis=1, keepdims=True)
        p_s = ops.sum(p, axis=0, keepdims=True)
        ratio = ops.divide_no_nan(p, p_t * p_s)
        log_ratio = ops.log(ops.maximum(ratio, _EPSILON))
        terms = ops.where(p > 0, p * log_ratio, 0.0)
        return ops.maximum(ops.sum(terms), 0.0)

    def get_config(self) -> "Config":
        config = super().get_config()
        config.update(num_classes=self.num_classes)
        return config


@keras.saving.register_keras_serializable(package="keras_kd")
class ExpectedCalibrationError(DistillationMetric):
    """Expected calibration error of the student.

    Samples are binned by confidence `max softmax(z_s)` into `num_bins`
    equal-width bins `((b - 1) / B, b / B]`; with `n_b` samples,
    accuracy `acc_b` and mean confidence `conf_b` in bin `b`,
    `ECE = sum_b n_b / n * |acc_b - conf_b|`. Counts, summed confidences and
    summed correct predictions per bin are accumulated over every batch.

    Args:
        num_bins: number of confidence bins. Defaults to 15.
        from_logits: `True` (default) when the scores are logits; `False`
            when they are probabilities (e.g. a softmax output), read as
            `log(clip(p, epsilon, 1 - epsilon))`
            (`keras_kd.ops.probabilities.as_logits`).
        name: name in logs.
        dtype: dtype of the accumulators.

    Returns (from `result()`):
        A scalar in [0, 1]; 0 before any update.

    Example:

    >>> m = keras_kd.metrics.ExpectedCalibrationError()
    >>> m.update_state(labels, student_logits)  # sparse or one-hot labels
    >>> m.result()
    """

    inputs = "labels"
    reads_distribution = True

    def __init__(self, num_bins: int = 15, from_logits: bool = True,
                 name: str = "ece", dtype: str | None = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.from_logits = bool(from_logits)
        num_bins = int(num_bins)
        if num_bins < 1:
            raise ValueError(f"`num_bins` must be >= 1, got {num_bins}.")
        self.num_bins = num_bins
        self.counts = self.add_variable((num_bins,), "zeros", name="counts")
        self.confidence = self.add_variable(
            (num_bins,), "zeros", name="confidence"
        )
        self.correct = self.add_variable((num_bins,), "zeros", name="correct")

    def update_state(self, y_true: "Tensor", student_logits: "Tensor",
                     sample_weight: "Tensor | None" = None) -> None:
        logits = _as_float(student_logits, self.dtype)
        if len(logits.shape) != 2:
            raise ValueError(
                "`ExpectedCalibrationError` expects student logits of shape "
                f"(batch, classes), got {tuple(logits.shape)}."
            )
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == 2 and y_true.shape[-1] == logits.shape[-1] \
                and logits.shape[-1] != 1:
            labels = ops.argmax(y_true, axis=-1)  # one-hot
        else:
            labels = ops.reshape(y_true, (-1,))
        probs = ops.softmax(as_logits(logits, self.from_logits), axis=-1)
        confidence = ops.max(probs, axis=-1)
        predicted = ops.argmax(logits, axis=-1)
        correct = ops.cast(
            ops.equal(predicted, ops.cast(labels, predicted.dtype)),
            self.dtype,
        )
        bins = ops.cast(ops.ceil(confidence * self.num_bins), "int32") - 1
        bins = ops.clip(bins, 0, self.num_bins - 1)
        one_hot = ops.one_hot(bins, self.num_bins, dtype=self.dtype)
        if sample_weight is not None:
            w = ops.reshape(_as_float(sample_weight, self.dtype), (-1, 1))
            one_hot = one_hot * w
        # (bins, 3): count, summed confidence, summed correct per bin.
        sums = ops.matmul(
            ops.transpose(one_hot),
            ops.stack([ops.ones_like(confidence), confidence, correct], -1),
        )
        self.counts.assign_add(sums[:, 0])
        self.confidence.assign_add(sums[:, 1])
        self.correct.assign_add(sums[:, 2])

    def result(self) -> "Tensor":
        total = ops.sum(self.counts)
        gap = ops.abs(
            ops.convert_to_tensor(self.correct)
            - ops.convert_to_tensor(self.confidence)
        )
        return ops.divide_no_nan(ops.sum(gap), total)

    def get_config(self) -> "Config":
        config = super().get_config()
        config.update(num_bins=self.num_bins, from_logits=self.from_logits)
        return config


def class_activation_map(feature: "Tensor", classifier_kernel: "Tensor",
                         size: "Sequence[int] | None" = None) -> "Tensor":
    """Class activation map summed over classes.

    `CAM(h, w) = sum_c sum_k W[k, c] F[h, w, k]`: the classifier weights
    applied to the last convolutional feature map (the input of the global
    pooling that feeds the classifier), summed over the classes, then
    resized bilinearly to `size`.

    Args:
        feature: channels-last feature map `(batch, height, width, channels)`.
        classifier_kernel: kernel of the `Dense` classifier,
            `(channels, classes)`.
        size: `(height, width)` to resize to (usually the input size), or
            `None` to keep the feature's size.

    Returns:
        A tensor of shape `(batch, height, width)`.
    """
    feature = ops.convert_to_tensor(feature)
    kernel = ops.cast(ops.convert_to_tensor(classifier_kernel), feature.dtype)
    weights = ops.sum(kernel, axis=-1)  # summing over classes commutes
    cam = ops.tensordot(feature, weights, axes=[[3], [0]])
    if size is not None and tuple(size) != tuple(cam.shape[1:3]):
        cam = ops.image.resize(
            cam[..., None], tuple(size), interpolation="bilinear",
            data_format="channels_last",
        )[..., 0]
    return cam


@keras.saving.register_keras_serializable(package="keras_kd")
class AttentionIoU(DistillationMetric):
    """Intersection over union of the attention maps of two models.

    Each map (a class activation map, see `class_activation_map`) is
    min-max normalised per image and thresholded (`>= threshold`); the
    metric sums the intersections and the unions of the two masks over every
    image and batch and returns their ratio. Low values mean the two models
    look at different regions (diverse attention).

    Inside a `Distiller`, the two models are named by `models`: the name of
    a teacher (`teacher.name`) or `"student"`. For each, `feature_layers`
    names its last convolutional layer (the input of the global pooling
    before the classifier) and `classifier_layers` its `Dense` classifier;
    the names are checked when the distiller is built. The maps are computed
    on the inputs each model sees in the step (its own augmentation while
    training, the clean batch during validation) and upsampled to the input
    size.

    Args:
        models: pair of model names, e.g. `("teacher_a", "teacher_b")` or
            `("teacher_a", "student")`. Only needed inside a `Distiller`.
        feature_layers: pair of layer names, the last convolutional feature
            of each model.
        classifier_layers: pair of layer names, the `Dense` classifier of
            each model.
        threshold: mask threshold on the normalised maps. Defaults to 0.4.
        name: name in logs; defaults to `"attention_iou_<a>_<b>"` from
            `models`, else `"attention_iou"`.
        dtype: dtype of the accumulators.

    Returns (from `result()`):
        A scalar in [0, 1]; 0 before any update.

    Example:

    >>> iou = keras_kd.metrics.AttentionIoU(
    ...     models=("t1", "t2"), feature_layers=("t1_stage2", "t2_stage2"),
    ...     classifier_layers=("t1_logits", "t2_logits"))
    >>> distiller = keras_kd.Distiller([t1, t2], student, diagnostics=[iou])
    >>> # Alone, on maps of shape (batch, height, width):
    >>> iou.update_state(map_a, map_b); iou.result()
    """

    inputs = "attention"

    def __init__(self, models: "Sequence[str] | None" = None,
                 feature_layers: "Sequence[str] | None" = None,
                 classifier_layers: "Sequence[str] | None" = None,
                 threshold: float = 0.4, name: str | None = None,
                 dtype: str | None = None) -> None:
        pairs = {"models": models, "feature_layers": feature_layers,
                 "classifier_layers": classifier_layers}
        for key, value in pairs.items():
            if value is not None and (
                isinstance(value, str) or len(value) != 2
            ):
                raise ValueError(
                    f"`{key}` must be a pair (one entry per compared model), "
                    f"got {value!r}."
                )
        if name is None:
            name = ("attention_iou_" + "_".join(models)) if models \
                else "attention_iou"
        super().__init__(name=name, dtype=dtype)
        self.models = None if models is None else tuple(models)
        self.feature_layers = (
            None if feature_layers is None else tuple(feature_layers)
        )
        self.classifier_layers = (
            None if classifier_layers is None else tuple(classifier_layers)
        )
        self.threshold = float(threshold)
        self.intersection = self.add_variable(
            (), "zeros", name="intersection"
        )
        self.union = self.add_variable((), "zeros", name="union")

    def update_state(self, map_a: "Tensor", map_b: "Tensor",
                     sample_weight: "Tensor | None" = None) -> None:
        """Accumulates intersections and unions of two batches of maps.

        Args:
            map_a: attention maps `(batch, height, width)` (or with a
                trailing axis of size 1) of the first model.
            map_b: the same for the second model; resized bilinearly to the
                size of `map_a` when the sizes differ.
            sample_weight: optional per-image weights.
        """
        map_a = _as_float(map_a, self.dtype)
        map_b = _as_float(map_b, self.dtype)
        if len(map_a.shape) == 4:
            map_a = map_a[..., 0]
        if len(map_b.shape) == 4:
            map_b = map_b[..., 0]
        if len(map_a.shape) != 3 or len(map_b.shape) != 3:
            raise ValueError(
                "`AttentionIoU` expects maps of shape (batch, height, width); "
                f"got {tuple(map_a.shape)} and {tuple(map_b.shape)}."
            )
        if tuple(map_a.shape[1:]) != tuple(map_b.shape[1:]):
            map_b = ops.image.resize(
                map_b[..., None], tuple(map_a.shape[1:]),
                interpolation="bilinear", data_format="channels_last",
            )[..., 0]
        mask_a = self._mask(map_a)
        mask_b = self._mask(map_b)
        inter = ops.cast(ops.logical_and(mask_a, mask_b), self.dtype)
        union = ops.cast(ops.logical_or(mask_a, mask_b), self.dtype)
        if sample_weight is None:
            self.intersection.assign_add(ops.sum(inter))
            self.union.assign_add(ops.sum(union))
            return
        w = ops.reshape(_as_float(sample_weight, self.dtype), (-1,))
        self.intersection.assign_add(
            ops.sum(ops.sum(inter, axis=(1, 2)) * w))
        self.union.assign_add(ops.sum(ops.sum(union, axis=(1, 2)) * w))

    def _mask(self, attention):
        """Whether the min-max normalised map, `(a - min) / (max - min)`,
        reaches the threshold; computed without the division as
        `a - min >= threshold * (max - min)`, and false on constant maps."""
        low = ops.min(attention, axis=(1, 2), keepdims=True)
        high = ops.max(attention, axis=(1, 2), keepdims=True)
        return ops.logical_and(
            attention - low >= self.threshold * (high - low), high > low)

    def result(self) -> "Tensor":
        return ops.divide_no_nan(self.intersection, self.union)

    def get_config(self) -> "Config":
        config = super().get_config()
        config.update(
            models=self.models,
            feature_layers=self.feature_layers,
            classifier_layers=self.classifier_layers,
            threshold=self.threshold,
        )
        return config


_BY_NAME = {
    "top1_agreement": TopOneAgreement,
    "teacher_kl": TeacherKL,
    "mutual_information": MutualInformation,
    "ece": ExpectedCalibrationError,
}


def get(identifier: str | keras.metrics.Metric) -> keras.metrics.Metric:
    """Returns a diagnostic metric from a name or a metric instance.

    Args:
        identifier: a `keras.metrics.Metric`, or one of `"top1_agreement"`,
            `"teacher_kl"`, `"mutual_information"`, `"ece"`.

    Returns:
        A `keras.metrics.Metric`.
    """
    if isinstance(identifier, keras.metrics.Metric):
        return identifier
    if isinstance(identifier, str) and identifier in _BY_NAME:
        return _BY_NAME[identifier]()
    raise ValueError(
        f"Unknown diagnostic {identifier!r}: pass a `keras.metrics.Metric` "
        f"(e.g. `keras_kd.metrics.AttentionIoU(...)`) or one of "
        f"{sorted(_BY_NAME)}."
    )
