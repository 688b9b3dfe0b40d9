"""Shared fixtures: one pipeline on the default model for the module, deployments that are
always terminated, and unique deployment names."""

import os
import shutil
import tempfile
import uuid
from typing import Iterator, List

import pytest

import tandem
from tandem import _native

MODEL = "SmolLM2-135M-Instruct"
# A model whose own chat template carries tool branches (Hermes-style <tool_call> blocks).
QWEN = "Qwen2.5-Coder-0.5B-Instruct"


def _private_home() -> None:
    """Deployments and their logs go to a Tandem home of the test run's own; models are shared
    with the user's home (fetched there once)."""
    models = os.path.join(_native.tandem_home(), "models")
    os.makedirs(models, exist_ok=True)
    home = tempfile.mkdtemp(prefix="tandem-pytest-")
    os.symlink(models, os.path.join(home, "models"))
    os.environ["TANDEM_HOME"] = home


_private_home()


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(os.environ["TANDEM_HOME"], ignore_errors=True)


@pytest.fixture(scope="module")
def pipe() -> Iterator[tandem.MIIPipeline]:
    p = tandem.pipeline(MODEL, max_length=512)
    yield p
    p.destroy()


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Deployments:
    """Starts deployments on free ports and terminates whatever is left at the end."""

    def __init__(self) -> None:
        self.clients: List[tandem.MIIClient] = []

    def serve(self, model: str = MODEL, **kwargs) -> tandem.MIIClient:
        kwargs.setdefault("deployment_name", unique_name("pytest"))
        kwargs.setdefault("port_number", 0)
        if kwargs.get("enable_restful_api"):
            kwargs.setdefault("restful_api_port", 0)
        client = tandem.serve(model, **kwargs)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for c in self.clients:
            try:
                c.terminate_server()
            except Exception:
                pass


@pytest.fixture
def deployments() -> Iterator[Deployments]:
    d = Deployments()
    yield d
    d.close()
