"""On PyTorch every op is launched from Python, so work that loops over
elements in Python shows up as more launched ops for a larger batch. These
tests count the ATen ops that one forward and backward pass dispatches at
two batch sizes and ask for the same count: the work per op grows with the
batch, the number of ops does not.

They cover every distillation loss that `keras_kd.losses` exports (found by
walking its namespace, so a new loss is counted without a new test) and
every public function of the modules of `keras_kd.ops` (a function without
a case below fails `test_every_op_has_a_case`).

Besides the batch, each case is also counted with its other sizes doubled
(classes, vocabulary, time steps, spatial size, channels): none of these
functions should loop over them either. The exceptions are written next to
their cases: the soft ranks loop over the `window` neighbours they compare
(a fixed number, capped at `n - 1`, so every case uses rows longer than the
window), and a chunked divergence runs one piece per chunk of time steps.
"""

import importlib
import inspect
import pkgutil

import numpy as np
import pytest
from keras import ops

from backend_utils import count_aten_ops

import keras_kd.losses
import keras_kd.ops
from keras_kd.losses import CMKD
from keras_kd.losses import KD
from keras_kd.losses import ActivationMapping
from keras_kd.losses import AttentionTransfer
from keras_kd.losses import DistillationLoss
from keras_kd.losses import FeatureMSE
from keras_kd.losses import ForwardKL
from keras_kd.losses import GeneralizedJSD
from keras_kd.losses import SpearmanCorrelation
from keras_kd.losses import TokenDivergence
from keras_kd.losses import top_k_distribution
from keras_kd.ops import affine
from keras_kd.ops import correlation
from keras_kd.ops import divergences
from keras_kd.ops import energy
from keras_kd.ops import probabilities
from keras_kd.ops import rank
from keras_kd.ops import scatter
from keras_kd.ops import sort
from keras_kd.ops import topk
from keras_kd.ops import window

pytestmark = pytest.mark.backends("torch")

SMALL, LARGE = 4, 64
CLASSES = 40  # above the soft ranks' window of 16 and tie reach of 4


# ----------------------------------------------------------------- counting


def dispatched_ops(fn, *arrays):
    """How many ATen ops `fn(*tensors)` and its backward dispatch.

    `tensors` are made from `arrays` (NumPy) before counting; the float ones
    require gradients. The float results of `fn` (a tensor or a tuple of
    them) are summed and differentiated with respect to those tensors;
    results without a gradient (exact ranks, permutations, masks) are only
    computed. The call is made once before it is counted: one-time work,
    such as a workspace that a call allocates for the size it meets and
    later calls reuse (`keras_kd.ops.window`'s scratch table), is not a
    cost per call.
    """
    import torch

    tensors = [
        torch.tensor(a, requires_grad=np.issubdtype(a.dtype, np.floating))
        for a in map(np.asarray, arrays)
    ]
    wanted = [t for t in tensors if t.requires_grad]

    def run():
        results = fn(*tensors)
        if not isinstance(results, (tuple, list)):
            results = (results,)
        totals = [ops.sum(r) for r in results
                  if torch.is_tensor(r) and r.is_floating_point()]
        if totals and wanted:
            total = sum(totals[1:], totals[0])
            if total.requires_grad:
                torch.autograd.grad(total, wanted, allow_unused=True)

    run()
    return count_aten_ops(run)


def constant(array):
    """A tensor made before counting (teacher outputs, sample weights,
    permutations): what a training step gets as data."""
    return ops.convert_to_tensor(np.asarray(array))


def normal(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def assert_same_count(build, sizes):
    """`build(batch, scale)` returns `(fn, arrays)`; counts the ops of each
    `(batch, scale)` in `sizes` and asks for one count."""
    counts = {}
    for size in sizes:
        fn, arrays = build(*size)
        counts[size] = dispatched_ops(fn, *arrays)
    assert len(set(counts.values())) == 1, counts


# The batch alone, then the other sizes doubled too.
BATCH_AND_SIZE = [(SMALL, 1), (LARGE, 1), (SMALL, 2)]
BATCH_ONLY = [(SMALL, 1), (LARGE, 1)]


# ------------------------------------------------------------------- losses


def exported_losses():
    """Every `DistillationLoss` subclass in the `keras_kd.losses` namespace,
    by name."""
    return {
        name: value for name, value in sorted(vars(keras_kd.losses).items())
        if not name.startswith("_") and inspect.isclass(value)
        and issubclass(value, DistillationLoss)
        and value is not DistillationLoss
    }


def _abstract_reason(cls):
    if cls.call is DistillationLoss.call:
        return f"{cls.__name__} has no `call` of its own"
    if issubclass(cls, TokenDivergence) and (
            cls.divergence is TokenDivergence.divergence):
        return (f"{cls.__name__} is the base class of the token divergences "
                "(no `divergence` of its own); its subclasses are counted")
    return None


def logits_case(loss, weighted=False):
    """`loss` on `(batch, classes)` logits, optionally with one sample
    weight per sample (the batch statistics of DIST and CMKD read them)."""
    def build(batch, scale):
        classes = CLASSES * scale
        weights = np.linspace(0.0, 1.0, batch).astype("float32")
        weights = constant(weights) if weighted else None
        teacher = constant(normal(batch, classes, seed=1))
        return (lambda student: loss(teacher, student, sample_weight=weights),
                [normal(batch, classes, seed=2)])
    return build


def token_case(loss, weighted=True, time_scales=True, student_vocab=None):
    """`loss` on `(batch, time, vocab)` logits, with `(batch, time)` sample
    weights (zeros for padding) when `weighted`."""
    def build(batch, scale):
        time = 3 * (scale if time_scales else 1)
        vocab = 30 * scale
        s_vocab = vocab if student_vocab is None else student_vocab * scale
        weights = None
        if weighted:
            weights = constant(np.tile(
                (np.arange(time) < time - 1).astype("float32"), (batch, 1)))
        teacher = constant(normal(batch, time, vocab, seed=1))
        return (lambda student: loss(teacher, student, sample_weight=weights),
                [normal(batch, time, s_vocab, seed=2)])
    return build


def feature_case(loss, teacher_factor=1):
    """`loss` on `(batch, height, width, channels)` feature maps; the
    teacher's map is `teacher_factor` times as large spatially (pooled to
    the student's)."""
    def build(batch, scale):
        size, channels = 4 * scale, 3 * scale
        t_size = size * teacher_factor
        weights = constant(np.linspace(0.0, 1.0, batch).astype("float32"))
        teacher = constant(normal(batch, t_size, t_size, channels, seed=1))
        return (lambda student: loss(teacher, student, sample_weight=weights),
                [normal(batch, size, size, channels, seed=2)])
    return build


def default_case(cls):
    """The case of `cls()` for the kind of output it compares."""
    loss = cls()
    if isinstance(loss, TokenDivergence):
        return token_case(loss)
    if loss.reads_distribution:
        return logits_case(loss)
    return feature_case(loss)


def test_exported_losses_are_found():
    names = set(exported_losses())
    assert {"KD", "PearsonCorrelation", "SpearmanCorrelation", "DIST",
            "CMKD", "ForwardKL", "ReverseKL", "GeneralizedJSD", "SkewKL",
            "FeatureMSE", "AttentionTransfer",
            "ActivationMapping"} <= names, names


@pytest.mark.parametrize("name", sorted(exported_losses()))
def test_every_exported_loss(name):
    cls = exported_losses()[name]
    reason = _abstract_reason(cls)
    if reason:
        pytest.skip(reason)
    assert_same_count(default_case(cls), BATCH_AND_SIZE)


LOSS_VARIANTS = {
    # Other code paths of the same losses.
    "KD standardize": logits_case(KD(standardize=True)),
    "Spearman window=4": logits_case(SpearmanCorrelation(window=4)),
    "Spearman probabilities": logits_case(
        SpearmanCorrelation(from_logits=False)),
    "CMKD weighted intra_weight": logits_case(
        CMKD(intra_weight=0.5, hard_samples="pearson"), weighted=True),
    "DIST weighted": logits_case(keras_kd.losses.DIST(), weighted=True),
    "ForwardKL unweighted": token_case(ForwardKL(), weighted=False),
    "GeneralizedJSD beta=0": token_case(GeneralizedJSD(beta=0.0)),
    "ForwardKL truncate": token_case(
        ForwardKL(vocab_mapping="truncate"), student_vocab=25),
    # One piece per chunk of 2 time steps, on purpose: the time axis stays
    # fixed and only the batch and vocabulary grow.
    "ForwardKL chunk_size=2": token_case(
        ForwardKL(chunk_size=2), time_scales=False),
    "FeatureMSE pooled teacher": feature_case(FeatureMSE(), teacher_factor=2),
    "AttentionTransfer pooled teacher": feature_case(
        AttentionTransfer(), teacher_factor=2),
    "ActivationMapping avg minmax": feature_case(
        ActivationMapping(pooling="avg", normalize="minmax")),
}


@pytest.mark.parametrize("name", sorted(LOSS_VARIANTS))
def test_loss_variants(name):
    assert_same_count(LOSS_VARIANTS[name], BATCH_AND_SIZE)


@pytest.mark.parametrize("loss", [
    ForwardKL(), ForwardKL(temperature=2.0), GeneralizedJSD(beta=0.3),
    # One piece per chunk of 2 time steps (the time axis stays fixed).
    ForwardKL(chunk_size=2)], ids=["forward", "temperature", "jsd", "chunk"])
def test_top_k_teacher(loss):
    """A divergence read against a sparse (top-k) teacher: the student's
    k + 1 bins (`keras_kd.ops.topk.log_softmax_bins`, a
    `torch.autograd.Function` here), which must not loop either."""
    def build(batch, scale):
        vocab = 30 * scale
        teacher = top_k_distribution(normal(batch, 3, vocab, seed=1), 5,
                                     temperature=loss.temperature,
                                     dtype="float32")
        return (lambda student: loss(teacher, student),
                [normal(batch, 3, vocab, seed=2)])

    assert_same_count(build, BATCH_AND_SIZE)


# ---------------------------------------------------------------------- ops


def public_ops():
    """Every public function defined in a module of `keras_kd.ops`, as
    `module.function`."""
    found = set()
    for info in pkgutil.iter_modules(keras_kd.ops.__path__):
        module = importlib.import_module(f"keras_kd.ops.{info.name}")
        for name, value in vars(module).items():
            if (not name.startswith("_") and inspect.isfunction(value)
                    and value.__module__ == module.__name__):
                found.add(f"{info.name}.{name}")
    return found


def rows_case(fn, *, pairs=False):
    """`fn(x)` (or `fn(a, b)` with `pairs`) on `(batch, classes)` rows."""
    def build(batch, scale):
        classes = CLASSES * scale
        arrays = [normal(batch, classes, seed=1)]
        if pairs:
            arrays.append(normal(batch, classes, seed=2))
        return fn, arrays
    return build


def log_softmax_pair(fn):
    """`fn(log_p, log_q)` on two rows of log-probabilities."""
    def pair(a, b):
        return fn(ops.log_softmax(a, axis=-1), ops.log_softmax(b, axis=-1))
    return rows_case(pair, pairs=True)


def _masked_teacher(fn):
    """`fn(log_p_t, log_p_s)` with a teacher that gives 0 probability (a
    `-inf` logit) to one class in three."""
    def pair(a, b):
        columns = np.arange(a.shape[-1]) % 3 == 0
        mask = constant(columns)[None, :]
        masked = ops.where(mask, float("-inf"), a)
        return fn(ops.log_softmax(masked, axis=-1),
                  ops.log_softmax(b, axis=-1))
    return rows_case(pair, pairs=True)


def _ties(batch, scale):
    """Rows of three distinct values: every row has runs longer than the
    ranks' neighbour comparisons reach, so the general tie averaging runs
    (at both batch sizes)."""
    values = np.random.default_rng(3).integers(0, 3, (batch, CLASSES * scale))
    return rank.exact_rank, [values.astype("float32")]


def _affine(bias):
    def build(batch, scale):
        size, channels = 4 * scale, 3 * scale
        arrays = [normal(batch, size, size, channels, seed=1),
                  normal(channels, 8, seed=2)]
        if bias:
            arrays.append(normal(8, seed=3))
        return affine.channel_affine, arrays
    return build


def _channel_energy(batch, scale):
    size, channels = 4 * scale, 3 * scale
    return energy.channel_energy, [normal(batch, size, size, channels)]


def _weighted_pearson(batch, scale):
    weights = constant(np.linspace(0.0, 1.0, batch).astype("float32"))
    return ((lambda a, b: correlation.weighted_pearson_correlation(
        a, b, weights, axis=0)),
        [normal(batch, CLASSES * scale, seed=1),
         normal(batch, CLASSES * scale, seed=2)])


def _soft_rank_tensor_strength(batch, scale):
    """A tensor `regularization_strength`, which gets a gradient too."""
    return ((lambda x, strength: rank.soft_rank(x, strength)),
            [normal(batch, CLASSES * scale, seed=1),
             np.asarray(0.1, "float32")])


def _brackets_tensor_strength(batch, scale):
    return ((lambda x, strength: window.window_brackets(
        ops.sort(x, axis=-1), 1.0 / strength, 16)),
        [normal(batch, CLASSES * scale, seed=1), np.asarray(0.1, "float32")])


def _soft_rank_axis_0(batch, scale):
    """Ranks along the first axis of a `(classes, batch)` tensor."""
    return ((lambda x: rank.soft_rank(x, axis=0)),
            [normal(CLASSES * scale, batch, seed=1)])


def _by_permutation(fn):
    """`fn(values, permutation)`: `scatter_rows` and `gather_rows`."""
    def build(batch, scale):
        classes = CLASSES * scale
        order = np.argsort(normal(batch, classes, seed=2), axis=-1)
        permutation = constant(order.astype("int32"))
        return ((lambda v: fn(v, permutation)),
                [normal(batch, classes, seed=1)])
    return build


def _mark_columns(batch, scale):
    classes = CLASSES * scale
    indices = np.random.default_rng(4).integers(0, classes, (batch, 3, 5))
    marks = constant(indices.astype("int32"))
    return (lambda: scatter.mark_columns(marks, classes)), []


def _log_softmax_bins(temperature):
    def build(batch, scale):
        classes = CLASSES * scale
        order = np.argsort(normal(batch, classes, seed=2), axis=-1)
        indices = constant(order[:, :5].astype("int32"))
        return ((lambda x: topk.log_softmax_bins(x, indices, temperature)),
                [normal(batch, classes, seed=1)])
    return build


def _entropy(x):
    log_p = ops.log_softmax(x, axis=-1)
    return probabilities.normalized_entropy(ops.exp(log_p), log_p)


OP_CASES = [
    ("affine.channel_affine", "bias", _affine(bias=True)),
    ("affine.channel_affine", "no bias", _affine(bias=False)),
    ("correlation.pearson_correlation", "",
     rows_case(correlation.pearson_correlation, pairs=True)),
    ("correlation.weighted_pearson_correlation", "", _weighted_pearson),
    ("correlation.probability_correlation", "", rows_case(
        lambda a, b: correlation.probability_correlation(
            ops.softmax(a, axis=-1), ops.softmax(b, axis=-1)), pairs=True)),
    ("correlation.correlation_with_known_mean", "", rows_case(
        lambda a, b: correlation.correlation_with_known_mean(
            a - ops.mean(a, axis=-1, keepdims=True),
            b - ops.mean(b, axis=-1, keepdims=True), 0.0), pairs=True)),
    ("divergences.kl_divergence", "",
     log_softmax_pair(divergences.kl_divergence)),
    ("divergences.log_mixture", "", log_softmax_pair(
        lambda p, q: divergences.log_mixture(p, q, 0.3))),
    ("divergences.forward_kl", "", log_softmax_pair(divergences.forward_kl)),
    ("divergences.reverse_kl", "", log_softmax_pair(divergences.reverse_kl)),
    ("divergences.reverse_kl", "masked teacher",
     _masked_teacher(divergences.reverse_kl)),
    ("divergences.generalized_jsd", "beta=0.5",
     log_softmax_pair(divergences.generalized_jsd)),
    ("divergences.generalized_jsd", "beta=1", log_softmax_pair(
        lambda p, q: divergences.generalized_jsd(p, q, beta=1.0))),
    ("divergences.generalized_jsd", "not normalized", log_softmax_pair(
        lambda p, q: divergences.generalized_jsd(p, q, normalized=False))),
    ("divergences.skew_kl", "", log_softmax_pair(divergences.skew_kl)),
    ("divergences.skew_kl", "reverse", log_softmax_pair(
        lambda p, q: divergences.skew_kl(p, q, reverse=True))),
    ("probabilities.as_logits", "probabilities", rows_case(
        lambda x: probabilities.as_logits(ops.softmax(x, axis=-1),
                                          from_logits=False))),
    ("probabilities.as_logits", "logits",
     rows_case(probabilities.as_logits)),
    ("probabilities.softened", "", rows_case(
        lambda x: probabilities.softened(x, 2.0))),
    ("probabilities.normalized_entropy", "", rows_case(_entropy)),
    ("rank.exact_rank", "", rows_case(rank.exact_rank)),
    ("rank.exact_rank", "long ties", _ties),
    # The soft ranks run one group of elementwise ops per neighbour in the
    # window (16 by default, capped at n - 1): rows of CLASSES >= 17
    # entries keep that number fixed when the classes double.
    ("rank.soft_rank", "", rows_case(rank.soft_rank)),
    ("rank.soft_rank", "tensor strength", _soft_rank_tensor_strength),
    ("rank.soft_rank", "axis 0", _soft_rank_axis_0),
    ("rank.sorted_soft_rank", "", rows_case(rank.sorted_soft_rank)),
    ("rank.sort_and_soft_rank", "", rows_case(rank.sort_and_soft_rank)),
    ("rank.pairwise_soft_rank", "", rows_case(rank.pairwise_soft_rank)),
    ("window.window_brackets", "", rows_case(
        lambda x: window.window_brackets(ops.sort(x, axis=-1), 10.0, 16))),
    ("window.window_brackets", "tensor strength", _brackets_tensor_strength),
    ("scatter.scatter_rows", "", _by_permutation(scatter.scatter_rows)),
    ("scatter.mark_columns", "", _mark_columns),
    ("scatter.gather_rows", "", _by_permutation(scatter.gather_rows)),
    ("energy.channel_energy", "", _channel_energy),
    ("sort.argsort_rows", "", rows_case(sort.argsort_rows)),
    ("topk.log_softmax_bins", "", _log_softmax_bins(1.0)),
    ("topk.log_softmax_bins", "temperature", _log_softmax_bins(2.0)),
    ("sort.sort_rows", "", rows_case(sort.sort_rows)),
]


def test_every_op_has_a_case():
    covered = {name for name, _, _ in OP_CASES}
    assert public_ops() == covered, (
        f"without a case: {sorted(public_ops() - covered)}; "
        f"not public: {sorted(covered - public_ops())}")


@pytest.mark.parametrize(
    "build", [build for _, _, build in OP_CASES],
    ids=[f"{name} {label}".strip() for name, label, _ in OP_CASES])
def test_ops(build):
    assert_same_count(build, BATCH_AND_SIZE)
