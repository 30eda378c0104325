class UsageError(Exception):
    """Bad user input: the message says what to fix."""
