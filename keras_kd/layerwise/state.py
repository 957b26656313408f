"""Layer-wise learning rates from the divergence between student and teacher
maps at paired layers.

`LayerwiseLearningRate` is the user-facing description (which layers, which
signal, how often, how far the scales may move). Given to a `Distiller`, it is
bound to the teachers and student as a `LayerwiseState`: a small Keras layer,
tracked by the distiller, that holds the last divergences and wraps the
compiled optimizer in a `keras_kd.LayerwiseOptimizer` whose scale variables
it sets before each step's loss. Model state and optimizer state are both
saved, so `save`/`load_model` and `BackupAndRestore` restore everything.

The paper (Kokane, Uddin & Xu, arXiv:2407.04871) was not available in full;
the choices below that it does not state are the library's reading and are
documented where they are made:

- The divergence of layer `l` is the batch mean of the Jensen-Shannon
  divergence (natural log, so in `[0, ln 2]`) between the normalized student
  and teacher maps, after average-pooling the larger map to the smaller
  spatial size. With several teachers it is the mean of that divergence
  over the teachers that have the pair's teacher layer.
- `lr_l = lr_0 * clip(d_l / mean_k d_k, min_scale, max_scale)`, with `lr_0`
  the compiled optimizer's learning rate at the current iteration (a
  `LearningRateSchedule` is evaluated there). The scales are re-estimated on
  the steps where the compiled optimizer's iteration count is a multiple of
  `update_every` (so on the very first step), from the current batch.
- Maps are computed in inference mode (`training=False`) on extra forward
  passes that only run on update steps, so batch-norm statistics and dropout
  are unaffected. The "top logit" of the Jacobian and Hessian signals is the
  output of the class the teachers rank first (the argmax of their averaged
  outputs), for every model, so that the maps answer the same question.
- The Hessian is that of the cross-entropy of that class,
  `-log softmax(z)[c]`, with respect to the layer's activations: the Hessian
  of a logit itself is zero almost everywhere in networks built from ReLU,
  max-pooling and linear layers. Its diagonal is estimated with Hutchinson's
  method, `diag(H) ~ mean_k v_k * (H v_k)` with Rademacher probes `v_k`. All
  paired layers are probed together (one Hessian-vector product per probe);
  cross-layer blocks average out because independent probes are
  uncorrelated. Probes are drawn with a seed made of a constant and the
  optimizer's iteration count (restored with the optimizer), so resumed
  training repeats them. (A `keras.random.SeedGenerator` would not do:
  Keras does not save its state.)
"""

import keras
from keras import ops

from keras_kd import _checks
from keras_kd._untracked import Untracked
from keras_kd.extension import GradientRouting
from keras_kd.layerwise.autodiff import (
    hutchinson_diagonals, joint_top_logit_gradients, single_output,
)
from keras_kd.layerwise.optimizer import LayerwiseOptimizer
from keras_kd.layerwise.signals import (
    collapse_channels, divergence_scales, map_divergence,
)
from keras_kd.taps import Tap, find_layer

SIGNALS = ("attention", "jacobian", "hessian")
SCOPES = ("layer", "block")
_PROBE_SEED = 1337


# The user-facing configuration.

@keras.saving.register_keras_serializable(package="keras_kd")
class LayerwiseLearningRate:
    """Per-layer learning rates that follow the student-teacher divergence.

    The distiller wraps the compiled optimizer in a
    `keras_kd.LayerwiseOptimizer`: each paired student layer trains with its
    own copy of the compiled optimizer (own slots, own learning rate);
    every other trained variable stays with the compiled optimizer. Layer
    `l` trains with `lr_l = lr_0 * clip(d_l / mean_k d_k, min_scale, max_scale)`, where
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
    `keras_kd.layerwise.state` for the library's reading. Maps are computed
    in inference mode on update steps only; the Jacobian and Hessian
    signals need a model with a single `(batch, classes)` output.

    With several teachers, the divergence of a pair is the mean, over the
    teachers that have the pair's teacher layer, of the divergence between
    the student's map and that teacher's map; the top class of the
    Jacobian and Hessian signals is the argmax of the teachers' averaged
    outputs.

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
        `Distiller` tracks (divergences, maps, the optimizer it wraps).

        Args:
            teacher: the teacher `keras.Model`, or a list of them.
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


def attach(layerwise_lr, teachers, student):
    """The `LayerwiseState` for a `Distiller`, or `None` without one.

    Args:
        layerwise_lr: `None` or a `LayerwiseLearningRate`.
        teachers: the teacher `keras.Model`, or a list of them.
        student: the student `keras.Model`.
    """
    if layerwise_lr is None:
        return None
    if not isinstance(layerwise_lr, LayerwiseLearningRate):
        raise TypeError(
            "`layerwise_lr` must be a `keras_kd.LayerwiseLearningRate`, got "
            f"{layerwise_lr!r}."
        )
    # A private copy: the user's object is never bound or changed.
    return LayerwiseLearningRate.from_config(
        layerwise_lr.get_config()).bind(teachers, student)


# The state a Distiller tracks.

def _layers_upstream(model, layer):
    """Every layer of a Functional model that `layer`'s output depends on,
    itself included."""
    inputs = model.inputs
    sub = keras.Model(inputs if len(inputs) > 1 else inputs[0], layer.output)
    return list(sub.layers)


def probe_seed(iteration):
    """The seed of the Hessian signal's probes at an iteration: the same
    iteration draws the same probes, so resumed training (which restores
    the optimizer's iteration count) repeats them."""
    return ops.stack([ops.convert_to_tensor(_PROBE_SEED, "int32"),
                      ops.cast(iteration, "int32")])


def _has_layer(model, name):
    try:
        return any(layer.name == name for layer in model.layers)
    except AttributeError:
        return False


class LayerwiseState(keras.layers.Layer, GradientRouting):
    """What a `Distiller` with `layerwise_lr` tracks: the last divergence of
    every pair (non-trainable variables, saved with the model). It wraps the
    compiled optimizer in a `keras_kd.LayerwiseOptimizer` (`wrap_optimizer`)
    and sets that optimizer's scales before each step's loss
    (`refresh` re-estimates the divergences when due, `before_step` sets
    the scales from them).

    Created by `LayerwiseLearningRate.bind`; not meant to be built by hand.

    Args:
        config: the `LayerwiseLearningRate` it implements.
        teacher: the teacher `keras.Model`, or a list of them.
        student: the student `keras.Model`.
        name: name of the layer.

    Attributes:
        config: the `LayerwiseLearningRate` (a private copy).
    """

    argument = "layerwise_lr"

    def __init__(self, config, teacher, student, name="layerwise_lr"):
        super().__init__(name=name)
        self.config = config
        teachers = list(teacher) if isinstance(teacher, (list, tuple)) \
            else [teacher]
        names = config.student_layers
        student_tap = Tap(student, names, "student")
        # Per pair, the (teacher index, position in its tap) of every
        # teacher that has the pair's teacher layer.
        sources = [[] for _ in config.pairs]
        teacher_taps = []
        for t, model in enumerate(teachers):
            layers = []
            for p, (_, t_name) in enumerate(config.pairs):
                if len(teachers) == 1 or _has_layer(model, t_name):
                    sources[p].append((t, len(layers)))
                    layers.append(t_name)
            teacher_taps.append(Tap(model, layers, "teacher"))
        for (s_name, t_name), found in zip(config.pairs, sources):
            if not found:
                raise ValueError(
                    f"No teacher has the layer '{t_name}' paired with the "
                    f"student layer '{s_name}'; teachers: "
                    f"{[model.name for model in teachers]}. Pair a layer "
                    "that at least one teacher has."
                )
        self._taps = Untracked(teachers=teacher_taps, student=student_tap,
                                teacher_models=teachers,
                                student_model=student, sources=sources)
        for p, found in enumerate(sources):
            for t, k in found:
                self._check_shapes(
                    config.pairs[p], teacher_taps[t].feature_shapes[k],
                    student_tap.feature_shapes[p],
                    teachers[t].name if len(teachers) > 1 else None)
        if config.signal != "attention":
            for model in teachers:
                self._check_output(model, "teacher")
            self._check_output(student, "student")
        self._groups = self._variable_groups(student)
        self._divergences = [
            self.add_weight(shape=(), initializer="zeros", trainable=False,
                            name=f"divergence_{n}", aggregation="mean",
                            dtype="float32")
            for n in names
        ]
        self._bound = Untracked(optimizer=None)
        self.built = True

    # Construction-time checks.

    @staticmethod
    def _check_shapes(pair, t_shape, s_shape, teacher_name=None):
        s_name, t_name = pair
        of = "" if teacher_name is None else f" of '{teacher_name}'"
        where = (
            f"pair (student layer '{s_name}' {s_shape}, teacher layer "
            f"'{t_name}'{of} {t_shape})"
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
            return
        for t, s in zip(t_shape[1:-1], s_shape[1:-1]):
            if t and s and max(t, s) % min(t, s):
                raise ValueError(
                    f"Spatial sizes cannot be pooled to a common size "
                    f"for the {where}: each size must divide the other."
                )

    def _check_output(self, model, role):
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
    def optimizer(self):
        """The `keras_kd.LayerwiseOptimizer` the distiller trains with
        (`None` before `compile`)."""
        return self._bound.optimizer

    @property
    def scales(self):
        """Dict from student layer name to its learning-rate scale, a
        variable of the compiled `LayerwiseOptimizer` (empty before
        `compile`)."""
        optimizer = self._bound.optimizer
        return {} if optimizer is None else optimizer.scales

    @property
    def divergences(self):
        """Dict from student layer name to its last measured divergence."""
        return dict(zip(self.student_layers, self._divergences))

    @property
    def optimizers(self):
        """Dict from student layer name to the optimizer that trains it
        (copies of the compiled optimizer; empty before the optimizer is
        built)."""
        optimizer = self._bound.optimizer
        return {} if optimizer is None else optimizer.group_optimizers

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
        """`{"lr_scale/<student layer>": scale}` for the training logs.

        The scales are computed from the divergences (model state), as the
        step set them in the optimizer, so that the logs read no optimizer
        variable."""
        scales = self._current_scales()
        return {f"lr_scale/{name}": scales[index]
                for index, name in enumerate(self.student_layers)}

    def _current_scales(self):
        return divergence_scales(
            ops.stack([v.value for v in self._divergences]),
            self.config.min_scale, self.config.max_scale)

    # The optimizer.

    def wrap_optimizer(self, optimizer):
        """The optimizer the distiller trains with: `optimizer` wrapped in a
        `keras_kd.LayerwiseOptimizer` with one group per paired student
        layer.

        A `keras.optimizers.LossScaleOptimizer` stays outermost: a new one,
        with the same configuration, around the wrapped inner optimizer
        (the object passed to `compile` is left as it is). An optimizer
        that already is (or holds) this state's `LayerwiseOptimizer` is
        returned unchanged, as when Keras adds a `LossScaleOptimizer` under
        `"mixed_float16"`.

        Args:
            optimizer: the optimizer `compile` sets, or `None`.
        """
        if optimizer is None:
            return None
        lso = keras.optimizers.LossScaleOptimizer
        if isinstance(optimizer, lso):
            inner = optimizer.inner_optimizer
            if isinstance(inner, LayerwiseOptimizer):
                self._bind(inner)
                return optimizer
            config = optimizer.get_config()
            config.pop("inner_optimizer")
            return lso(self._wrap(inner), **config)
        if isinstance(optimizer, LayerwiseOptimizer):
            self._bind(optimizer)
            return optimizer
        return self._wrap(optimizer)

    def _wrap(self, inner):
        previous = self._bound.optimizer
        if previous is not None and previous.inner_optimizer is inner:
            return previous  # compiled again with the same optimizer
        if inner.built:
            raise ValueError(
                f"The optimizer '{inner.name}' is already built; "
                "`layerwise_lr` builds it on the variables outside every "
                "pair. Pass a new optimizer to `compile()`."
            )
        optimizer = LayerwiseOptimizer(
            inner, groups=self.layer_variables,
            name=f"layerwise_{inner.name}")
        self._bind(optimizer)
        return optimizer

    def _bind(self, optimizer):
        if optimizer.group_names != self.student_layers:
            raise ValueError(
                f"The `LayerwiseOptimizer` '{optimizer.name}' has the groups "
                f"{optimizer.group_names}, but `layerwise_lr` pairs the "
                f"student layers {self.student_layers}. Compile with the "
                "optimizer it wraps instead."
            )
        self._bound.optimizer = optimizer

    # Divergences and scales.

    def refresh_due(self, iteration):
        """Whether the step at `iteration` re-estimates the divergences:
        `iteration` is a multiple of `update_every`. A Python bool for a
        Python int, a boolean tensor for a tensor."""
        every = self.config.update_every
        if isinstance(iteration, int):
            return iteration % every == 0
        return ops.equal(ops.mod(ops.cast(iteration, "int32"), every), 0)

    def refresh(self, x, iteration, due=None):
        """Re-estimates the divergences from batch `x` on the steps where
        `refresh_due(iteration)`, and keeps them otherwise.

        Args:
            x: the batch of inputs.
            iteration: the compiled optimizer's iteration count.
            due: `None` to decide inside the compiled step (graph, XLA or
                JAX `jit`), with an `ops.cond` that assigns no variable;
                `True` or `False` when the caller has decided.
        """
        if due is not None and not due:
            return
        seed = None
        if self.config.signal == "hessian":
            seed = probe_seed(iteration)
        if due is None:
            current = ops.stack([v.value for v in self._divergences])
            new = ops.cond(self.refresh_due(iteration),
                           lambda: self.measure(x, seed), lambda: current)
        else:
            new = self.measure(x, seed)
        for index, variable in enumerate(self._divergences):
            variable.assign(new[index])

    def before_step(self, x, iteration):
        """Sets the optimizer's scales from the divergences (after
        `refresh`)."""
        optimizer = self._bound.optimizer
        if optimizer is None:
            raise ValueError(
                "The distiller with `layerwise_lr` is not compiled: call "
                "`compile()` before training."
            )
        scales = self._current_scales()
        for index, name in enumerate(self.student_layers):
            optimizer.scales[name].assign(scales[index])

    def signal_maps(self, x, seed=None):
        """The collapsed teacher and student maps of every pair on batch `x`.

        Args:
            x: a batch of inputs.
            seed: for the Hessian signal, the seed of the probes, a tensor
                of shape `(2,)` (`probe_seed(iteration)`, as training uses);
                `None` for `probe_seed(0)`.

        Returns:
            `(teacher_maps, student_maps)`, lists with one entry per pair,
            as returned by `collapse_channels` (before pooling and
            normalization). With several teachers a teacher entry is the
            list of the maps of the teachers that have the pair's teacher
            layer (a single map when one teacher has it).
        """
        taps = self._taps
        signal, p = self.config.signal, self.config.p
        x = keras.tree.map_structure(ops.convert_to_tensor, x)
        roles = ["teacher"] * len(taps.teachers)
        if signal == "attention":
            teacher = [tap(x, training=False)[1] for tap in taps.teachers]
            student = taps.student(x, training=False)[1]
        elif signal == "jacobian":
            classes, teacher = joint_top_logit_gradients(
                taps.teachers, x, roles=roles)
            _, (student,) = joint_top_logit_gradients(
                [taps.student], x, classes, ["student"])
        else:
            outputs = [
                single_output(tap(x, training=False)[0], "teacher",
                              tap.model)
                for tap in taps.teachers
            ]
            mean = sum(outputs) / float(len(outputs))
            classes = ops.stop_gradient(ops.argmax(mean, axis=-1))
            if seed is None:
                seed = probe_seed(0)
            estimates = hutchinson_diagonals(
                taps.teachers + [taps.student], x, classes,
                self.config.hutchinson_samples, seed,
                roles + ["student"])
            teacher, student = estimates[:-1], estimates[-1]
        teacher_maps = []
        for found in taps.sources:
            maps = [collapse_channels(ops.stop_gradient(teacher[t][k]), p)
                    for t, k in found]
            teacher_maps.append(maps[0] if len(maps) == 1 else maps)
        student_maps = [collapse_channels(ops.stop_gradient(s), p)
                        for s in student]
        return teacher_maps, student_maps

    def measure(self, x, seed=None):
        """The divergence of every pair on batch `x`, shape `(pairs,)`:
        with several teachers, the mean over the teachers that have the
        pair's teacher layer."""
        teacher, student = self.signal_maps(x, seed)
        divergences = []
        for t_maps, s_map in zip(teacher, student):
            if not isinstance(t_maps, list):
                t_maps = [t_maps]
            divergences.append(
                sum(map_divergence(t, s_map) for t in t_maps)
                / float(len(t_maps)))
        return ops.stack(divergences)
