"""The pre-flight: one pass over the whole dataset before any training step.

It lists what would silently go wrong: images that are missing or unreadable, samples longer than
the maximum length (and whether truncation would cut an image), how often each new token appears
(a token that never appears cannot learn), and strings that look like intended special tokens but
are not in the vocabulary (``<box>`` written in the data but never added would be split into
``<``, ``box``, ``>`` and learned as text).
"""
from __future__ import annotations

import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .data import IMAGE, encode, images_of, renderer
from ..errors import TokengraftError

# What people write when they mean one token: <box>, </ref>, <loc_12>, <|tool|>, [IMG], [/INST]
LOOKS_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?[A-Za-z_][A-Za-z0-9_:.\-]{0,39}>|\[/?[A-Z][A-Z0-9_]{1,39}\]")


class PreflightError(TokengraftError):
    pass


@dataclass(frozen=True)
class Problem:
    """A pre-flight finding that stops training. Callers decide by ``code`` (e.g. a flag that waives
    ``unknown-tags``); ``message`` is for people and may be reworded freely."""
    code: str  # no-image-folder | missing-images | unreadable-images | unknown-tags | tokens-never-appear
    message: str


@dataclass
class Report:
    samples: int = 0
    missing_images: list = field(default_factory=list)  # (sample id, path)
    unreadable_images: list = field(default_factory=list)  # (sample id, path, why)
    too_long: list = field(default_factory=list)  # (sample id, tokens, cuts an image?)
    dropped: list = field(default_factory=list)  # (sample id, why) other unusable samples
    token_counts: dict = field(default_factory=dict)  # new token -> occurrences in the data
    unknown_tags: dict = field(default_factory=dict)  # string -> (count, first sample id)
    max_length: int = 0
    image_folder: str | None = None
    encoded: list = field(default_factory=list, repr=False)  # data.Encoded per record, for the dataset

    @property
    def problems(self) -> list[Problem]:
        """Problems that stop training unless the user says otherwise."""
        out = []
        if self.missing_images:
            sid, path = self.missing_images[0]
            if self.image_folder is None:
                out.append(Problem("no-image-folder", f"{len(self.missing_images)} image(s) not found, e.g. {path} "
                                   f"(sample {sid}), and no --image-folder was given: pass the folder the "
                                   f"records' image paths are relative to"))
            else:
                out.append(Problem("missing-images", f"{len(self.missing_images)} missing image(s), e.g. {path} "
                                   f"(sample {sid}); check --image-folder"))
        if self.unreadable_images:
            sid, path, why = self.unreadable_images[0]
            out.append(Problem("unreadable-images",
                               f"{len(self.unreadable_images)} unreadable image(s), e.g. {path} (sample {sid}: {why})"))
        if self.unknown_tags:
            tags = ", ".join(list(self.unknown_tags)[:6])
            out.append(Problem("unknown-tags",
                               f"{len(self.unknown_tags)} tag(s) in the data look like special tokens but are not "
                               f"in the vocabulary ({tags}); they would be learned as plain text pieces: add them "
                               f"with --tokens (or --tokens from-data 'PATTERN'), or pass --allow-text-tags if that "
                               f"is intended"))
        missing = [t for t, c in self.token_counts.items() if c == 0]
        if missing:
            out.append(Problem("tokens-never-appear",
                               f"{len(missing)} new token(s) never appear in the data ({', '.join(missing[:6])}); "
                               f"their rows cannot learn: drop them from --tokens or fix the data"))
        return out

    def format(self) -> str:
        lines = [f"pre-flight: {self.samples} samples"]
        for sid, p in self.missing_images[:20]:
            lines.append(f"  missing image: {p} (sample {sid})")
        for sid, p, why in self.unreadable_images[:20]:
            lines.append(f"  unreadable image: {p} (sample {sid}): {why}")
        for sid, n, cut in self.too_long[:20]:
            lines.append(f"  too long: sample {sid}: {n} tokens > {self.max_length}"
                         + (" (dropped: truncation would cut an image)" if cut else " (truncated)"))
        for sid, why in self.dropped[:20]:
            lines.append(f"  unusable: sample {sid}: {why}")
        if self.token_counts:
            shown = list(self.token_counts.items())[:40]  # thousands of tokens: one readable line
            more = len(self.token_counts) - len(shown)
            lines.append("  new-token frequency: " + ", ".join(f"{t} {c}" for t, c in shown)
                         + (f", ... ({more} more)" if more else ""))
        for tag, (c, sid) in list(self.unknown_tags.items())[:20]:
            lines.append(f"  not in vocabulary: {tag} ({c}x, first in sample {sid})")
        return "\n".join(lines)


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def tokens_from_data(records, pattern: str) -> list[str]:
    """Every distinct string matching ``pattern`` in the conversations, in natural order
    (``<loc_2>`` before ``<loc_10>``): the ``--tokens from-data PATTERN`` list."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise PreflightError(f"--tokens from-data: pattern {pattern!r} is not a valid regular expression ({e})") from None
    found = {m.group(0) for r in records for t in r["conversations"] for m in rx.finditer(t["value"])}
    found.discard(IMAGE)
    if not found:
        raise PreflightError(f"--tokens from-data: nothing in the data matches {pattern!r}")
    return sorted(found, key=_natural)


def check_image(path: Path) -> str | None:
    """None if the image opens and decodes, else why not."""
    from PIL import Image

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open forever
            return "not a regular file (a folder, FIFO or device)"
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # PIL raises many types for corrupt files
        return f"{type(e).__name__}: {e}"
    return None


def preflight(records, tokenizer, new_tokens, *, image_folder=None, template="tokenizer", max_length=2048,
              image_token_id=None, n_image_tokens=0, train_on="assistant", check_images=True) -> Report:
    rep = Report(samples=len(records), max_length=max_length, image_folder=image_folder)
    render = renderer(tokenizer, template)
    known = set(tokenizer.get_vocab()) | set(new_tokens)  # new tokens will be grafted before training
    counts = Counter()
    # one pattern for all new tokens (longest first, as the tokenizer matches them): one scan per
    # text instead of one per token per text, which was hours at 10,000 tokens on a real dataset
    find_new = re.compile("|".join(re.escape(t) for t in sorted(set(new_tokens), key=len, reverse=True))) \
        if new_tokens else None
    unknown: dict[str, list] = {}
    folder = Path(image_folder) if image_folder else None
    seen_images: dict[str, str | None] = {}
    for i, r in enumerate(records):
        sid = str(r.get("id", i))
        for name in images_of(r):
            p = folder / name if folder else Path(name)
            if str(p) not in seen_images:
                seen_images[str(p)] = check_image(p) if check_images else None
            why = seen_images[str(p)]
            if why == "missing":
                rep.missing_images.append((sid, str(p)))
            elif why:
                rep.unreadable_images.append((sid, str(p), why))
        for t in r["conversations"]:
            text = t["value"]
            if find_new is not None:
                counts.update(m.group(0) for m in find_new.finditer(text))
            for m in LOOKS_SPECIAL.finditer(text):
                s = m.group(0)
                if s not in known and s != IMAGE:
                    unknown.setdefault(s, [0, sid])[0] += 1
        e = encode(r, tokenizer, render, image_token_id=image_token_id, n_image_tokens=n_image_tokens,
                   max_length=max_length, train_on=train_on)
        rep.encoded.append(e)
        if e.full_length > max_length:
            rep.too_long.append((sid, e.full_length, bool(e.dropped and "cut an image" in e.dropped)))
        elif e.dropped:
            rep.dropped.append((sid, e.dropped))
    rep.token_counts = {t: counts[t] for t in new_tokens}
    rep.unknown_tags = {k: tuple(v) for k, v in sorted(unknown.items(), key=lambda kv: -kv[1][0])}
    return rep
