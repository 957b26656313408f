"""The plan a backend trainer follows for LAKD local modules
(`LocalModulePlan`): which variables, which losses and which teacher
outputs each module has.

Backend-free: the per-module gradient loop lives in the backend trainer
(`keras_kd.trainers`), which reads the plan through the `ModuleChain`
interface of `keras_kd.extension`.
"""

from typing import NamedTuple

from keras_kd.adapters import channel_adapter
from keras_kd.extension import ModuleChain
from keras_kd.local.graph import Part, owner_of_layers, split_chain
from keras_kd.local.stream import TeacherStream
from keras_kd.losses.features import check_poolable
from keras_kd.step import BoundTerm, StepLosses, StudentForward
from keras_kd.taps import find_layer
from keras_kd.term import Term


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
        self.teachers = teachers.with_features(
            feature_bounds,
            extra_layers=diagnostics.teacher_layers if diagnostics else None,
        )
        models = self.teachers.teachers
        self.teacher_segments = None
        if len(models) == 1 and not any(
                diagnostics.teacher_layers[0] if diagnostics else []):
            self._build_teacher_segments(models[0])
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
