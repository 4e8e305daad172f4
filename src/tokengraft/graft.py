"""Graft new tokens onto a tokenizer + model: add, resize (never shrink), initialize, record.

``graft(model, tokenizer, tokens)`` works in memory on any transformers causal LM or LLaVA and
returns the updated :class:`~tokengraft.manifest.Manifest`.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import init as I
from .hf import image_token_id, is_tied, rows_of, sync_config
from .manifest import ROLES, AddedToken, Manifest
from .vocab import fingerprint, vocab_of
from .errors import TokengraftError

logger = logging.getLogger("tokengraft")
KL_BUDGET = 5e-7  # nats per position the new rows may cost on real text (tied `auto`: spent on semantics)


class GraftError(TokengraftError):
    pass


@dataclass
class TokenSpec:
    content: str
    special: bool = True
    role: str = "generate"
    init: str = "auto"
    description: str | None = None
    stop: bool = False


def parse_tokens(tokens=None, tokens_file: str | None = None) -> list[TokenSpec]:
    """Tokens from a comma-separated string, a list (of strings, dicts or TokenSpec), and/or a
    YAML/JSON tokens file. Empty, whitespace-only and duplicate tokens are errors."""
    items: list = []
    if isinstance(tokens, str):
        items += [t for t in tokens.split(",")] if tokens else []
    elif tokens:
        items += list(tokens)
    if tokens_file:
        items += _read_tokens_file(tokens_file)
    specs = []
    for i, it in enumerate(items):
        if isinstance(it, TokenSpec):
            spec = it
        elif isinstance(it, str):
            spec = TokenSpec(it.strip() if it.strip() else it)
        elif isinstance(it, dict):
            unknown = set(it) - set(TokenSpec.__dataclass_fields__)
            if unknown or "content" not in it:
                raise GraftError(f"token entry {i}: expected keys content[, description, role, special, init, stop], "
                                 f"got {sorted(it)}")
            spec = TokenSpec(**it)
        else:
            raise GraftError(f"token entry {i}: expected a string or a mapping, got {type(it).__name__}")
        if not isinstance(spec.content, str) or not spec.content.strip():
            raise GraftError(f"token entry {i}: empty or whitespace-only token {spec.content!r}; remove it")
        if spec.role not in ROLES:
            raise GraftError(f"token {spec.content!r}: role {spec.role!r} is not one of {ROLES}")
        method = spec.init.split(":", 1)[0]
        if method not in I.FOR_GRAFT:
            raise GraftError(f"token {spec.content!r}: init {spec.init!r} is not one of {I.FOR_GRAFT} (copy as copy:TOKEN)")
        if method == "describe" and not spec.description:
            raise GraftError(f"token {spec.content!r}: init 'describe' needs a description in the tokens file")
        specs.append(spec)
    seen = set()
    for s in specs:
        if s.content in seen:
            raise GraftError(f"token {s.content!r} is listed twice; list each token once")
        seen.add(s.content)
    return specs


def _read_tokens_file(path: str) -> list:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise GraftError(f"{p}: cannot read tokens file ({e.strerror})") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json errors differ; both mean the same to the user
        raise GraftError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({e})") from None
    if isinstance(data, dict) and "tokens" in data:
        data = data["tokens"]
    if not isinstance(data, list):
        raise GraftError(f"{p}: expected a list of tokens (or a mapping with key 'tokens')")
    return data


# -- graft ------------------------------------------------------------------------------------

def graft(model, tokenizer, tokens, *, init: str | None = None, pad_to_multiple_of: int = 64,
          manifest: Manifest | None = None, processor=None, kl_budget: float = KL_BUDGET,
          generation_config=None, log=None) -> Manifest:
    """Add ``tokens`` to ``tokenizer`` and ``model`` in place; return the (updated) manifest.

    ``tokens``: comma-separated string, list of strings/dicts/TokenSpec. ``init`` overrides each
    token's init. Never shrinks; reuses padded rows; keeps tied/untied; syncs config vocab sizes.
    """
    log = log or logger.info
    specs = parse_tokens(tokens)
    if init is not None:
        for s in specs:
            s.init = init
        parse_tokens(specs)  # re-validate (describe needs descriptions)
    if pad_to_multiple_of < 1:
        raise GraftError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    tied = is_tied(model)
    rows_before = rows_of(model)
    vocab_before = vocab_of(tokenizer)
    if len(vocab_before) > rows_before:
        raise GraftError(f"the tokenizer has {len(vocab_before)} tokens but the model only {rows_before} rows; "
                         f"they do not belong together (run `tokengraft doctor` on the folder)")
    if manifest is None:
        manifest = Manifest(base_fingerprint=fingerprint(vocab_before), base_size=len(vocab_before),
                            rows=rows_before, tied=tied, pad_multiple=pad_to_multiple_of)
    elif manifest.vocab_fingerprint and manifest.vocab_fingerprint != fingerprint(vocab_before):
        raise GraftError("the tokenizer differs from the one the manifest records; "
                         "was it edited by hand? run `tokengraft doctor` on the folder")

    already = [s.content for s in specs if manifest.token(s.content)]
    in_vocab = {s.content: tokenizer.convert_tokens_to_ids(s.content) for s in specs
                if s.content not in already and s.content in tokenizer.get_vocab()}
    todo = [s for s in specs if s.content not in already and s.content not in in_vocab]
    if already:
        log(f"already grafted (no-op): {', '.join(already)}")
    if in_vocab:
        log(f"already in the base vocabulary, not added: {', '.join(f'{k} (id {v})' for k, v in in_vocab.items())}")
    if not todo:
        manifest.vocab_fingerprint = fingerprint(vocab_before)
        return manifest

    for s in todo:  # one at a time: ids follow the user's order, special or not
        add_token(tokenizer, s.content, s.special)
    vocab_after = vocab_of(tokenizer)
    ids = {s.content: tokenizer.convert_tokens_to_ids(s.content) for s in todo}
    for s in todo:
        got = tokenizer(f"a{s.content}b {s.content}", add_special_tokens=False)["input_ids"]
        if got.count(ids[s.content]) != 2:
            raise GraftError(f"token {s.content!r} does not encode to its own id {ids[s.content]} in running text")

    needed = len(vocab_after)
    rows = rows_before
    if needed > rows_before:
        rows = math.ceil(needed / pad_to_multiple_of) * pad_to_multiple_of
        model.resize_token_embeddings(rows, mean_resizing=False)
    if is_tied(model) != tied:
        raise GraftError("resizing changed whether the head is tied; this model's resize is not supported")

    created = list(range(rows_before, rows))  # rows that did not exist before
    token_rows = sorted(ids.values())
    _initialize(model, tokenizer, todo, ids, vocab_before, rows_before, created, tied, kl_budget, log)

    sync_config(model, rows, tied)
    img = image_token_id(model)
    if img is not None and not (0 <= img < len(vocab_after)):
        raise GraftError(f"image token id {img} is outside the tokenizer ({len(vocab_after)} tokens)")
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    pad_rows = list(range(needed, rows))
    if gen is not None:
        # keep deliberate suppressions of base tokens; padding rows a new token now uses are freed
        keep = [t for t in (getattr(gen, "suppress_tokens", None) or []) if t < len(vocab_before)]
        gen.suppress_tokens = sorted(set(keep) | set(pad_rows)) or None

    for s in todo:
        manifest.tokens.append(AddedToken(content=s.content, id=ids[s.content], special=s.special, role=s.role,
                                          init=s._resolved, description=s.description, stop=s.stop))
    manifest.rows, manifest.tied = rows, tied
    manifest.vocab_fingerprint = fingerprint(vocab_after)
    manifest.record("add", tokens=[s.content for s in todo], rows_before=rows_before, rows_after=rows,
                    reused_padding_rows=[r for r in token_rows if r < rows_before],
                    skipped_existing=sorted(in_vocab), already_grafted=already)
    how = (f"rows {rows_before} -> {rows}" + (f" (padded to a multiple of {pad_to_multiple_of})" if rows != needed else "")
           if rows != rows_before else f"reused free padding rows, no resize ({rows} rows)")
    log(f"added {len(todo)} token(s) at ids {token_rows[0]}..{token_rows[-1]}; {how}")
    return manifest


def add_token(tokenizer, content: str, special: bool) -> None:
    """Add one token the way transformers registers it: a special token through
    ``add_special_tokens`` (so it is in ``all_special_tokens`` / ``all_special_ids``, dropped by
    ``skip_special_tokens=True``, and saved under ``extra_special_tokens`` in tokenizer_config.json,
    keeping the tokens already there); a non-special one as a plain added token."""
    from transformers import AddedToken as HFAddedToken

    tok = HFAddedToken(content, special=special, normalized=False)
    if not special:
        tokenizer.add_tokens([tok])
        return
    params = getattr(tokenizer.add_special_tokens, "__code__", None)
    names = params.co_varnames if params else ()
    if "replace_extra_special_tokens" in names:  # transformers 5
        tokenizer.add_special_tokens({"extra_special_tokens": [tok]}, replace_extra_special_tokens=False)
    else:  # transformers 4 spelled it "additional"
        tokenizer.add_special_tokens({"additional_special_tokens": [tok]}, replace_additional_special_tokens=False)


@torch.no_grad()
def _initialize(model, tokenizer, todo, ids, vocab_before, rows_before, created, tied, kl_budget, log):
    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = None if tied or head_mod is None else head_mod.weight
    out_w = emb if head is None else head  # the head's weight, tied or not
    n_base = len(vocab_before)
    in_mask = I.trained_mask(emb, n_base)
    in_mean = I.mean_row(emb, in_mask)
    out_mean = I.mean_row(out_w, I.trained_mask(out_w, n_base))
    gen = torch.Generator().manual_seed(0)
    probe = _Probe(model, tokenizer, out_w, n_base)

    # Rows the resize created that no token uses: they can never be generated (suppress_tokens),
    # and must not take mass from real text either. The least probable base token's output row is
    # measured ~1000x quieter than the mean row on held-out text (docs/add.md).
    token_rows = set(ids.values())
    padding = [r for r in created if r not in token_rows]
    if padding:
        quiet = probe.quietest_row() if probe.available else out_mean
        for r in padding:
            emb[r] = (quiet if tied else in_mean).to(emb.dtype)
            if head is not None:
                head[r] = quiet.to(head.dtype)

    def semantic(weight, spec, fallback):
        method, _, arg = spec.init.partition(":")
        if method == "copy":
            src = tokenizer.convert_tokens_to_ids(arg)
            if arg not in tokenizer.get_vocab() or src >= n_base:
                raise GraftError(f"token {spec.content!r}: copy source {arg!r} is not in the base vocabulary")
            return I.copy_row(weight, src)
        if method == "describe" or (method == "auto" and spec.description):
            text = spec.description
        else:
            text = I.markup_words(spec.content)
        pieces = [p for p in tokenizer(text, add_special_tokens=False)["input_ids"] if p < n_base]
        return I.subword_row(weight, pieces, fallback)

    blend_for_tied = []
    for s in todo:
        r = ids[s.content]
        method = s.init.split(":", 1)[0]
        if method == "mean":
            vin, vout, name = in_mean, out_mean, "mean"
        elif method == "hewitt":
            vin = I.hewitt_rows(emb, in_mask, 1, generator=gen)[0]
            vout = I.hewitt_rows(head, I.trained_mask(head, n_base), 1, generator=gen)[0] if head is not None else vin
            name = "hewitt"
        elif method == "auto":
            # input side semantic; output side invisible (the mean) until training moves it.
            # Tied: one row serves both, blended below as far as the KL budget allows.
            vin, vout = semantic(emb, s, in_mean), out_mean
            name = ("describe" if s.description else "subword") + "/mean"
            if tied:
                blend_for_tied.append((s, r, vin))
        else:  # subword, describe, copy: the same strategy on both sides
            vin = semantic(emb, s, in_mean)
            vout = semantic(head, s, out_mean) if head is not None else vin
            name = s.init
        s._resolved = name
        emb[r] = vin.to(emb.dtype)
        if head is not None:
            head[r] = vout.to(head.dtype)

    if blend_for_tied:
        if not probe.available:
            raise GraftError("tied head: cannot run the model on probe text to calibrate `auto`; "
                             "use --init mean or --init subword")
        rows = torch.stack([v for _, _, v in blend_for_tied])
        blended = {r for _, r, _ in blend_for_tied}
        # what every other row beyond the base vocabulary costs (earlier tokens, padding rows)
        fixed = probe.kl([r for r in range(n_base, emb.shape[0]) if r not in blended])
        a, kl = I.calibrate_blend(probe.hidden, probe.lse, rows, in_mean.expand_as(rows),
                                  max(kl_budget - fixed, 0.0))
        for s, r, v in blend_for_tied:
            emb[r] = (in_mean + a * (v - in_mean)).to(emb.dtype)
            s._resolved = f"{s._resolved.split('/')[0]}*{a:.3g}+mean"
        log(f"tied head: semantic rows blended {a:.3g} of the way from the mean; "
            f"KL on real text {kl + fixed:.2e} nats/token (budget {kl_budget:.0e})")
        if kl + fixed > kl_budget:  # even plain mean rows are visible: many tokens on a tied head
            logger.warning(f"warning: the {len(rows)} new tied rows cost {kl + fixed:.2e} nats/token on real "
                           f"text, {(kl + fixed) / kl_budget:.0f}x the budget {kl_budget:.0e}, even as mean "
                           f"rows; the model will predict them where they do not belong until trained "
                           f"(train on data that uses them, or add fewer tokens at a time)")


class _Probe:
    """The head's inputs on real prose, computed once on first use (one forward pass)."""

    def __init__(self, model, tokenizer, out_w, n_base):
        # KL is measured against the base *vocabulary* (rows 0..n_base-1): rows beyond it
        # (padding, earlier grafts) count as added, so every figure has the same reference.
        self.model, self.tokenizer, self.out_w, self.rows_before = model, tokenizer, out_w, n_base
        self._hidden = None
        self.available = True

    @property
    def hidden(self):
        if self._hidden is None:
            from .probe import head_inputs, real_text

            self._hidden = head_inputs(self.model, self.tokenizer, real_text())
            self.lse = torch.logsumexp(self._hidden @ self.out_w[: self.rows_before].float().T, dim=1)
        return self._hidden

    def quietest_row(self) -> torch.Tensor:
        """The output row of the base token whose largest probability on the probe text is smallest."""
        w = self.out_w[: self.rows_before].float()
        worst = torch.full((self.rows_before,), -float("inf"))
        for h, lse in zip(self.hidden.split(256), self.lse.split(256)):
            worst = torch.maximum(worst, (h @ w.T - lse[:, None]).max(0).values)
        return w[int(worst.argmin())].clone()

    def kl(self, rows: list[int]) -> float:
        """Mean KL(base vocabulary || base vocabulary + ``rows``) on the probe text."""
        from .probe import kl_of_rows

        if not rows:
            return 0.0
        return float(kl_of_rows(self.hidden, self.out_w, rows, base_lse=self.lse).mean())
