"""Model definitions that distillation benchmarks use.

`keras_kd.models.cifar` holds the CIFAR-100 architectures of the
distillation literature and a loader for their PyTorch checkpoints.
"""
