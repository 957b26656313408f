"""How a feature changes the way a training step trains.

Two features do more than add a loss. LAKD local modules train each module
of the student by its own gradient, and layer-wise learning rates give each
paired layer its own learning rate. Each plugs into the backend trainers
(`keras_kd.trainers`) through one of the two small interfaces below; a
trainer calls only these methods, and the feature never reads the
distiller's own attributes. The `Distiller` hands every optimizer that
`compile` sets to `wrap_optimizer`, and trains with the optimizer it
returns.

A `Distiller` holds at most one extension, `distiller.training_extension`.
"""


class TrainingExtension:
    """The part every extension has.

    Every backend trainer (TensorFlow, JAX, PyTorch) implements both
    interfaces.

    Attributes:
        argument: the `Distiller` argument that enables the feature, for
            error messages.
    """

    argument: str | None = None

    def wrap_optimizer(self, optimizer):
        """The optimizer the distiller trains with, given the one Keras'
        `compile` sets (`distiller.optimizer = optimizer`); by default
        `optimizer` itself.

        Keras may set the optimizer twice in one `compile` (the second time
        inside a `LossScaleOptimizer` under `"mixed_float16"`), so a wrapped
        optimizer must come back unchanged.

        Args:
            optimizer: a `keras.optimizers.Optimizer`, or `None`.
        """
        return optimizer

    def logs(self):
        """Values to add to the training logs of a step."""
        return {}


class GradientRouting(TrainingExtension):
    """One gradient for the whole student, routed by the optimizer that
    `wrap_optimizer` returns (layer-wise learning rates: a
    `keras_kd.LayerwiseOptimizer`).

    A training step calls `refresh` and then `before_step` on the batch,
    differentiates the total loss once, and applies the gradients with
    `distiller.optimizer` as any Keras model does.

    `refresh` may run as a program of its own, before the step's: under
    `jit` the JAX trainer decides on the host, with `refresh_due`, which
    steps refresh, and runs a compiled refresh on those steps only, so
    that a costly refresh is not part of every step's program.
    """

    def refresh_due(self, iteration):
        """Whether the step at `iteration` refreshes: a Python bool for a
        Python int (the JAX trainer asks on the host), a boolean tensor
        for a tensor. By default never.

        Args:
            iteration: the compiled optimizer's iteration count.
        """
        return False

    def refresh(self, x, iteration, due=None):
        """Updates the extension's own state from the batch `x` on the
        steps where `refresh_due(iteration)` (for example re-estimates
        statistics). It reads the distiller's variables and may assign the
        distiller's non-trainable variables; it must not assign the
        optimizer's.

        Args:
            x: the batch of inputs.
            iteration: the compiled optimizer's iteration count.
            due: `None` to decide inside the compiled step; `True` or
                `False` when the trainer has decided (on the host).
        """

    def before_step(self, x, iteration):
        """Sets the optimizer's state for this step from the extension's
        state, after `refresh` and before the loss is computed. It may
        assign the distiller's variables and the optimizer's (the JAX
        trainer maps both).

        Args:
            x: the batch of inputs.
            iteration: the compiled optimizer's iteration count.
        """


class ModuleChain(TrainingExtension):
    """The student trained as a chain of modules, each by its own loss and
    its own gradient (LAKD local modules).

    For each module `k` in turn a training step: advances the teacher
    stream to `k`, runs `module_losses(k, ...)` on the previous module's
    output with its gradient stopped, differentiates that loss with respect
    to `module_variables(k)` only, and (on backends that can) releases the
    module's activations before module `k + 1` starts. The gradients of all
    modules are applied in one optimizer call at the end.

    Attributes:
        num_modules: the number of modules.
        loss_names: names of the extra losses the modules log, each as
            `<name>_loss` (their values appear in `StepLosses.terms`).
    """

    num_modules = 0
    loss_names = ()

    def module_variables(self, k):
        """The trainable variables module `k` (0-based) updates."""
        raise NotImplementedError

    def teacher_stream(self, x, sequence=None, augment=False):
        """The teachers' outputs for the batch `x`, computed as the modules
        need them.

        Args:
            x: the batch of inputs.
            sequence: `sequence(value, after)` returns `value` computed no
                earlier than the tensors in `after` (a backend trainer's
                ordering primitive); `None` for dataflow order.
            augment: whether the teachers see their augmentations (training
                steps).

        Returns:
            An object whose `advance(k, after)` computes what module `k`
            needs and returns the tensors it computed.
        """
        raise NotImplementedError

    def diagnostic_inputs(self, stream, y_pred, features):
        """After the last module: `(TeacherOutputs, StudentForward)` for
        the diagnostics, from the stream, the last output and the merged
        `diagnostic_features` of the modules."""
        raise NotImplementedError

    def module_losses(self, k, inputs, y, sample_weight, stream, training):
        """Runs module `k` on `inputs` and assembles its loss.

        Returns:
            `(output, losses, diagnostic_features)`: the module's output,
            its `StepLosses`, and `{layer name: feature}` for the
            diagnostics.
        """
        raise NotImplementedError
