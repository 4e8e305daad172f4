"""LLaVA-format data -> token ids, labels and images.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt"|"system", "value"}]}``
(JSON list or JSONL). Prompts are rendered with the tokenizer's chat template or a named one;
labels cover only assistant turns (their text and end-of-turn marker) unless ``train_on="all"``.
Each ``<image>`` becomes as many image tokens as the processor feeds the model, and truncation
never cuts an image: a sample whose image would not fit is dropped (and the pre-flight says so).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from ..errors import TokengraftError
from ..files import parse_json, read_text

IGNORE = -100
DATA_LIMIT = 8 << 30  # bytes; LLaVA-665k is ~1 GB of JSON
ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE = "<image>"


class DataError(TokengraftError):
    pass


# -- reading ----------------------------------------------------------------------------------

def load_records(path) -> list[dict]:
    """Records from a LLaVA JSON list or JSONL file, checked for the fields training needs."""
    p = Path(path)
    what = "LLaVA records (a JSON list or JSONL)"
    text = read_text(p, what, error=DataError, limit=DATA_LIMIT, missing=f"{p}: data file not found")
    recs: list = []
    if text.lstrip().startswith("["):
        recs = parse_json(text, str(p), what, error=DataError)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                recs.append(parse_json(line, f"{p}:{n}", "one record per line", error=DataError))
    for i, r in enumerate(recs):
        conv = r.get("conversations") if isinstance(r, dict) else None
        if not isinstance(conv, list) or not conv:
            raise DataError(f"{p}: record {i} has no 'conversations' list; expected LLaVA format "
                            f'{{"image": ..., "conversations": [{{"from": "human", "value": ...}}, ...]}}')
        for t in conv:
            if not isinstance(t, dict) or t.get("from") not in ROLE or not isinstance(t.get("value"), str):
                raise DataError(f"{p}: record {i} ({r.get('id', i)}): each turn needs 'from' in "
                                f"{sorted(ROLE)} and a string 'value'")
        if r.get("image") is not None and not any(ROLE[t["from"]] == "user" for t in conv):
            raise DataError(f"{p}: record {i} ({r.get('id', i)}) has an image but no human turn to put it in; "
                            f"add a {{\"from\": \"human\", \"value\": \"<image>...\"}} turn or drop the image")
    return recs


def images_of(rec: dict) -> list[str]:
    im = rec.get("image")
    if im is None:
        return []
    return list(im) if isinstance(im, list) else [im]


def messages_of(rec: dict) -> list[dict]:
    """Chat messages; an image sample whose text lacks ``<image>`` gets it at the start of the
    first human turn (LLaVA's own convention)."""
    msgs = [{"role": ROLE[t["from"]], "content": t["value"]} for t in rec["conversations"]]
    n_img = len(images_of(rec))
    if n_img and not any(IMAGE in m["content"] for m in msgs):
        first = next(m for m in msgs if m["role"] == "user")
        first["content"] = (IMAGE + "\n") * n_img + first["content"]
    return msgs


# -- chat templates ---------------------------------------------------------------------------

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def _vicuna(msgs, gen, bos="<s>", eos="</s>"):
    sys_ = next((m["content"] for m in msgs if m["role"] == "system"), VICUNA_SYSTEM)
    s = bos + sys_
    for m in msgs:
        if m["role"] == "user":
            s += " USER: " + m["content"]
        elif m["role"] == "assistant":
            s += " ASSISTANT: " + m["content"] + eos
    return s + (" ASSISTANT:" if gen else "")


def _chatml(msgs, gen, bos=""):
    s = bos + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return s + ("<|im_start|>assistant\n" if gen else "")


def _llama3(msgs, gen, **_):
    s = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in msgs)
    return s + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


TEMPLATES = ("tokenizer", "vicuna", "chatml", "internlm2", "llama3")


def renderer(tokenizer, template: str = "tokenizer"):
    """``render(messages, add_generation_prompt) -> str`` for a template name."""
    if template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; pass --template vicuna|chatml|internlm2|llama3")
        return lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    if template == "vicuna":
        return lambda msgs, gen: _vicuna(msgs, gen, bos, eos)
    if template == "chatml":
        return lambda msgs, gen: _chatml(msgs, gen)
    if template == "internlm2":
        return lambda msgs, gen: _chatml(msgs, gen, bos)
    if template == "llama3":
        return _llama3
    raise DataError(f"template {template!r} is not one of {', '.join(TEMPLATES)}")


WINDOW = 2  # messages of context before each block (even: user/assistant turns keep their parity)
BLOCK = 2  # messages whose prefixes are rendered after one context: cost per message ~ WINDOW + BLOCK
EXACT_LIMIT = 400  # longest conversation rendered prefix by prefix (quadratic) when the template is not local
_NOT_PREFIXES = ("the chat template does not render conversations as growing prefixes; pass a named "
                 "--template (vicuna, chatml, internlm2, llama3)")


def _prefixes(msgs: list[dict], render, block: int):
    """(pieces, ends, gens) such that ``"".join(pieces)`` renders the whole conversation, ``ends[i]`` is
    ``len(render(msgs[:i + 1]))`` and ``gens[j]`` what the generation prompt adds to
    ``render(msgs[:j])`` (assistant turns j). Each message's piece is the difference between two
    renderings of a short conversation (the system message, ``WINDOW`` messages before the block,
    the block so far), so the work is linear in the length; ``block=len(msgs)`` renders every real
    prefix (exact, quadratic). None when a rendering does not extend the one before it."""
    head = 1 if msgs[0]["role"] == "system" else 0
    pieces, ends, gens, total, b = [], [], {}, 0, 0
    while b < len(msgs):
        e = min(len(msgs), b + block if b else head + block)
        ctx = msgs[:b] if b - WINDOW <= head else msgs[:head] + msgs[b - WINDOW:b]
        prev = render(ctx, False) if ctx else ""
        for i in range(b, e):
            if msgs[i]["role"] == "assistant":
                g = render(ctx + msgs[b:i], True)
                if not g.startswith(prev):
                    return None
                gens[i] = g[len(prev):]
            cur = render(ctx + msgs[b:i + 1], False)
            if not cur.startswith(prev):
                return None
            pieces.append(cur[len(prev):])
            total += len(pieces[-1])
            ends.append(total)
            prev = cur
        b = e
    return pieces, ends, gens


def _rendered(msgs: list[dict], render):
    """(text, ends, gens) of :func:`_prefixes`, built locally (linear) and checked against one
    rendering of the whole conversation; a template whose pieces depend on more than the nearby
    turns is rendered prefix by prefix instead, up to ``EXACT_LIMIT`` messages."""
    try:
        got = _prefixes(msgs, render, BLOCK)
    except Exception:  # a template may refuse a shortened conversation (raise_exception): go exact
        got = None
    if got is not None:
        text = "".join(got[0])
        if text == render(msgs, False):
            return text, got[1], got[2]
    if len(msgs) > EXACT_LIMIT:
        raise DataError(f"the chat template renders a turn differently depending on turns far from it, and a "
                        f"{len(msgs)}-turn conversation would take quadratic time to split; pass a named "
                        f"--template (vicuna, chatml, internlm2, llama3) or split the conversation")
    try:
        got = _prefixes(msgs, render, len(msgs))
    except Exception as e:  # jinja's TemplateError, transformers' ValueError for an empty prompt, ...
        raise DataError(f"the chat template cannot render this conversation ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); fix the record or pass a named --template") from None
    if got is None:
        raise DataError(_NOT_PREFIXES)
    return "".join(got[0]), got[1], got[2]


def segments(msgs: list[dict], render) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant) pieces: an assistant piece is what
    its turn adds after the generation prompt, ``render(msgs[:j + 1])`` minus ``render(msgs[:j], True)``;
    the rest is prompt. Linear in the conversation's length (see :func:`_rendered`)."""
    text, ends, gens = _rendered(msgs, render)
    out, cursor = [], 0
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = ends[j - 1] if j else 0
        gen = gens[j]
        if not text.startswith(gen, start) or start + len(gen) > ends[j]:
            raise DataError(_NOT_PREFIXES)
        out.append((text[cursor:start] + gen, False))
        out.append((text[start + len(gen):ends[j]], True))
        cursor = ends[j]
    if cursor < len(text):
        out.append((text[cursor:], False))
    return [(t, a) for t, a in out if t]


# -- encoding ---------------------------------------------------------------------------------

@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: list[str]
    id: str
    full_length: int  # before truncation
    dropped: str | None = None  # why the sample cannot be used


def image_token_count(processor, image_token_id: int) -> int:
    """How many placeholder tokens one image takes, asked of the processor itself."""
    from PIL import Image

    img = Image.new("RGB", (224, 224))
    tok = processor.tokenizer
    ids = processor(text=tok.convert_ids_to_tokens(image_token_id), images=[img], return_tensors="pt")["input_ids"]
    return int((ids == image_token_id).sum())


def encode(rec: dict, tokenizer, render, *, image_token_id: int | None = None, n_image_tokens: int = 0,
           max_length: int = 2048, train_on: str = "assistant") -> Encoded:
    msgs = messages_of(rec)
    ids, labels = [], []
    try:
        pieces = segments(msgs, render)
    except DataError as e:
        raise DataError(f"record {rec.get('id', '?')}: {e}") from None
    for text, is_asst in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if image_token_id is not None and n_image_tokens > 1:  # expand each placeholder
            exp = []
            for t in piece:
                exp.extend([t] * n_image_tokens if t == image_token_id else [t])
            piece = exp
        ids += piece
        labels += piece if (is_asst or train_on == "all") else [IGNORE] * len(piece)
    if image_token_id is not None:
        labels = [IGNORE if t == image_token_id else lab for t, lab in zip(ids, labels)]
    imgs = images_of(rec)
    rid = str(rec.get("id", ""))
    n = len(ids)
    enc = Encoded(ids, labels, imgs, rid, n)
    n_ph = ids.count(image_token_id) // max(n_image_tokens, 1) if image_token_id is not None else 0
    if imgs and image_token_id is None:
        enc.dropped = "the sample has an image but the model is text-only (no processor / image token)"
        return enc
    if imgs and n_ph != len(imgs):
        enc.dropped = f"{len(imgs)} image(s) but {n_ph} {IMAGE} placeholder(s) in the text"
        return enc
    if n > max_length:
        last_img = max((i for i, t in enumerate(ids) if t == image_token_id), default=-1)
        if last_img >= max_length:
            enc.dropped = f"{n} tokens > max_length {max_length} and truncating would cut an image"
            return enc
        enc.input_ids, enc.labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE for lab in enc.labels[1:]):
        enc.dropped = "no assistant tokens left to learn from" + (" after truncation" if n > max_length else "")
    return enc


class LlavaDataset(torch.utils.data.Dataset):
    """Encoded samples (text encoded up front; images loaded per item)."""

    def __init__(self, records, tokenizer, processor=None, image_folder=None, template="tokenizer",
                 max_length=2048, train_on="assistant", image_token_id=None, log=print, encoded=None):
        self.tokenizer, self.processor = tokenizer, processor
        self.image_folder = Path(image_folder) if image_folder else None
        self.render = renderer(tokenizer, template)
        self.image_token_id = image_token_id
        self.n_image_tokens = image_token_count(processor, image_token_id) if processor and image_token_id is not None else 0
        # ``encoded``: the pre-flight's encodings of these records with the same settings (render once)
        encs = encoded if encoded is not None else [
            encode(r, tokenizer, self.render, image_token_id=image_token_id, n_image_tokens=self.n_image_tokens,
                   max_length=max_length, train_on=train_on) for r in records]
        if len(encs) != len(records):
            raise ValueError(f"{len(encs)} encodings for {len(records)} records")
        self.dropped = [(e.id, e.dropped) for e in encs if e.dropped]
        self.items = [e for e in encs if not e.dropped]
        self.records = [r for r, e in zip(records, encs) if not e.dropped]
        if self.dropped:
            log(f"data: dropped {len(self.dropped)} of {len(encs)} samples (first: {self.dropped[0][0]}: "
                f"{self.dropped[0][1]})")
        if not self.items:
            raise DataError("no usable samples left; run the pre-flight (tokengraft train --preflight-only)")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        e = self.items[i]
        out = {"input_ids": e.input_ids, "labels": e.labels}
        if e.images:
            from PIL import Image

            pics = []
            for name in e.images:
                with Image.open(self.image_folder / name if self.image_folder else name) as im:
                    pics.append(im.convert("RGB"))
            out["pixel_values"] = self.processor.image_processor(pics, return_tensors="pt")["pixel_values"]
        return out


@dataclass
class Collator:
    """Right-pads ids (pad id) and labels (-100); stacks the images of the batch in order."""
    pad_id: int

    def __call__(self, batch):
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pix = [b["pixel_values"] for b in batch if "pixel_values" in b]
        if pix:
            out["pixel_values"] = torch.cat(pix)
        return out


def prompt_of(rec: dict, render) -> tuple[str, str]:
    """(prompt up to the first assistant turn's generation prompt, that turn's reference text)."""
    msgs = messages_of(rec)
    j = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return render(msgs[:j], True), msgs[j]["content"]
