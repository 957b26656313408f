import keras
import numpy as np
import pytest
import scipy.special
import scipy.stats
from backend_utils import BACKEND
from backend_utils import jit
from backend_utils import to_numpy
from backend_utils import value_and_grad
from backend_utils import evaluate
from backend_utils import float64_context
from backend_utils import value_and_grad_fn
from keras import ops

from keras_kd.losses.cmkd import CMKD
from keras_kd.losses.cmkd import cmkd_loss
from keras_kd.losses.cmkd import entropy_weights
from keras_kd.losses.correlation import PearsonCorrelation
from keras_kd.losses.correlation import SpearmanCorrelation
from keras_kd.losses.correlation import pearson_loss
from keras_kd.losses.correlation import spearman_loss
from keras_kd.losses.dist import DIST
from keras_kd.losses.dist import dist_loss
from keras_kd.losses.dist import intra_class_loss
from keras_kd.ops.correlation import pearson_correlation
from keras_kd.losses.logits import standardize_logits

B, C = 6, 12


# ---------------------------------------------------------------- references


def np_softmax(z, tau):
    return scipy.special.softmax(z.astype("float64") / tau, axis=-1)


def np_pearson_rows(a, b):
    return np.array([scipy.stats.pearsonr(x, y)[0] for x, y in zip(a, b)])


def np_spearman_rows(t, s):
    return np.array([scipy.stats.spearmanr(x, y)[0] for x, y in zip(t, s)])


def np_weighted_corr_columns(a, b, w):
    w = w[:, None]
    a = a - (w * a).sum(0) / w.sum()
    b = b - (w * b).sum(0) / w.sum()
    return (w * a * b).sum(0) / np.sqrt(
        (w * a * a).sum(0) * (w * b * b).sum(0))


def np_dist(t, s, tau, beta=1.0, gamma=1.0, w=None):
    """DIST transcribed from its formula (methods.md), per-sample form."""
    pt, ps = np_softmax(t, tau), np_softmax(s, tau)
    inter = 1.0 - np_pearson_rows(ps, pt)
    if w is None:
        intra = 1.0 - np.mean([scipy.stats.pearsonr(ps[:, c], pt[:, c])[0]
                               for c in range(t.shape[1])])
    else:
        intra = 1.0 - np_weighted_corr_columns(ps, pt, w).mean()
    return tau**2 * (beta * inter + gamma * intra)


def np_entropy_weights(t, tau):
    p = np_softmax(t, tau)
    return -(p * np.log(np.maximum(p, 1e-300))).sum(-1) / np.log(t.shape[1])


def np_zscore(z):
    return (z - z.mean(-1, keepdims=True)) / (
        z.std(-1, ddof=1, keepdims=True) + 1e-7)


def separated(rng, batch=B, classes=C, spacing=2.0):
    """Logits that are distinct permutations of an evenly spaced grid."""
    rows = [rng.permutation(classes) for _ in range(batch)]
    return (spacing * np.stack(rows) - classes).astype("float32")


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return ((rng.normal(size=(B, C)) * 3).astype("float32"),
            (rng.normal(size=(B, C)) * 3).astype("float32"))


def per_sample(loss_cls, **kwargs):
    return loss_cls(reduction=None, **kwargs)


# -------------------------------------------------------------- correctness


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pearson_matches_scipy_per_sample(logits, tau):
    t, s = logits
    values = per_sample(PearsonCorrelation, temperature=tau)(t, s)
    assert values.shape == (B,)
    expected = 1.0 - np_pearson_rows(np_softmax(s, tau), np_softmax(t, tau))
    np.testing.assert_allclose(values, expected, atol=1e-5)
    np.testing.assert_allclose(
        float(PearsonCorrelation(tau)(t, s)), expected.mean(), atol=1e-5)


def test_spearman_matches_scipy_at_small_strength(logits):
    t, s = logits
    t = np.round(t)  # teacher ties: scipy averages them, so must we
    loss = per_sample(SpearmanCorrelation, regularization_strength=1e-5)
    expected = 1.0 - np_spearman_rows(t, s)
    np.testing.assert_allclose(loss(t, s), expected, atol=1e-3)
    # The temperature only rescales the soft ranks' inputs.
    loss = per_sample(SpearmanCorrelation, temperature=4.0,
                      regularization_strength=1e-6)
    np.testing.assert_allclose(loss(t, s), expected, atol=1e-3)


def test_spearman_soft_ranks_differ_at_large_strength(logits):
    t, s = logits
    exact = 1.0 - np_spearman_rows(t, s)
    soft = per_sample(SpearmanCorrelation, regularization_strength=3.0)(t, s)
    assert np.abs(np.asarray(soft) - exact).max() > 1e-2


@pytest.mark.parametrize("tau,beta,gamma", [(4.0, 1.0, 1.0), (2.0, 0.5, 2.0),
                                            (1.0, 1.0, 0.0)])
def test_dist_matches_numpy_formula(logits, tau, beta, gamma):
    t, s = logits
    loss = DIST(temperature=tau, beta=beta, gamma=gamma)
    np.testing.assert_allclose(float(loss(t, s)),
                               np_dist(t, s, tau, beta, gamma).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(
        per_sample(DIST, temperature=tau, beta=beta, gamma=gamma)(t, s),
        np_dist(t, s, tau, beta, gamma), rtol=1e-5)


def test_dist_weighted_intra_matches_numpy(logits):
    t, s = logits
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 0.25], "float32")
    expected = (np_dist(t, s, 4.0, w=w) * w).mean()
    np.testing.assert_allclose(float(DIST()(t, s, sample_weight=w)),
                               expected, rtol=1e-5)


def test_cmkd_matches_numpy_reading(logits):
    t, s = logits
    tau = 4.0
    w = np_entropy_weights(t, tau)
    lp = 1.0 - np_pearson_rows(np_softmax(s, tau), np_softmax(t, tau))
    ls = 1.0 - np_spearman_rows(t, s)
    expected = tau**2 * ((1 - w) * lp + w * ls)
    loss = per_sample(CMKD, temperature=tau, regularization_strength=1e-6)
    np.testing.assert_allclose(loss(t, s), expected, atol=2e-3)
    flipped = per_sample(CMKD, temperature=tau, regularization_strength=1e-6,
                         hard_samples="pearson")
    np.testing.assert_allclose(flipped(t, s),
                               tau**2 * (w * lp + (1 - w) * ls), atol=2e-3)


def test_cmkd_reduces_to_pearson_and_spearman_at_the_extremes(logits):
    rng = np.random.default_rng(1)
    _, s = logits
    tau = 4.0
    # One-hot-like teacher: entropy ~ 0, so w ~ 0 -> the Pearson loss.
    confident = 200.0 * np.eye(C)[rng.integers(0, C, B)] + rng.normal(
        size=(B, C))
    confident = confident.astype("float32")
    lp = 1.0 - np_pearson_rows(np_softmax(s, tau), np_softmax(confident, tau))
    cmkd = per_sample(CMKD, temperature=tau)
    np.testing.assert_allclose(cmkd(confident, s), tau**2 * lp, rtol=1e-4)
    np.testing.assert_allclose(cmkd(confident, s),
                               tau**2 * pearson_loss(confident, s, tau),
                               rtol=1e-5)
    # Near-uniform teacher: entropy ~ log C, so w ~ 1 -> the Spearman loss.
    unsure = (1e-3 * rng.normal(size=(B, C))).astype("float32")
    ls = 1.0 - np_spearman_rows(unsure, s)
    cmkd = per_sample(CMKD, temperature=tau, regularization_strength=1e-6)
    np.testing.assert_allclose(cmkd(unsure, s), tau**2 * ls, atol=1e-3)
    np.testing.assert_allclose(
        cmkd(unsure, s),
        tau**2 * spearman_loss(unsure, s, tau, regularization_strength=1e-6),
        atol=1e-4)
    # `hard_samples="pearson"` sends the uncertain samples to Pearson.
    flipped = per_sample(CMKD, temperature=tau, hard_samples="pearson")
    lp = 1.0 - np_pearson_rows(np_softmax(s, tau), np_softmax(unsure, tau))
    np.testing.assert_allclose(flipped(unsure, s), tau**2 * lp, rtol=1e-3)


def value_and_gradient(loss, compiled, mix=None):
    """`(sum of mix * loss(a, b), its gradient with respect to b)` as NumPy,
    eager or compiled with XLA."""
    def total(a, b):
        values = loss(a, b)
        return ops.sum(values if mix is None else ops.multiply(mix, values))

    run = value_and_grad_fn(total, argnums=(1,))
    run = jit(run) if compiled else run

    def call(a, b):
        value, (grad,) = evaluate(run(a, b))
        return value, grad

    return call


@pytest.mark.parametrize("options", [
    {},
    {"hard_samples": "pearson"},
    {"standardize": True, "intra_weight": 0.5},
])
@pytest.mark.parametrize("compiled", [False, True])
def test_cmkd_gradient_matches_its_terms_in_class_order(logits, compiled,
                                                        options):
    # cmkd_loss computes every per-sample term in the student's sorted order;
    # its value and gradient must be those of the same terms computed class
    # by class.
    t, s = logits
    tau, eps = 2.0, 0.3
    mix = np.linspace(0.5, 2.0, B).astype("float32")

    def composed(a, b):
        if options.get("standardize"):
            a, b = standardize_logits(a), standardize_logits(b)
        w = entropy_weights(a, tau)
        if options.get("hard_samples") == "pearson":
            w = 1.0 - w
        lp = pearson_loss(a, b, tau) + options.get(
            "intra_weight", 0.0) * intra_class_loss(a, b, tau)
        ls = spearman_loss(a, b, tau, regularization_strength=eps, window=4)
        return tau**2 * ((1.0 - w) * lp + w * ls)

    expected = value_and_gradient(composed, compiled, mix)(t, s)
    actual = value_and_gradient(
        lambda a, b: cmkd_loss(a, b, tau, eps, window=4, **options),
        compiled, mix,
    )(t, s)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
    np.testing.assert_allclose(actual[1], expected[1], rtol=1e-4,
                               atol=1e-6)


def test_cmkd_standardize_and_intra_term(logits):
    t, s = logits
    tau = 2.0
    standardized = CMKD(temperature=tau, standardize=True)
    np.testing.assert_allclose(
        float(standardized(t, s)),
        float(CMKD(temperature=tau)(np_zscore(t), np_zscore(s))),
        rtol=1e-4)
    # z-scoring makes the loss blind to a per-row scale and shift.
    np.testing.assert_allclose(float(standardized(t, 3.0 * s + 1.0)),
                               float(standardized(t, s)), rtol=1e-4)
    # The optional intra-class term adds tau^2 (1 - w_i) * gamma * intra.
    w = np_entropy_weights(t, 4.0)
    pt, ps = np_softmax(t, 4.0), np_softmax(s, 4.0)
    intra = 1.0 - np.mean([scipy.stats.pearsonr(ps[:, c], pt[:, c])[0]
                           for c in range(C)])
    with_intra = float(CMKD(intra_weight=0.5)(t, s))
    np.testing.assert_allclose(
        with_intra - float(CMKD()(t, s)),
        16.0 * np.mean((1 - w) * 0.5 * intra), rtol=1e-4)


def test_every_loss_is_zero_for_identical_inputs():
    rng = np.random.default_rng(2)
    # Logits 2 apart: soft ranks at the default strength are exact.
    z = separated(rng)
    for loss in (PearsonCorrelation(), PearsonCorrelation(4.0),
                 SpearmanCorrelation(), SpearmanCorrelation(4.0), DIST(),
                 DIST(beta=2.0, gamma=0.5), CMKD(), CMKD(intra_weight=1.0),
                 CMKD(hard_samples="pearson"),
                 CMKD(temperature=2.0, standardize=True,
                      regularization_strength=0.01)):
        assert abs(float(loss(z, z))) < 1e-5, loss.name
    # Pearson and DIST need no separation at all.
    z = rng.normal(size=(B, C)).astype("float32")
    assert abs(float(DIST()(z, z))) < 1e-5
    assert abs(float(PearsonCorrelation()(z, z))) < 1e-6


# ------------------------------------------------------------ sample weights


@pytest.mark.parametrize("make", [
    lambda: PearsonCorrelation(2.0),
    lambda: SpearmanCorrelation(),
    lambda: DIST(),
    lambda: CMKD(),
    lambda: CMKD(intra_weight=1.0, standardize=True),
])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
def test_sample_weight_zero_removes_the_sample(logits, make, reduction):
    t, s = logits
    loss = make()
    loss = loss.__class__.from_config({**loss.get_config(),
                                       "reduction": reduction})
    keep = np.array([0, 1, 3, 4, 5])
    w = np.ones(B, "float32")
    w[2] = 0.0
    weighted = float(loss(t, s, sample_weight=w))
    alone = float(loss(t[keep], s[keep]))
    scale = len(keep) / B if reduction == "sum_over_batch_size" else 1.0
    np.testing.assert_allclose(weighted, alone * scale, rtol=1e-5)
    # Column-shaped weights are accepted too.
    np.testing.assert_allclose(
        float(loss(t, s, sample_weight=w[:, None])), weighted, rtol=1e-6)
    # Without weights the dropped sample does matter for batch terms.
    if isinstance(loss, DIST):
        assert abs(float(loss(t, s)) - alone) > 1e-4


def test_dist_batch_weights_are_cleared_after_the_call(logits):
    t, s = logits
    loss = DIST()
    loss(t, s, sample_weight=np.ones(B))
    assert loss._batch_weights is None
    np.testing.assert_allclose(np.asarray(loss.call(t, s)),
                               np_dist(t, s, 4.0), rtol=1e-5)


# --------------------------------------------------------------- gradients


@pytest.mark.parametrize("loss", [
    PearsonCorrelation(4.0), SpearmanCorrelation(), DIST(),
    CMKD(intra_weight=1.0), CMKD(standardize=True),
])
def test_gradients_finite_and_teacher_not_differentiated(logits, loss):
    t, s = logits
    # Large logits and a constant row (zero variance) must stay finite.
    s = np.concatenate([s[:-1] * 30, np.zeros((1, C))]).astype("float32")
    value, (grad_t, grad) = value_and_grad(loss, t * 30, s)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
    assert np.all(grad_t == 0)  # the teacher gets no gradient


def test_spearman_gradient_nonzero_for_every_student_logit(logits):
    t, s = logits
    loss = SpearmanCorrelation(regularization_strength=0.5)
    _, (grad,) = value_and_grad(lambda s: loss(t, s), s)
    assert np.all(np.isfinite(grad)) and np.all(np.abs(grad) > 0)


def test_losses_compile_with_xla(logits):
    t, s = logits
    loss = CMKD(intra_weight=1.0, window=2)  # a short window compiles fast
    w = np.array([1, 1, 0, 1, 2, 1], "float32")
    fn = jit(lambda a, b, c: loss(a, b, sample_weight=c))
    np.testing.assert_allclose(float(fn(t, s, w)),
                               float(loss(t, s, sample_weight=w)), rtol=1e-5)


@pytest.mark.backends("tensorflow")  # only TF traces unknown sizes
def test_value_losses_accept_a_dynamic_number_of_classes(logits):
    # Only the rank losses need a static class axis (for the sort).
    import tensorflow as tf

    t, s = logits
    spec = [tf.TensorSpec([None, None], tf.float32)] * 2
    for loss in (pearson_loss, dist_loss):
        fn = tf.function(lambda a, b: loss(a, b, 2.0), input_signature=spec)
        np.testing.assert_allclose(fn(t, s), loss(t, s, 2.0), rtol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_cmkd_with_masked_teacher_logits(logits, compiled):
    # Masked classes (-inf logits, e.g. vocabulary padding) have p = 0; the
    # entropy weights used to be NaN (0 * -inf).
    t, s = logits
    t = t.copy()
    t[:, :3] = -np.inf
    np.testing.assert_allclose(to_numpy(entropy_weights(t, 4.0)),
                               np_entropy_weights(t, 4.0), rtol=1e-5)
    run = value_and_gradient(cmkd_loss, compiled)
    value, grad = run(t, s)
    assert np.isfinite(value) and np.isfinite(grad).all()


@pytest.mark.parametrize("compiled", [False, True])
def test_constant_student_rows_get_bounded_gradients(logits, compiled):
    # A zero-initialized head outputs equal logits, which centre to exactly
    # 0: the correlation is 0, and the gradient used to be the teacher's
    # direction divided by the 1e-8 floor (about 1e10 for Spearman; NaN
    # with standardize=True under XLA).
    t, _ = logits
    s = np.zeros_like(t)
    losses = {
        "pearson": lambda a, b: pearson_loss(a, b, 4.0),
        "spearman": lambda a, b: spearman_loss(a, b, 4.0),
        "dist": lambda a, b: dist_loss(a, b),
        "cmkd": lambda a, b: cmkd_loss(a, b, standardize=True),
    }
    for name, loss in losses.items():
        value, grad = value_and_gradient(loss, compiled)(t, s)
        assert np.isfinite(value) and np.isfinite(grad).all(), name
        assert np.abs(grad).max() < 1e3, (name, np.abs(grad).max())


# A zero-initialized head at batch sizes and class counts where rounding
# leaves a residue in the centred constant rows: TensorFlow's softmax in
# eager mode (p - 1/C, about 1e-9) and the batch mean of B equal
# probabilities (DIST's intra-class term, eager and XLA). The guard used to
# test for exactly 0, so these rows got the teacher's direction divided by
# the residue or the 1e-8 floor.
ZERO_HEAD_BATCHES = (1, 2, 3, 5, 6, 8, 13, 16, 32, 64)
ZERO_HEAD_CLASSES = (3, 7, 10, 12, 16, 17, 100)
ZERO_HEAD_LOSSES = {
    "DIST": lambda: DIST(),
    "PearsonCorrelation(temperature=4)": lambda: PearsonCorrelation(
        temperature=4.0),
    "SpearmanCorrelation": lambda: SpearmanCorrelation(),
    "CMKD": lambda: CMKD(),
}
# Bound on B * max |d loss / d student logits| (the gradient of the sum of
# the per-sample losses, so that it does not shrink with B). A row counted
# as constant has norm 1, so the correlation's gradient is the other row's
# unit direction, then scaled by tau^2 and the softmax or soft-rank
# Jacobian. Over this grid, with the fix, the largest values are 69
# (CMKD), 17 (SpearmanCorrelation), 9 (DIST) and 0.07 (PearsonCorrelation);
# with the residue they were 2e3 to 3e7.
ZERO_HEAD_BOUND = 100.0


def zero_head_gradients(names, batch, classes, compiled):
    """`{name: gradient}` of each loss in `names` with respect to all-zero
    student logits, for a standard normal teacher of shape
    `(batch, classes)`; one XLA program for all of them when `compiled`
    (on backends that have XLA)."""
    losses = [ZERO_HEAD_LOSSES[name]() for name in names]
    rng = np.random.default_rng(1000 * batch + classes)
    t = rng.standard_normal((batch, classes)).astype("float32")
    gradients = [value_and_grad_fn(lambda b, loss=loss: loss(t, b))
                 for loss in losses]

    def run(b):
        return [g(b)[1][0] for g in gradients]

    if compiled:
        run = jit(run)
    grads = run(ops.zeros((batch, classes)))
    return dict(zip(names, evaluate(grads)))


def assert_zero_head_gradients_bounded(grads, batch, classes, mode):
    for name, grad in grads.items():
        grad = np.asarray(grad)
        where = f"{name}, B={batch}, C={classes}, {mode}"
        assert np.isfinite(grad).all(), where
        peak = batch * np.abs(grad).max()
        assert peak < ZERO_HEAD_BOUND, f"{where}: B * max|grad| = {peak:.3g}"


@pytest.mark.parametrize("classes", ZERO_HEAD_CLASSES)
def test_zero_head_gradients_bounded_eager(classes):
    # The whole grid for DIST and Pearson; the two rank losses (about ten
    # times slower per call, and per-sample: the batch size only adds rows)
    # at two batch sizes.
    # On JAX, where each eager op is an XLA program compiled for its
    # shape (several seconds per batch size here), DIST and Pearson at the
    # batch size where TensorFlow left the largest residue (8); the XLA
    # test below covers the other shapes and the rank losses.
    batches = ZERO_HEAD_BATCHES
    if BACKEND == "jax":
        batches = (8,)
    for batch in batches:
        names = ["DIST", "PearsonCorrelation(temperature=4)"]
        if batch in (13, 64) and BACKEND != "jax":
            names += ["SpearmanCorrelation", "CMKD"]
        grads = zero_head_gradients(names, batch, classes, compiled=False)
        assert_zero_head_gradients_bounded(grads, batch, classes, "eager")


# Each shape is an XLA compilation (about 1 s for DIST and Pearson, several
# for the rank losses on a 2-core CPU): every class count once, batch
# sizes from 1 to 64, and the rank losses at one of the shapes.
ZERO_HEAD_XLA_CASES = [
    (1, 3), (3, 7), (8, 10), (8, 12), (16, 16), (13, 17), (64, 100),
]


@pytest.mark.parametrize("batch, classes", ZERO_HEAD_XLA_CASES)
def test_zero_head_gradients_bounded_xla(batch, classes):
    names = ["DIST", "PearsonCorrelation(temperature=4)"]
    if (batch, classes) == (8, 10):
        names += ["SpearmanCorrelation", "CMKD"]
    grads = zero_head_gradients(names, batch, classes, compiled=True)
    assert_zero_head_gradients_bounded(grads, batch, classes, "XLA")


def test_correlation_counts_only_rounding_level_spread_as_constant():
    # The constant-row test is relative to the values and near rounding
    # level: a row of probabilities whose spread is 1e-4 of its values
    # (about 50 times the threshold at 12 classes) is still correlated as
    # it is, while the same row with a spread of one float32 step is 0.
    rng = np.random.default_rng(7)
    teacher = rng.normal(size=(1, C))
    base = np.full((1, C), 1.0 / C)
    direction = rng.normal(size=(1, C))
    direction -= direction.mean()
    small = (base + 1e-4 / C * direction).astype("float32")
    expected = scipy.stats.pearsonr(
        small[0].astype("float64"), teacher[0])[0]
    actual = pearson_correlation(small, teacher.astype("float32"))
    np.testing.assert_allclose(actual, [expected], rtol=1e-3)
    ulp = np.spacing(np.float32(1.0 / C))
    residue = (base + ulp * np.sign(direction)).astype("float32")
    np.testing.assert_allclose(
        pearson_correlation(residue, teacher.astype("float32")), [0.0],
        atol=1e-5)


@pytest.mark.parametrize("classes", [20, 300])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rank_losses_in_half_precision(dtype, classes):
    # Sums of squared rank deviations (~C^3 / 12) and their products pass
    # the float16 range (from C = 15 on): the rank terms must be computed
    # in float32 (float16 gave a loss of 1 with no gradient, or NaN).
    rng = np.random.default_rng(5)
    t = ops.cast(3.0 * rng.normal(size=(4, classes)), dtype)
    s = ops.cast(3.0 * rng.normal(size=(4, classes)), dtype)

    def as_float32(x):
        return to_numpy(ops.cast(x, "float32"))

    for loss in (spearman_loss, cmkd_loss):
        half = loss(t, s)
        _, (grad,) = value_and_grad_fn(lambda b: ops.sum(loss(t, b)))(s)
        assert keras.backend.standardize_dtype(half.dtype) == dtype
        assert keras.backend.standardize_dtype(grad.dtype) == dtype
        assert np.isfinite(as_float32(grad)).all()
        full = loss(ops.cast(t, "float32"), ops.cast(s, "float32"))
        np.testing.assert_allclose(as_float32(half), to_numpy(full),
                                   rtol=1e-2)
        # Identical inputs: the (near-zero) float32 value, not 1 or NaN.
        same = as_float32(loss(t, t))
        same_full = to_numpy(
            loss(ops.cast(t, "float32"), ops.cast(t, "float32")))
        assert np.all(same_full < 0.1)
        np.testing.assert_allclose(same, same_full, atol=1e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_value_losses_in_half_precision(dtype):
    # Per-class correlations across the batch sum squared deviations of
    # probabilities (~1e-7 at 100 classes), whose product underflows in
    # float16: DIST was NaN.
    rng = np.random.default_rng(6)
    t = ops.cast(3.0 * rng.normal(size=(8, 100)), dtype)
    s = ops.cast(3.0 * rng.normal(size=(8, 100)), dtype)
    for loss in (pearson_loss, dist_loss):
        half = loss(t, s, 4.0)
        assert keras.backend.standardize_dtype(half.dtype) == dtype
        full = loss(ops.cast(t, "float32"), ops.cast(s, "float32"), 4.0)
        np.testing.assert_allclose(to_numpy(ops.cast(half, "float32")),
                                   to_numpy(full), rtol=2e-2)


@pytest.mark.backends("tensorflow")  # only TF traces unknown sizes
def test_entropy_weights_with_a_dynamic_number_of_classes(logits):
    import tensorflow as tf

    t, _ = logits
    spec = [tf.TensorSpec([None, None], tf.float32)]
    fn = tf.function(lambda a: entropy_weights(a, 2.0), input_signature=spec)
    np.testing.assert_allclose(fn(t), np_entropy_weights(t, 2.0), rtol=1e-5)
    one_class = np.ones((3, 1), "float32")
    np.testing.assert_array_equal(fn(one_class), np.zeros(3))


# ------------------------------------------------------------ Keras contract


@pytest.mark.parametrize("loss", [
    PearsonCorrelation(temperature=2.5, name="pc"),
    SpearmanCorrelation(temperature=2.0, regularization_strength=0.05,
                        window=8, reduction="sum"),
    DIST(temperature=3.0, beta=0.5, gamma=2.0, dtype="float64"),
    CMKD(temperature=2.0, regularization_strength=0.2, window=4,
         hard_samples="pearson", standardize=True, intra_weight=0.5,
         name="cm", reduction="mean"),
])
def test_config_round_trip(logits, loss):
    t, s = logits
    config = loss.get_config()
    for clone in (loss.__class__.from_config(config),
                  keras.saving.deserialize_keras_object(
                      keras.saving.serialize_keras_object(loss))):
        assert type(clone) is type(loss)
        assert clone.get_config() == config
        assert clone.dtype == loss.dtype
        with float64_context(loss.dtype == "float64"):
            np.testing.assert_allclose(to_numpy(clone(t, s)),
                                       to_numpy(loss(t, s)), rtol=1e-6)


def test_reduction_and_dtype(logits):
    t, s = logits
    per = per_sample(DIST)(t, s)
    assert per.shape == (B,)
    np.testing.assert_allclose(float(DIST(reduction="sum")(t, s)),
                               float(np.sum(to_numpy(per))), rtol=1e-5)
    with float64_context():
        for cls in (DIST, CMKD):
            per = cls(dtype="float64", reduction=None)(t, s)
            assert keras.backend.standardize_dtype(per.dtype) == "float64"


@pytest.mark.xfail(
    BACKEND == "torch", strict=True,
    reason="Keras reduces float64 losses in float32 under torch (its "
    "result_type maps float64 to float32 off TensorFlow): "
    "keras.losses.MeanSquaredError(dtype='float64') is float32 there too")
def test_reduced_loss_has_the_loss_dtype(logits):
    t, s = logits
    with float64_context():
        for loss in (DIST(dtype="float64"), CMKD(dtype="float64")):
            assert keras.backend.standardize_dtype(
                loss(t, s).dtype) == "float64"


def test_invalid_arguments():
    with pytest.raises(ValueError, match="temperature"):
        PearsonCorrelation(temperature=0.0)
    with pytest.raises(ValueError, match="regularization_strength"):
        SpearmanCorrelation(regularization_strength=-1.0)
    with pytest.raises(ValueError, match="window"):
        SpearmanCorrelation(window=0)
    with pytest.raises(ValueError, match="gamma"):
        DIST(gamma=-1.0)
    with pytest.raises(ValueError, match="hard_samples"):
        CMKD(hard_samples="easy")
