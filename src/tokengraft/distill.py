"""Distillation init: fit each new token's INPUT row so the model reading the token behaves as it
does reading the token's description.

For short contexts ``c`` (real prose from :mod:`tokengraft.probe`, plus the caller's text) with a
few following tokens ``x``, the fitted row minimises KL( p(. | c + description + x) ||
p(. | c + token + x) ) over the next-token distributions at the token and at each ``x`` position.
The model is frozen and in eval mode; only the k rows are optimised (a parameter fed through
``inputs_embeds``), starting from the description's sub-word mean. The output side is not touched
here: graft keeps it invisible (and calibrates a tied row within the KL budget).

Cost: one teacher forward, then ``steps`` forward+backward passes over k x n_contexts short
sequences (k tokens batched together), so time grows linearly with k.
"""
from __future__ import annotations

import torch

from .errors import TokengraftError


class DistillError(TokengraftError):
    pass


CONTEXT_TOKENS = 6   # tokens of prose before the token: a sentence-like setting, kept short for CPU cost
FOLLOW_TOKENS = 1    # prose tokens after it: the token's effect on what comes next


def _windows(tokenizer, texts: list[str], n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``n`` (context, following) id windows cut from ``texts`` at seeded word boundaries."""
    span = CONTEXT_TOKENS + FOLLOW_TOKENS
    seqs = [s for s in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(s) > span]
    if not seqs:
        raise DistillError(f"no context text of more than {span} tokens; pass longer contexts")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = seqs[i % len(seqs)] if i < len(seqs) else seqs[int(torch.randint(len(seqs), (1,), generator=g))]
        start = int(torch.randint(len(s) - span, (1,), generator=g))
        out.append((s[start:start + CONTEXT_TOKENS], s[start + CONTEXT_TOKENS:start + span]))
    return out


def _description_pieces(tokenizer, token_ids, descriptions, n_base) -> list[list[int]]:
    if len(descriptions) != len(token_ids):
        raise DistillError(f"{len(token_ids)} tokens but {len(descriptions)} descriptions")
    pieces = []
    for tid, d in zip(token_ids, descriptions):
        if not d or not str(d).strip():
            name = tokenizer.convert_ids_to_tokens(int(tid))
            raise DistillError(f"token {name!r} (id {tid}) has no description; init 'distill' needs one "
                               f"(add `description:` in the tokens file, or use --init auto)")
        ids = [i for i in tokenizer(" " + str(d).strip(), add_special_tokens=False)["input_ids"] if i < n_base]
        if not ids:
            raise DistillError(f"the description of token id {tid} encodes to no base tokens: {d!r}")
        pieces.append(ids)
    return pieces


def _teacher(model, emb, windows, pieces):
    """Log-probabilities after each description (k x n x (FOLLOW+1) x V) from plain ids."""
    out = []
    for p in pieces:
        seqs = [c + p + x for c, x in windows]
        ids = torch.tensor(seqs, device=emb.device)
        # the last description piece, then each x: the last FOLLOW+1 positions (head only there)
        logits = model(inputs_embeds=emb[ids], logits_to_keep=FOLLOW_TOKENS + 1).logits.float()
        out.append(torch.log_softmax(logits, dim=-1))
    return torch.stack(out)


def _student_logp(model, emb, windows, rows):
    """Log-probabilities after the token (k x n x (FOLLOW+1) x V), the rows fed as embeddings."""
    k, n = rows.shape[0], len(windows)
    ctx = torch.tensor([c for c, _ in windows], device=emb.device)
    fol = torch.tensor([x for _, x in windows], device=emb.device)
    e_c = emb[ctx].detach().expand(k, -1, -1, -1)
    e_x = emb[fol].detach().expand(k, -1, -1, -1)
    e_t = rows[:, None, None, :].expand(-1, n, 1, -1).to(emb.dtype)
    seq = torch.cat([e_c, e_t, e_x], dim=2).reshape(k * n, -1, emb.shape[1])
    logits = model(inputs_embeds=seq, logits_to_keep=FOLLOW_TOKENS + 1).logits.float()  # the token, then each x
    return torch.log_softmax(logits, dim=-1).reshape(k, n, FOLLOW_TOKENS + 1, -1)


def _kl(teacher, student):
    """Mean KL(teacher || student) per (token, context, position)."""
    return (teacher.exp() * (teacher - student)).sum(-1).mean(dim=(1, 2))


def fit_rows(model, tokenizer, token_ids, descriptions, *, contexts=None, steps: int = 12, lr: float = 0.05,
             seed: int = 0, n_contexts: int = 4, n_base: int | None = None, batch: int = 16) -> torch.Tensor:
    """Fitted input rows ([k, hidden], float32) for ``token_ids``, in order. The model is not
    modified. ``contexts``: extra text (e.g. the user's data) mixed with the probe prose."""
    from .probe import real_text

    emb = model.get_input_embeddings().weight
    n_base = n_base if n_base is not None else min(emb.shape[0], len(tokenizer))
    pieces = _description_pieces(tokenizer, token_ids, descriptions, n_base)
    texts = list(contexts or []) + real_text()
    windows = _windows(tokenizer, texts, n_contexts, seed)
    start = torch.stack([emb[p].detach().float().mean(0) for p in pieces])
    was_training = model.training
    model.eval()
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        out = []
        # tokens in batches: memory is batch x n_contexts sequences, time is linear in k
        for b in range(0, len(pieces), batch):
            out.append(_fit_batch(model, emb, windows, pieces[b:b + batch], start[b:b + batch], steps, lr, seed))
        return torch.cat(out)
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)


def _fit_batch(model, emb, windows, pieces, start, steps, lr, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        teacher = _teacher(model, emb, windows, pieces)
    rows = torch.nn.Parameter(start.clone())
    # Adam steps are ~lr per coordinate: scale to the rows' own size so lr means the same on any model
    scale = float(start.abs().mean())
    opt = torch.optim.Adam([rows], lr=lr * scale)
    best, best_loss = start.clone(), _kl(teacher, _student_logp(model, emb, windows, rows)).detach()
    for _ in range(steps):
        opt.zero_grad()
        loss = _kl(teacher, _student_logp(model, emb, windows, rows))
        better = loss.detach() < best_loss  # the rows that produced this loss, kept per token
        best[better], best_loss[better] = rows.detach()[better], loss.detach()[better]
        loss.sum().backward()
        opt.step()
    return best


@torch.no_grad()
def zero_shot_kl(model, tokenizer, token_ids, descriptions, rows, contexts, *, n_contexts: int = 8,
                 seed: int = 1) -> torch.Tensor:
    """Per token: mean KL(after description || after the token with input ``rows``) on ``contexts``
    (held-out text), the measure ``fit_rows`` minimises. Lower = the token already means its description."""
    emb = model.get_input_embeddings().weight
    n_base = min(emb.shape[0], len(tokenizer))
    pieces = _description_pieces(tokenizer, token_ids, descriptions, n_base)
    windows = _windows(tokenizer, list(contexts), n_contexts, seed)
    model.eval()
    teacher = _teacher(model, emb, windows, pieces)
    return _kl(teacher, _student_logp(model, emb, windows, rows.float().to(emb.device)))
