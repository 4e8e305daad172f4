"""What doctor reports: one :class:`Finding` per problem (severity, stable code, one line), and the
two ways of printing a list of them (a table for people, JSON for scripts)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..errors import TokengraftError

SEVERITIES = ("error", "warning", "info")


class DoctorError(TokengraftError):
    """The path cannot be examined at all (not a folder, not a checkpoint): exit 2."""


@dataclass
class Finding:
    severity: str  # error | warning | info
    code: str  # short stable id, e.g. "vocab-size-mismatch"
    message: str  # one line: what is wrong, where, what to run
    data: dict | None = None  # figures behind the message, for --json consumers

    def __post_init__(self):
        assert self.severity in SEVERITIES, self.severity
        # a finding is one line, whatever an exception text pasted into it held
        self.message = " ".join(self.message.split())

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["data"] is None:
            del d["data"]
        return d


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def first_line(e: BaseException) -> str:
    """An exception as one short line (its type and the first line of its text)."""
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def counts(findings: list[Finding]) -> dict[str, int]:
    return {k: sum(f.severity == k for f in findings) for k in SEVERITIES}


def format_table(findings: list[Finding]) -> str:
    """A readable table: severity, code, message; then the counts."""
    w = max([len(f.code) for f in findings] + [4])
    lines = [f"{'SEVERITY':<8}  {'CODE':<{w}}  MESSAGE"]
    lines += [f"{f.severity:<8}  {f.code:<{w}}  {f.message}" for f in findings]
    n = counts(findings)
    verdict = "FAIL" if n["error"] else "OK"
    lines.append(f"{verdict}: {n['error']} error(s), {n['warning']} warning(s), {n['info']} note(s)")
    return "\n".join(lines)


def to_json(findings: list[Finding], path=None) -> str:
    n = counts(findings)
    return json.dumps({"path": None if path is None else str(path), "ok": not n["error"], "counts": n,
                       "findings": [f.to_dict() for f in findings]}, indent=2, ensure_ascii=False)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    order = {k: i for i, k in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: order[f.severity])  # stable: checks keep their order
