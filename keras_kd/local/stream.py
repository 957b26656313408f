"""The teachers' outputs for one batch of LAKD local modules, computed
as the student's modules need them."""

import keras
from keras import ops

from keras_kd.teachers import TeacherOutputs


class TeacherStream:
    """The teachers' outputs for one batch, in inference mode and without
    gradient, computed as the student's modules need them.

    With teacher segments, segment `j` (input to `teacher_layers[0]`, ...,
    last split to the output) runs only when a module first needs it, so
    that the teacher's activations and later features are not held while
    earlier modules train; the last segment is skipped when no term reads
    the teacher's output. Otherwise every teacher runs whole, once, when the
    first module needs it.

    Attributes:
        local: `{k: teacher feature aligned to module k}` (a list, one per
            teacher that has the layer, with several teachers).
        out: the teachers' final output (when computed), combined as the
            distiller's `ensemble` mode says.
        terms: `{term index: teacher feature read by that term}`.
        teacher_outputs: the `TeacherOutputs` for the diagnostics (after
            the last module).
    """

    def __init__(self, plan, x, sequence=None, augment=False):
        self.plan = plan
        self.local, self.terms, self.out = {}, {}, None
        self.teacher_outputs = None
        self._next, self._h, self._augment = 0, x, augment
        self._sequence = sequence or (lambda value, after: value)

    def advance(self, k, after=()):
        """Computes what module `k` needs, each new piece only once the
        tensors in `after` exist. Returns the tensors computed."""
        plan = self.plan
        if plan.teacher_segments is None:
            if self._next > 0:
                return []
            self._next = plan.num_modules
            teacher = plan.teachers(self._sequence(self._h, after),
                                    training=False, augment=self._augment)
            n = plan.n_splits
            self.out = teacher.outputs
            self.local = dict(enumerate(teacher.features[:n]))
            self.terms = {i: teacher.features[slot]
                          for i, slot in plan._feature_slot.items()}
            self.teacher_outputs = teacher
            return keras.tree.flatten(teacher)
        if self._next == 0 and self._augment:
            # One teacher: its augmentation, applied before the first
            # segment.
            self._h = plan.teachers.augment(self._h)
        computed = []
        while self._next <= plan.teacher_need[k]:
            j = self._next
            end, feats = plan.teacher_segments[j](
                self._sequence(self._h, after), training=False)
            end, feats = keras.tree.map_structure(
                ops.stop_gradient, (end, list(feats)))
            if j < plan.n_splits:
                self.local[j] = self._h = end
            else:
                self.out = end
            self.terms.update(zip(plan.segment_terms[j], feats))
            computed.extend(keras.tree.flatten((end, feats)))
            self._next += 1
        if k == plan.n_splits:
            self.teacher_outputs = TeacherOutputs(self.out, [], self.out,
                                                  [[]])
        return computed
