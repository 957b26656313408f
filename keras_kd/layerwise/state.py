"""Layer-wise learning rates from the divergence between student and teacher
maps at paired layers.

`LayerwiseLearningRate` is the user-facing description (which layers, which
signal, how often, how far the scales may move). Given to a `Distiller`, it is
bound to the teacher and student as a `LayerwiseState`: a small Keras layer
that owns the per-layer scale variables and, once the distiller is compiled,
one optimizer per paired student layer. Everything is tracked by the
distiller, so `save`/`load_model` and `BackupAndRestore` restore it.

The paper (Kokane, Uddin & Xu, arXiv:2407.04871) was not available in full;
the choices below that it does not state are the library's reading and are
documented where they are made:

- The divergence of layer `l` is the batch mean of the Jensen-Shannon
  divergence (natural log, so in `[0, ln 2]`) between the normalized student
  and teacher maps, after average-pooling the larger map to the smaller
  spatial size.
- `lr_l = lr_0 * clip(d_l / mean_k d_k, min_scale, max_scale)`, with `lr_0`
  the compiled optimizer's learning rate at the current iteration (a
  `LearningRateSchedule` is evaluated there). The scales are re-estimated on
  the steps where the compiled optimizer's iteration count is a multiple of
  `update_every` (so on the very first step), from the current batch.
- Maps are computed in inference mode (`training=False`) on extra forward
  passes that only run on update steps, so batch-norm statistics and dropout
  are unaffected. The "top logit" of the Jacobian and Hessian signals is the
  output of the class the teacher ranks first, for both models, so that the
  two maps answer the same question.
- The Hessian is that of the cross-entropy of the teacher's top class,
  `-log softmax(z)[c]`, with respect to the layer's activations: the Hessian
  of a logit itself is zero almost everywhere in networks built from ReLU,
  max-pooling and linear layers. Its diagonal is estimated with Hutchinson's
  method, `diag(H) ~ mean_k v_k * (H v_k)` with Rademacher probes `v_k`. All
  paired layers are probed together (one Hessian-vector product per probe);
  cross-layer blocks average out because independent probes are
  uncorrelated. Probes are drawn from a stateless generator seeded by the
  iteration count, so resumed training repeats them.
"""

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.extension import GradientRouting
from keras_kd.layerwise.autodiff import (
    single_output, hutchinson_diagonals, top_logit_gradients,
)
from keras_kd.layerwise.signals import (
    collapse_channels, divergence_scales, map_divergence,
)
from keras_kd.taps import Tap, find_layer

SIGNALS = ("attention", "jacobian", "hessian")
SCOPES = ("layer", "block")


class _Untracked:
    """Holds helpers whose variables belong to the teacher or the student and
    are tracked there."""

    def __init__(self, **items):
        self.__dict__.update(items)


# The user-facing configuration.

@keras.saving.register_keras_serializable(package="keras_kd")
class LayerwiseLearningRate:
    """Per-layer learning rates that follow the student-teacher divergence.

    Each paired student layer gets its own optimizer, built from the
    compiled optimizer's config (own slots, own learning rate); every other
    trained variable stays with the compiled optimizer. Layer `l` trains
    with `lr_l = lr_0 * clip(d_l / mean_k d_k, min_scale, max_scale)`, where
    `lr_0` is the compiled learning rate at the current iteration (a
    `LearningRateSchedule` included) and `d_l` is the Jensen-Shannon
    divergence between the normalized student and teacher maps of the pair,
    pooled to a common size. The scales are re-estimated every
    `update_every` steps from the current batch and logged in the `fit`
    history as `lr_scale/<student layer>`.

    Signals (the map compared at a layer, collapsed over channels as
    `mean_c |.|^p`):

    - `"attention"`: the activations, as in attention transfer.
    - `"jacobian"`: the gradient of the top logit (the teacher's top class,
      for both models) with respect to the activations.
    - `"hessian"`: a Hutchinson estimate of the diagonal of the Hessian of
      the cross-entropy of that class with respect to the activations.

    The paper does not spell these choices out; see the module docstring of
    `keras_kd.layerwise` for the library's reading. Maps are computed in
    inference mode on update steps only; the Jacobian and Hessian signals
    need a model with a single `(batch, classes)` output.

    Args:
        pairs: list of `(student_layer, teacher_layer)` name pairs, at least
            two (with one pair the scale is always 1). Layers are read from
            Functional or Sequential models; spatial sizes of a pair must
            divide each other.
        signal: `"attention"`, `"jacobian"` or `"hessian"`.
        update_every: re-estimate the scales every this many steps.
        min_scale: lower bound of a layer's scale.
        max_scale: upper bound of a layer's scale.
        p: power applied to the absolute values before collapsing channels.
        scope: which variables a pair's optimizer trains. `"layer"`: the
            trainable variables of the named student layer (it must have
            some). `"block"`: those of every student layer the named layer
            depends on that no earlier paired layer depends on, i.e. the
            block ending at the named layer (use it when the named layer is
            an activation or pooling layer).
        hutchinson_samples: Rademacher probes per update for `"hessian"`.

    Example:

    ```python
    layerwise = keras_kd.LayerwiseLearningRate(
        pairs=[("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")],
        signal="jacobian", update_every=50, min_scale=0.5, max_scale=2.0)
    distiller = keras_kd.Distiller(teacher, student, layerwise_lr=layerwise)
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
    history = distiller.fit(x, y, epochs=5)
    history.history["lr_scale/s_stage1"]
    ```
    """

    def __init__(
        self, pairs, signal="attention", update_every=50, min_scale=0.5,
        max_scale=2.0, p=2, scope="layer", hutchinson_samples=1,
    ):
        pairs = [tuple(pair) for pair in pairs]
        for pair in pairs:
            if len(pair) != 2 or not all(isinstance(n, str) for n in pair):
                raise ValueError(
                    "Each item of `pairs` must be a (student_layer, "
                    f"teacher_layer) pair of layer names, got {pair!r}."
                )
        if len(pairs) < 2:
            raise ValueError(
                "`pairs` needs at least two (student_layer, teacher_layer) "
                f"pairs: a scale is relative to the mean over the paired "
                f"layers, so with {len(pairs)} pair it is always 1."
            )
        students = [s for s, _ in pairs]
        repeated = sorted({s for s in students if students.count(s) > 1})
        if repeated:
            raise ValueError(
                f"Student layers {repeated} appear in more than one pair; "
                "each student layer gets one optimizer."
            )
        if signal not in SIGNALS:
            raise ValueError(
                f"`signal` must be one of {SIGNALS}, got {signal!r}."
            )
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
        if int(update_every) != update_every or update_every < 1:
            raise ValueError(
                f"`update_every` must be a positive integer, got "
                f"{update_every!r}."
            )
        min_scale, max_scale = float(min_scale), float(max_scale)
        if not 0 < min_scale <= max_scale:
            raise ValueError(
                "Expected 0 < `min_scale` <= `max_scale`, got "
                f"min_scale={min_scale}, max_scale={max_scale}."
            )
        _checks.positive("p", p)
        if int(hutchinson_samples) != hutchinson_samples or \
                hutchinson_samples < 1:
            raise ValueError(
                "`hutchinson_samples` must be a positive integer, got "
                f"{hutchinson_samples!r}."
            )
        self.pairs = pairs
        self.signal = signal
        self.update_every = int(update_every)
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.p = p
        self.scope = scope
        self.hutchinson_samples = int(hutchinson_samples)

    @property
    def student_layers(self):
        """Names of the paired student layers, in order."""
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self):
        """Names of the paired teacher layers, in order."""
        return [t for _, t in self.pairs]

    def bind(self, teacher, student):
        """Validate the pairs against the models and return the state the
        `Distiller` tracks (scale variables, maps, optimizers).

        Args:
            teacher: the teacher `keras.Model`.
            student: the student `keras.Model`.

        Returns:
            A `LayerwiseState` layer.
        """
        return LayerwiseState(self, teacher, student)

    def get_config(self):
        return {
            "pairs": [list(pair) for pair in self.pairs],
            "signal": self.signal,
            "update_every": self.update_every,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "p": self.p,
            "scope": self.scope,
            "hutchinson_samples": self.hutchinson_samples,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"LayerwiseLearningRate(pairs={self.pairs!r}, "
            f"signal={self.signal!r}, update_every={self.update_every}, "
            f"min_scale={self.min_scale}, max_scale={self.max_scale})"
        )


def attach(layerwise_lr, teacher, student):
    """The `LayerwiseState` for a `Distiller`, or `None` without one."""
    if layerwise_lr is None:
        return None
    if not isinstance(layerwise_lr, LayerwiseLearningRate):
        raise TypeError(
            "`layerwise_lr` must be a `keras_kd.LayerwiseLearningRate`, got "
            f"{layerwise_lr!r}."
        )
    # A private copy: the user's object is never bound or changed.
    return LayerwiseLearningRate.from_config(
        layerwise_lr.get_config()).bind(teacher, student)


# The state a Distiller tracks.

def _layers_upstream(model, layer):
    """Every layer of a Functional model that `layer`'s output depends on,
    itself included."""
    inputs = model.inputs
    sub = keras.Model(inputs if len(inputs) > 1 else inputs[0], layer.output)
    return list(sub.layers)


class LayerwiseState(keras.layers.Layer, GradientRouting):
    """What a `Distiller` with `layerwise_lr` tracks: one scale and one
    divergence variable per pair (non-trainable, saved with the model) and,
    after `compile`, one optimizer per pair.

    Created by `LayerwiseLearningRate.bind`; not meant to be built by hand.

    Args:
        config: the `LayerwiseLearningRate` it implements.
        teacher: the teacher `keras.Model`.
        student: the student `keras.Model`.
        name: name of the layer.

    Attributes:
        config: the `LayerwiseLearningRate` (a private copy).
        scales: dict from student layer name to its scale variable.
        divergences: dict from student layer name to its last divergence.
        optimizers: dict from student layer name to its optimizer (empty
            before `compile`).
        layer_variables: dict from student layer name to the variables its
            optimizer trains.
    """

    argument = "layerwise_lr"

    def __init__(self, config, teacher, student, name="layerwise_lr"):
        super().__init__(name=name)
        self.check_backend()
        self.config = config
        names = config.student_layers
        teacher_tap = Tap(teacher, config.teacher_layers, "teacher")
        student_tap = Tap(student, names, "student")
        self._taps = _Untracked(teacher=teacher_tap, student=student_tap,
                                teacher_model=teacher, student_model=student)
        self._check_shapes(teacher_tap.feature_shapes,
                           student_tap.feature_shapes)
        if config.signal != "attention":
            self._check_outputs(teacher, student)
        self._groups = self._variable_groups(student)
        self._divergences = [
            self.add_weight(shape=(), initializer="zeros", trainable=False,
                            name=f"divergence_{n}", aggregation="mean")
            for n in names
        ]
        self._scales = [
            self.add_weight(shape=(), initializer="ones", trainable=False,
                            name=f"scale_{n}", aggregation="mean")
            for n in names
        ]
        self.layer_optimizers = []
        self._owner = {}
        self._global_clipnorm = None
        self.built = True

    # Construction-time checks.

    def _check_shapes(self, teacher_shapes, student_shapes):
        for (s_name, t_name), t_shape, s_shape in zip(
                self.config.pairs, teacher_shapes, student_shapes):
            where = (
                f"pair (student layer '{s_name}' {s_shape}, teacher layer "
                f"'{t_name}' {t_shape})"
            )
            if len(t_shape) != len(s_shape) or len(s_shape) not in (2, 3, 4):
                raise ValueError(
                    f"Cannot compare the maps of the {where}: both outputs "
                    "must have the same rank, 2 (batch, units), 3 (batch, "
                    "steps, channels) or 4 (batch, height, width, channels)."
                )
            if len(s_shape) == 2:
                if t_shape[1] != s_shape[1]:
                    raise ValueError(
                        f"Cannot compare the maps of the {where}: rank-2 "
                        "outputs are compared unit by unit and need the "
                        "same number of units."
                    )
                continue
            for t, s in zip(t_shape[1:-1], s_shape[1:-1]):
                if t and s and max(t, s) % min(t, s):
                    raise ValueError(
                        f"Spatial sizes cannot be pooled to a common size "
                        f"for the {where}: each size must divide the other."
                    )

    def _check_outputs(self, teacher, student):
        for role, model in (("teacher", teacher), ("student", student)):
            outputs = model.outputs
            if len(outputs) != 1 or len(outputs[0].shape) != 2:
                raise ValueError(
                    f"The '{self.config.signal}' signal needs a single "
                    f"output of shape (batch, classes), but the {role} "
                    f"model '{model.name}' outputs "
                    f"{[tuple(o.shape) for o in outputs]}. Use "
                    "signal='attention', which reads activations only."
                )

    def _variable_groups(self, student):
        """For each pair, the student layers whose variables its optimizer
        trains (see `scope`)."""
        names = self.config.student_layers
        layers = [find_layer(student, n, "student") for n in names]
        if self.config.scope == "layer":
            for name, layer in zip(names, layers):
                if not layer.trainable_weights:
                    raise ValueError(
                        f"The student layer '{name}' "
                        f"({type(layer).__name__}) has no trainable "
                        "variables for its own optimizer. Pair a layer that "
                        "has weights, or pass scope='block' to train the "
                        "block of layers that ends at it."
                    )
            return [[layer] for layer in layers]
        upstream = [_layers_upstream(student, layer) for layer in layers]
        order = sorted(range(len(layers)), key=lambda i: len(upstream[i]))
        claimed = set()
        groups = [None] * len(layers)
        for i in order:
            group = [lay for lay in upstream[i] if id(lay) not in claimed]
            claimed.update(id(lay) for lay in group)
            groups[i] = group
        for name, group in zip(names, groups):
            if not any(lay.trainable_weights for lay in group):
                raise ValueError(
                    f"The block ending at student layer '{name}' has no "
                    "trainable variables of its own (earlier pairs claim "
                    "every layer before it)."
                )
        return groups

    # Public read-outs.

    @property
    def student_layers(self):
        return self.config.student_layers

    @property
    def scales(self):
        return dict(zip(self.student_layers, self._scales))

    @property
    def divergences(self):
        return dict(zip(self.student_layers, self._divergences))

    @property
    def optimizers(self):
        return dict(zip(self.student_layers, self.layer_optimizers))

    @property
    def layer_variables(self):
        return {
            name: self._trainable_in(group)
            for name, group in zip(self.student_layers, self._groups)
        }

    @staticmethod
    def _trainable_in(group):
        seen, out = set(), []
        for layer in group:
            for variable in layer.trainable_variables:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    out.append(variable)
        return out

    def logs(self):
        """`{"lr_scale/<student layer>": scale}` for the training logs."""
        return {
            f"lr_scale/{name}": _read(variable)
            for name, variable in self.scales.items()
        }

    # Optimizers.

    def on_compile(self, optimizer, variables):
        """Builds the per-pair optimizers (see `build_optimizers`)."""
        self.build_optimizers(optimizer, variables)

    def build_optimizers(self, optimizer, trainable_variables):
        """Create one optimizer per pair from `optimizer`'s config and build
        every optimizer on its own variables. Called by `Distiller.compile`.

        Args:
            optimizer: the compiled optimizer; built here on the variables
                outside every pair.
            trainable_variables: every variable the distiller trains.
        """
        self._check_optimizer(optimizer)
        trained = {id(v) for v in trainable_variables}
        owner, per_layer = {}, []
        for index, (name, group) in enumerate(
                zip(self.student_layers, self._groups)):
            variables = [v for v in self._trainable_in(group)
                         if id(v) in trained and id(v) not in owner]
            if not variables:
                raise ValueError(
                    f"The student layer '{name}' has no trainable variables "
                    "left to give its own optimizer (is it frozen?)."
                )
            owner.update((id(v), index) for v in variables)
            per_layer.append(variables)
        config = optimizer.get_config()
        self._global_clipnorm = config.get("global_clipnorm")
        config["global_clipnorm"] = None  # applied once, to all gradients
        config["learning_rate"] = float(
            ops.convert_to_numpy(optimizer.learning_rate))
        optimizers = []
        for name, variables in zip(self.student_layers, per_layer):
            layer_config = dict(config, name=f"{config['name']}_{name}")
            layer_optimizer = type(optimizer).from_config(layer_config)
            layer_optimizer.build(variables)
            optimizers.append(layer_optimizer)
        self.layer_optimizers = optimizers
        self._owner = owner
        optimizer.build([v for v in trainable_variables
                         if id(v) not in owner])

    def _check_optimizer(self, optimizer):
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "`layerwise_lr` does not support `LossScaleOptimizer` (its "
                "dynamic loss scale cannot be shared by per-layer "
                "optimizers). Compile with the inner optimizer, or without "
                "`layerwise_lr`."
            )
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise ValueError(
                "`layerwise_lr` does not support optimizers with "
                "`gradient_accumulation_steps`; got "
                f"{optimizer.gradient_accumulation_steps}."
            )
        if getattr(optimizer, "use_ema", False):
            raise ValueError(
                "`layerwise_lr` does not support optimizers with "
                "`use_ema=True`: the moving averages would be split "
                "across optimizers."
            )
        if optimizer.built:
            raise ValueError(
                f"The optimizer '{optimizer.name}' is already built; "
                "`layerwise_lr` builds it on the variables outside every "
                "pair. Pass a new optimizer to `compile()`."
            )

    def apply_gradients(self, optimizer, gradients, variables):
        """Route each pair's gradients to its optimizer at
        `lr_0 * scale`, and the rest to the compiled `optimizer`."""
        if not self.layer_optimizers:
            raise ValueError(
                "The distiller's per-layer optimizers are not built: compile "
                "the distiller before training."
            )
        base_lr = ops.cast(optimizer.learning_rate, "float32")
        gradients = list(gradients)
        if self._global_clipnorm:
            gradients = _clip_by_global_norm(gradients,
                                             self._global_clipnorm)
        groups = [[] for _ in self.layer_optimizers]
        rest = []
        for gradient, variable in zip(gradients, variables):
            index = self._owner.get(id(variable))
            target = rest if index is None else groups[index]
            target.append((gradient, variable))
        for layer_optimizer, scale, pairs in zip(
                self.layer_optimizers, self._scales, groups):
            layer_optimizer.learning_rate = base_lr * scale
            if pairs:
                layer_optimizer.apply_gradients(pairs)
        if rest:
            optimizer.apply_gradients(rest)
        else:
            optimizer.iterations.assign_add(1)

    # Divergences and scales.

    def before_step(self, x, iteration):
        """Updates the scales before the step's loss (see `update_scales`)."""
        self.update_scales(x, iteration)

    def update_scales(self, x, step):
        """Re-estimate the divergences and scales when `step` is a multiple
        of `update_every`; keep them otherwise. Runs inside the train step
        (graph or XLA): the branch is an `ops.cond`."""
        current = ops.stack([_read(v) for v in self._divergences])
        due = ops.equal(ops.mod(ops.cast(step, "int64"),
                                self.config.update_every), 0)
        new = ops.cond(due, lambda: self.measure(x, step),
                       lambda: current)
        scales = divergence_scales(new, self.config.min_scale,
                                   self.config.max_scale)
        for index in range(len(self._scales)):
            self._divergences[index].assign(new[index])
            self._scales[index].assign(scales[index])

    def signal_maps(self, x, step=0):
        """The collapsed teacher and student maps of every pair on batch `x`.

        Args:
            x: a batch of inputs.
            step: iteration number that seeds the Hessian probes.

        Returns:
            `(teacher_maps, student_maps)`, lists with one map per pair, as
            returned by `collapse_channels` (before pooling and
            normalization).
        """
        taps = self._taps
        signal, p = self.config.signal, self.config.p
        x = keras.tree.map_structure(ops.convert_to_tensor, x)
        if signal == "attention":
            _, teacher = taps.teacher(x, training=False)
            _, student = taps.student(x, training=False)
        elif signal == "jacobian":
            classes, teacher = top_logit_gradients(taps.teacher, x,
                                                   role="teacher")
            _, student = top_logit_gradients(taps.student, x, classes,
                                             role="student")
        else:
            outputs, _ = taps.teacher(x, training=False)
            outputs = single_output(outputs, "teacher", taps.teacher.model)
            classes = ops.stop_gradient(ops.argmax(outputs, axis=-1))
            samples = self.config.hutchinson_samples
            teacher = hutchinson_diagonals(taps.teacher, x, classes, samples,
                                           step, 1, "teacher")
            student = hutchinson_diagonals(taps.student, x, classes, samples,
                                           step, 2, "student")
        teacher = [collapse_channels(ops.stop_gradient(t), p) for t in teacher]
        student = [collapse_channels(ops.stop_gradient(s), p) for s in student]
        return teacher, student

    def measure(self, x, step=0):
        """The divergence of every pair on batch `x`, shape `(pairs,)`."""
        teacher, student = self.signal_maps(x, step)
        return ops.stack([map_divergence(t, s)
                          for t, s in zip(teacher, student)])


def _read(variable):
    """The current value of a Keras variable as a tensor (a copy, so that a
    later assignment does not change it)."""
    return ops.copy(variable.value)


def _clip_by_global_norm(gradients, clipnorm):
    present = [g for g in gradients if g is not None]
    norm = ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32")))
                        for g in present))
    factor = ops.minimum(1.0, clipnorm / ops.maximum(norm, 1e-12))
    return [None if g is None else g * ops.cast(factor, g.dtype)
            for g in gradients]
