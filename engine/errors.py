"""The one error type for bad user input. A leaf module: it imports nothing of ours, so
every other module may import it without forming an import circle."""


class ConfigError(Exception):
    """Bad user input, reported as `<source>: <key>: <message>`; main.py prints it as one
    line and exits with status 2."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
