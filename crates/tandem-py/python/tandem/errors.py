"""The exceptions of MII's API (``mii.errors``), plus the validation error of generate options."""


class UnknownArgument(Exception):
    """A keyword argument that names no ``ModelConfig`` (or, for ``serve``, ``MIIConfig``) field."""


class DeploymentNotFoundError(Exception):
    """``client(name)`` found no running deployment by that deployment or model name."""


class ValidationError(ValueError):
    """A generate option or prompt that does not validate; the message names the option."""
