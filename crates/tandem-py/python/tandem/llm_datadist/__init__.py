"""LLM-DataDist's v2 (CacheManager) Python API over Tandem's ``llm-datadist`` crate.

Code written for the vendor's ``llm_datadist`` package runs with only its accelerator lines
changed: memory is given as integer addresses (a CPU torch tensor's ``data_ptr()``, a numpy
array's ``ctypes.data``) and transfers land in that memory with no extra copy;
``Placement.DEVICE`` is host memory (memory domain ``device_id``, a NUMA node).

Links run over TCP between hosts and shared memory between processes of one host. For the
two-sided ``link(comm_name, cluster_rank_info, rank_table)``, a rank table entry's
``device_ip`` is the host address of that rank's process and its port is the entry's
``device_port`` when present, else ``HCCL_IF_BASE_PORT`` (default 60000) + ``device_id``.
"""

import atexit
from abc import ABC, abstractmethod
from typing import Optional

from tandem import _native
from tandem.llm_datadist.enums import (
    DataType,
    LLMRole,
    LLMStatusCode,
    Memtype,
    Placement,
    RegisterMemStatus,
)
from tandem.llm_datadist.status import LLMException, Status

LLMDataDist = _native.LLMDataDist
LLMConfig = _native.LLMConfig
LlmConfig = _native.LLMConfig
LLMClusterInfo = _native.LLMClusterInfo
CacheDesc = _native.CacheDesc
CacheKey = _native.CacheKey
CacheKeyByIdAndIndex = _native.CacheKeyByIdAndIndex
BlocksCacheKey = _native.BlocksCacheKey
Cache = _native.Cache
CacheManager = _native.CacheManager
CacheTask = _native.CacheTask
MemInfo = _native.MemInfo
TransferConfig = _native.TransferConfig
TransferWithCacheKeyConfig = _native.TransferWithCacheKeyConfig


class LayerSynchronizer(ABC):
    """Tells ``transfer_cache_async`` when a layer's KV is computed."""

    @abstractmethod
    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        """Blocks until layer ``layer_index`` is ready; ``False`` stops the transfer."""


# As the vendor's package: the live instance is finalized when the interpreter exits.
atexit.register(_native.finalize_live)

__all__ = [
    "LLMClusterInfo",
    "LLMStatusCode",
    "LLMException",
    "LLMRole",
    "LlmConfig",
    "LLMConfig",
    "DataType",
    "Status",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "Cache",
    "BlocksCacheKey",
    "LLMDataDist",
    "Placement",
    "RegisterMemStatus",
    "LayerSynchronizer",
    "TransferConfig",
    "CacheTask",
    "TransferWithCacheKeyConfig",
    "Memtype",
    "MemInfo",
    "CacheManager",
]
