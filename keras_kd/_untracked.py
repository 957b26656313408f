"""One holder for Python objects that Keras must not track."""


class Untracked:
    """Holds Python objects as attributes that Keras' attribute tracking
    does not see (they hold layers or optimizers that are tracked
    elsewhere, or plain Python state).

    Example:

    >>> hidden = Untracked(teachers=[teacher])
    >>> hidden.teachers
    [teacher]
    """

    def __init__(self, **items):
        self.__dict__.update(items)
