"""Errors that reach the user as one clear line."""


class StagediffError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class CorruptArtifact(StagediffError):
    """An artifact in the store does not parse, or does not match its key or checksum."""
