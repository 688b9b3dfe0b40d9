"""LLM-DataDist's enums, built from the Rust crate's tables so their values cannot drift."""

from enum import Enum, IntEnum

from tandem import _native


class _VendorIntEnum(IntEnum):
    """An IntEnum whose ``str()`` is ``Class.MEMBER`` on every Python version, as the vendor's."""

    __str__ = Enum.__str__  # type: ignore[assignment]

#: Instance roles (``llm.Role``): a label in CacheManager mode.
LLMRole = _VendorIntEnum("LLMRole", _native.enum_members("LLMRole"), module=__name__)
#: Status codes, with the vendor's numeric values.
LLMStatusCode = _VendorIntEnum("LLMStatusCode", _native.enum_members("LLMStatusCode"), module=__name__)
#: Where a cache lives. Without an accelerator, ``DEVICE`` is host memory of memory domain
#: ``device_id`` (a NUMA node).
Placement = _VendorIntEnum("Placement", _native.enum_members("Placement"), module=__name__)
#: Element types (GE's numbers).
DataType = Enum("DataType", _native.enum_members("DataType"), module=__name__)
#: Progress of a two-sided ``link``.
RegisterMemStatus = Enum("RegisterMemStatus", _native.enum_members("RegisterMemStatus"), module=__name__)
#: Memory kinds of ``MemInfo``.
Memtype = Enum("Memtype", _native.enum_members("Memtype"), module=__name__)
