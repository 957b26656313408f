"""Distillation losses: Keras `Loss` objects called as
`loss(teacher_output, student_output, sample_weight=None)`."""

from keras_kd.losses.activation_mapping import ActivationMapping
from keras_kd.losses.base import DistillationLoss
from keras_kd.losses.divergences import (
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewKL,
    TokenDivergence,
)
from keras_kd.losses.features import AttentionTransfer, FeatureMSE
from keras_kd.losses.logits import KD
from keras_kd.losses.cmkd import CMKD
from keras_kd.losses.correlation import PearsonCorrelation
from keras_kd.losses.correlation import SpearmanCorrelation
from keras_kd.losses.dist import DIST
from keras_kd.teachers.topk import TopKDistribution
from keras_kd.teachers.topk import top_k_distribution
