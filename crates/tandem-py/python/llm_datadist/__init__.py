"""``llm_datadist``: the vendor's package name for Tandem's LLM-DataDist API, so code written for
it imports unchanged. Everything lives in ``tandem.llm_datadist``."""

from tandem.llm_datadist import *  # noqa: F401,F403
from tandem.llm_datadist import __all__  # noqa: F401
