"""The base class every distillation loss derives from."""

from __future__ import annotations

from typing import Any

import keras

from keras_kd.outputs import is_tensor_like
from keras_kd._typing import Config, Shape, Tensor


class DistillationLoss(keras.losses.Loss):
    """A Keras `Loss` that compares a teacher output with a student output.

    Subclasses implement `call(teacher_output, student_output)` and return one
    loss value per sample (shape `(batch,)`). `keras.losses.Loss.__call__`
    then applies `sample_weight` and the reduction, so every distillation loss
    honours sample weights the same way as the student's own loss: with the
    default `"sum_over_batch_size"` reduction the result is
    `sum_i(w_i * l_i) / batch_size`, and a sample of weight 0 contributes
    nothing.

    The argument order follows Keras (`y_true` first): the teacher output
    plays the role of the target and is never differentiated.

    Class attributes:
        matches_channels: `True` when the loss needs teacher and student
            features with the same number of channels (last axis). The
            `Distiller` then inserts a trainable adapter on the student side
            when they differ. Losses that only compare channel-free summaries
            (attention maps, logits) set it to `False`. A plain
            `keras.losses.Loss` used in a `Term` is treated as `True`.
        reads_distribution: `True` for a loss that reads its inputs as class
            scores of a distribution (logits, or probabilities with
            `from_logits=False`): `KD`, the correlation losses and the token
            divergences. Such a loss has a `from_logits` attribute (part of
            its config), so that the `Distiller` can refuse a model whose
            output is a softmax while the loss expects logits. `False` for
            losses on features.

    `get_config` includes the `dtype`, so a loss built with a dtype gets it
    back from `from_config` (and `from_logits` where the loss has it).
    """

    matches_channels = True
    reads_distribution = False

    def __init__(self, name: str | None = None,
                 reduction: str = "sum_over_batch_size",
                 dtype: str | None = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def __call__(self, y_true: Tensor, y_pred: Tensor,
                 sample_weight: Tensor | None = None) -> Tensor:
        """`loss(teacher_output, student_output, sample_weight=None)`.

        Raises:
            ValueError: an output is a list or a dict (the outputs of a
                multi-output model) rather than one tensor.
        """
        for role, value in (("teacher", y_true), ("student", y_pred)):
            if not is_tensor_like(value):
                raise ValueError(
                    f"{type(self).__name__} expects a tensor as the {role} "
                    f"output, got a {type(value).__name__} of "
                    f"{len(value)}. For a multi-output model, pick one "
                    "output with `Term(..., teacher_output=..., "
                    "student_output=...)`."
                )
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def check_shapes(self, teacher_shape: Shape, student_shape: Shape,
                     where: str) -> None:
        """Raises a `ValueError` when the loss cannot compare inputs of
        these shapes; the `Distiller` calls it when it is built, for every
        term whose shapes are known. Accepts any shapes by default.

        Args:
            teacher_shape: the static shape of the teacher value.
            student_shape: the static shape of the student value.
            where: the term and layers, for the message.
        """
        del teacher_shape, student_shape, where

    def get_config(self) -> Config:
        config = super().get_config()
        config["dtype"] = self.dtype
        if self.reads_distribution:
            config["from_logits"] = self.from_logits
        return config

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError(
            f"{type(self).__name__} must implement "
            "`call(teacher_output, student_output)` returning per-sample "
            "losses."
        )


class BatchCoupledLoss(DistillationLoss):
    """A loss whose per-sample values contain a batch statistic (`DIST`,
    `CMKD`).

    `keras.losses.Loss.__call__` hands `call` only the two tensors; these
    losses also need the sample weights to weight the batch statistic (the
    intra-class correlations), so `__call__` makes them available to `call`
    (as `self._batch_weights`) for the duration of the call and then defers
    to the standard Keras machinery (dtype conversion, masks, weighting,
    reduction). One instance should therefore not be called from several
    Python threads at once.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._batch_weights = None

    def __call__(self, y_true: Tensor, y_pred: Tensor,
                 sample_weight: Tensor | None = None) -> Tensor:
        self._batch_weights = sample_weight
        try:
            return super().__call__(
                y_true, y_pred, sample_weight=sample_weight
            )
        finally:
            self._batch_weights = None
