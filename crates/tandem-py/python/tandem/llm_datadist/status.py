"""``LLMException`` and ``Status``, as the vendor's ``llm_datadist.status`` has them."""

from typing import Any

from tandem.llm_datadist.enums import LLMStatusCode


class LLMException(RuntimeError):
    """A failed LLM-DataDist call; ``status_code`` says why (an ``LLMStatusCode``)."""

    def __init__(self, *args: Any, status_code: LLMStatusCode = LLMStatusCode.LLM_SUCCESS) -> None:
        super().__init__(*args)
        self._status_code = status_code

    @property
    def status_code(self) -> LLMStatusCode:
        """The status code."""
        return self._status_code


class Status:
    """A status code with ``is_ok()``."""

    def __init__(self, status: LLMStatusCode) -> None:
        self._status = status

    def is_ok(self) -> bool:
        """Whether it is ``LLM_SUCCESS``."""
        return self._status == LLMStatusCode.LLM_SUCCESS

    @property
    def status_code(self) -> LLMStatusCode:
        """The status code."""
        return self._status
