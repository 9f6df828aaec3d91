"""Bad-input errors that speak the caller's language: API argument names or CLI flags.

One check serves both interfaces. :func:`bad_arg` raises a ``ValueError`` whose message names the
Python argument (``steps must be at most 1000``); the CLI prints :func:`for_cli` of it instead,
which names the flag (``--steps must be at most 1000``). :func:`with_cli` attaches a whole CLI
wording to any exception (``pass --overwrite`` for ``pass overwrite=True``).
"""


def flag(name: str) -> str:
    """The CLI flag of an API argument: ``flag("batch_size") == "--batch-size"``."""
    return "--" + name.replace("_", "-")


def bad_arg(name: str, text: str, *, cli: str | None = None, kind=ValueError) -> Exception:
    """An error about argument ``name``: ``text`` holds ``{}`` where the argument is named.

    ``cli`` is the flag when it is not ``flag(name)`` (``height`` is ``--size``).

    >>> err = bad_arg("steps", "{} must be at most 1000, got 5000")
    >>> str(err), for_cli(err)
    ('steps must be at most 1000, got 5000', '--steps must be at most 1000, got 5000')
    """
    return with_cli(kind(text.format(name)), text.format(cli or flag(name)))


def with_cli(err: Exception, cli_message: str) -> Exception:
    """``err``, carrying the message the command line shows in its place."""
    err.cli_message = cli_message
    return err


def for_cli(err: BaseException) -> str:
    """What the command line prints for ``err``: its CLI wording, else its message."""
    return getattr(err, "cli_message", None) or str(err)
