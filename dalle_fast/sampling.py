"""On-device token sampling: :mod:`dalle_fast.ops.sampling`, also importable from here."""

from .ops.sampling import SAMPLE_BACKENDS, _resolve, check_error_flags, sample  # noqa: F401

__all__ = ["sample", "check_error_flags"]
