"""Exceptions whose messages are meant for the user: what is wrong and how to fix it.

`UserError` subclasses are configuration or data problems: retrying cannot fix them, so the
orchestration layer never retries them. `TransientError` marks failures worth a retry.
"""


class UserError(Exception):
    """A problem the user must fix (bad config, bad data, missing input). Never retried."""


class ConfigError(UserError):
    """The configuration is invalid."""


class HubUnavailableError(UserError):
    """A model or dataset hub was asked for but cannot be reached (offline machine)."""


class ArtifactError(UserError):
    """Base for artifact-store problems that a retry cannot fix."""


class ArtifactNotCommittedError(ArtifactError):
    """The artifact folder has no manifest: it was never written or its writer was interrupted."""


class ArtifactCorruptError(ArtifactError):
    """A committed artifact's files do not match its manifest."""


class TransientError(Exception):
    """A failure that may succeed on retry (storage or network hiccup)."""
