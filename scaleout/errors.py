"""The scale-out room's errors (the CLI turns them into one line, like the library's)."""


class ScaleOutError(Exception):
    """A scale-out engine could not run the work as asked."""


class EngineMissingError(ScaleOutError):
    """The engine asked for is not installed; the message names the extra to install."""
