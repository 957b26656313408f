"""DIST's value with keras-kd's epsilon against the authors' code.

The authors' DIST code divides each covariance by `|a_c| |b_c| + 1e-8`;
keras-kd divides by `max(|a_c| |b_c|, 1e-8)` (the floor only changes
vectors whose norm product is below 1e-8). For a student close to its
teacher the correlations are close to 1 and the loss is small, while the
added 1e-8 shifts every correlation by about `1e-8 / (|a_c| |b_c|)`: the
two values then differ by a visible fraction of the loss, more so at high
temperatures (flatter probabilities, smaller deviations) and with many
classes.

For each case: teacher logits `3 * N(0, 1)` of shape (B, C), student logits
the teacher's plus `noise * N(0, 1)`; DIST with beta = gamma = 1 at
temperature tau. "keras-kd" is `keras_kd.losses.DIST(dtype="float64")`;
"authors" is the same formula in float64 NumPy with `+ 1e-8`. A float64
NumPy copy of keras-kd's floor checks that the difference is the epsilon's
placement alone.

Usage:

    python benchmarks/dist_epsilon.py     # a few seconds; no timing
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras_kd  # noqa: E402

EPSILON = 1e-8
CASES = [  # (B, C, tau, noise)
    (64, 100, 1.0, 0.1),
    (64, 100, 4.0, 0.3),
    (64, 100, 4.0, 0.1),
    (64, 100, 8.0, 0.1),
    (64, 100, 16.0, 0.1),
    (64, 100, 8.0, 0.03),
    (256, 100, 8.0, 0.1),
    (64, 1000, 4.0, 0.3),
    (64, 1000, 4.0, 0.1),
    (256, 1000, 4.0, 0.1),
]


def softmax(z, tau):
    z = z / tau
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def correlation(a, b, floor):
    """Row-wise Pearson correlation, the norm product floored at (floor)
    or increased by (not floor) 1e-8."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    norms = np.maximum(norms, EPSILON) if floor else norms + EPSILON
    return (a * b).sum(-1) / norms


def dist(t, s, tau, floor):
    pt, ps = softmax(t, tau), softmax(s, tau)
    inter = 1.0 - correlation(ps, pt, floor).mean()
    intra = 1.0 - correlation(ps.T, pt.T, floor).mean()
    return tau**2 * (inter + intra)


def main():
    rng = np.random.default_rng(0)
    print(f"{'B':>4} {'C':>5} {'tau':>4} {'noise':>5} {'keras-kd':>11} "
          f"{'authors':>11} {'difference':>10}")
    for batch, classes, tau, noise in CASES:
        t = 3.0 * rng.standard_normal((batch, classes))
        s = t + noise * rng.standard_normal((batch, classes))
        ours = float(keras_kd.losses.DIST(temperature=tau, dtype="float64")(
            t, s))
        np.testing.assert_allclose(ours, dist(t, s, tau, True), rtol=1e-9)
        authors = dist(t, s, tau, False)
        print(f"{batch:>4} {classes:>5} {tau:>4g} {noise:>5g} {ours:>11.6f} "
              f"{authors:>11.6f} {(authors - ours) / ours:>+10.1%}")


if __name__ == "__main__":
    main()
