"""Graft new tokens onto a tokenizer + model: add, resize (never shrink), initialize, record.

``graft(model, tokenizer, tokens)`` works in memory on any transformers causal LM or LLaVA and
returns the updated :class:`~tokengraft.manifest.Manifest`.
"""
from __future__ import annotations

import logging
import math

import torch

from . import init as I
from .compat import resize_rows
from .hf import image_token_id, is_tied, rows_of, sync_config
from .manifest import AddedToken, Manifest
from .tokenspec import GraftError, TokenSpec, parse_tokens  # noqa: F401  (public here since the start)
from .vocab import add_token, add_tokens, fingerprint, vocab_of  # noqa: F401  (add_token: public)
from .vocab import encode_many as _encode_many
from .vocab import runs as _runs

logger = logging.getLogger("tokengraft")
KL_BUDGET = 5e-7  # nats per position the new rows may cost on real text (tied `auto`: spent on semantics)


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

    base_vocab = tokenizer.get_vocab()  # once: get_vocab() builds a fresh dict on every call
    _check_manifest(manifest, base_vocab)
    grafted = set(manifest.contents)  # one set: a scan per token is quadratic at thousands of tokens
    already = [s.content for s in specs if s.content in grafted]
    in_vocab = {s.content: base_vocab[s.content] for s in specs
                if s.content not in already and s.content in base_vocab}
    todo = [s for s in specs if s.content not in already and s.content not in in_vocab]
    if already:
        log(f"already grafted (no-op): {', '.join(already)}")
    if in_vocab:
        log(f"already in the base vocabulary, not added: {', '.join(f'{k} (id {v})' for k, v in in_vocab.items())}")
    if not todo:
        manifest.vocab_fingerprint = fingerprint(vocab_before)
        return manifest

    # One call per run of equally-special tokens (usually one call in all): each call rebuilds the
    # tokenizer's added-token matcher, so adding 10,000 tokens one at a time is quadratic.
    # Ids still follow the user's order.
    for start, end in _runs([s.special for s in todo]):
        add_tokens(tokenizer, [s.content for s in todo[start:end]], todo[start].special)
    vocab_after = vocab_of(tokenizer)
    ids = {s.content: tokenizer.convert_tokens_to_ids(s.content) for s in todo}
    texts = [f"a{s.content}b {s.content}" for s in todo]
    for s, got in zip(todo, _encode_many(tokenizer, texts)):
        if got.count(ids[s.content]) != 2:
            raise GraftError(f"token {s.content!r} does not encode to its own id {ids[s.content]} in running text")

    needed = len(vocab_after)
    rows = rows_before
    if needed > rows_before:
        rows = math.ceil(needed / pad_to_multiple_of) * pad_to_multiple_of
        resize_rows(model, rows)
    if is_tied(model) != tied:
        raise GraftError("resizing changed whether the head is tied; this model's resize is not supported")

    created = list(range(rows_before, rows))  # rows that did not exist before
    token_rows = sorted(ids.values())
    _note_non_finite(model, len(vocab_before), tied, log)
    _initialize(model, tokenizer, todo, ids, vocab_before, rows_before, created, tied, kl_budget, log)
    _refuse_non_finite(model, sorted(set(token_rows) | set(created)), tied)

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


def _check_manifest(manifest: Manifest, vocab: dict) -> None:
    """The manifest is checked against the tokenizer, never trusted over it (a copied or hand-made
    tokengraft.json without a fingerprint would turn real additions into "already grafted")."""
    for t in manifest.tokens:
        got = vocab.get(t.content)
        if got != t.id:
            has = "does not have it" if got is None else f"has it at id {got}"
            raise GraftError(f"tokengraft.json records {t.content!r} at id {t.id} but the tokenizer {has}: the "
                             f"manifest does not belong to this tokenizer; restore the folder's own tokengraft.json "
                             f"or remove it")


def _matrices(model, tied) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, weight) of the input embedding and, untied, the head."""
    mods = [model.get_input_embeddings()] + ([] if tied else [model.get_output_embeddings()])
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names.get(id(m.weight), "head"), m.weight) for m in mods if m is not None]


@torch.no_grad()
def _note_non_finite(model, n_base: int, tied: bool, log) -> None:
    """Say so when the base holds inf/NaN rows: every statistic leaves them out (init.looks_trained)."""
    for name, w in _matrices(model, tied):
        bad = (~torch.isfinite(w[:n_base]).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            log(f"note: {len(bad)} base row(s) of {name} hold inf/NaN (first: row {bad[0]}); left out of "
                f"every statistic, kept as they are (`tokengraft doctor` reports them)")


@torch.no_grad()
def _refuse_non_finite(model, rows: list[int], tied: bool) -> None:
    """Every row the graft wrote is finite, or a one-line error naming the tensor and the row."""
    idx = torch.tensor(rows, dtype=torch.long)
    for name, w in _matrices(model, tied):
        bad = (~torch.isfinite(w[idx]).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            r = rows[bad[0]]
            raise GraftError(f"row {r} of {name} would be non-finite ({w[r][~torch.isfinite(w[r])][0].item()}): "
                             f"its init read inf/NaN base rows (copy:/subword/describe of such a token); "
                             f"choose another --init or repair the base model")


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

    # The base pieces of every token's words (or description), encoded in one batched call:
    # one tokenizer call per token dominates the time at thousands of tokens.
    wants_text = [s for s in todo if s.init.split(":", 1)[0] in ("auto", "subword", "describe", "distill")]
    # `subword` reads the token's own name even when a description exists (that is `describe`)
    texts = [s.description if s.init.split(":", 1)[0] in ("describe", "distill") or
             (s.init.startswith("auto") and s.description) else I.markup_words(s.content) for s in wants_text]
    pieces_of = {s.content: [p for p in got if p < n_base]
                 for s, got in zip(wants_text, _encode_many(tokenizer, texts))}

    # the sub-word rows of every token that wants them, one gather per matrix (per-token indexing
    # took seconds at 10,000 tokens)
    sub_in = dict(zip(pieces_of, I.subword_rows(emb, list(pieces_of.values()), in_mean))) if pieces_of else {}
    sub_out = {}

    def semantic(weight, spec, fallback):
        method, _, arg = spec.init.partition(":")
        if method == "copy":
            src = tokenizer.convert_tokens_to_ids(arg)
            if not isinstance(src, int) or not 0 <= src < n_base or vocab_before[src] != arg:
                raise GraftError(f"token {spec.content!r}: copy source {arg!r} is not in the base vocabulary")
            return I.copy_row(weight, src)
        if weight is emb:
            return sub_in[spec.content]
        if not sub_out:  # the head's sub-word rows (untied subword/describe only), computed once
            sub_out.update(zip(pieces_of, I.subword_rows(weight, list(pieces_of.values()), fallback)))
        return sub_out[spec.content]

    blend_for_tied, distilled = [], []
    new_in, new_out, where = [], [], []
    for s in todo:
        r = ids[s.content]
        method = s.init.split(":", 1)[0]
        if method == "mean":
            vin, vout, name = in_mean, out_mean, "mean"
        elif method == "hewitt":
            vin = I.hewitt_rows(emb, in_mask, 1, generator=gen)[0]
            vout = I.hewitt_rows(head, I.trained_mask(head, n_base), 1, generator=gen)[0] if head is not None else vin
            name = "hewitt"
        elif method == "distill":  # distill (tokengraft.distill): input fitted below; output as auto
            vin, vout, name = semantic(emb, s, in_mean), out_mean, "distill/mean"
            distilled.append((s, r))
            if tied:
                blend_for_tied.append((s, r, None))
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
        new_in.append(vin)
        new_out.append(vout)
        where.append(r)
    # one indexed write per side (row-by-row writes into a 50k x H matrix add up at k = 10,000)
    idx = torch.tensor(where, dtype=torch.long)
    emb[idx] = torch.stack(new_in).to(emb.dtype)
    if head is not None:
        head[idx] = torch.stack(new_out).to(head.dtype)
    if distilled:  # distill: fit the input rows with the model (output rows untouched, see above)
        from .distill import fit_rows
        with torch.enable_grad():
            fitted = fit_rows(model, tokenizer, [r for _, r in distilled], [s.description for s, _ in distilled],
                              n_base=n_base)
        emb[torch.tensor([r for _, r in distilled])] = fitted.to(emb.dtype)
        by_row = dict(zip([r for _, r in distilled], fitted))
        blend_for_tied = [(s, r, by_row[r] if v is None else v) for s, r, v in blend_for_tied]

    if blend_for_tied:
        if not probe.available:
            raise GraftError("tied head: cannot run the model on probe text to calibrate `auto`; "
                             "use --init mean or --init subword")
        _calibrate_tied(emb, probe, blend_for_tied, in_mean, n_base, kl_budget, log)


def _calibrate_tied(emb, probe, blend_for_tied, in_mean, n_base, kl_budget, log):
    """Tied head, ``auto``: one joint calibration over all k new rows.

    The budget bounds the TOTAL KL the k rows cost together (so the total new-token probability
    mass, about KL, stays bounded as k grows). Step 1: if k mean rows already exceed it (mean rows
    cost about k x one row's mass), the shared invisible reference moves from the mean toward the
    quietest base output row (:meth:`_Probe.quietest_row`, ~1000x quieter), only as far as needed.
    Step 2: every semantic row is blended from that reference by the same factor ``a``, the
    largest the remaining budget allows."""
    rows = torch.stack([v for _, _, v in blend_for_tied])
    blended = {r for _, r, _ in blend_for_tied}
    idx = torch.tensor([r for _, r, _ in blend_for_tied], dtype=torch.long)
    # what every other row beyond the base vocabulary costs (earlier tokens, padding rows)
    fixed = probe.kl([r for r in range(n_base, emb.shape[0]) if r not in blended])
    budget = max(kl_budget - fixed, 0.0)
    ref, moved = in_mean, 0.0
    k = len(rows)
    if float(I.kl_of_added(probe.hidden, probe.lse, in_mean.expand(k, -1)).mean()) > budget:
        quiet = probe.quietest_row()
        # largest step from `quiet` back toward the mean that still fits the budget
        back, _ = I.calibrate_blend(probe.hidden, probe.lse, in_mean.expand(k, -1), quiet.expand(k, -1), budget)
        ref = quiet + back * (in_mean - quiet)
        moved = 1.0 - back
    a, kl = I.calibrate_blend(probe.hidden, probe.lse, rows, ref.expand_as(rows), budget)
    emb[idx] = (ref + a * (rows - ref)).to(emb.dtype)
    for s, _, _ in blend_for_tied:
        s._resolved = f"{s._resolved.split('/')[0]}*{a:.3g}+" + ("mean" if moved == 0 else f"quiet{moved:.3g}")
    log(f"tied head: {k} semantic rows blended {a:.3g} of the way from "
        + ("the mean" if moved == 0 else f"a reference moved {moved:.3g} of the way from the mean to the quietest base row")
        + f"; KL on real text {kl + fixed:.2e} nats/token in total (budget {kl_budget:.0e})")
    # even the quietest reference is visible: very many tokens on a tied head (1% slack: the
    # bisection lands on the budget itself, up to float rounding)
    if kl + fixed > kl_budget * 1.01:
        logger.warning(f"warning: the {k} new tied rows cost {kl + fixed:.2e} nats/token on real "
                       f"text, {(kl + fixed) / kl_budget:.0f}x the budget {kl_budget:.0e}, even at the "
                       f"quietest reference; the model will predict them where they do not belong until "
                       f"trained (train on data that uses them, or add fewer tokens at a time)")


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
            # One pass over positions x vocabulary serves both the log-normaliser and the quietest
            # row: that product is the largest cost after the forward pass itself.
            w = self.out_w[: self.rows_before].float()
            lses, worst = [], torch.full((self.rows_before,), -float("inf"))
            for h in self._hidden.split(256):
                z = h @ w.T
                lse = torch.logsumexp(z, dim=1)
                worst = torch.maximum(worst, (z - lse[:, None]).max(0).values)
                lses.append(lse)
            self.lse = torch.cat(lses)
            self._quiet = w[int(worst.argmin())].clone()
        return self._hidden

    def quietest_row(self) -> torch.Tensor:
        """The output row of the base token whose largest probability on the probe text is smallest."""
        self.hidden  # noqa: B018  (computes it)
        return self._quiet.clone()

    def kl(self, rows: list[int]) -> float:
        """Mean KL(base vocabulary || base vocabulary + ``rows``) on the probe text."""
        from .probe import kl_of_rows

        if not rows:
            return 0.0
        return float(kl_of_rows(self.hidden, self.out_w, rows, base_lse=self.lse).mean())
