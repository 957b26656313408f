"""Small helpers for the data a cache is built on or paired with."""

import numpy as np


def unpack_x(element):
    if isinstance(element, (tuple, list)):
        return element[0] if element else None
    return element



def is_tf_dataset(x):
    return (type(x).__module__.startswith("tensorflow")
            and hasattr(x, "element_spec"))


def as_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.asarray(value)

