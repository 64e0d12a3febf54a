class CamError(Exception):
    """A run failure with a one-line message that names the problem and the fix (exit code 1)."""
    exit_code = 1


class UsageError(CamError):
    """Bad arguments or inputs (exit code 2)."""
    exit_code = 2


def one_line(e: BaseException) -> str:
    """An unexpected exception as the one line the CLI and the server report."""
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'
