"""On PyTorch every op is launched from Python, so work that loops over
elements in Python shows up as more launched ops for a larger batch. These
tests count the ATen ops that one forward and backward pass dispatches, at
two batch sizes, and ask for the same count: the work per op grows with
the batch, the number of ops does not."""

import numpy as np
import pytest
from keras import ops

from keras_kd.losses import CMKD
from keras_kd.losses import ForwardKL
from keras_kd.losses import SpearmanCorrelation
from keras_kd.losses import top_k_distribution
from keras_kd.ops.rank import exact_rank
from keras_kd.ops.rank import soft_rank
from keras_kd.ops.scatter import scatter_rows

pytestmark = pytest.mark.backends("torch")

SMALL, LARGE = 4, 64


def dispatched_ops(fn, *arrays):
    """How many ATen ops `fn(*tensors)` and its backward dispatch, for
    float32 tensors made from `arrays` that require gradients (a result
    without a gradient, such as exact ranks, is only computed)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    with Count() as count:
        total = ops.sum(fn(*tensors))
        if total.requires_grad:
            torch.autograd.grad(total, tensors, allow_unused=True)
    return count.calls


def logits(batch, classes=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, classes)).astype("float32")


def assert_batch_independent(make_fn, make_arrays):
    small = dispatched_ops(make_fn(SMALL), *make_arrays(SMALL))
    large = dispatched_ops(make_fn(LARGE), *make_arrays(LARGE))
    assert small == large, (small, large)


def test_scatter_rows():
    def arrays(batch):
        return (logits(batch),)

    def make_fn(batch):
        order = np.argsort(logits(batch, seed=1), axis=-1).astype("int32")
        return lambda v: scatter_rows(v, order)

    assert_batch_independent(make_fn, arrays)


@pytest.mark.parametrize("rank", [exact_rank, soft_rank])
def test_ranks(rank):
    assert_batch_independent(lambda batch: rank,
                             lambda batch: (logits(batch),))


@pytest.mark.parametrize("loss", [SpearmanCorrelation(), CMKD()],
                         ids=["spearman", "cmkd"])
def test_rank_losses(loss):
    assert_batch_independent(
        lambda batch: loss,
        lambda batch: (logits(batch, seed=2), logits(batch, seed=3)))


def test_top_k_divergence():
    def arrays(batch):
        rng = np.random.default_rng(batch)
        return (rng.normal(size=(batch, 3, 30)).astype("float32"),)

    def make_fn(batch):
        teacher = top_k_distribution(
            np.random.default_rng(0).normal(size=(batch, 3, 30)), 5,
            dtype="float32")
        return lambda student: ForwardKL()(teacher, student)

    assert_batch_independent(make_fn, arrays)
