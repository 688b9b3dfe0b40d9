"""MII's entry points (``mii.pipeline``, ``mii.serve``, ``mii.client``) over Tandem's engine and
server: ``import tandem as mii`` runs code written for MII."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

from tandem import _native
from tandem import config as _config
from tandem.errors import DeploymentNotFoundError
from tandem.response import GenerationFinishReason, Response

Prompts = Union[str, List[str]]

#: How long ``serve`` waits for a new deployment to come up (the first run fetches the model).
SERVE_START_TIMEOUT_S = 900.0


def _prompt_list(prompts: Prompts) -> List[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    raise TypeError("prompts must be a str or a list of str")


def _options(kwargs: Dict[str, Any]) -> str:
    # The Rust side parses and validates every option (the same parser as the REST route).
    return json.dumps(kwargs)


def _response(row: Any) -> Response:
    text, prompt_length, generated_length, finish = row
    return Response(text, int(prompt_length), int(generated_length), GenerationFinishReason(finish))


class MIIPipeline:
    """A non-persistent, in-process engine (``mii.pipeline``'s result)."""

    def __init__(self, model_config: Dict[str, Any], all_rank_output: bool = False) -> None:
        spec = _config.model_spec(model_config)
        tp = int(model_config.get("tensor_parallel", 1))
        if tp < 1:
            raise ValueError(f"tensor_parallel={tp}: must be at least 1")
        self.model_config = model_config
        self.all_rank_output = all_rank_output
        # With tensor_parallel=N, ranks 1..N-1 run as `python -m tandem tp-rank` processes.
        self._engine = _native.Pipeline(
            spec, _config.engine_args(model_config), tp, [sys.executable, "-m", "tandem"]
        )

    def __call__(self, prompts: Prompts, **generate_kwargs: Any) -> List[Response]:
        """Generates for every prompt (batched together); one ``Response`` per prompt, in order.

        Options are MII's (``max_new_tokens``, ``do_sample``, ``top_p``, ``top_k``,
        ``temperature``, ``stop``, ...); a bad one raises ``ValidationError`` naming it. The GIL
        is released while generating; Ctrl-C cancels the requests and raises.
        """
        rows = self._engine.generate(_prompt_list(prompts), _options(generate_kwargs))
        return [_response(r) for r in rows]

    def destroy(self) -> None:
        """Stops the engine and frees its memory; later calls raise ``RuntimeError``."""
        self._engine.destroy()

    @property
    def model_path(self) -> str:
        """The model file or directory this pipeline runs."""
        return self._engine.model_path


def pipeline(
    model_name_or_path: str = "",
    model_config: Optional[Dict[str, Any]] = None,
    all_rank_output: bool = False,
    **kwargs: Any,
) -> MIIPipeline:
    """``mii.pipeline``: loads a model (a GGUF file, an HF directory, or a known model name such
    as ``"SmolLM2-135M-Instruct"``, fetched on first use) into an in-process engine."""
    mc = _config.route_pipeline_kwargs(model_name_or_path, model_config, kwargs)
    return MIIPipeline(mc, all_rank_output)


@dataclass
class MIIConfig:
    """What a client knows of its deployment (``client.mii_config``)."""

    deployment_name: str
    model_name_or_path: str
    port_number: int
    enable_restful_api: bool
    restful_api_port: Optional[int]


class MIIClient:
    """A client of a persistent deployment (``mii.client`` / ``mii.serve``'s result)."""

    def __init__(self, name: str) -> None:
        self._client = _native.Client(name)
        http = self._client.http
        self.mii_config = MIIConfig(
            deployment_name=self._client.deployment_name,
            model_name_or_path=self._client.model,
            port_number=int(self._client.grpc.rsplit(":", 1)[1]),
            enable_restful_api=http is not None,
            restful_api_port=int(http.rsplit(":", 1)[1]) if http else None,
        )

    def generate(
        self,
        prompts: Prompts,
        streaming_fn: Optional[Callable[[List[Response]], None]] = None,
        **query_kwargs: Any,
    ) -> Optional[List[Response]]:
        """Generates on the deployment. With ``streaming_fn`` (one prompt only), calls it with
        ``[Response]`` for every chunk (``finish_reason`` ``"none"`` until the last) and
        returns None; otherwise returns one ``Response`` per prompt, in order."""
        prompt_list = _prompt_list(prompts)
        options = _options(query_kwargs)
        if streaming_fn is None:
            return [_response(r) for r in self._client.generate(prompt_list, options)]
        if len(prompt_list) != 1:
            raise RuntimeError("MII client streaming only supports a single prompt")

        def on_chunk(text: str, prompt_tokens: int, generated_tokens: int, finish: str) -> None:
            streaming_fn([_response((text, prompt_tokens, generated_tokens, finish))])

        self._client.generate_stream(prompt_list[0], options, on_chunk)
        return None

    def __call__(self, prompts: Prompts, **query_kwargs: Any) -> Optional[List[Response]]:
        return self.generate(prompts, **query_kwargs)

    def terminate_server(self) -> None:
        """Stops the whole deployment (every replica and front end) and waits until it is gone."""
        self._client.terminate()


def client(model_or_deployment_name: str) -> MIIClient:
    """``mii.client``: connects to a running deployment by deployment name, or by model name
    (its default ``<model>-mii-deployment``); ``DeploymentNotFoundError`` if none runs."""
    return MIIClient(model_or_deployment_name)


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def serve(
    model_name_or_path: str = "",
    model_config: Optional[Dict[str, Any]] = None,
    mii_config: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> MIIClient:
    """``mii.serve``: starts a persistent deployment (``tandem serve``: MII's gRPC, and with
    ``enable_restful_api=True`` REST and OpenAI routes) that outlives this process until
    ``terminate_server()``; returns its client. Its log is
    ``$TANDEM_HOME/deployments/<name>.log``."""
    mc, mii = _config.route_serve_kwargs(model_name_or_path, model_config, mii_config, kwargs)
    args = _config.serve_args(mc, mii)
    name = mii.get("deployment_name") or _native.default_deployment_name(_config.model_spec(mc))
    log_dir = os.path.join(_native.tandem_home(), "deployments")
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    # Reap the server when it stops while this process lives (no zombie); it outlives us.
    threading.Thread(target=proc.wait, name=f"tandem-serve-{proc.pid}", daemon=True).start()
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while True:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"tandem serve exited with code {code}:\n{_log_tail(log_path)}")
        try:
            _, _, pid, _, _ = _native.find_deployment(name)
            if pid == proc.pid:
                return MIIClient(name)
        except DeploymentNotFoundError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"deployment {name!r} did not start within {SERVE_START_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}")
        time.sleep(0.1)
