"""The Distiller's trainer on PyTorch: `torch.autograd`, as Keras' own torch
trainer.

The teachers (and the diagnostics) run under `torch.no_grad()`, so no graph
is recorded for them; the student's one forward pass and every loss are
recorded, and `backward()` fills the gradients of the trained variables.
"""

import keras
import torch

from keras_kd.trainers.base import DistillerTrainer


class TorchTrainer(DistillerTrainer):
    """`train_step(data)` and `test_step(data)` on PyTorch."""

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = self.distillation_step
        with torch.no_grad():
            teacher = step.teacher_outputs(x, augment=True)
        x_student = step.student_inputs(x, augment=True)
        routing = self._gradient_routing()
        if routing is not None:
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

    def test_step(self, data):
        with torch.no_grad():
            return self._stateful_test_step(data)
