"""Probabilities and log-probabilities of class scores: logits from
probabilities (`as_logits`, the `from_logits=False` of every loss that
reads a distribution), the softened softmax of the losses, the normalized
entropy of a distribution, and the floor of the log-probability of a masked
(`-inf`) logit."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_kd._typing import Tensor

# The teacher's log-probabilities are floored here, so that a masked (-inf)
# teacher logit gives a probability of exactly 0 and finite arithmetic
# (0 * -inf would be NaN, and so would the gradient of a log-sum-exp of two
# -infs). A real log-probability below it is a probability that float32
# rounds to 0. The student's are not: flooring them would keep one more
# (batch, time, vocab) tensor for the backward pass, so student logits must
# be finite.
LOG_FLOOR = -1e30


def as_logits(scores: Tensor, from_logits: bool = True) -> Tensor:
    """Class scores as logits: `scores` themselves when `from_logits`, else
    the log of the probabilities `scores` clipped to
    `[epsilon, 1 - epsilon]` (`epsilon = keras.config.epsilon()`, the
    clipping of Keras' crossentropy losses).

    Log-probabilities are logits up to a constant per row, and every loss
    that reads a distribution is unchanged by that constant (a softmax at
    any temperature, ranks, standardized logits), so a loss given
    `as_logits(softmax(z), from_logits=False)` equals the loss given `z`
    (up to the clipping, which only acts on probabilities below
    `epsilon`). A probability of exactly 0 counts as `epsilon`, not as a
    masked entry.

    Args:
        scores: logits, or probabilities along the last axis (rows that sum
            to 1, e.g. a softmax output).
        from_logits: whether `scores` are logits.

    Returns:
        `scores` (`from_logits=True`) or `log(clip(scores, epsilon,
        1 - epsilon))`, a tensor of the same shape.

    Example:

    >>> as_logits(np.array([[0.0, 0.25, 0.75]]), from_logits=False)
    ... # [[log(1e-7), log(0.25), log(0.75)]]
    """
    if from_logits:
        return scores
    scores = ops.convert_to_tensor(scores)
    epsilon = keras.config.epsilon()
    return ops.log(ops.clip(scores, epsilon, 1.0 - epsilon))


def softened(logits: Tensor, temperature: float) -> Tensor:
    """`softmax(logits / temperature)` along the last axis."""
    return ops.softmax(logits / temperature, axis=-1)


def normalized_entropy(p: Tensor, log_p: Tensor) -> Tensor:
    """`H(p) / log(C)` per row, from probabilities and their logarithms."""
    num_classes = p.shape[-1]
    # p log p -> 0 as p -> 0; masked (-inf) logits give exactly 0 * -inf.
    entropy = -ops.sum(ops.where(p > 0, p * log_p, 0.0), axis=-1)
    if num_classes is None:  # known only when the step runs
        # One class has entropy 0: the maximum only avoids 0 / log(1).
        classes = ops.cast(ops.shape(p)[-1], entropy.dtype)
        normalized = entropy / ops.log(ops.maximum(classes, 2.0))
        return ops.clip(normalized, 0.0, 1.0)
    if num_classes < 2:
        return ops.zeros_like(entropy)
    return ops.clip(entropy / math.log(num_classes), 0.0, 1.0)
