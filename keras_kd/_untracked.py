"""One holder for Python objects that Keras must not track."""

from typing import TYPE_CHECKING, Any


class Untracked:
    """Holds Python objects as attributes that Keras' attribute tracking
    does not see (they hold layers or optimizers that are tracked
    elsewhere, or plain Python state).

    Example:

    >>> hidden = Untracked(teachers=[teacher])
    >>> hidden.teachers
    [teacher]
    """

    def __init__(self, **items: Any) -> None:
        self.__dict__.update(items)

    if TYPE_CHECKING:  # its attributes are whatever it was given
        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...
