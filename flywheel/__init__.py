"""cifar_distill's reusable machinery: the parts a user keeps when swapping CIFAR for their own data.

Each module is one concept; ARCHITECTURE.md (at the repository root) maps them and the files the steps
exchange.

The package raises its own exceptions; cifar_distill.py alone turns them into messages and exit codes.
"""


class FlywheelError(RuntimeError):
    """A problem the user fixes (missing input, bad data, a run folder in use); the message names the fix."""
