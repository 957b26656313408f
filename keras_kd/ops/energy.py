"""`channel_energy(feature)`: the mean of the squared activations over the
channel (last) axis, `mean_c F^2`: the spatial attention map of attention
transfer with `p = 2`, before its normalisation.

Feature maps are the largest tensors of a distillation step (a batch of
64 maps of 32 x 32 x 64 is 16 MiB), so on an eager backend every pass over
one costs more than the rest of the loss. On TensorFlow and JAX this is
`mean(square(F), axis=-1)`, which XLA fuses into one pass each way. On
PyTorch, where each op is its own pass, it is one `torch.autograd.Function`:
forward, one `torch.linalg.vector_norm` over the channels (no squared copy
of the map), squared; backward, `F * (2 g / C)`, one pass. Keras' form
differentiated by autograd takes two passes forward (the square, the mean)
and three backward.
"""

from __future__ import annotations

import functools

import keras
from keras import ops

from keras_kd._typing import Tensor


def channel_energy(feature: Tensor) -> Tensor:
    """`mean(square(feature), axis=-1)`, differentiable.

    Args:
        feature: float tensor of shape `(..., channels)`.

    Returns:
        A tensor of shape `feature.shape[:-1]` and the dtype of `feature`.

    Example:

    >>> np.asarray(channel_energy(np.array([[3.0, 4.0], [1.0, 1.0]])))
    array([12.5,  1. ])
    """
    if keras.backend.backend() == "torch":
        import torch

        return _torch_function().apply(torch.as_tensor(feature))
    return ops.mean(ops.square(feature), axis=-1)


@functools.lru_cache(maxsize=None)
def _torch_function():
    import torch

    class ChannelEnergy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, feature):
            ctx.save_for_backward(feature)
            channels = feature.shape[-1]
            norms = torch.linalg.vector_norm(feature, dim=-1)
            return norms.square_().div_(channels)

        @staticmethod
        def backward(ctx, upstream):
            (feature,) = ctx.saved_tensors
            scale = upstream * (2.0 / feature.shape[-1])
            return feature * scale.unsqueeze(-1).to(feature.dtype)

    return ChannelEnergy
