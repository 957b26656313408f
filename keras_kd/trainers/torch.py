"""The Distiller's trainer on PyTorch: `torch.autograd`, as Keras' own torch
trainer.

The teachers (and the diagnostics) run under `torch.no_grad()`, so no graph
is recorded for them; the student's one forward pass and every loss are
recorded, and `backward()` fills the gradients of the trained variables.
"""

import keras
import torch

from keras_kd.batches import unpack
from keras_kd.trainers.base import DistillerTrainer


class TorchTrainer(DistillerTrainer):
    """`train_step(data)` and `test_step(data)` on PyTorch."""

    def train_step(self, data):
        if self._module_chain() is not None:
            return self._train_modules(data)
        x, y, sample_weight = unpack(data)
        step = self.distillation_step
        with torch.no_grad():
            teacher = step.teacher_outputs(x, augment=True)
        x_student = step.student_inputs(x, augment=True)
        routing = self._gradient_routing()
        if routing is not None:
            routing.refresh(x, self.optimizer.iterations)
            routing.before_step(x, self.optimizer.iterations)
        # Clear the gradients left by the previous step.
        self.zero_grad()
        outcome = step(x_student, y, sample_weight, teacher, training=True)
        variables = self.trainable_variables
        if variables:
            self.optimizer.scale_loss(outcome.losses.total).backward()
        with torch.no_grad():
            logs = self._record(x, y, sample_weight,
                                outcome.student.outputs, outcome.losses,
                                teacher, outcome.student)
            self._apply_gradients([v.value.grad for v in variables],
                                  variables)
        return logs

    def _train_modules(self, data):
        """Local modules: each module's loss differentiated with
        `torch.autograd.grad` over its own variables, on the previous
        module's output detached; the module's graph is freed before the
        next module runs. One optimizer update at the end."""
        chain = self._module_chain()

        def differentiate(k, run):
            module = run()
            values = [v.value for v in chain.module_variables(k)]
            loss = self.optimizer.scale_loss(module.losses.total)
            if loss.requires_grad:
                # A variable the module's loss does not reach (a term of
                # weight 0 with an adapter) gets a zero gradient, as on
                # TensorFlow and JAX.
                gradients = torch.autograd.grad(
                    loss, values, allow_unused=True, materialize_grads=True)
            else:  # no part of the module's loss has a weight
                gradients = [torch.zeros_like(v) for v in values]
            # Without their graphs, the module's activations are freed.
            return _detached(module), list(gradients)

        run = self._modules_forward(data, training=True,
                                    differentiate=differentiate)
        with torch.no_grad():
            logs = self._record_modules(run)
            variables = self.trainable_variables
            self._apply_gradients(
                [run.gradients[id(v)] for v in variables], variables)
        return logs

    def test_step(self, data):
        with torch.no_grad():
            return self._stateful_test_step(data)


def _detached(structure):
    """Every tensor of `structure` without its graph."""
    return keras.tree.map_structure(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
        structure)
