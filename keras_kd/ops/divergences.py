"""Divergences between distributions given as log-probabilities: forward KL,
reverse KL, generalized Jensen-Shannon and skew KL.

Each function takes `log_p_t` and `log_p_s` of the same shape
`(..., bins)` (normalized log-probabilities along the last axis) and
returns one value per row, shape `(...)`. They are the formulas of the
token-level losses in `keras_kd.losses.divergences`, which apply them per
token after the softmax, chunking and masking.

Notation: `p_t` is the teacher's distribution, `p_s` the student's;
`KL(p || q) = sum_v p_v (log p_v - log q_v)`.
"""

import math

from keras import ops

from keras_kd.ops.probabilities import LOG_FLOOR


def kl_divergence(log_p, log_q):
    """`KL(p || q) = sum_v p_v (log p_v - log q_v)` over the last axis.

    Args:
        log_p: log-probabilities of `p`, shape `(..., bins)`.
        log_q: log-probabilities of `q`, same shape.

    Returns:
        A tensor of shape `(...)`.
    """
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def log_mixture(log_p, log_q, weight):
    """`log(weight * p + (1 - weight) * q)`, elementwise, for
    `0 < weight < 1`."""
    return ops.logaddexp(log_p + math.log(weight),
                         log_q + math.log1p(-weight))


def forward_kl(log_p_t, log_p_s):
    """Forward KL: `KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)`.

    Mean-seeking: the student is penalized where the teacher has mass and
    the student has none. Hinton's KD loss is this divergence.
    """
    return kl_divergence(log_p_t, log_p_s)


def reverse_kl(log_p_t, log_p_s):
    """Reverse KL: `KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)`, with
    a finite definition where the teacher has no mass.

    Mode-seeking: the student is penalized where it has mass and the teacher
    has little.

    Entries the teacher masks (probability 0: a `-inf` logit, a
    log-probability at or below `LOG_FLOOR`) would make the reverse KL
    infinite wherever the student has mass there (numerically, about
    `1e30` times that mass). With `S` the teacher's support, `m_S` the
    student's mass on it and `q = p_s / m_S` the student renormalized on
    it, the value is instead

        KL(q || p_t) - log(m_S)
        = sum_{v in S} q_v (log q_v - log p_t,v) - log(sum_{v in S} p_s,v)

    the reverse KL on the support plus `-log(m_S)`, the forward KL between
    the two-bin distributions "in the support or not" of the teacher
    `(1, 0)` and of the student `(m_S, 1 - m_S)`. Both terms are
    non-negative and the value is 0 only when `p_s = p_t`. Without masked
    entries `m_S = 1` and it is the reverse KL itself. The penalty is
    finite for finite student logits, and its gradient with respect to the
    student's logit `z_s,v` (at temperature 1) is `p_s,v - q_v` for `v` in
    `S` and `p_s,v` outside, at most 1 in magnitude: a student that puts
    mass on masked entries is pushed off them with a bounded force,
    whatever the mass.

    Args:
        log_p_t: teacher log-probabilities, shape `(..., bins)`; entries at
            or below `LOG_FLOOR` (or `-inf`) are masked.
        log_p_s: student log-probabilities, same shape, finite.

    Returns:
        A tensor of shape `(...)`.
    """
    support = log_p_t > LOG_FLOOR
    # log(m_S): a log-sum-exp of the student's log-probabilities on S.
    log_mass = ops.logsumexp(ops.where(support, log_p_s, LOG_FLOOR), axis=-1,
                             keepdims=True)
    # Outside S both log-probabilities are replaced before any arithmetic,
    # so that no inf or NaN reaches the gradient through the unused branch.
    log_q = ops.where(support, log_p_s - log_mass, 0.0)
    log_t = ops.where(support, log_p_t, 0.0)
    inside = ops.where(support, ops.exp(log_q) * (log_q - log_t), 0.0)
    return ops.sum(inside, axis=-1) - ops.squeeze(log_mass, axis=-1)


def generalized_jsd(log_p_t, log_p_s, beta=0.5, normalized=True):
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024).

    `JSD(beta) = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)` with the
    mixture `m = beta * p_t + (1 - beta) * p_s`. As `beta -> 0`,
    `JSD(beta) / beta -> KL(p_t || p_s)` (forward KL); as `beta -> 1`,
    `JSD(beta) / (1 - beta) -> KL(p_s || p_t)` (reverse KL).

    With `normalized=True` the value is `JSD(beta) / (beta * (1 - beta))`,
    which is continuous in `beta` on `[0, 1]` and equals forward KL at
    `beta = 0` and reverse KL at `beta = 1` (both computed as such). With
    `normalized=False` it is GKD's `JSD(beta)` itself, defined for
    `0 < beta < 1` only (it tends to 0 at both ends).

    Args:
        log_p_t: teacher log-probabilities, shape `(..., bins)`.
        log_p_s: student log-probabilities, same shape.
        beta: the interpolation coefficient in `[0, 1]`.
        normalized: divide by `beta * (1 - beta)`.

    Returns:
        A tensor of shape `(...)`.
    """
    beta = float(beta)
    if beta in (0.0, 1.0):
        if not normalized:
            raise ValueError(
                "`beta` must be in (0, 1) when `normalized=False` "
                f"(GKD's JSD(beta) is 0 at both ends); got {beta}."
            )
        if beta == 0.0:
            return forward_kl(log_p_t, log_p_s)
        return reverse_kl(log_p_t, log_p_s)
    log_m = log_mixture(log_p_t, log_p_s, beta)
    value = (beta * kl_divergence(log_p_t, log_m)
             + (1.0 - beta) * kl_divergence(log_p_s, log_m))
    if normalized:
        value = value / (beta * (1.0 - beta))
    return value


def skew_kl(log_p_t, log_p_s, alpha=0.1, reverse=False):
    """Skew KL divergence (DistiLLM, Ko et al. 2024).

    Forward (`reverse=False`): `KL(p_t || alpha * p_t + (1 - alpha) * p_s)`.
    Reverse (`reverse=True`): `KL(p_s || alpha * p_s + (1 - alpha) * p_t)`.
    `alpha = 0` is exactly forward (reverse) KL. Mixing some of the first
    distribution into the second bounds the value by `-log(alpha)` and keeps
    the gradient finite where the second distribution has no mass.

    Args:
        log_p_t: teacher log-probabilities, shape `(..., bins)`.
        log_p_s: student log-probabilities, same shape.
        alpha: the skew in `[0, 1)`.
        reverse: skew the reverse KL instead of the forward KL.

    Returns:
        A tensor of shape `(...)`.
    """
    alpha = float(alpha)
    if alpha == 0.0:
        if reverse:
            return reverse_kl(log_p_t, log_p_s)
        return forward_kl(log_p_t, log_p_s)
    first, second = (log_p_s, log_p_t) if reverse else (log_p_t, log_p_s)
    return kl_divergence(first, log_mixture(first, second, alpha))
