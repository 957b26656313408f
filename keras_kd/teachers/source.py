"""The interface a step asks for the teachers' outputs.

Two sources implement it: the live teachers (`keras_kd.teachers.Teachers`,
which run the frozen models) and a teacher cache's reader
(`keras_kd.cache.reader.CacheReader`, which reads the outputs a batch
carries). A step asks its sources in order and uses the first answer.
"""

from typing import Protocol


class TeacherSource(Protocol):
    """Gives the teachers' outputs for a batch.

    Example:

    >>> for source in (cache_reader, live_teachers):
    ...     outputs = source.outputs(x, augment=True)
    ...     if outputs is not None:
    ...         break
    """

    def outputs(self, x, augment=False):
        """The `keras_kd.teachers.TeacherOutputs` for the batch `x`, in
        inference mode and with their gradients stopped, or `None` when
        this source has nothing for `x` (a cache reader, for a batch that
        carries no cache).

        Args:
            x: the batch of inputs.
            augment: whether the teachers see their augmentations
                (training steps).
        """
