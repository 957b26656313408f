"""The `Distiller`: a `keras.Model` that trains a student from a frozen
teacher.

Data flows one way: batch -> teacher forward (outside the gradient tape,
`training=False`) and one student forward (inside it) -> the student's loss
and each `Term` -> the total loss -> the optimizer.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_kd import layerwise as kd_layerwise
from keras_kd import losses as kd_losses
from keras_kd.augment import apply_augmentation, check_augmentation
from keras_kd.augment import check_augmentation_shape
from keras_kd.diagnostics import Diagnostics
from keras_kd.ensemble import Teachers, as_teacher_list, check_teacher_outputs
from keras_kd.ensemble import ensemble_loss
from keras_kd.losses.features import check_poolable
from keras_kd.taps import Tap
from keras_kd.term import Term


def _replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _scale_for_replicas(value):
    """Divide a per-replica loss by the replica count, as Keras losses do."""
    n = _replicas()
    return value / n if n > 1 else value


def _unscale_for_replicas(value):
    n = _replicas()
    return value * n if n > 1 else value


def _unique_names(terms):
    seen = {}
    for term in terms:
        base = term.name
        if base in seen:
            seen[base] += 1
            term.name = f"{base}_{seen[base]}"
        else:
            seen[base] = 0
    return terms


class _Untracked:
    """Holds helpers that Keras must not track (their variables are the
    student's or teacher's own and are tracked there)."""

    def __init__(self, **items):
        self.__dict__.update(items)


@keras.saving.register_keras_serializable(package="keras_kd")
class Distiller(keras.Model):
    """Trains a student model from a frozen teacher.

    The training loss is
    `student_loss_weight * student_loss + sum(term.weight * term_loss)
    + the student's regularization losses`, each a mean over the batch. The
    student loss is the loss given to `compile()`, computed on the labels;
    with unlabelled data (`fit(x)`) it is skipped and training is pure
    distillation.

    The teacher is called with `training=False` outside the gradient tape and
    is never updated: its weights and the object itself are left exactly as
    they were handed over. The student runs forward once per step; its
    outputs and every tapped feature come from that one call. When a feature
    term compares maps with different channel counts, the distiller owns a
    trainable adapter (a `Dense` layer on the channel axis, i.e. a 1x1
    convolution for images) on the student side; it trains with the student
    and is never exported.

    `fit` history holds `loss`, `student_loss` (with labels), one
    `<term name>_loss` per term (unweighted), the compiled metrics computed on
    the student outputs, the diagnostics, and their `val_` forms.

    Several teachers form an ensemble (see `keras_kd.ensemble.Teachers`):
    terms on the final outputs compare the student with the teachers'
    averaged outputs (`ensemble="logits"`) or are averaged over the teachers
    (`ensemble="losses"`); a feature term reads its `teacher_layer` from
    every teacher that has a layer of that name and averages its loss over
    them. Augmentations apply in `train_step` only: each teacher sees its own
    augmentation of the batch and the student's single forward pass sees the
    student's.

    Args:
        teacher: a trained `keras.Model`, or a list of them (an ensemble;
            their outputs must have equal shapes).
        student: the `keras.Model` to train.
        terms: list of `keras_kd.Term`. Defaults to one Hinton KD term on the
            final outputs (`Term(keras_kd.losses.KD())`).
        student_loss_weight: weight of the compiled student loss.
        ensemble: with several teachers, `"logits"` (average the teachers'
            outputs, then compute each term) or `"losses"` (compute each term
            against every teacher, then average).
        teacher_augmentation: `None`, one augmentation for all teachers, or
            a list with one augmentation (or `None`) per teacher. An
            augmentation is a Keras layer (called with `training=True`, e.g.
            `keras_kd.augment.weak()`) or a callable on the batch.
        student_augmentation: `None` or one augmentation for the student.
        diagnostics: list of `keras_kd.metrics` metrics (or their names,
            e.g. `"top1_agreement"`) logged in the `fit` history for training
            and validation.
        layerwise_lr: optional `keras_kd.LayerwiseLearningRate`: paired
            student layers then train with their own optimizers at learning
            rates that follow the student-teacher divergence, logged as
            `lr_scale/<student layer>`. Its state is `layerwise_state`.
        local_modules: optional `keras_kd.LocalModules`: train the student
            as a chain of local modules, each by its own loss under its own
            gradient tape (LAKD). `None` trains it end to end. Cannot be
            combined with `layerwise_lr`.
        name: name of the distiller.

    Example:

    ```python
    distiller = keras_kd.Distiller(
        teacher=teacher,
        student=student,
        terms=[
            keras_kd.Term(keras_kd.losses.KD(temperature=4.0), weight=0.9),
            keras_kd.Term(keras_kd.losses.AttentionTransfer(), weight=1000.0,
                          teacher_layer="t_stage2", student_layer="s_stage2"),
        ],
        student_loss_weight=0.1,
    )
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    distiller.fit(train_ds, validation_data=val_ds, epochs=10)
    distiller.export_student("student_savedmodel")
    ```
    """

    def __init__(
        self, teacher, student, terms=None, student_loss_weight=1.0,
        ensemble="logits", teacher_augmentation=None,
        student_augmentation=None, diagnostics=None,
        layerwise_lr=None, local_modules=None, name="distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        teachers = as_teacher_list(teacher)
        if not isinstance(student, keras.Model):
            raise TypeError(
                f"`student` must be a `keras.Model`, got {student!r}."
            )
        if terms is None:
            terms = [Term(kd_losses.KD())]
        terms = list(terms)
        for term in terms:
            if not isinstance(term, Term):
                raise TypeError(
                    "Each item of `terms` must be a `keras_kd.Term`, got "
                    f"{term!r}. Wrap a loss as `keras_kd.Term(loss, weight)`."
                )
        self.teachers = teachers
        self.student = student
        self.student_loss_weight = float(student_loss_weight)
        self._terms = _unique_names(terms)

        feature_terms = [t for t in self._terms if t.reads_features]
        check_teacher_outputs(teachers)
        self._diagnostics = Diagnostics(
            diagnostics, teachers, student,
            reserved=["loss", "student_loss"]
            + [f"{t.name}_loss" for t in self._terms],
        )
        teacher_tap = Teachers(
            teachers, feature_terms, ensemble=ensemble,
            augmentation=teacher_augmentation,
            extra_layers=self._diagnostics.teacher_layers,
        )
        student_tap = Tap(
            student, [t.student_layer for t in feature_terms]
            + self._diagnostics.student_layers, "student"
        )
        self._student_augmentation = check_augmentation(
            student_augmentation, "`student_augmentation`"
        )
        check_augmentation_shape(
            self._student_augmentation, student, "The student augmentation"
        )
        self._taps = _Untracked(teacher=teacher_tap, student=student_tap)
        self._check_logit_shapes()
        self.adapters = self._build_adapters(feature_terms)
        for option, value in (("layerwise_lr", layerwise_lr),
                              ("local_modules", local_modules)):
            if value is not None and len(teachers) != 1:
                raise ValueError(
                    f"`{option}` supports one teacher; got "
                    f"{len(teachers)} teachers."
                )
        if local_modules is not None and (
            teacher_augmentation is not None
            or student_augmentation is not None or diagnostics
        ):
            raise ValueError(
                "`local_modules` cannot be combined with "
                "`teacher_augmentation`, `student_augmentation` or "
                "`diagnostics`: the local-module training step does not "
                "apply them."
            )
        self.layerwise_lr = layerwise_lr
        self.layerwise_state = kd_layerwise.attach(
            layerwise_lr, teachers[0], student
        )
        self.local_modules = local_modules
        self._local = None
        if local_modules is not None:
            from keras_kd.local import LocalModules  # local imports this file

            if not isinstance(local_modules, LocalModules):
                raise TypeError(
                    "`local_modules` must be a `keras_kd.LocalModules`, got "
                    f"{local_modules!r}."
                )
            if layerwise_lr is not None:
                raise ValueError(
                    "`local_modules` and `layerwise_lr` cannot be combined: "
                    "local modules train each module under its own tape "
                    "and do not update layer-wise learning-rate scales."
                )
            self._local = local_modules.bind(self)
            self.local_loss_trackers = self._local.trackers

        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.term_loss_trackers = [
            keras.metrics.Mean(name=f"{t.name}_loss") for t in self._terms
        ]
        self.diagnostics = self._diagnostics.metrics
        if all(t.built for t in teachers) and student.built:
            self.built = True

    @property
    def teacher(self):
        """The teacher, when there is one (else see `teachers`)."""
        if len(self.teachers) != 1:
            raise AttributeError(
                f"The distiller '{self.name}' has {len(self.teachers)} "
                "teachers; use `distiller.teachers`."
            )
        return self.teachers[0]

    @property
    def ensemble(self):
        """How several teachers are combined: `"logits"` or `"losses"`."""
        return self._taps.teacher.ensemble

    @property
    def terms(self):
        """The distillation terms, in order."""
        return list(self._terms)

    # Construction-time validation and adapters.

    def _check_logit_shapes(self):
        if not any(not t.reads_features for t in self._terms):
            return
        try:
            t_shape = tuple(self.teachers[0].output.shape)
            s_shape = tuple(self.student.output.shape)
        except (AttributeError, ValueError):
            return  # Subclassed models: shapes are only known at run time.
        if t_shape[1:] != s_shape[1:]:
            raise ValueError(
                f"The teacher '{self.teachers[0].name}' outputs shape "
                f"{t_shape} "
                f"but the student '{self.student.name}' outputs shape "
                f"{s_shape}; terms on the final outputs need equal shapes."
            )

    def _build_adapters(self, feature_terms):
        adapters = {}
        tshapes = self._taps.teacher.feature_shapes
        sshapes = self._taps.student.feature_shapes
        for term, t_shape, s_shape in zip(feature_terms, tshapes, sshapes):
            where = (
                f"term '{term.name}' (teacher layer '{term.teacher_layer}' "
                f"{t_shape}, student layer '{term.student_layer}' {s_shape})"
            )
            check_poolable(t_shape, s_shape, where)
            if term.loss.matches_channels and t_shape[-1] != s_shape[-1]:
                adapter = keras.layers.Dense(
                    t_shape[-1], name=f"{term.name}_adapter"
                )
                adapter.build(s_shape)
                adapters[term.name] = adapter
        return adapters

    # Keras model API.

    def call(self, inputs, training=None):
        """Runs the student."""
        return self.student(inputs, training=training)

    @property
    def trainable_weights(self):
        """The student's and the adapters' trainable weights (never the
        teacher's)."""
        if not self.trainable:
            return []
        weights = list(self.student.trainable_weights)
        for adapter in self.adapters.values():
            weights.extend(adapter.trainable_weights)
        return weights

    @property
    def trainable_variables(self):
        return self.trainable_weights

    @property
    def non_trainable_weights(self):
        trainable = {id(v) for v in self.trainable_weights}
        return [v for v in self.weights if id(v) not in trainable]

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The student's own loss: the compiled loss on the labels.

        Returns zero when there are no labels or no compiled loss (pure
        distillation). Distillation terms and regularization are added by
        the training and test steps.
        """
        del x, training
        if y is None or self._compile_loss is None:
            return ops.zeros((), dtype="float32")
        return self._compile_loss(y, y_pred, sample_weight)

    def _teacher_forward(self, x, augment=False):
        """The teachers' outputs and tapped features, in inference mode
        (each on its own augmentation of `x` when `augment`).

        Called outside any gradient tape: nothing of the teacher is recorded.
        """
        outputs = self._taps.teacher(x, training=False, augment=augment)
        return keras.tree.map_structure(ops.stop_gradient, outputs)

    def _student_losses(self, x, y, sample_weight, teacher, training):
        """One student forward and every loss; returns (total, y_pred,
        student_loss, term_losses, student_feats)."""
        teacher_out, teacher_feats = teacher[:2]
        y_pred, student_feats = self._taps.student(x, training=training)

        student_loss = self.compute_loss(
            y=y, y_pred=y_pred, sample_weight=sample_weight
        )
        total = self.student_loss_weight * student_loss
        term_losses = []
        feature_index = 0
        for term in self._terms:
            if term.reads_features:
                t_val = teacher_feats[feature_index]
                s_val = student_feats[feature_index]
                feature_index += 1
                adapter = self.adapters.get(term.name)
                if adapter is not None:
                    s_val = adapter(s_val)
            else:
                t_val, s_val = teacher_out, y_pred
            value = ensemble_loss(term.loss, t_val, s_val, sample_weight)
            term_losses.append(value)
            total = total + term.weight * ops.cast(value, total.dtype)
        regularization = self.student.losses
        if regularization:
            total = total + _scale_for_replicas(
                ops.cast(ops.sum(regularization), total.dtype)
            )
        return total, y_pred, student_loss, term_losses, student_feats

    def get_metrics_result(self):
        """The model's metric values, skipping compiled metrics that have
        not seen a labelled batch yet (pure distillation with `fit(x)`)."""
        logs = {}
        for metric in self.metrics:
            if not getattr(metric, "built", True):
                continue
            result = metric.result()
            if isinstance(result, dict):
                logs.update(result)
            else:
                logs[metric.name] = result
        return logs

    def _update_trackers(self, x, y, y_pred, sample_weight, total,
                         student_loss, term_losses):
        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        self._loss_tracker.update_state(
            _unscale_for_replicas(total), sample_weight=batch
        )
        if y is not None:
            self.student_loss_tracker.update_state(
                _unscale_for_replicas(student_loss), sample_weight=batch
            )
        for tracker, value in zip(self.term_loss_trackers, term_losses):
            tracker.update_state(
                _unscale_for_replicas(value), sample_weight=batch
            )
        if y is not None:
            return self.compute_metrics(x, y, y_pred, sample_weight)
        # Without labels there is no student loss and no compiled metric.
        trackers = [self._loss_tracker] + self.term_loss_trackers
        trackers += self._diagnostics.unlabelled_metrics
        return {m.name: m.result() for m in trackers}

    def train_step(self, data):
        if self._local is not None:
            return self._local.train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher = self._teacher_forward(x, augment=True)
        x_student = apply_augmentation(self._student_augmentation, x)
        if self.layerwise_state is not None:
            self.layerwise_state.update_scales(x, self.optimizer.iterations)
        with tf.GradientTape() as tape:
            total, y_pred, student_loss, term_losses, student_feats = (
                self._student_losses(
                    x_student, y, sample_weight, teacher, training=True
                )
            )
            scaled = self.optimizer.scale_loss(total)
        self._update_diagnostics(teacher, y_pred, student_feats, y,
                                 sample_weight)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self._apply_gradients(gradients, variables)
        logs = self._update_trackers(
            x, y, y_pred, sample_weight, total, student_loss, term_losses
        )
        if self.layerwise_state is not None:
            logs = {**logs, **self.layerwise_state.logs()}
        return logs

    def _apply_gradients(self, gradients, variables):
        """Applies the gradients of the trained variables (one optimizer,
        or one per paired layer with `layerwise_lr`)."""
        if self.layerwise_state is not None:
            return self.layerwise_state.apply_gradients(
                self.optimizer, gradients, variables
            )
        self.optimizer.apply_gradients(zip(gradients, variables))

    def _update_diagnostics(self, teacher, y_pred, student_feats, y,
                            sample_weight):
        """Updates the diagnostic metrics (before the weights change, so
        that the student's attention maps use the weights of its forward)."""
        extra = len(self._diagnostics.student_layers)
        self._diagnostics.update(
            teacher[2], y_pred, student_feats[len(student_feats) - extra:],
            y, sample_weight,
        )

    def compile(self, *args, **kwargs):
        """`keras.Model.compile`; with `layerwise_lr` it also builds one
        optimizer per paired layer from the compiled optimizer's config."""
        super().compile(*args, **kwargs)
        if self.layerwise_state is not None:
            self.layerwise_state.build_optimizers(
                self.optimizer, self.trainable_variables
            )

    def compile_from_config(self, config):
        # Keras skips a custom `compile()` when loading; call it here.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.optimizer is not None and self.built and (
            not self.optimizer.built
        ):
            self.optimizer.build(self.trainable_variables)

    def test_step(self, data):
        if self._local is not None:
            return self._local.test_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher = self._teacher_forward(x)
        total, y_pred, student_loss, term_losses, student_feats = (
            self._student_losses(x, y, sample_weight, teacher, training=False)
        )
        self._update_diagnostics(teacher, y_pred, student_feats, y,
                                 sample_weight)
        return self._update_trackers(
            x, y, y_pred, sample_weight, total, student_loss, term_losses
        )

    # Export and serialization.

    def export_student(self, filepath, verbose=True, **kwargs):
        """Writes the student alone (no teacher, no adapters) as a
        TensorFlow SavedModel with a `serve` endpoint.

        Args:
            filepath: directory to write.
            verbose: print a summary of the exported endpoints.
            **kwargs: passed on to `keras.Model.export`.

        Example:

        >>> distiller.export_student("student_savedmodel")
        >>> reloaded = tf.saved_model.load("student_savedmodel")
        >>> reloaded.serve(x)
        """
        self.student.export(
            filepath, format="tf_saved_model", verbose=verbose, **kwargs
        )
        return filepath

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        teachers = [serialize(t) for t in self.teachers]
        augmentation = self._taps.teacher.augmentations
        if isinstance(augmentation, list):
            augmentation = [serialize(a) for a in augmentation]
        else:
            augmentation = serialize(augmentation)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "teacher": teachers[0] if len(teachers) == 1 else teachers,
            "student": keras.saving.serialize_keras_object(self.student),
            "terms": [
                keras.saving.serialize_keras_object(t) for t in self._terms
            ],
            "student_loss_weight": self.student_loss_weight,
            "ensemble": self.ensemble,
            "teacher_augmentation": augmentation,
            "student_augmentation": serialize(self._student_augmentation),
            "diagnostics": self._diagnostics.get_config(),
            "layerwise_lr": keras.saving.serialize_keras_object(
                self.layerwise_lr
            ),
            "local_modules": keras.saving.serialize_keras_object(
                self.local_modules
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)

        def deserialize(item):
            if isinstance(item, list):
                return [deserialize(i) for i in item]
            return keras.saving.deserialize_keras_object(
                item, custom_objects=custom_objects
            )

        for key in ("teacher", "student", "teacher_augmentation",
                    "student_augmentation", "diagnostics"):
            if key in config:
                config[key] = deserialize(config[key])
        config["terms"] = [
            keras.saving.deserialize_keras_object(
                t, custom_objects=custom_objects
            )
            for t in config["terms"]
        ]
        config["layerwise_lr"] = keras.saving.deserialize_keras_object(
            config.get("layerwise_lr"), custom_objects=custom_objects
        )
        if config.get("local_modules") is not None:
            config["local_modules"] = keras.saving.deserialize_keras_object(
                config["local_modules"], custom_objects=custom_objects
            )
        return cls(**config)
