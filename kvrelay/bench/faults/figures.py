"""What one fault scenario measured: each request's outcome, the leaks, the recovery times, the notes.

Owns: `Outcome`, `Figures` and its summary (the row `kvrelay bench faults` prints and records).  Must not
touch: the cluster or the load (they fill these in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    kind: str  # correct, clear_error, wrong, hung
    detail: str = ""  # "disconnected" when the client closed its stream (the abort)
    seconds: float = 0.0
    ended: float = 0.0  # time.monotonic() when the request ended (for a disconnect: the abort)


@dataclass
class Figures:
    scenario: str
    outcomes: list[Outcome] = field(default_factory=list)
    leaks: dict[str, int] = field(default_factory=dict)
    recovery_s: float = float("nan")  # fault (for the store: its return) to every component back in service
    first_answer_s: float = float("nan")  # fault to the first right answer of a request sent after it
    notes: list[str] = field(default_factory=list)
    # the store's pins and reserved bytes over time (holdings.py), when the scenario watches them: one row
    # [seconds from the round's start, pins, reserved bytes] per change, and per round the seconds from its
    # last abort until both were back to their values before it (inf: not within the watch's limit)
    store_timeline: list[list[float]] = field(default_factory=list)
    store_release_s: list[float] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    def summary(self) -> dict[str, Any]:
        out = {"scenario": self.scenario, "sent": len(self.outcomes), "correct": self.count("correct"),
               "clear_errors": self.count("clear_error"), "wrong": self.count("wrong"), "hung": self.count("hung"),
               "leaks": sum(self.leaks.values()), "leak_detail": {k: v for k, v in self.leaks.items() if v},
               "recovery_s": self.recovery_s, "first_answer_s": self.first_answer_s,
               "max_request_s": max((o.seconds for o in self.outcomes), default=0.0), "notes": self.notes}
        if self.store_release_s:
            out["store_release_s"] = self.store_release_s
            out["store_timeline"] = self.store_timeline
        return out
