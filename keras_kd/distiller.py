"""The `Distiller`: a `keras.Model` that trains a student from frozen
teachers.

Data flows one way: batch -> teachers (inference mode, no gradient) and one
student forward -> the student's loss and each `Term` -> the total loss ->
the optimizer. This module builds and validates the pieces and holds the
model's state; the loss assembly is `keras_kd.step`, and the backend trainer
that differentiates and applies is picked at import from `keras_kd.trainers`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.adapters import check_loss_shapes, feature_adapters
from keras_kd import batches
from keras_kd import log_names
from keras_kd._untracked import Untracked
from keras_kd import _keras_compat as compat
from keras_kd import cache as teacher_cache
from keras_kd import losses as kd_losses
from keras_kd.augment import check_augmentation, check_augmentation_shape
from keras_kd.augment import distinct_layers
from keras_kd.diagnostics import Diagnostics, check_single_outputs
from keras_kd.distribution import check_placement
from keras_kd.layerwise import LayerwiseLearningRate
from keras_kd.layerwise import attach as attach_layerwise
from keras_kd.local import LocalModules
from keras_kd.outputs import check_reads_logits, symbolic_outputs
from keras_kd.step import BoundTerm, DistillationStep, LossAssembly
from keras_kd.taps import Tap
from keras_kd.teachers import Teachers, as_teacher_list
from keras_kd.teachers import check_teacher_outputs, check_teachers_apart
from keras_kd.term import Term
from keras_kd.trainers import Trainer
from keras_kd._typing import Augmentation, Config, Tensor


@keras.saving.register_keras_serializable(package="keras_kd")
class Distiller(Trainer, keras.Model):
    """Trains a student model from a frozen teacher.

    The training loss is
    `student_loss_weight * student_loss + sum(term.weight * term_loss)
    + the student's regularization losses`, each a mean over the batch. The
    student loss is the loss given to `compile()`, computed on the labels;
    with unlabelled data (`fit(x)`) it is skipped and training is pure
    distillation.

    The teacher is called with `training=False` outside the gradient
    computation and is never updated: its weights and the object itself are
    left exactly as they were handed over. The student runs forward once per
    step; its outputs and every tapped feature come from that one call. When
    a feature term compares maps with different channel counts, the
    distiller owns a trainable adapter (`keras_kd.adapters.ChannelAdapter`,
    an affine map on the channel axis, i.e. a 1x1 convolution for images)
    on the student side; it trains with the student and is never exported.

    `fit` history holds `loss`, `student_loss` (with labels), one
    `<term name>_loss` per term (unweighted), the compiled metrics computed on
    the student outputs, the diagnostics, and their `val_` forms. Terms keep
    the names the user gave them; when two share a name, the distiller logs
    the later one under the first free `<name>_<k>` (the `Term` object is not
    renamed; `distiller.term_names` lists the log names). A term whose log
    would take a key of the distiller or of the compiled loss (a term named
    `student`, like a local module's loss, or like an output of a
    multi-output student) is refused with a `ValueError`, and so, at the
    first batch, are any other two logs with one key (e.g. a compiled metric
    named like a term's `<name>_loss`).

    The distiller trains on the TensorFlow, JAX and PyTorch backends, through
    the trainer of `keras_kd.trainers` that matches `keras.backend.backend()`
    (local modules and layer-wise learning rates included).

    Several teachers form an ensemble (see `keras_kd.teachers.Teachers`):
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
        terms: a `keras_kd.Term` or a list (or tuple) of them. Defaults to
            one Hinton KD term on the final outputs
            (`Term(keras_kd.losses.KD())`).
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
            student layers then train at learning rates that follow the
            student-teacher divergence (averaged over the teachers that
            have the paired layer), logged as `lr_scale/<student layer>`.
            `compile` wraps the optimizer in a `keras_kd.LayerwiseOptimizer`
            (`distiller.optimizer`); the rest of its state is
            `layerwise_state`.
        local_modules: optional `keras_kd.LocalModules`: train the student
            as a chain of local modules, each by its own loss and its own
            gradient (LAKD). `None` trains it end to end. Cannot be
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
        self,
        teacher: keras.Model | Sequence[keras.Model],
        student: keras.Model,
        terms: Term | Sequence[Term] | None = None,
        student_loss_weight: float = 1.0,
        ensemble: str = "logits",
        teacher_augmentation: (
            Augmentation | Sequence[Augmentation | None] | None) = None,
        student_augmentation: Augmentation | None = None,
        diagnostics: Sequence[Any] | None = None,
        layerwise_lr: LayerwiseLearningRate | None = None,
        local_modules: LocalModules | None = None,
        name: str = "distiller",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        # Whether `fit` is running (its validation data are checked).
        self._fitting = False
        teachers = as_teacher_list(teacher)
        if not isinstance(student, keras.Model):
            raise TypeError(
                f"`student` must be a `keras.Model`, got {student!r}."
            )
        check_teachers_apart(teachers, student)
        terms = _as_term_list(terms)
        for term in terms:
            if not isinstance(term, Term):
                raise TypeError(
                    "Each item of `terms` must be a `keras_kd.Term`, got "
                    f"{term!r}. Wrap a loss as `keras_kd.Term(loss, weight)`."
                )
        if local_modules is not None and not isinstance(
                local_modules, LocalModules):
            raise TypeError(
                "`local_modules` must be a `keras_kd.LocalModules`, got "
                f"{local_modules!r}."
            )
        student_loss_weight = _checks.non_negative(
            "student_loss_weight", student_loss_weight)
        _checks.one_extension(layerwise_lr, local_modules)
        _checks.something_trains(terms, student_loss_weight, local_modules,
                                 name)
        self.teachers = teachers
        self.student = student
        self.student_loss_weight = student_loss_weight

        # The distiller's own log names: the user's Terms are not renamed.
        logs = log_names.LogNames.of(
            terms, student,
            list(local_modules.loss_names) if local_modules else [])
        names, extra_losses = logs.terms, logs.extensions
        bound = [BoundTerm(t, n) for t, n in zip(terms, names)]
        self._terms = Untracked(user=terms, bound=bound)
        feature_terms = [b for b in bound if b.reads_features]
        check_teacher_outputs(teachers)
        for b in bound:
            if not b.reads_features:
                b.bind_outputs(teachers, student)
                _check_term_reads_logits(b, teachers, student)
                check_loss_shapes(
                    b, b.teacher_choices[0].shape, b.student_choice.shape,
                    f"term '{b.name}' (final outputs)")

        if diagnostics:
            check_single_outputs(teachers, student)
        self.diagnostics_feed = Diagnostics(
            diagnostics, teachers, student,
            reserved=logs.loss_keys,
        )
        teacher_side = Teachers(
            teachers, feature_terms, ensemble=ensemble,
            augmentation=teacher_augmentation,
            extra_layers=self.diagnostics_feed.teacher_layers,
        )
        student_tap = Tap(
            student, [t.student_layer for t in feature_terms]
            + self.diagnostics_feed.student_layers, "student"
        )
        student_augmentation = check_augmentation(
            student_augmentation, "`student_augmentation`"
        )
        check_augmentation_shape(
            student_augmentation, student, "The student augmentation"
        )
        # Tracked, so that their seed generators are part of the model's
        # state (saved, and threaded through JAX's stateless step).
        self.augmentations = distinct_layers(
            teacher_side.augmentations, student_augmentation)
        self._sides = Untracked(teachers=teacher_side,
                                 student_augmentation=student_augmentation)
        self.adapters = feature_adapters(
            feature_terms, teacher_side.feature_shapes,
            student_tap.feature_shapes)

        assembly = LossAssembly(
            self.student_loss_weight,
            lambda y, y_pred, sample_weight: self.compute_loss(
                y=y, y_pred=y_pred, sample_weight=sample_weight),
        )
        self._step = Untracked(step=DistillationStep(
            teacher_side, student_tap, bound, assembly,
            student_augmentation=student_augmentation,
            num_diagnostic_features=len(self.diagnostics_feed.student_layers),
            regularization=lambda: self.student.losses,
        ))

        self.layerwise_lr = layerwise_lr
        self.layerwise_state = attach_layerwise(
            layerwise_lr, teacher_side, student
        )
        self.local_modules = local_modules
        self.local_plan = None
        if local_modules is not None:
            self.local_plan = local_modules.bind(
                teacher_side, student, bound, assembly,
                diagnostics=self.diagnostics_feed)
            self.adapters.update(self.local_plan.adapters)

        # One `Mean` per logged loss: `student_loss`, then one per term and
        # per extension loss, in order.
        self._tracker_names = ["student"] + names + extra_losses
        self._loss_trackers = [
            keras.metrics.Mean(name=f"{n}_loss") for n in self._tracker_names
        ]
        self.diagnostics = self.diagnostics_feed.metrics
        for metric in self.diagnostics:
            if metric.reads_distribution:
                check_reads_logits(
                    f"the diagnostic '{metric.name}'", metric.from_logits,
                    [(role, m.name, symbolic_outputs(m)) for role, m in
                     [("teacher", t) for t in teachers]
                     + [("student", student)]])
        if all(t.built for t in teachers) and student.built:
            self.built = True

    # Read-only views.

    @property
    def teacher(self) -> keras.Model:
        """The teacher, when there is one (else see `teachers`).

        Raises:
            ValueError: the distiller has several teachers. (Not an
                `AttributeError`: PyTorch's `Module` would replace its
                message.)
        """
        if len(self.teachers) != 1:
            raise ValueError(
                f"The distiller '{self.name}' has {len(self.teachers)} "
                "teachers; use `distiller.teachers`."
            )
        return self.teachers[0]

    @property
    def ensemble(self) -> str:
        """How several teachers are combined: `"logits"` or `"losses"`."""
        return self._sides.teachers.ensemble

    @property
    def terms(self) -> list[Term]:
        """The distillation terms, in order (the user's own objects)."""
        return list(self._terms.user)

    @property
    def term_names(self) -> list[str]:
        """The name under which each term is logged (`<name>_loss`), in
        order."""
        return [b.name for b in self._terms.bound]

    @property
    def output_names(self) -> list[str]:
        """The student's output names, so that `compile` handles a
        multi-output student as Keras handles a multi-output model (a loss
        dict keyed by output name; per-output losses logged as
        `<output>_loss`). Only Functional and Sequential students have
        them."""
        names = getattr(self.student, "output_names", None)
        if not names:
            raise AttributeError(
                f"The student '{self.student.name}' has no output names.")
        return list(names)

    @property
    def distillation_step(self) -> Any:
        """The backend-agnostic step (`keras_kd.step.DistillationStep`)
        that the trainers run."""
        return self._step.step

    @property
    def training_extension(self) -> Any:
        """The feature that changes how a step trains (the layer-wise
        learning-rate state or the local-module plan), or `None`; see
        `keras_kd.extension`."""
        if self.layerwise_state is not None:
            return self.layerwise_state
        return self.local_plan

    @property
    def loss_trackers(self) -> dict[str, Any]:
        """`{name: Mean}`: the trackers of `student_loss`, of each term's
        `<name>_loss` and of each extension loss."""
        return dict(zip(self._tracker_names, self._loss_trackers))

    # Keras model API.

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """Runs the student (on the inputs alone when they carry a teacher
        cache)."""
        return self.student(
            teacher_cache.model_inputs(batches.without_weights(inputs)),
            training=training)

    # Data that carries a teacher cache (`keras_kd.cache`) is checked
    # against the teachers before Keras runs a step.

    def _cache_requirements(self):
        """What a teacher cache must match to stand in for the teachers
        (`keras_kd.cache.CacheRequirements`)."""
        extensions = [name for name, value in (
            ("local_modules", self.local_modules),
            ("layerwise_lr", self.layerwise_lr)) if value is not None]
        return teacher_cache.requirements(
            self.name, self.teachers, self._sides.teachers,
            self._terms.bound, self.diagnostics_feed, extensions)

    def _check_cached_call(self, method, args, kwargs):
        check_placement(self)
        return teacher_cache.check_call(
            self._cache_requirements, self.distillation_step.cache_reader,
            method, args, kwargs)

    def check_teacher_cache(self, data: Any) -> None:
        """Checks a teacher cache against this distiller (its teachers'
        fingerprint, ensemble mode, terms and cached features) and lets
        the distiller's step read it. `fit` (its `validation_data` too),
        `evaluate`, `train_on_batch` and `test_on_batch` do this
        themselves; call it before feeding cached batches any other way
        (a PyTorch `DataLoader`, `train_step` called directly).

        Args:
            data: a `keras_kd.TeacherCache`, or data that carries one
                (`cache.inputs(x)`, `cache.dataset(...)`, a batch).

        Raises:
            ValueError: the cache does not fit (other teachers or weights,
                another ensemble mode, a missing feature, or options a
                cache cannot replace).

        Example:

        >>> distiller.check_teacher_cache(cache)
        >>> distiller.fit(torch_loader_of_cached_batches, epochs=3)
        """
        teacher_cache.check_data(self._cache_requirements,
                                 self.distillation_step.cache_reader, data)

    # Sample weights without labels (`fit(x, sample_weight=w)`), which
    # Keras drops, travel inside `x` (`keras_kd.batches`).

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        args, kwargs = self._check_cached_call("fit", args, kwargs)
        args, kwargs = batches.carry_call_weights("fit", args, kwargs)
        # `fit` checked its `validation_data`: the `evaluate` it runs on
        # them does not check again.
        outer, self._fitting = self._fitting, True
        try:
            return super().fit(*args, **kwargs)
        finally:
            self._fitting = outer

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        if not self._fitting:
            args, kwargs = self._check_cached_call("evaluate", args, kwargs)
        args, kwargs = batches.carry_call_weights("evaluate", args, kwargs)
        return super().evaluate(*args, **kwargs)

    def train_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._check_cached_call(
            "train_on_batch", args, kwargs)
        return super().train_on_batch(*args, **kwargs)

    def test_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._check_cached_call(
            "test_on_batch", args, kwargs)
        return super().test_on_batch(*args, **kwargs)

    @property
    def trainable_weights(self) -> list[Any]:
        """The student's and the adapters' trainable weights (never the
        teacher's)."""
        if not self.trainable:
            return []
        weights = list(self.student.trainable_weights)
        for adapter in self.adapters.values():
            weights.extend(adapter.trainable_weights)
        return weights

    @property
    def trainable_variables(self) -> list[Any]:
        return self.trainable_weights

    @property
    def non_trainable_weights(self) -> list[Any]:
        trainable = {id(v) for v in self.trainable_weights}
        return [v for v in self.weights if id(v) not in trainable]

    @property
    def non_trainable_variables(self) -> list[Any]:
        """Every other variable of the distiller: the teachers', batch-norm
        statistics, seed generators, layer-wise divergences."""
        trainable = {id(v) for v in self.trainable_variables}
        return [v for v in self.variables if id(v) not in trainable]

    def compute_loss(
        self, x: Any = None, y: Any = None, y_pred: Any = None,
        sample_weight: Any = None, training: bool = True,
    ) -> Tensor:
        """The student's own loss: the compiled loss on the labels.

        Returns zero when there are no labels or no compiled loss (pure
        distillation). Distillation terms and regularization are added by
        the training and test steps.
        """
        del x, training
        loss = compat.compiled_loss(self)
        if y is None or loss is None:
            return ops.zeros((), dtype="float32")
        return loss(y, y_pred, sample_weight)

    def compute_metrics(self, x: Any, y: Any, y_pred: Any,
                        sample_weight: Any = None) -> dict[str, Any]:
        """Updates the compiled metrics on the student outputs and returns
        the logs; without labels (`fit(x)`) the compiled metrics are left
        alone."""
        if y is None:
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_metrics_result(self) -> dict[str, Any]:
        """The model's metric values, skipping compiled metrics that have
        not seen a labelled batch yet (pure distillation with `fit(x)`)."""
        logs = {}
        for metric in self.metrics:
            if not getattr(metric, "built", True):
                continue
            result = metric.result()
            if not isinstance(result, dict):
                result = {metric.name: result}
            for key, value in result.items():
                if key in logs:
                    raise ValueError(
                        f"Two logs of the distiller '{self.name}' are named "
                        f"'{key}' (a term's `<name>_loss`, a compiled metric "
                        "or loss, or a diagnostic); one would hide the "
                        "other in the history. Rename the term, the metric "
                        "or the diagnostic."
                    )
                logs[key] = value
        return logs

    @property
    def optimizer(self) -> keras.optimizers.Optimizer | None:
        """The optimizer the distiller trains with (`None` before
        `compile`).

        It is the one given to `compile`, except with a training extension
        that wraps it: with `layerwise_lr`, a `keras_kd.LayerwiseOptimizer`
        around it (inside Keras' `LossScaleOptimizer` when there is one).
        Setting it (as Keras' `compile` does) wraps the new optimizer the
        same way; the compile configuration Keras saves keeps the
        optimizer as given, so `load_model` wraps it again.
        """
        slot = getattr(self, "_optimizer_slot", None)
        return None if slot is None else slot.optimizer

    @optimizer.setter
    def optimizer(self, optimizer):
        try:
            extension = self.training_extension
        except AttributeError:  # set before `__init__` made the extension
            extension = None
        if extension is not None:
            optimizer = extension.wrap_optimizer(optimizer)
        # In a holder Keras does not track: the optimizer is the
        # distiller's, saved as Keras saves a model's `optimizer`.
        self._optimizer_slot = Untracked(optimizer=optimizer)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`keras.Model.compile`, with the same arguments. The distiller
        remembers the `jit_compile` asked for (`"auto"` by default), so
        that a saved distiller resolves it again on the backend that
        loads it."""
        try:
            bound = inspect.signature(keras.Model.compile).bind(
                self, *args, **kwargs)
            self._jit_request = Untracked(value=bound.arguments.get(
                "jit_compile", "auto"))
        except TypeError:
            pass  # Keras reports the wrong call.
        super().compile(*args, **kwargs)

    def compile_from_config(self, config: Config) -> None:
        """Compiles a loaded distiller with the configuration that
        `get_compile_config` saved (Keras leaves a model with its own
        `compile` uncompiled otherwise)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built and self.optimizer is not None:
            # Creates the optimizer's variables, which loading restores.
            self.optimizer.build(self.trainable_variables)

    def get_compile_config(self) -> Config:
        """The `compile` arguments a saved distiller is compiled with again,
        made backend-free: a built-in optimizer under its public Keras
        class (PyTorch's and TensorFlow's own optimizer classes do not run
        on another backend), and `jit_compile` as asked for rather than as
        resolved here."""
        config = super().get_compile_config()
        if not isinstance(config, dict):
            return config
        config = dict(config)
        config["optimizer"] = compat.public_optimizer(config.get("optimizer"))
        request = getattr(self, "_jit_request", None)
        if request is not None and "jit_compile" in config:
            config["jit_compile"] = request.value
        return config

    # Export and serialization.

    def export_student(self, filepath: str | os.PathLike[str],
                       verbose: bool = True, **kwargs: Any) -> Any:
        """Writes the student alone (no teacher, no adapters) as a
        TensorFlow SavedModel with a `serve` endpoint.

        A SavedModel needs TensorFlow installed, whichever backend trains.
        On JAX and TensorFlow the student is exported by
        `keras.Model.export`. On PyTorch, Keras' exporter needs `torch_xla`;
        without it the student is saved as `.keras` and exported by a
        TensorFlow-backend Python process (its layers must then be built-in
        Keras layers or registered serializable ones).

        Args:
            filepath: directory to write.
            verbose: print a summary of the exported endpoints.
            **kwargs: passed on to `keras.Model.export`.

        Returns:
            `filepath`.

        Example:

        >>> distiller.export_student("student_savedmodel")
        >>> reloaded = tf.saved_model.load("student_savedmodel")
        >>> reloaded.serve(x)
        """
        from keras_kd.export import export_saved_model

        return export_saved_model(self.student, filepath, verbose=verbose,
                                  **kwargs)

    def get_config(self) -> Config:
        serialize = keras.saving.serialize_keras_object
        teachers = [serialize(t) for t in self.teachers]
        augmentation = self._sides.teachers.augmentations
        if isinstance(augmentation, list):
            augmentation = [serialize(a) for a in augmentation]
        else:
            augmentation = serialize(augmentation)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "teacher": teachers[0] if len(teachers) == 1 else teachers,
            "student": serialize(self.student),
            "terms": [serialize(t) for t in self._terms.user],
            "student_loss_weight": self.student_loss_weight,
            "ensemble": self.ensemble,
            "teacher_augmentation": augmentation,
            "student_augmentation": serialize(self._sides.student_augmentation),
            "diagnostics": self.diagnostics_feed.get_config(),
            "layerwise_lr": serialize(self.layerwise_lr),
            "local_modules": serialize(self.local_modules),
        }

    @classmethod
    def from_config(cls, config: Config,
                    custom_objects: dict[str, Any] | None = None
                    ) -> Distiller:
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


def _check_term_reads_logits(bound, teachers, student):
    """A term whose loss reads logits (`from_logits=True`) must not read
    a softmax or sigmoid output."""
    loss = bound.loss
    if not (isinstance(loss, kd_losses.DistillationLoss)
            and loss.reads_distribution):
        return

    def chosen(model, choice):
        outputs = symbolic_outputs(model)
        return None if outputs is None else choice(outputs)

    several = len(teachers) > 1
    check_reads_logits(
        f"the term '{bound.name}' ({type(loss).__name__})", loss.from_logits,
        [(f"teacher {i}" if several else "teacher", t.name,
          chosen(t, c)) for i, (t, c) in
         enumerate(zip(teachers, bound.teacher_choices))]
        + [("student", student.name, chosen(student, bound.student_choice))])


def _as_term_list(terms: Any) -> list[Any]:
    """The `terms` argument of `Distiller` as a new list.

    Args:
        terms: `None` (one `Term(KD())`), a single `keras_kd.Term`, or a
            list or tuple of them.

    Returns:
        A list of the given items (not yet checked to be `Term`s).

    Raises:
        TypeError: `terms` is neither `None`, a `Term`, a list nor a tuple.
    """
    if terms is None:
        return [Term(kd_losses.KD())]
    if isinstance(terms, Term):
        return [terms]
    if isinstance(terms, (list, tuple)):
        return list(terms)
    hint = ""
    if isinstance(terms, keras.losses.Loss):
        hint = (" Wrap a loss in a term: "
                f"`terms=keras_kd.Term({type(terms).__name__}(...))`.")
    raise TypeError(
        "`terms` must be a `keras_kd.Term` or a list of them, got "
        f"{terms!r} (of type {type(terms).__name__})." + hint
    )
