"""`channel_affine`: `x @ kernel + bias` on the last axis of a feature map,
written for the speed of XLA on CPU.

The channel adapters of the feature losses (`keras_kd.adapters`) apply it
to whole feature maps, for example 128 x 32 x 32 positions of 16 channels.
`benchmarks/adapter_affine.py` times the forward and backward pass of one
adapter at that size (16 to 64 channels); on a 2-core CPU it showed two
slow paths (figures in `benchmarks/RESULTS_lakd.md`):

- JAX compiled a `matmul` of a 4-D input with a 2-D kernel about 4x slower
  than the same product on the input flattened to `(positions, channels)`
  (109 ms against 25 ms). Every backend therefore multiplies the flattened
  input.
- TensorFlow's XLA took about twice as long for the bias gradient (a sum
  over all positions of the output's gradient) as for the matrix products:
  52 ms with `+ bias`, 16 ms without it. On
  TensorFlow the bias is therefore appended to the kernel as one more row,
  and the input gets one more channel of ones: `[x, 1] @ [kernel; bias]` is
  the same affine map, and its bias gradient is part of the kernel's
  matrix product (18 ms). JAX and PyTorch add the bias directly, which was
  already fast there.
"""

import keras
from keras import ops


def channel_affine(x, kernel, bias=None):
    """`x @ kernel + bias` on the last axis of `x`.

    Args:
        x: tensor of shape `(..., in_channels)`.
        kernel: tensor of shape `(in_channels, out_channels)`.
        bias: `None`, or a tensor of shape `(out_channels,)`.

    Returns:
        A tensor of shape `(..., out_channels)`.

    Example:

    >>> y = channel_affine(np.ones((2, 4, 4, 3), "float32"),
    ...                    np.ones((3, 8), "float32"),
    ...                    np.zeros((8,), "float32"))
    >>> tuple(y.shape)
    (2, 4, 4, 8)
    """
    shape = ops.shape(x)
    units = kernel.shape[-1]
    rows = ops.reshape(x, (-1, shape[-1]))
    if bias is None:
        y = ops.matmul(rows, kernel)
    elif keras.backend.backend() == "tensorflow":
        ones = ops.ones((ops.shape(rows)[0], 1), dtype=rows.dtype)
        y = ops.matmul(ops.concatenate([rows, ones], axis=-1),
                       ops.concatenate([kernel, bias[None, :]], axis=0))
    else:
        y = ops.matmul(rows, kernel) + bias
    return ops.reshape(y, tuple(shape[:-1]) + (units,))
