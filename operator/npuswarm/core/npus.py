"""NPU id sets and their text forms (``0-3``, ``1,3``, ``0-2,4``), as the Ascend runtime reads."""

from __future__ import annotations

from collections.abc import Iterable

MAX_NPU_ID = 63


def parse_npu_ids(text: str) -> frozenset[int]:
    """Parse ``0-2,4`` into ``{0, 1, 2, 4}``; raise ValueError with the offending part."""
    ids: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low_text, sep, high_text = part.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if sep else low
        except ValueError:
            raise ValueError(f"not an NPU id or range: {part!r} in {text!r}") from None
        if low < 0 or high < low or high > MAX_NPU_ID:
            raise ValueError(f"bad NPU range {part!r} in {text!r}")
        ids.update(range(low, high + 1))
    return frozenset(ids)


def format_npu_ids(ids: Iterable[int]) -> str:
    """The plain comma list (``0,1,2,3``): every consumer understands it, ranges are optional."""
    return ",".join(str(i) for i in sorted(ids))


def device_name(npu_id: int) -> str:
    return f"davinci{npu_id}"


def npu_id_from_device(name: str) -> int | None:
    """``davinci3`` -> 3; anything else (``davinci_manager``, ``3``) -> None."""
    if not name.startswith("davinci"):
        return None
    suffix = name[len("davinci") :]
    return int(suffix) if suffix.isdigit() else None
