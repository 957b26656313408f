"""Probabilities and log-probabilities of class scores: the softened
softmax of the losses, the normalized entropy of a distribution, and the
floor of the log-probability of a masked (`-inf`) logit."""

import math

from keras import ops

# The teacher's log-probabilities are floored here, so that a masked (-inf)
# teacher logit gives a probability of exactly 0 and finite arithmetic
# (0 * -inf would be NaN, and so would the gradient of a log-sum-exp of two
# -infs). A real log-probability below it is a probability that float32
# rounds to 0. The student's are not: flooring them would keep one more
# (batch, time, vocab) tensor for the backward pass, so student logits must
# be finite.
LOG_FLOOR = -1e30


def softened(logits, temperature):
    """`softmax(logits / temperature)` along the last axis."""
    return ops.softmax(logits / temperature, axis=-1)


def normalized_entropy(p, log_p):
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
