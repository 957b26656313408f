"""LAKD local modules: the user-facing `LocalModules` and the plan a
backend trainer follows (`LocalModulePlan`), which says which variables,
which losses and which teacher outputs each module has.

Backend-free: the per-module gradient loop lives in the backend trainer
(`keras_kd.trainers`), which reads the plan through the `ModuleChain`
interface of `keras_kd.extension`.
"""

from typing import NamedTuple

import keras
from keras import ops

from keras_kd.adapters import channel_adapter
from keras_kd.extension import ModuleChain
from keras_kd.local.graph import Part, owner_of_layers, split_chain
from keras_kd.losses.activation_mapping import ActivationMapping
from keras_kd.losses.features import check_poolable
from keras_kd.step import BoundTerm, StepLosses, StudentForward
from keras_kd.taps import find_layer
from keras_kd.teachers import TeacherOutputs, Teachers
from keras_kd.term import Term


@keras.saving.register_keras_serializable(package="keras_kd")
class LocalModules:
    """Splits the student into local modules trained by local losses (LAKD).

    Given to `keras_kd.Distiller(..., local_modules=LocalModules(...))`,
    the student is cut at the outputs of the layers named in `split_at`
    into `len(split_at) + 1` modules that form a chain: module 1 runs from
    the student's input to the output of `split_at[0]`, module `k + 1`
    from the output of `split_at[k - 1]` to the output of `split_at[k]`,
    and the last module from the last split to the student's output.

    Each training step runs the modules in turn. Module `k + 1` receives
    the output of module `k` with its gradient stopped, and each module is
    trained by its own loss only:

    - module `k` (all but the last): the activation-mapping loss
      (`keras_kd.losses.ActivationMapping(alpha, beta, pooling,
      normalize)`) between its output, passed through a trainable adapter
      (a `Dense` layer on the channel axis, i.e. a 1x1 convolution) when
      the channel counts differ, and the teacher feature
      `teacher_layers[k]`;
    - the last module: the compiled student loss (weighted by the
      distiller's `student_loss_weight`) and the distiller's terms on the
      final outputs (e.g. `KD`);
    - every module: the distiller's feature terms whose `student_layer`
      lies inside it, and the regularization losses of its own layers.

    Each module's forward and backward pass run under their own
    `tf.GradientTape`, and the next module starts only after the previous
    module's gradients are computed, so a module's activations are
    released before the next module runs (in graph mode a control
    dependency enforces the order). The gradients of all modules are then
    applied in one optimizer call. This gives exactly the update of
    applying each module's gradients right after its backward pass (no
    module's loss depends on another module's weights once its input has
    been computed), while the optimizer's step counter, learning-rate
    schedule and Adam bias correction advance once per batch rather than
    once per module, and loss-scale optimizers check all gradients
    together.

    The split must cut the student's graph into a chain: every path from
    the input to the output passes through each split layer, in the order
    given (a residual connection that jumps over a split point is an
    error; split after the merge instead). The teacher runs in inference
    mode, outside every tape, each layer once per step; when
    `teacher_layers` cut it into a chain too, it runs segment by segment,
    each just before the module that needs it.

    This follows LAKD (Zhang et al., 2024, arXiv:2408.11478: "local
    modules with independent gradients"); where the paper's full text was
    not available, the library's reading is documented on
    `ActivationMapping`.

    Args:
        split_at: names of student layers, from input to output, at whose
            outputs the student is cut. Each must be a layer called once
            with one output.
        teacher_layers: names of teacher layers, one per split: the output
            of module `k` (that of `split_at[k]`) is aligned to the output
            of `teacher_layers[k]`.
        alpha: weight of the alignment where the teacher attends.
        beta: weight of the alignment on the complement of the teacher's
            map (what the teacher misses).
        pooling: channel pooling of the teacher map: `"avg_max"`, `"avg"`
            or `"max"`.
        normalize: `"sigmoid"` (of the standardised map) or `"minmax"`.
        name: prefix in logs and adapter names; the `fit` history holds
            `<name>_<k>_loss`, the activation-mapping loss of module `k`
            (1-based, one per split).

    Example:

    ```python
    distiller = keras_kd.Distiller(
        teacher, student,
        terms=[keras_kd.Term(keras_kd.losses.KD(temperature=4.0), 0.9)],
        student_loss_weight=0.1,
        local_modules=keras_kd.LocalModules(
            split_at=["s_stage1", "s_stage2", "s_stage3"],
            teacher_layers=["t_stage1", "t_stage2", "t_stage3"],
            alpha=1.0, beta=0.1),
    )
    distiller.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    distiller.fit(x, y, epochs=10)
    ```
    """

    def __init__(
        self, split_at, teacher_layers, alpha=1.0, beta=0.1,
        pooling="avg_max", normalize="sigmoid", name="local",
    ):
        split_at = _names(split_at, "split_at")
        teacher_layers = _names(teacher_layers, "teacher_layers")
        if not split_at:
            raise ValueError(
                "`split_at` must name at least one student layer; got an "
                "empty list."
            )
        repeated = sorted({n for n in split_at if split_at.count(n) > 1})
        if repeated:
            raise ValueError(
                f"`split_at` names the layer(s) {repeated} more than once; "
                "each split point must be a different layer."
            )
        if len(teacher_layers) != len(split_at):
            raise ValueError(
                f"`teacher_layers` has {len(teacher_layers)} name(s) but "
                f"`split_at` has {len(split_at)}: give one teacher layer per "
                "split point (the output of module k, at split_at[k], is "
                "aligned to teacher_layers[k]; the last module is trained "
                "by the student loss and the terms on the final outputs). "
                f"Got split_at={split_at}, teacher_layers={teacher_layers}."
            )
        self.split_at = split_at
        self.teacher_layers = teacher_layers
        self.loss = ActivationMapping(
            alpha=alpha, beta=beta, pooling=pooling, normalize=normalize,
            name=f"{name}_activation_mapping",
        )
        self.name = name

    @property
    def alpha(self):
        return self.loss.alpha

    @property
    def beta(self):
        return self.loss.beta

    @property
    def loss_names(self):
        """The names under which the modules' activation-mapping losses are
        logged (`<name>_<k>`, 1-based, one per split)."""
        return [f"{self.name}_{k + 1}" for k in range(len(self.split_at))]

    def bind(self, teachers, student, terms, assembly, ensemble="logits",
             teacher_augmentation=None, diagnostics=None):
        """Builds and validates the modules for a student and its teachers;
        called by `Distiller`.

        Args:
            teachers: the teacher `keras.Model`s.
            student: the student `keras.Model`.
            terms: the distiller's `keras_kd.step.BoundTerm`s.
            assembly: the distiller's `keras_kd.step.LossAssembly`.
            ensemble: how several teachers combine (`"logits"` or
                `"losses"`), as in the `Distiller`.
            teacher_augmentation: the distiller's teacher augmentation(s).
            diagnostics: the distiller's `keras_kd.diagnostics.Diagnostics`
                (which layers its metrics read), or `None`.

        Returns:
            A `LocalModulePlan`.
        """
        return LocalModulePlan(
            self, teachers, student, terms, assembly, ensemble=ensemble,
            teacher_augmentation=teacher_augmentation,
            diagnostics=diagnostics)

    def get_config(self):
        return {
            "split_at": list(self.split_at),
            "teacher_layers": list(self.teacher_layers),
            "alpha": self.loss.alpha,
            "beta": self.loss.beta,
            "pooling": self.loss.pooling,
            "normalize": self.loss.normalize,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"LocalModules(split_at={self.split_at!r}, "
            f"teacher_layers={self.teacher_layers!r}, alpha={self.alpha}, "
            f"beta={self.beta})"
        )


def _names(value, argument):
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"`{argument}` must be a list of layer names, got {value!r}."
        )
    for item in value:
        if not isinstance(item, str):
            raise TypeError(
                f"`{argument}` must hold layer names (strings); got "
                f"{item!r} in {list(value)!r}."
            )
    return list(value)


class ModuleStep(NamedTuple):
    """What one module computed: its output, its `StepLosses`, and
    `{layer name: feature}` for the diagnostics that read a layer inside
    it."""

    output: object
    losses: StepLosses
    diagnostic_features: dict


class LocalModulePlan(ModuleChain):
    """The student of one distiller cut into module sub-models, with each
    module's variables, adapters and losses.

    Built by `LocalModules.bind`. A backend trainer runs module `k` with
    `module_losses(k, ...)` on the previous module's output, differentiates
    its loss with respect to `module_variables(k)`, and advances
    `teacher_stream(x)` so that each teacher segment runs just before the
    module that needs it.

    The teachers run in one of two ways. With one teacher that
    `teacher_layers` cut into a chain (and no diagnostic reading a teacher
    layer), the teacher runs segment by segment, each just before the
    student module that needs it, so that its activations are not held
    while earlier modules train. Otherwise every teacher runs whole, once
    per step, through the same `keras_kd.teachers.Teachers` as end-to-end
    distillation (several teachers, per-teacher augmentation): the
    activation-mapping loss of a module is then averaged over the teachers
    that have its teacher layer, and terms on the final outputs follow the
    distiller's `ensemble` mode.

    Attributes:
        spec: the `LocalModules` it implements.
        parts: the modules, in order: sub-graphs of the student run with
            its own layers (`keras_kd.local.graph.Part`).
        adapters: `{name: layer}`, the adapters of the activation-mapping
            losses (for the distiller to track and save).
        num_modules: `len(parts)`.
        loss_names: the names of the modules' activation-mapping losses.
        feature_terms: per module, the indices (in the distiller's term
            order) of the feature terms that read a layer inside it.
        teacher_segments: the teacher's segments when it runs segment by
            segment, else `None`.
    """

    argument = "local_modules"

    def __init__(self, spec, teachers, student, terms, assembly,
                 ensemble="logits", teacher_augmentation=None,
                 diagnostics=None):
        self.spec = spec
        self.assembly = assembly
        self.terms = list(terms)
        self.student = student
        n_splits = len(spec.split_at)
        self.n_splits = n_splits
        self.num_modules = n_splits + 1
        self.loss_names = spec.loss_names
        starts, ends, module_layers = split_chain(
            student, spec.split_at, "student", "split_at"
        )
        owner = owner_of_layers(module_layers)

        def module_of(layer_name, what):
            layer = find_layer(student, layer_name, "student")
            if id(layer) not in owner:
                raise ValueError(
                    f"{what} reads student layer '{layer_name}', which "
                    "belongs to no local module (only layers between the "
                    "input and the output can be read)."
                )
            return owner[id(layer)]

        # Which module each term belongs to.
        self.feature_terms = [[] for _ in range(n_splits + 1)]
        self.logit_terms = []
        for i, term in enumerate(self.terms):
            if term.reads_features:
                self.feature_terms[module_of(
                    term.student_layer, f"Term '{term.name}'")].append(i)
            else:
                self.logit_terms.append(i)

        # The activation-mapping loss of each split, as a feature term that
        # reads `teacher_layers[k]` (its adapter is added below).
        self.local_terms = [
            BoundTerm(Term(spec.loss, teacher_layer=t_layer,
                           student_layer=s_layer, name=name), name)
            for name, t_layer, s_layer in zip(
                self.loss_names, spec.teacher_layers, spec.split_at)
        ]
        feature_bounds = self.local_terms + [
            self.terms[i] for k in range(self.num_modules)
            for i in self.feature_terms[k]]
        self._feature_slot = {
            i: n_splits + j for j, i in enumerate(
                i for k in range(self.num_modules)
                for i in self.feature_terms[k])}
        self.diagnostics = diagnostics
        diagnostic_layers = diagnostics.student_layers if diagnostics else []
        self.teachers = Teachers(
            teachers, feature_bounds, ensemble=ensemble,
            augmentation=teacher_augmentation,
            extra_layers=diagnostics.teacher_layers if diagnostics else None,
        )
        self.teacher_segments = None
        if len(teachers) == 1 and not any(
                diagnostics.teacher_layers[0] if diagnostics else []):
            self._build_teacher_segments(teachers[0])
            if diagnostics is not None and diagnostics.metrics:
                # The diagnostics read the teacher's output.
                self.teacher_need[-1] = n_splits

        # Module sub-models over the student's own layers (shared weights):
        # each returns its output, then the features its terms read, then
        # the features the diagnostics read inside it.
        self.diagnostic_slots = [
            (module_of(name, "A diagnostic"), name)
            for name in diagnostic_layers]
        self.parts = []
        for k in range(n_splits + 1):
            names = [self.terms[i].student_layer
                     for i in self.feature_terms[k]]
            names += [name for m, name in self.diagnostic_slots if m == k]
            self.parts.append(Part(
                starts[k], ends[k],
                [student.get_layer(name).output for name in names],
                module_layers[k], name=f"{student.name}_module{k + 1}",
            ))

        # Adapters from each module's output to the teacher's channels
        # where they differ.
        self.adapters = {}
        for k, bound in enumerate(self.local_terms):
            bound.adapter = self._adapter(k, ends[k])
            if bound.adapter is not None:
                self.adapters[bound.name] = bound.adapter
        self._check_partition()

    # Construction helpers.

    def _build_teacher_segments(self, teacher):
        """Cuts the teacher at `teacher_layers` too, when that gives a
        chain, so that each teacher segment runs just before the student
        module that needs it; `self.teacher_segments` stays `None` (the
        whole teacher runs once) otherwise."""
        n = self.n_splits
        self.segment_terms = [[] for _ in range(n + 1)]
        # Highest teacher segment each student module needs.
        self.teacher_need = [k for k in range(n)]
        self.teacher_need.append(n if self.logit_terms else -1)
        try:
            starts, ends, parts = split_chain(
                teacher, self.spec.teacher_layers, "teacher",
                "teacher_layers",
            )
        except ValueError:
            return
        owner = owner_of_layers(parts)
        for k, indices in enumerate(self.feature_terms):
            for i in indices:
                layer = teacher.get_layer(self.terms[i].teacher_layer)
                if id(layer) not in owner:
                    return
                self.segment_terms[owner[id(layer)]].append(i)
                self.teacher_need[k] = max(self.teacher_need[k],
                                           owner[id(layer)])
        self.teacher_segments = [
            Part(
                starts[j], ends[j],
                [teacher.get_layer(self.terms[i].teacher_layer).output
                 for i in self.segment_terms[j]],
                parts[j], name=f"{teacher.name}_segment{j + 1}",
            )
            for j in range(n + 1)
        ]

    def _adapter(self, k, cut):
        t_shape = self.teachers.feature_shapes[k]
        s_shape = tuple(cut.shape)
        where = (
            f"local module {k + 1} (student layer '{self.spec.split_at[k]}' "
            f"{s_shape}, teacher layer '{self.spec.teacher_layers[k]}' "
            f"{t_shape})"
        )
        if len(t_shape) < 3 or len(s_shape) < 3:
            raise ValueError(
                "The activation mapping needs channels-last feature maps "
                f"with a spatial axis, `(batch, ..., channels)`, for {where}."
            )
        check_poolable(t_shape, s_shape, where)
        return channel_adapter(t_shape, s_shape,
                               f"{self.spec.name}_{k + 1}_adapter")

    def _check_partition(self):
        """Every trainable variable of the student and the adapters belongs
        to exactly one module."""
        counts = {}
        for k in range(self.num_modules):
            for v in self.module_variables(k):
                counts[id(v)] = counts.get(id(v), 0) + 1
        expected = {id(v) for v in self.student.trainable_variables}
        for bound in self.terms + self.local_terms:
            if bound.adapter is not None:
                expected.update(id(v) for v in bound.adapter.trainable_variables)
        if set(counts) != expected or any(n != 1 for n in counts.values()):
            raise ValueError(
                "The local modules do not partition the trainable variables "
                f"of the student '{self.student.name}' and the adapters: a "
                "layer is shared between modules or lies outside all of "
                "them."
            )

    # The ModuleChain interface.

    def module_variables(self, k):
        """The trainable variables updated by module `k`'s loss (0-based):
        its layers' and its adapters'."""
        variables = list(self.parts[k].trainable_variables)
        bounds = [self.terms[i] for i in self.feature_terms[k]]
        if k < self.n_splits:
            bounds.append(self.local_terms[k])
        for bound in bounds:
            if bound.adapter is not None:
                variables.extend(bound.adapter.trainable_variables)
        return variables

    def teacher_stream(self, x, sequence=None, augment=False):
        """The teachers' outputs for the batch `x` (each on its own
        augmentation of `x` when `augment`), computed as the modules need
        them (see `TeacherStream`)."""
        return TeacherStream(self, x, sequence, augment)

    def module_losses(self, k, inputs, y, sample_weight, stream, training):
        """Runs module `k` (0-based) on `inputs` and assembles its loss.

        `stream` is a `TeacherStream` advanced to module `k`.

        Module `k < n_splits` is trained by its activation-mapping loss; the
        last module by the student loss and the terms on the final outputs;
        every module by the feature terms that read a layer inside it and
        by its own layers' regularization losses.

        Returns:
            A `ModuleStep`.
        """
        out, feats = self.parts[k](inputs, training=training)
        count = len(self.feature_terms[k])
        diagnostic = dict(zip(
            [name for m, name in self.diagnostic_slots if m == k],
            feats[count:]))
        last = k == self.n_splits
        pairs = []
        if not last:
            pairs.append((self.local_terms[k], stream.local[k], out))
        else:
            pairs.extend(
                (self.terms[i],) + self.terms[i].final_outputs(
                    stream.out, out, per_teacher=False)
                for i in self.logit_terms)
        pairs.extend((self.terms[i], stream.terms[i], feature)
                     for i, feature in zip(self.feature_terms[k], feats))
        losses = self.assembly(
            pairs, sample_weight, y=y if last else None,
            y_pred=out if last else None,
            regularization=self.parts[k].losses,
        )
        return ModuleStep(out, losses, diagnostic)

    def diagnostic_inputs(self, stream, y_pred, features):
        """What the diagnostics read after the last module: the teachers'
        `TeacherOutputs` and the student's `StudentForward`.

        Args:
            stream: the step's `TeacherStream`, advanced to the last module.
            y_pred: the last module's output.
            features: the modules' `diagnostic_features`, merged.
        """
        names = [name for _, name in self.diagnostic_slots]
        student = StudentForward(y_pred, [], [features[n] for n in names])
        return stream.teacher_outputs, student


class TeacherStream:
    """The teachers' outputs for one batch, in inference mode and without
    gradient, computed as the student's modules need them.

    With teacher segments, segment `j` (input to `teacher_layers[0]`, ...,
    last split to the output) runs only when a module first needs it, so
    that the teacher's activations and later features are not held while
    earlier modules train; the last segment is skipped when no term reads
    the teacher's output. Otherwise every teacher runs whole, once, when the
    first module needs it.

    Attributes:
        local: `{k: teacher feature aligned to module k}` (a list, one per
            teacher that has the layer, with several teachers).
        out: the teachers' final output (when computed), combined as the
            distiller's `ensemble` mode says.
        terms: `{term index: teacher feature read by that term}`.
        teacher_outputs: the `TeacherOutputs` for the diagnostics (after
            the last module).
    """

    def __init__(self, plan, x, sequence=None, augment=False):
        self.plan = plan
        self.local, self.terms, self.out = {}, {}, None
        self.teacher_outputs = None
        self._next, self._h, self._augment = 0, x, augment
        self._sequence = sequence or (lambda value, after: value)

    def advance(self, k, after=()):
        """Computes what module `k` needs, each new piece only once the
        tensors in `after` exist. Returns the tensors computed."""
        plan = self.plan
        if plan.teacher_segments is None:
            if self._next > 0:
                return []
            self._next = plan.num_modules
            teacher = plan.teachers(self._sequence(self._h, after),
                                    training=False, augment=self._augment)
            n = plan.n_splits
            self.out = teacher.outputs
            self.local = dict(enumerate(teacher.features[:n]))
            self.terms = {i: teacher.features[slot]
                          for i, slot in plan._feature_slot.items()}
            self.teacher_outputs = teacher
            return keras.tree.flatten(teacher)
        if self._next == 0 and self._augment:
            # One teacher: its augmentation, applied before the first
            # segment.
            self._h = plan.teachers.augment(self._h)
        computed = []
        while self._next <= plan.teacher_need[k]:
            j = self._next
            end, feats = plan.teacher_segments[j](
                self._sequence(self._h, after), training=False)
            end, feats = keras.tree.map_structure(
                ops.stop_gradient, (end, list(feats)))
            if j < plan.n_splits:
                self.local[j] = self._h = end
            else:
                self.out = end
            self.terms.update(zip(plan.segment_terms[j], feats))
            computed.extend(keras.tree.flatten((end, feats)))
            self._next += 1
        if k == plan.n_splits:
            self.teacher_outputs = TeacherOutputs(self.out, [], self.out,
                                                  [[]])
        return computed
