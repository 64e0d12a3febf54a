class CamError(Exception):
    """A run failure with a one-line message that names the problem and the fix (exit code 1)."""
    exit_code = 1


class UsageError(CamError):
    """Bad arguments or inputs (exit code 2)."""
    exit_code = 2
