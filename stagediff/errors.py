"""Errors that reach the user as one clear line."""


class StagediffError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class CorruptArtifact(StagediffError):
    """An artifact in the store does not parse, or does not match its key or checksum."""


class CorruptInput(CorruptArtifact):
    """A stage found an input artifact corrupt while consuming it (and noted it in the store): its
    producing stage must write it again before this stage can run."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # picklable across processes (Prefect results) with its path
        return (type(self), (str(self), self.path))


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
