"""Token divergences against a teacher with masked (`-inf`) logits: each
equals a NumPy reference of its documented definition, with finite and
bounded gradients (the reverse KL on the teacher's support plus
`-log(student mass on the support)` for `ReverseKL`). On every backend."""

import numpy as np
import pytest

from backend_utils import value_and_grad
from keras_kd.losses import ForwardKL, GeneralizedJSD, ReverseKL, SkewKL

MASKED = (2, 5, 7)  # vocabulary entries the teacher masks everywhere


def masked_logits(student_on_masked=0.0):
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(2, 3, 9)) * 2.0
    teacher[..., MASKED] = -np.inf
    teacher[1, 2, :] = rng.normal(size=9)  # one position masks nothing
    student = rng.normal(size=(2, 3, 9)) * 2.0
    student[..., MASKED] += student_on_masked
    return teacher.astype("float32"), student.astype("float32")


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(log_p, log_q):
    """`KL(p || q)` with `0 log 0 = 0`."""
    p = np.exp(log_p)
    safe = np.where(p > 0, log_p - log_q, 0.0)
    return (p * safe).sum(-1)


def np_log_mix(log_p, log_q, w):
    return np.log(w * np.exp(log_p) + (1 - w) * np.exp(log_q))


def np_reverse_kl(lt, ls):
    """The documented definition: `KL(q || p_t) - log(m_S)`, `q` the
    student renormalized on the teacher's support `S`, `m_S` its mass
    there."""
    support = np.isfinite(lt)
    mass = np.where(support, np.exp(ls), 0.0).sum(-1, keepdims=True)
    log_q = np.where(support, ls - np.log(mass), -np.inf)
    return np_kl(log_q, np.where(support, lt, 0.0)) - np.log(mass[..., 0])


def np_divergence(kind, t, s, tau):
    lt = np_log_softmax(t.astype("float64") / tau)
    ls = np_log_softmax(s.astype("float64") / tau)
    if kind == "forward":
        value = np_kl(lt, ls)
    elif kind in ("reverse", "jsd_1", "skew_reverse_0"):
        value = np_reverse_kl(lt, ls)
    elif kind == "jsd":
        m = np_log_mix(lt, ls, 0.5)
        value = (0.5 * np_kl(lt, m) + 0.5 * np_kl(ls, m)) / 0.25
    elif kind == "skew":
        value = np_kl(lt, np_log_mix(lt, ls, 0.1))
    elif kind == "skew_reverse":
        value = np_kl(ls, np_log_mix(ls, lt, 0.1))
    return tau**2 * value


LOSSES = {
    "forward": lambda **kw: ForwardKL(**kw),
    "reverse": lambda **kw: ReverseKL(**kw),
    "jsd": lambda **kw: GeneralizedJSD(beta=0.5, **kw),
    "jsd_1": lambda **kw: GeneralizedJSD(beta=1.0, **kw),
    "skew": lambda **kw: SkewKL(alpha=0.1, **kw),
    "skew_reverse": lambda **kw: SkewKL(alpha=0.1, reverse=True, **kw),
    "skew_reverse_0": lambda **kw: SkewKL(alpha=0.0, reverse=True, **kw),
}


def numerical_gradient(fn, x, step=1e-5):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (fn(up) - fn(down)) / (2 * step)
    return grad


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_masked_teacher_matches_numpy_with_bounded_gradients(kind, tau):
    teacher, student = masked_logits()
    loss = LOSSES[kind](temperature=tau, chunk_size=2, reduction="sum")
    value, (grad,) = value_and_grad(lambda s: loss(teacher, s), student)

    def reference(s):
        return np_divergence(kind, teacher, s, tau).sum()

    np.testing.assert_allclose(value, reference(student), rtol=1e-4,
                               atol=1e-5)
    assert np.all(np.isfinite(grad))
    expected = numerical_gradient(reference, student.astype("float64"))
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


def test_reverse_kl_of_a_student_on_masked_entries_stays_bounded():
    """Most of the student's mass on the masked entries: the value grows
    like `-log(m_S)` (not like `1e30 * mass`) and each logit's gradient
    stays at most `tau` per token for the penalty."""
    teacher, student = masked_logits(student_on_masked=12.0)
    tau = 2.0
    loss = ReverseKL(temperature=tau, reduction="sum")
    value, (grad,) = value_and_grad(lambda s: loss(teacher, s), student)
    expected = np_divergence("reverse", teacher, student, tau)
    np.testing.assert_allclose(value, expected.sum(), rtol=1e-4)
    assert 1.0 < value < 200.0
    assert np.all(np.isfinite(grad))
    # Per token: tau * (p_s - q) for the penalty plus the reverse KL of the
    # renormalized student on the support; its largest entry here:
    assert np.abs(grad).max() < 5.0 * tau
    # Gradient descent moves mass off the masked entries.
    assert np.all(grad[..., MASKED][:, :2] > 0)


def test_reverse_kl_without_masked_entries_is_the_reverse_kl():
    rng = np.random.default_rng(1)
    teacher, student = (rng.normal(size=(3, 4, 7)).astype("float32")
                        for _ in range(2))
    value = ReverseKL(reduction="sum")(teacher, student)
    lt, ls = np_log_softmax(teacher), np_log_softmax(student)
    np.testing.assert_allclose(value, np_kl(ls, lt).sum(), rtol=1e-5)
