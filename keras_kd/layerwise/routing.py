"""Routing each paired student layer's gradients to an optimizer of its own.

Given to a `Distiller`, a `LayerwiseLearningRate` is bound to the teachers
and student as a `LayerwiseState`: a small Keras layer, tracked by the
distiller, that holds the last divergences and wraps the compiled optimizer
in a `keras_kd.LayerwiseOptimizer` whose scale variables it sets before
each step's loss. Model state and optimizer state are both saved, so
`save`/`load_model` and `BackupAndRestore` restore everything.

`lr_l = lr_0 * clip(d_l / mean_k d_k, min_scale, max_scale)`, with `lr_0`
the compiled optimizer's learning rate at the current iteration (a
`LearningRateSchedule` is evaluated there) and `d_l` the divergence of pair
`l` (`keras_kd.layerwise.measure`). The scales are re-estimated on the
steps where the compiled optimizer's iteration count is a multiple of
`update_every` (so on the very first step), from the current batch.
"""

import keras
from keras import ops

from keras_kd._untracked import Untracked
from keras_kd.extension import GradientRouting
from keras_kd.layerwise.measure import Measurement, probe_seed
from keras_kd.layerwise.optimizer import LayerwiseOptimizer
from keras_kd.layerwise.signals import divergence_scales
from keras_kd.taps import find_layer


def _layers_upstream(model, layer):
    """Every layer of a Functional model that `layer`'s output depends on,
    itself included."""
    inputs = model.inputs
    sub = keras.Model(inputs if len(inputs) > 1 else inputs[0], layer.output)
    return list(sub.layers)


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
        teachers: the distiller's `keras_kd.teachers.Teachers`.
        student: the student `keras.Model`.
        name: name of the layer.

    Attributes:
        config: the `LayerwiseLearningRate` (a private copy).
    """

    argument = "layerwise_lr"

    def __init__(self, config, teachers, student, name="layerwise_lr"):
        super().__init__(name=name)
        self.config = config
        # Checks the pairs against the models first.
        measurement = Measurement(config, teachers, student)
        self._groups = self._variable_groups(student)
        self._divergences = [
            self.add_weight(shape=(), initializer="zeros", trainable=False,
                            name=f"divergence_{n}", aggregation="mean",
                            dtype="float32")
            for n in config.student_layers
        ]
        # The taps' variables belong to the teachers and the student, the
        # optimizer to the distiller: tracked there.
        self._hidden = Untracked(measurement=measurement, optimizer=None)
        self.built = True

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
        return self._hidden.optimizer

    @property
    def scales(self):
        """Dict from student layer name to its learning-rate scale, a
        variable of the compiled `LayerwiseOptimizer` (empty before
        `compile`)."""
        optimizer = self._hidden.optimizer
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
        optimizer = self._hidden.optimizer
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
        previous = self._hidden.optimizer
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
        self._hidden.optimizer = optimizer

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
        optimizer = self._hidden.optimizer
        if optimizer is None:
            raise ValueError(
                "The distiller with `layerwise_lr` is not compiled: call "
                "`compile()` before training."
            )
        scales = self._current_scales()
        for index, name in enumerate(self.student_layers):
            optimizer.scales[name].assign(scales[index])

    def signal_maps(self, x, seed=None):
        """The collapsed teacher and student maps of every pair on batch `x`
        (see `keras_kd.layerwise.measure.Measurement.signal_maps`).

        Args:
            x: a batch of inputs.
            seed: for the Hessian signal, the seed of the probes
                (`probe_seed(iteration)`); `None` for `probe_seed(0)`.
        """
        return self._hidden.measurement.signal_maps(x, seed)

    def measure(self, x, seed=None):
        """The divergence of every pair on batch `x`, shape `(pairs,)`:
        with several teachers, the mean over the teachers that have the
        pair's teacher layer."""
        return self._hidden.measurement.divergences(x, seed)
