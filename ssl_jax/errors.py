"""Errors a user can fix, told apart from crashes.

A `UserError` is a mistake in what was asked (an unknown config key or dataset,
a dataset not prepared yet, a batch that does not split over the devices, a
workdir without a run, ...): its message names the problem and the fix, and
the command-line entry points print it as one line and exit with status 2,
without a Python traceback (ssl_jax/cli.py). Anything else is a crash and keeps
its traceback. It is a ValueError so that code catching ValueError still works;
an error that was another built-in before keeps that as a second base
(config.NoRunError and checkpoint.NoCheckpointError are FileNotFoundErrors too).
"""


class UserError(ValueError):
    """A mistake in the command, the config or the data on disk; the message says the fix."""
