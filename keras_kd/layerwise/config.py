"""`LayerwiseLearningRate`: the user-facing, serializable description of
layer-wise learning rates (which layers, which signal, how often, how far
the scales may move), and its validation.

A `Distiller` binds a private copy of it to the teachers and the student
(`attach`) as a `keras_kd.layerwise.routing.LayerwiseState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from keras_kd import _checks
from keras_kd.layerwise.routing import LayerwiseState
from keras_kd._typing import Config

SIGNALS = ("attention", "jacobian", "hessian")
SCOPES = ("layer", "block")


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
    `keras_kd.layerwise.measure` for the library's reading. Maps are computed
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
        self,
        pairs: Sequence[Sequence[str]],
        signal: str = "attention",
        update_every: int = 50,
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        p: float = 2,
        scope: str = "layer",
        hutchinson_samples: int = 1,
    ) -> None:
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
    def student_layers(self) -> list[str]:
        """Names of the paired student layers, in order."""
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[str]:
        """Names of the paired teacher layers, in order."""
        return [t for _, t in self.pairs]

    def bind(self, teachers: Any, student: keras.Model) -> Any:
        """Validate the pairs against the models and return the state the
        `Distiller` tracks (divergences, maps, the optimizer it wraps).

        Args:
            teachers: the distiller's `keras_kd.teachers.Teachers`, which
                the measurement asks for the paired teacher layers.
            student: the student `keras.Model`.

        Returns:
            A `LayerwiseState` layer.
        """
        return LayerwiseState(self, teachers, student)

    def get_config(self) -> Config:
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
    def from_config(cls, config: Config) -> LayerwiseLearningRate:
        return cls(**config)

    def __repr__(self) -> str:
        return (
            f"LayerwiseLearningRate(pairs={self.pairs!r}, "
            f"signal={self.signal!r}, update_every={self.update_every}, "
            f"min_scale={self.min_scale}, max_scale={self.max_scale})"
        )


def attach(layerwise_lr: LayerwiseLearningRate | None, teachers: Any,
           student: keras.Model) -> LayerwiseState | None:
    """The `LayerwiseState` for a `Distiller`, or `None` without one.

    Args:
        layerwise_lr: `None` or a `LayerwiseLearningRate`.
        teachers: the distiller's `keras_kd.teachers.Teachers`.
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

