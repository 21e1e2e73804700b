"""Read TensorBoard event files back (for the integration tests)."""
from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under ``root`` (all event-file directories below it):
    ``{tag: [(step, value), ...]}`` in the order written."""
    out: dict[str, list[tuple[int, float]]] = {}
    dirs = sorted({p.parent for p in Path(root).rglob("events.out.tfevents.*")})
    assert dirs, f"no TensorBoard event files under {root}"
    for d in dirs:
        events = EventAccumulator(str(d), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return out
