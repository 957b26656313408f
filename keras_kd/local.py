"""LAKD local modules: the student trained as a chain of modules, each by
its own loss, with one gradient tape per module.

`LocalModules` is the user-facing description (split points, matching
teacher layers, the activation-mapping loss); `Distiller(...,
local_modules=...)` binds it to a student and a teacher, which builds the
module sub-models once and validates the split before any training.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_kd.distiller import _scale_for_replicas, _unscale_for_replicas
from keras_kd.losses.activation_mapping import ActivationMapping
from keras_kd.losses.features import check_poolable
from keras_kd.taps import Tap, _graph_endpoints, find_layer


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

    def bind(self, distiller):
        """Builds and validates the modules for a distiller's student and
        teacher; called by `Distiller`.

        Returns:
            The object that runs the per-module training and test steps.
        """
        return _ModuleRunner(self, distiller)

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


# Walking the student's graph.

def _producer(tensor):
    """The layer and call node that produced a symbolic tensor."""
    history = tensor._keras_history
    layer = history.operation
    return layer, layer._inbound_nodes[history.node_index]


def _walk_back(outputs, stops, earlier):
    """Layers that compute `outputs` from the `stops` tensors.

    Returns `(layers, leak)`: the layers in discovery order, and the first
    tensor reached that is neither a stop nor computed inside (a model
    input or the output of a layer in `earlier`), as
    `(consumer_layer, producer_layer)`, or `None`.
    """
    stop_ids = {id(t) for t in stops}
    layers, layer_ids, seen = [], set(), set()
    queue = [(None, t) for t in keras.tree.flatten(outputs)]
    while queue:
        consumer, tensor = queue.pop(0)
        if id(tensor) in stop_ids or id(tensor) in seen:
            continue
        layer, node = _producer(tensor)
        if node.is_input or id(layer) in earlier:
            return layers, (consumer, layer)
        seen.add(id(tensor))
        if id(layer) not in layer_ids:
            layer_ids.add(id(layer))
            layers.append(layer)
        queue.extend((layer, t) for t in node.input_tensors)
    return layers, None


def _cut_tensor(model, name, role, argument):
    """The output of the layer `name`, where `model` is cut."""
    layer = find_layer(model, name, role)
    if len(layer._inbound_nodes) != 1:
        raise ValueError(
            f"Layer '{name}' in `{argument}` is called "
            f"{len(layer._inbound_nodes)} times in the {role} "
            f"'{model.name}'; split at a layer that is called once."
        )
    output = layer.output
    if len(keras.tree.flatten(output)) != 1:
        raise ValueError(
            f"Layer '{name}' in `{argument}` of the {role} '{model.name}' "
            "has several outputs; split at a layer with a single output."
        )
    return output


def _split_chain(model, names, role, argument):
    """Cuts a Functional model at the outputs of the named layers.

    Returns:
        `(starts, ends, parts)`: for each of the `len(names) + 1` parts,
        its input(s), its output(s) and its layers.

    Raises:
        ValueError: when the cut is not a chain of parts in that order.
    """
    inputs, outputs = _graph_endpoints(model, role)
    cuts = [_cut_tensor(model, name, role, argument) for name in names]
    starts, ends = [inputs] + cuts, cuts + [outputs]
    parts, earlier = [], set()
    for k in range(len(names) + 1):
        if 0 < k < len(names):
            if id(model.get_layer(names[k])) in earlier:
                raise ValueError(
                    f"`{argument}` must list layers from input to output: "
                    f"'{names[k]}' comes before '{names[k - 1]}' in the "
                    f"{role} '{model.name}'."
                )
        layers, leak = _walk_back(ends[k], keras.tree.flatten(starts[k]),
                                  earlier)
        if leak is not None:
            consumer, producer = leak
            where = (f"after '{names[k - 1]}'" if k > 0
                     else f"before '{names[0]}'")
            reader = consumer.name if consumer is not None else "the output"
            raise ValueError(
                f"`{argument}`={list(names)} does not cut the {role} "
                f"'{model.name}' into a chain of modules: layer '{reader}' "
                f"(in module {k + 1}, {where}) reads the output of "
                f"'{producer.name}', which lies in an earlier module or is "
                "a model input. A connection (e.g. a residual or a "
                "parallel branch) jumps over the split point; split at a "
                "layer that every path from the input passes through, such "
                "as the layer after the merge."
            )
        if not layers:
            raise ValueError(
                f"Module {k + 1} of the {role} '{model.name}' would hold no "
                f"layer: '{names[k - 1]}' in `{argument}` gives the "
                f"{role}'s output or repeats a split. Split at an earlier "
                "layer."
            )
        parts.append(layers)
        earlier.update(id(layer) for layer in layers)
    return starts, ends, parts


class _Part:
    """A sub-model from `start` to `(end, features)` over a model's own
    layers. Keras cannot list one tensor twice among the outputs of a
    model cut at an inner tensor, so repeated tensors are output once."""

    def __init__(self, start, end, features, name):
        single_end = not isinstance(end, (list, tuple, dict))
        extras, self.index = [], []
        for feature in features:
            if single_end and feature is end:
                self.index.append(0)
                continue
            if not any(feature is e for e in extras):
                extras.append(feature)
            self.index.append(
                1 + next(i for i, e in enumerate(extras) if e is feature)
            )
        self.model = keras.Model(start, (end, extras), name=name)

    def __call__(self, x, training):
        end, extras = self.model(x, training=training)
        outputs = [end] + list(extras)
        return end, [outputs[i] for i in self.index]


def _owner(parts):
    return {id(layer): k for k, layers in enumerate(parts) for layer in layers}


class _ModuleRunner:
    """The student cut into module sub-models, their adapters and the
    per-module training and test steps of one `Distiller`."""

    def __init__(self, spec, distiller):
        self.spec = spec
        self.distiller = distiller
        student, teacher = distiller.student, distiller.teacher
        n_splits = len(spec.split_at)
        self.n_splits = n_splits
        starts, ends, module_layers = _split_chain(
            student, spec.split_at, "student", "split_at"
        )

        # Which module each term of the distiller belongs to.
        terms = distiller._terms
        owner = _owner(module_layers)
        self.feature_terms = [[] for _ in range(n_splits + 1)]
        self.logit_terms = []
        teacher_names = list(spec.teacher_layers)
        self.teacher_index = {}
        for i, term in enumerate(terms):
            if not term.reads_features:
                self.logit_terms.append(i)
                continue
            layer = find_layer(student, term.student_layer, "student")
            if id(layer) not in owner:
                raise ValueError(
                    f"Term '{term.name}' reads student layer "
                    f"'{term.student_layer}', which belongs to no local "
                    "module (only layers between the input and the output "
                    "can be read)."
                )
            self.feature_terms[owner[id(layer)]].append(i)
            self.teacher_index[i] = len(teacher_names)
            teacher_names.append(term.teacher_layer)
        # Validates the teacher layer names; runs the teacher in one piece
        # when it cannot be cut into a chain at `teacher_layers`.
        self.teacher_tap = Tap(teacher, teacher_names, "teacher")
        self._build_teacher_segments(teacher)

        # Module sub-models over the student's own layers (shared weights).
        self.parts = [
            _Part(
                starts[k], ends[k],
                [student.get_layer(terms[i].student_layer).output
                 for i in self.feature_terms[k]],
                name=f"{student.name}_module{k + 1}",
            )
            for k in range(n_splits + 1)
        ]
        self.models = [part.model for part in self.parts]

        # Adapters from each module's output to the teacher's channels.
        self.adapters = []
        for k in range(n_splits):
            adapter = self._adapter(k, ends[k])
            if adapter is not None:
                key = f"{spec.name}_{k + 1}"
                if key in distiller.adapters:
                    raise ValueError(
                        f"The adapter name '{key}' of the local modules "
                        "clashes with a term of the same name; give "
                        "`LocalModules(name=...)` or the term another name."
                    )
                distiller.adapters[key] = adapter
            self.adapters.append(adapter)

        self.trackers = [
            keras.metrics.Mean(name=f"{spec.name}_{k + 1}_loss")
            for k in range(n_splits)
        ]
        self._check_partition()

    # Construction helpers.

    def _build_teacher_segments(self, teacher):
        """Cuts the teacher at `teacher_layers` too, when that gives a
        chain, so that each teacher segment runs just before the student
        module that needs it; `self.teacher_segments` stays `None` (one
        teacher forward) otherwise."""
        terms = self.distiller._terms
        n = self.n_splits
        self.teacher_segments = None
        self.segment_terms = [[] for _ in range(n + 1)]
        # Highest teacher segment each student module needs.
        self.teacher_need = [k for k in range(n)]
        self.teacher_need.append(n if self.logit_terms else -1)
        try:
            starts, ends, parts = _split_chain(
                teacher, self.spec.teacher_layers, "teacher",
                "teacher_layers",
            )
        except ValueError:
            return
        owner = _owner(parts)
        for k, indices in enumerate(self.feature_terms):
            for i in indices:
                layer = teacher.get_layer(terms[i].teacher_layer)
                if id(layer) not in owner:
                    return
                self.segment_terms[owner[id(layer)]].append(i)
                self.teacher_need[k] = max(self.teacher_need[k],
                                           owner[id(layer)])
        self.teacher_segments = [
            _Part(
                starts[j], ends[j],
                [teacher.get_layer(terms[i].teacher_layer).output
                 for i in self.segment_terms[j]],
                name=f"{teacher.name}_segment{j + 1}",
            )
            for j in range(n + 1)
        ]

    def _adapter(self, k, cut):
        t_shape = self.teacher_tap.feature_shapes[k]
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
        if t_shape[-1] == s_shape[-1]:
            return None
        adapter = keras.layers.Dense(
            t_shape[-1], name=f"{self.spec.name}_{k + 1}_adapter"
        )
        adapter.build(s_shape)
        return adapter

    def _check_partition(self):
        """Every trainable variable of the student and the adapters belongs
        to exactly one module."""
        counts = {}
        for k in range(len(self.models)):
            for v in self.module_variables(k):
                counts[id(v)] = counts.get(id(v), 0) + 1
        expected = {id(v) for v in self.distiller.trainable_variables}
        if set(counts) != expected or any(n != 1 for n in counts.values()):
            raise ValueError(
                "The local modules do not partition the trainable variables "
                f"of the student '{self.distiller.student.name}' and the "
                "adapters: a layer is shared between modules or lies "
                "outside all of them."
            )

    def module_variables(self, k):
        """The trainable variables updated by module `k`'s loss (0-based):
        its layers' and its adapters'."""
        variables = list(self.models[k].trainable_variables)
        if k < len(self.adapters) and self.adapters[k] is not None:
            variables.extend(self.adapters[k].trainable_variables)
        for i in self.feature_terms[k]:
            adapter = self.distiller.adapters.get(
                self.distiller._terms[i].name
            )
            if adapter is not None:
                variables.extend(adapter.trainable_variables)
        return variables

    # Steps.

    def teacher_stream(self, x):
        """The teacher's outputs for the batch `x`, computed as the modules
        need them (see `_TeacherStream`)."""
        return _TeacherStream(self, x)

    def module_loss(self, k, h, y, sample_weight, teacher, training):
        """Runs module `k` (0-based) on `h` and computes its local loss.

        `teacher` is a `_TeacherStream` advanced to module `k`.

        Returns:
            `(output, total, local_value, student_loss, term_values)`: the
            module's output, its whole loss, its activation-mapping loss
            (`None` for the last module), the student loss (`None` except
            for the last module) and `{term index: unweighted value}`.
        """
        d = self.distiller
        out, feats = self.parts[k](h, training=training)
        total = ops.zeros((), dtype="float32")
        local_value = student_loss = None
        term_values = {}
        if k < self.n_splits:
            s_val = out
            if self.adapters[k] is not None:
                s_val = self.adapters[k](s_val)
            local_value = self.spec.loss(
                teacher.local[k], s_val, sample_weight=sample_weight
            )
            total = total + ops.cast(local_value, total.dtype)
        else:
            student_loss = d.compute_loss(
                y=y, y_pred=out, sample_weight=sample_weight
            )
            total = total + d.student_loss_weight * ops.cast(
                student_loss, total.dtype
            )
            for i in self.logit_terms:
                term = d._terms[i]
                value = term.loss(teacher.out, out,
                                  sample_weight=sample_weight)
                term_values[i] = value
                total = total + term.weight * ops.cast(value, total.dtype)
        for j, i in enumerate(self.feature_terms[k]):
            term = d._terms[i]
            s_val = feats[j]
            adapter = d.adapters.get(term.name)
            if adapter is not None:
                s_val = adapter(s_val)
            value = term.loss(teacher.terms[i], s_val,
                              sample_weight=sample_weight)
            term_values[i] = value
            total = total + term.weight * ops.cast(value, total.dtype)
        regularization = self.models[k].losses
        if regularization:
            total = total + _scale_for_replicas(
                ops.cast(ops.sum(regularization), total.dtype)
            )
        return out, total, local_value, student_loss, term_values

    @staticmethod
    def handoff(value, after=()):
        """`value` (a tensor or a structure of tensors) with its gradient
        stopped, computed only once the tensors in `after` exist.

        Passing the previous module's gradients as `after` stops graph
        execution from starting the next module before the previous
        module's backward pass has run and released its activations (the
        dataflow alone would allow it).
        """
        deps = [getattr(g, "values", g) for g in after if g is not None]

        def one(tensor):
            tensor = ops.stop_gradient(tensor)
            if deps and not tf.executing_eagerly():
                with tf.control_dependencies(deps):
                    tensor = tf.identity(tensor)
            return tensor

        return keras.tree.map_structure(one, value)

    def _run(self, data, training):
        d = self.distiller
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher = self.teacher_stream(x)
        h = x
        total = ops.zeros((), dtype="float32")
        locals_, term_values = [], {}
        gradients, variables = [], []
        after = ()
        for k in range(len(self.models)):
            # The teacher's part for this module runs after the previous
            # module's backward pass, and this module after both.
            ready = teacher.advance(k, after)
            h = self.handoff(h, list(after) + ready)
            if training:
                with tf.GradientTape() as tape:
                    out, loss, local_value, student_loss, values = (
                        self.module_loss(k, h, y, sample_weight, teacher,
                                         training=True)
                    )
                    scaled = d.optimizer.scale_loss(loss)
                module_vars = self.module_variables(k)
                after = tape.gradient(scaled, module_vars)
                del tape  # releases this module's activations
                gradients.extend(after)
                variables.extend(module_vars)
            else:
                out, loss, local_value, student_loss, values = (
                    self.module_loss(k, h, y, sample_weight, teacher,
                                     training=False)
                )
            total = total + loss
            term_values.update(values)
            if local_value is not None:
                locals_.append(local_value)
            h = out
        if training:
            # In the distiller's variable order, as the optimizer was built.
            by_id = {id(v): g for v, g in zip(variables, gradients)}
            variables = d.trainable_variables
            d._apply_gradients([by_id[id(v)] for v in variables], variables)
        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        for tracker, value in zip(self.trackers, locals_):
            tracker.update_state(_unscale_for_replicas(value),
                                 sample_weight=batch)
        term_losses = [term_values[i] for i in range(len(d._terms))]
        logs = d._update_trackers(x, y, out, sample_weight, total,
                                  student_loss, term_losses)
        if y is None:
            logs.update({t.name: t.result() for t in self.trackers})
        return logs

    def train_step(self, data):
        """One step: each module forward and backward under its own tape,
        in turn; then one optimizer update of all modules' variables."""
        return self._run(data, training=True)

    def test_step(self, data):
        """The same losses without tapes, `training=False`."""
        return self._run(data, training=False)


class _TeacherStream:
    """The teacher's outputs for one batch, in inference mode and without
    gradient, computed as the student's modules need them.

    When `teacher_layers` cut the teacher into a chain, teacher segment `j`
    (input to `teacher_layers[0]`, ..., last split to the output) runs
    only when a module first needs it, so that the teacher's activations
    and later features are not held while earlier modules train; the last
    segment is skipped when no term reads the teacher's output. Otherwise
    the whole teacher runs once, when the first module needs it.

    Attributes:
        local: `{k: teacher feature aligned to module k}`.
        out: the teacher's final output (when computed).
        terms: `{term index: teacher feature read by that term}`.
    """

    def __init__(self, runner, x):
        self.runner = runner
        self.local, self.terms, self.out = {}, {}, None
        self._next, self._h = 0, x

    def advance(self, k, after=()):
        """Computes what module `k` needs, each new piece only once the
        tensors in `after` exist. Returns the tensors computed."""
        r = self.runner
        need = r.teacher_need[k]
        computed = []
        if r.teacher_segments is None:
            if self._next == 0 and need >= 0:
                out, feats = r.teacher_tap(r.handoff(self._h, after),
                                           training=False)
                out, feats = r.handoff((out, list(feats)))
                self.out = out
                self.local = dict(enumerate(feats[:r.n_splits]))
                self.terms = {i: feats[j] for i, j in r.teacher_index.items()}
                self._next = r.n_splits + 1
                computed = keras.tree.flatten((out, feats))
            return computed
        while self._next <= need:
            j = self._next
            end, feats = r.teacher_segments[j](r.handoff(self._h, after),
                                               training=False)
            end, feats = r.handoff((end, list(feats)))
            if j < r.n_splits:
                self.local[j] = self._h = end
            else:
                self.out = end
            self.terms.update(zip(r.segment_terms[j], feats))
            computed.extend(keras.tree.flatten((end, feats)))
            self._next += 1
        return computed
