"""The old home of the stream framing: now ``channel_data`` (RFC 8656 §12).

Kept importable for the shell until it imports ``channel_data``.
"""

from .channel_data import MAX_FRAME, Deframer, FramingError, frame_length

__all__ = ["MAX_FRAME", "Deframer", "FramingError", "frame_length"]
