"""MII's ``ModelConfig`` / ``MIIConfig`` keyword routing, and their translation into the
``tandem`` command's flags (which the Rust side parses and validates).

Fields that only make sense for DeepSpeed on GPUs (``torch_dist_port``, ``zmq_port_number``,
``replica_configs``, ``sync_debug``, ``profile_model_time``, ``restful_processes``,
``hostfile``, ``version``, ``instance_type``) are accepted and have no effect.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from tandem.errors import UnknownArgument

#: ``mii.config.ModelConfig`` fields.
MODEL_CONFIG_FIELDS = (
    "model_name_or_path",
    "tokenizer",
    "task",
    "tensor_parallel",
    "quantization_mode",
    "inference_engine_config",
    "torch_dist_port",
    "zmq_port_number",
    "replica_num",
    "replica_configs",
    "device_map",
    "max_length",
    "sync_debug",
    "profile_model_time",
)

#: ``mii.config.MIIConfig`` fields.
MII_CONFIG_FIELDS = (
    "deployment_name",
    "deployment_type",
    "model_config",
    "model_conf",
    "port_number",
    "enable_restful_api",
    "restful_api_host",
    "restful_api_port",
    "restful_processes",
    "hostfile",
    "version",
    "instance_type",
)

#: ``inference_engine_config`` keys: Tandem's engine flags, and DeepSpeed's ``state_manager``.
ENGINE_KEYS = {
    "max_batch_tokens": "--max-batch-tokens",
    "max_batch_seqs": "--max-batch-seqs",
    "block_size": "--block-size",
    "num_blocks": "--num-blocks",
    "kv_memory_fraction": "--kv-memory-fraction",
    "kv_dtype": "--kv-dtype",
}
STATE_MANAGER_KEYS = {
    "max_ragged_batch_size": "--max-batch-tokens",
    "max_ragged_sequence_count": "--max-batch-seqs",
    "max_context": "--max-length",
    "max_tracked_sequences": None,
}


def _merge(kind: str, target: Dict[str, Any], key: str, value: Any) -> None:
    if key in target and target[key] != value:
        raise ValueError(f"{key} is given twice with different values ({target[key]!r} in {kind}, {value!r} as a keyword)")
    target[key] = value


def route_pipeline_kwargs(
    model_name_or_path: str, model_config: Optional[Dict[str, Any]], kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """``mii.pipeline``'s routing: every keyword must name a ``ModelConfig`` field."""
    mc = dict(model_config or {})
    for key, value in kwargs.items():
        if key not in MODEL_CONFIG_FIELDS:
            raise UnknownArgument(f"Keyword argument {key} not recognized")
        _merge("model_config", mc, key, value)
    if model_name_or_path:
        _merge("model_config", mc, "model_name_or_path", model_name_or_path)
    return mc


def route_serve_kwargs(
    model_name_or_path: str,
    model_config: Optional[Dict[str, Any]],
    mii_config: Optional[Dict[str, Any]],
    kwargs: Dict[str, Any],
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``mii.serve``'s routing: ``ModelConfig`` fields to the model config, ``MIIConfig``
    fields to the deployment config, anything else is ``UnknownArgument``."""
    mii = dict(mii_config or {})
    mc = dict(model_config or mii.pop("model_config", None) or mii.pop("model_conf", None) or {})
    for key, value in kwargs.items():
        if key in MODEL_CONFIG_FIELDS:
            _merge("model_config", mc, key, value)
        elif key in MII_CONFIG_FIELDS:
            _merge("mii_config", mii, key, value)
        else:
            raise UnknownArgument(f"Keyword argument {key} not recognized")
    for key in mii:
        if key not in MII_CONFIG_FIELDS:
            raise UnknownArgument(f"Keyword argument {key} not recognized")
    for key in mc:
        if key not in MODEL_CONFIG_FIELDS:
            raise UnknownArgument(f"Keyword argument {key} not recognized")
    if model_name_or_path:
        _merge("model_config", mc, "model_name_or_path", model_name_or_path)
    return mc, mii


def model_spec(mc: Dict[str, Any]) -> Optional[str]:
    """The model to load: a path or a known name; None for the default model."""
    spec = mc.get("model_name_or_path") or None
    tokenizer = mc.get("tokenizer")
    if tokenizer not in (None, "", spec):
        raise ValueError("tokenizer: Tandem uses the model's own tokenizer (from its GGUF or tokenizer.json); leave it unset")
    if mc.get("task") not in (None, "text-generation"):
        raise ValueError(f"task {mc['task']!r}: only 'text-generation' exists")
    if mc.get("quantization_mode") is not None:
        raise ValueError("quantization_mode: weights run in their stored (GGUF) format; leave it unset")
    if mc.get("device_map") not in (None, "auto"):
        raise ValueError("device_map: only 'auto' (this machine's CPU cores)")
    return spec


def engine_args(mc: Dict[str, Any]) -> List[str]:
    """The engine flags a ``ModelConfig`` asks for."""
    args: List[str] = []
    if mc.get("max_length") is not None:
        args.append(f"--max-length={int(mc['max_length'])}")
    iec = mc.get("inference_engine_config") or {}
    if not isinstance(iec, dict):
        raise ValueError("inference_engine_config must be a dict")
    for key, value in iec.items():
        if key == "state_manager":
            if not isinstance(value, dict):
                raise ValueError("inference_engine_config.state_manager must be a dict")
            for sk, sv in value.items():
                if sk not in STATE_MANAGER_KEYS:
                    raise ValueError(f"inference_engine_config.state_manager.{sk} is not supported (known: {', '.join(STATE_MANAGER_KEYS)})")
                flag = STATE_MANAGER_KEYS[sk]
                if flag == "--max-length" and mc.get("max_length") is not None:
                    continue
                if flag is not None:
                    args.append(f"{flag}={sv}")
        elif key == "exact":
            if value:
                args.append("--exact")
        elif key in ENGINE_KEYS:
            args.append(f"{ENGINE_KEYS[key]}={value}")
        else:
            known = ", ".join([*ENGINE_KEYS, "exact", "state_manager"])
            raise ValueError(f"inference_engine_config.{key} is not supported (known: {known})")
    return args


def serve_args(mc: Dict[str, Any], mii: Dict[str, Any]) -> List[str]:
    """The ``tandem serve`` flags for a deployment."""
    if mii.get("deployment_type", "local") not in ("local", None):
        raise ValueError(f"deployment_type {mii['deployment_type']!r}: only 'local' deployments exist (use tandem.pipeline for non-persistent)")
    args = ["serve"]
    spec = model_spec(mc)
    if spec is not None:
        args.append(f"--model={spec}")
    if mii.get("deployment_name"):
        args.append(f"--deployment-name={mii['deployment_name']}")
    args.append(f"--port={int(mii.get('port_number', 50050))}")
    host = mii.get("restful_api_host", "localhost")
    args.append(f"--host={'127.0.0.1' if host == 'localhost' else host}")
    if mii.get("enable_restful_api", False):
        args.append(f"--restful-api-port={int(mii.get('restful_api_port', 28080))}")
    else:
        args.append("--no-restful-api")
    args.append(f"--replica-num={int(mc.get('replica_num', 1))}")
    args.append(f"--tensor-parallel={int(mc.get('tensor_parallel', 1))}")
    args.extend(engine_args(mc))
    return args
