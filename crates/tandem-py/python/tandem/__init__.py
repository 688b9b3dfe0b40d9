"""Tandem: an LLM inference engine in Rust, with DeepSpeed-MII's Python API.

``import tandem as mii`` is enough for code written for MII::

    import tandem as mii
    pipe = mii.pipeline("SmolLM2-135M-Instruct")
    print(pipe(["DeepSpeed is", "Seattle is"], max_new_tokens=32))

``tandem.llm_datadist`` (also importable as ``llm_datadist``) is LLM-DataDist's v2 API over
Tandem's KV-cache transfer library.
"""

from tandem import errors
from tandem._native import __version__
from tandem.api import MIIClient, MIIConfig, MIIPipeline, client, pipeline, serve
from tandem.errors import DeploymentNotFoundError, UnknownArgument, ValidationError
from tandem.response import GenerationFinishReason, Response

__all__ = [
    "__version__",
    "pipeline",
    "serve",
    "client",
    "MIIPipeline",
    "MIIClient",
    "MIIConfig",
    "Response",
    "GenerationFinishReason",
    "errors",
    "UnknownArgument",
    "DeploymentNotFoundError",
    "ValidationError",
]
