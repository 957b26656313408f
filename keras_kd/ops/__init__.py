"""Backend-agnostic tensor operations used by keras-kd losses."""

from keras_kd.ops.rank import exact_rank
from keras_kd.ops.rank import pairwise_soft_rank
from keras_kd.ops.rank import soft_rank
from keras_kd.ops.rank import sort_and_soft_rank
from keras_kd.ops.rank import sorted_soft_rank
