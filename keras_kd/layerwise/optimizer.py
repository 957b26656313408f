"""`LayerwiseOptimizer`: one Keras optimizer that trains groups of variables
at their own learning rates.

It wraps an optimizer (the "inner" one) the way
`keras.optimizers.LossScaleOptimizer` does: the variables outside every
group train with the inner optimizer itself, and each group with a copy of
it (same class and configuration, its own slots) whose learning rate is the
inner optimizer's current learning rate times the group's scale. The scales
are Keras variables of the wrapper, so they are optimizer state: listed in
`variables`, saved and loaded with the optimizer, restored by
`BackupAndRestore`, and threaded through JAX's stateless step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_kd._untracked import Untracked
from keras_kd._typing import Config, Tensor

_LSO = keras.optimizers.LossScaleOptimizer


class ScaledLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate of a group: `optimizer.learning_rate * scale`.

    `optimizer.learning_rate` is read when the rate is needed, so a
    `LearningRateSchedule`, a callable or a learning rate set by a callback
    on the wrapped optimizer is followed.

    Args:
        optimizer: the wrapped (inner) optimizer.
        scale: a scalar Keras variable.
    """

    def __init__(self, optimizer, scale):
        self.optimizer = optimizer
        self.scale = scale

    def __call__(self, step):
        del step  # the inner optimizer's own iteration count is used
        base = ops.cast(self.optimizer.learning_rate, "float32")
        return base * ops.cast(self.scale, "float32")

    def get_config(self) -> Config:
        # Rebuilt by `LayerwiseOptimizer.build`, never deserialized.
        return {"scale": self.scale.path}


def _refuse_accumulation(optimizer):
    steps = optimizer.gradient_accumulation_steps
    if steps:
        raise ValueError(
            "`LayerwiseOptimizer` (and `layerwise_lr`) does not support "
            "`gradient_accumulation_steps`, set to "
            f"{steps} on the optimizer '{optimizer.name}': the accumulated "
            "gradients, and the step count that moves between updates, are "
            "not part of Keras' public optimizer API. Pass an optimizer "
            "without `gradient_accumulation_steps` and train on batches "
            f"{steps} times larger instead (the same updates, up to layers "
            "whose output depends on the batch, such as batch "
            "normalization)."
        )


def _same_path(saved, path):
    """Whether a saved variable path names the variable at `path`: Keras
    prefixes a variable's path with the model's name when the model is
    built inside its own name scope (as when it is loaded), so one path may
    end with the other."""
    return (saved == path or path.endswith("/" + saved)
            or saved.endswith("/" + path))


def _paths(variables):
    out = []
    for variable in variables:
        if isinstance(variable, str):
            out.append(variable)
        elif isinstance(variable, keras.Variable):
            out.append(variable.path)
        else:
            raise TypeError(
                "Each entry of a group must be a `keras.Variable` or a "
                f"variable path (str), got {variable!r}."
            )
    return out


@keras.saving.register_keras_serializable(package="keras_kd")
class LayerwiseOptimizer(keras.optimizers.Optimizer):
    """Trains each group of variables at its own learning rate.

    The variables outside every group train with `inner_optimizer` itself.
    Each group trains with its own copy of `inner_optimizer` (same class and
    configuration, its own slots) at learning rate
    `inner_optimizer.learning_rate * scales[group]`, where `scales[group]`
    is a scalar Keras variable of this optimizer (initially 1) that training
    code assigns. `keras_kd.Distiller` builds one around the compiled
    optimizer when it is given `layerwise_lr`, and sets the scales at every
    step from the student-teacher divergences.

    The wrapper behaves as one Keras optimizer: `variables` holds its scales
    and every inner optimizer's variables (so `.keras` files,
    `BackupAndRestore` and JAX's stateless step carry them), `apply` and
    `stateless_apply` route each gradient to the optimizer of its group,
    and `iterations`, `learning_rate` and `scale_loss` are those of
    `inner_optimizer`. It composes with:

    - `global_clipnorm` of `inner_optimizer`: the wrapper clips all
      gradients together, once, as a single optimizer would; the copies do
      not clip again.
    - `clipnorm`, `clipvalue`, `weight_decay`, `use_ema`,
      `loss_scale_factor`: each copy keeps them, so every group follows
      Keras' semantics for its variables
      (with `use_ema`, `finalize_variable_values` swaps in every group's
      averages). Settings made by methods rather than the configuration
      (`exclude_from_weight_decay`) reach the variables outside the groups
      only.
    - `keras.optimizers.LossScaleOptimizer`, around this optimizer (never
      inside it): Keras' `compile` adds it under the `"mixed_float16"`
      policy.

    `gradient_accumulation_steps` on `inner_optimizer` is refused with a
    `ValueError`: Keras keeps the accumulated gradients, and the step count
    that moves without an update, out of its public API.

    Args:
        inner_optimizer: the `keras.optimizers.Optimizer` to wrap (not
            built yet, without `gradient_accumulation_steps`). It trains
            the variables outside every group, and
            its configuration is copied for each group.
        groups: dict from group name to the variables the group trains,
            each a `keras.Variable` or a variable path (`variable.path`;
            paths are what `get_config` saves, and a path also matches a
            variable whose path ends with it, or that it ends with). A
            variable listed in two groups belongs to the first.
        name: name of the optimizer.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(
        8, name="hidden"), keras.layers.Dense(1, name="head")])
    optimizer = keras_kd.LayerwiseOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9),
        groups={"hidden": model.get_layer("hidden").trainable_variables})
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    optimizer.scales["hidden"].assign(0.5)  # "hidden" trains at 0.05
    model.fit(x, y)
    ```
    """

    def __init__(self, inner_optimizer: keras.optimizers.Optimizer,
                 groups: Any, name: str | None = None,
                 **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(
                "`LayerwiseOptimizer` takes no argument of its own besides "
                f"`name`; got {sorted(kwargs)}. Set them on the "
                "`inner_optimizer`."
            )
        super().__init__(learning_rate=0.0, name=name)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`inner_optimizer` must be a `keras.optimizers.Optimizer`, "
                f"got {inner_optimizer!r}."
            )
        if isinstance(inner_optimizer, (_LSO, LayerwiseOptimizer)):
            raise ValueError(
                f"`inner_optimizer` cannot be a "
                f"`{type(inner_optimizer).__name__}`: wrap the "
                "`LayerwiseOptimizer` in the `LossScaleOptimizer` instead, "
                "`LossScaleOptimizer(LayerwiseOptimizer(optimizer, groups))`, "
                "so that the loss scale is shared by every group."
            )
        _refuse_accumulation(inner_optimizer)
        if not isinstance(groups, dict) or not groups:
            raise ValueError(
                "`groups` must be a non-empty dict from group name to a "
                f"list of variables, got {groups!r}."
            )
        self.inner_optimizer = inner_optimizer
        # Read now: `build` may run while a TensorFlow graph is traced,
        # where `get_config` cannot read the learning rate.
        config = inner_optimizer.get_config()
        config["global_clipnorm"] = None  # clipped once, by the wrapper
        self._groups = Untracked(
            config=config,
            names=[str(name) for name in groups],
            paths=[_paths(variables) for variables in groups.values()],
            ids=[{id(v) for v in variables
                  if isinstance(v, keras.Variable)}
                 for variables in groups.values()],
            built_with=[],      # the variables `build` was given
            members=[],         # per group, then the rest: its variables
            owner={},           # id(variable) -> index of its optimizer
        )
        self._scales = [
            self.add_variable(shape=(), initializer="ones", dtype="float32",
                              aggregation="mean", name=f"scale_{group}")
            for group in self._groups.names
        ]
        self._group_optimizers: list[Any] = []

    # What is read from the inner optimizer.

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def loss_scale_factor(self) -> Any:
        inner = self.__dict__.get("inner_optimizer")
        return None if inner is None else inner.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # `LossScaleOptimizer` clears it on the optimizer it wraps: clear
        # (or set) it on every optimizer that unscales gradients.
        inner = self.__dict__.get("inner_optimizer")
        if inner is None:
            return
        inner.loss_scale_factor = value
        for optimizer in self._group_optimizers:
            optimizer.loss_scale_factor = value

    # Groups.

    @property
    def group_names(self) -> list[str]:
        """The names of the groups, in order."""
        return list(self._groups.names)

    @property
    def scales(self) -> dict[str, Any]:
        """Dict from group name to its scale (a scalar float32 Keras
        variable, initially 1): the group trains at
        `learning_rate * scale`."""
        return dict(zip(self._groups.names, self._scales))

    @property
    def group_optimizers(self) -> dict[str, keras.optimizers.Optimizer]:
        """Dict from group name to the copy of the inner optimizer that
        trains it (empty before `build`)."""
        return dict(zip(self._groups.names, self._group_optimizers))

    @property
    def group_variables(self) -> dict[str, list[Any]]:
        """Dict from group name to the variables it trains, then `None` to
        the variables the inner optimizer trains (after `build`)."""
        if not self.built:
            return {}
        keys = self._groups.names + [None]
        return {k: list(v) for k, v in zip(keys, self._groups.members)}

    def _group_of(self, variable, var_list):
        for index, (ids, paths) in enumerate(zip(self._groups.ids,
                                                 self._groups.paths)):
            if ids:
                if id(variable) in ids:
                    return index
                continue
            for path in paths:
                if not _same_path(path, variable.path):
                    continue
                matches = [v.path for v in var_list
                           if _same_path(path, v.path)]
                if len(matches) > 1:
                    raise ValueError(
                        f"The path '{path}' of group "
                        f"'{self._groups.names[index]}' matches several "
                        f"variables to train: {matches}. Give the layers "
                        "distinct names, or pass the variables themselves "
                        "in `groups`."
                    )
                return index
        return None

    def build(self, var_list: Sequence[Any]) -> None:
        """Creates every inner optimizer's variables.

        Each group's copy of the inner optimizer is built on the group's
        variables in `var_list`, and the inner optimizer on the variables
        outside every group.

        Args:
            var_list: every variable this optimizer will train.
        """
        if self.built:
            return
        inner = self.inner_optimizer
        if inner.built:
            raise ValueError(
                f"The optimizer '{inner.name}' is already built; a "
                "`LayerwiseOptimizer` builds it on the variables outside "
                "its groups. Pass a new optimizer."
            )
        _refuse_accumulation(inner)
        var_list = list(var_list)
        count = len(self._groups.names)
        members: list[list[Any]] = [[] for _ in range(count + 1)]
        owner = {}
        for variable in var_list:
            index = self._group_of(variable, var_list)
            index = count if index is None else index
            owner[id(variable)] = index
            members[index].append(variable)
        for name, variables in zip(self._groups.names, members):
            if not variables:
                raise ValueError(
                    f"No variable to train belongs to the group '{name}' of "
                    f"the optimizer '{self.name}' (is its layer frozen?). "
                    "Every group needs at least one trainable variable."
                )
        # `LossScaleOptimizer` may have cleared the factor since `__init__`.
        config = dict(self._groups.config,
                      loss_scale_factor=inner.loss_scale_factor)
        optimizers = []
        for name, scale, variables in zip(self._groups.names, self._scales,
                                          members):
            group_config = dict(config, name=f"{inner.name}_{name}",
                                learning_rate=ScaledLearningRate(inner, scale))
            optimizer = type(inner).from_config(group_config)
            optimizer.build(variables)
            optimizers.append(optimizer)
        inner.build(members[count])
        self._group_optimizers = optimizers
        self._groups.built_with = var_list
        self._groups.members = members
        self._groups.owner = owner
        super().build(var_list)

    @property
    def variables(self) -> list[Any]:
        out = super().variables + self.inner_optimizer.variables
        for optimizer in self._group_optimizers:
            out = out + optimizer.variables
        return out

    def _optimizers(self):
        """Every optimizer, in the order `apply` runs them: the groups'
        copies first, so that they read the inner optimizer's learning rate
        before it counts the step."""
        return self._group_optimizers + [self.inner_optimizer]

    # Applying gradients.

    def apply(self, grads: Sequence[Tensor],
              trainable_variables: Sequence[Any] | None = None) -> None:
        """Applies each gradient with the optimizer of its variable's
        group (see `keras.optimizers.Optimizer.apply`)."""
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer "
                    "must already be built on a list of variables. Call "
                    "`optimizer.build(trainable_variables)` first."
                )
            trainable_variables = self._groups.built_with
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
        grads = self._clip_together(list(grads))
        optimizers = self._optimizers()
        routed: list[tuple[list[Any], list[Any]]] = [
            ([], []) for _ in optimizers]
        for grad, variable in zip(grads, trainable_variables):
            index = self._groups.owner.get(id(variable))
            if index is None:
                raise ValueError(
                    f"Unknown variable: {variable.path}. This optimizer can "
                    "only be called for the variables it was built with."
                )
            routed[index][0].append(grad)
            routed[index][1].append(variable)
        for index, optimizer in enumerate(optimizers):
            group_grads, variables = routed[index]
            if any(g is not None for g in group_grads):
                optimizer.apply(group_grads, variables)
            else:
                # No gradient for the group this step (or no variable
                # outside the groups): still count the step, so that every
                # optimizer's iterations and schedules stay in step.
                # Without gradient accumulation (refused), `iterations` is
                # the optimizer's step counter itself.
                optimizer.iterations.assign_add(1)

    def _clip_together(self, grads):
        """`inner_optimizer.global_clipnorm` applied to all gradients
        together, as a single optimizer applies it."""
        inner = self.inner_optimizer
        clipnorm = inner.global_clipnorm
        if not clipnorm:
            return grads
        # Keras clips the unscaled gradients.
        scale = inner.loss_scale_factor
        present = [g if scale is None else g / scale
                   for g in grads if g is not None]
        norm = ops.sqrt(ops.sum(ops.stack(
            [ops.sum(ops.square(g)) for g in present])))
        # As `keras.optimizers` clips: NaN for a non-finite norm.
        factor = clipnorm * ops.minimum(1.0 / norm, 1.0 / clipnorm)
        factor = factor + (norm - norm)
        return [None if g is None else g * ops.cast(factor, g.dtype)
                for g in grads]

    def scale_loss(self, loss: Tensor) -> Tensor:
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        """Lets every optimizer finalize its own variables (with `use_ema`,
        each group's moving averages replace its variables)."""
        del var_list
        if not self.built:
            return
        for optimizer, variables in zip(self._optimizers(),
                                        self._groups.members):
            if variables:
                optimizer.finalize_variable_values(variables)

    # Serialization.

    def get_config(self) -> Config:
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer),
            "groups": dict(zip(self._groups.names, self._groups.paths)),
        }

    @classmethod
    def from_config(cls, config: Config,
                    custom_objects: dict[str, Any] | None = None
                    ) -> LayerwiseOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
