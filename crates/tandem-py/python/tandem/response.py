"""MII's ``Response`` and ``GenerationFinishReason`` (``mii.batching.data_classes``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict


class GenerationFinishReason(str, Enum):
    """Why generation ended: EOS or a stop string, a length cap, or not yet (streaming)."""

    STOP = "stop"
    LENGTH = "length"
    NONE = "none"


@dataclass
class Response:
    """One prompt's result. ``str()`` and ``repr()`` give the text, as in MII."""

    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: GenerationFinishReason

    def __str__(self) -> str:
        return self.generated_text

    def __repr__(self) -> str:
        return self.generated_text

    def to_msg_dict(self) -> Dict[str, Any]:
        """The REST payload of this response (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)
