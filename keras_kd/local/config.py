"""`LocalModules`: the user-facing, serializable configuration of LAKD's
local modules (which student layers cut the student, which teacher layers
each module aligns to, and the activation-mapping loss)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from keras_kd.local.plan import LocalModulePlan
from keras_kd.losses.activation_mapping import ActivationMapping
from keras_kd._typing import Config


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
      (an affine map on the channel axis, i.e. a 1x1 convolution) when
      the channel counts differ, and the teacher feature
      `teacher_layers[k]`;
    - the last module: the compiled student loss (weighted by the
      distiller's `student_loss_weight`) and the distiller's terms on the
      final outputs (e.g. `KD`);
    - every module: the distiller's feature terms whose `student_layer`
      lies inside it, and the regularization losses of its own layers.

    Each module's forward and backward pass run under their own gradient
    computation (a `tf.GradientTape`, `jax.value_and_grad` or
    `torch.autograd.grad`), and the next module starts only after the previous
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
    mode, outside every gradient computation, each layer once per step; when
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
        self,
        split_at: Sequence[str],
        teacher_layers: Sequence[str],
        alpha: float = 1.0,
        beta: float = 0.1,
        pooling: str = "avg_max",
        normalize: str = "sigmoid",
        name: str = "local",
    ) -> None:
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
    def alpha(self) -> float:
        return self.loss.alpha

    @property
    def beta(self) -> float:
        return self.loss.beta

    @property
    def loss_names(self) -> list[str]:
        """The names under which the modules' activation-mapping losses are
        logged (`<name>_<k>`, 1-based, one per split)."""
        return [f"{self.name}_{k + 1}" for k in range(len(self.split_at))]

    def bind(self, teachers: Any, student: keras.Model, terms: Any,
             assembly: Any, diagnostics: Any = None) -> Any:
        """Builds and validates the modules for a student and its teachers;
        called by `Distiller`.

        Args:
            teachers: the distiller's `keras_kd.teachers.Teachers` (its
                teacher models, ensemble mode and augmentations); the
                modules ask it for the teacher layers they read.
            student: the student `keras.Model`.
            terms: the distiller's `keras_kd.step.BoundTerm`s.
            assembly: the distiller's `keras_kd.step.LossAssembly`.
            diagnostics: the distiller's `keras_kd.diagnostics.Diagnostics`
                (which layers its metrics read), or `None`.

        Returns:
            A `LocalModulePlan`.
        """
        return LocalModulePlan(self, teachers, student, terms, assembly,
                               diagnostics=diagnostics)

    def get_config(self) -> Config:
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
    def from_config(cls, config: Config) -> LocalModules:
        return cls(**config)

    def __repr__(self) -> str:
        return (
            f"LocalModules(split_at={self.split_at!r}, "
            f"teacher_layers={self.teacher_layers!r}, alpha={self.alpha}, "
            f"beta={self.beta})"
        )


def _names(value: Any, argument: str) -> list[str]:
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
