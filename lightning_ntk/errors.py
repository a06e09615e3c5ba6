"""The library's own error types, by what went wrong rather than where: the callback and the gradient
engines route errors by these types. Each subclasses the built-in type it was raised as before, so
``except ValueError`` (or ``TypeError``) keeps catching it."""


class LabelError(ValueError):
    """The labels are refused: missing, not class indices, outside the network's classes, or of one class.
    The data's fault (fixed with other data or ``task=Task(labels=...)``), not the model's."""


class LogitsError(Exception):
    """The model's output holds no ``[batch, classes]`` floating logits: the model's (or the task's) fault,
    which no other way of computing gradients would fix."""


class LogitsShapeError(LogitsError, ValueError):
    """The logits are a tensor of the wrong shape or dtype."""


class LogitsTypeError(LogitsError, TypeError):
    """The logits, as the task reads them, are not a tensor, or are missing from the model's output."""
