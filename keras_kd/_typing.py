"""Type aliases of the public API's annotations.

Keras has no tensor type of its own: a tensor is the backend's
(`tf.Tensor`, `jax.Array`, `torch.Tensor`), a NumPy array or a symbolic
`keras.KerasTensor`, and every `keras.ops` function takes any of them.
Keras ships no type information, so a type checker sees `keras.Model` and
the other Keras classes as `Any`.
"""

from typing import Any, Callable

# A backend tensor, a NumPy array or a `keras.KerasTensor`.
Tensor = Any
# A static shape, as Keras gives it: `None` for an unknown dimension.
Shape = tuple[int | None, ...]
# What `get_config` returns and `from_config` takes.
Config = dict[str, Any]
# A Keras layer, or any callable that maps a batch of inputs to a batch.
Augmentation = Callable[..., Any]
