"""What trains, per mode: ``rows``, ``lora`` and ``full``.

The new tokens' rows train through small *delta* parameters (k new rows x hidden), added to the
frozen embedding and head by forward hooks. Why deltas instead of gradient masking on the whole
matrix: the optimizer then holds O(k x hidden) state, not O(vocab x hidden), and the base matrices
are never written, so every base row stays bit-identical. A tied model has one delta serving both
sides, exactly as the tie shares one row.

* ``rows``: only the deltas (and, optionally, the projector) train.
* ``lora``: PEFT LoRA on the language model's linear layers plus the deltas; the embedding and head
  are never copied (no ``modules_to_save``).
* ``full``: every weight except the vision tower (unless asked) trains; the new rows still train
  through the deltas so they get their own learning rate and weight decay, and the base matrices
  get no gradient on those rows so the two do not fight (the *shield*, see ``NewRows.shield``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from ..errors import TokengraftError

MODES = ("rows", "lora", "full")
ATTR = "tokengraft_rows"  # the submodule name the deltas live under
LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ParamsError(TokengraftError):
    pass


class NewRows(nn.Module):
    """Trainable deltas for ``ids``: ``embed`` (input side; also the output side when tied) and
    ``head`` (output side of an untied model). Effective row = base row + delta."""

    def __init__(self, ids: list[int], hidden: int, rows: int, tied: bool, dtype=torch.float32):
        super().__init__()
        if not ids:
            raise ParamsError("no new tokens to train; list them with --tokens")
        self.tied = tied
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        lookup = torch.zeros(rows, dtype=torch.long)  # 0: not a new token; i+1: new token i
        lookup[torch.tensor(ids)] = torch.arange(1, len(ids) + 1)
        self.register_buffer("lookup", lookup, persistent=False)
        self.embed = nn.Parameter(torch.zeros(len(ids), hidden, dtype=dtype))
        self.head = None if tied else nn.Parameter(torch.zeros(len(ids), hidden, dtype=dtype))
        # full mode: the base rows of the new tokens are used detached, so their gradient is zero by
        # construction. Done in the forward, not with a gradient hook on the weight, because FSDP2
        # (and ZeRO-3) replace the weight by sharded parameters a hook on the original never sees.
        self.shield = False
        self._handles: list = []

    @property
    def out_delta(self) -> torch.Tensor:
        return self.embed if self.tied else self.head

    def embed_hook(self, module, args, out):
        ids = args[0]
        slot = self.lookup[ids.clamp(0, self.lookup.numel() - 1)]
        if self.shield:  # same values; no gradient into the base rows at new-token positions
            out = torch.where((slot > 0).unsqueeze(-1), out.detach(), out)
        table = torch.cat([self.embed.new_zeros(1, self.embed.shape[1]), self.embed]).to(out.dtype)
        return out + F.embedding(slot, table)

    def head_hook(self, module, args, out):
        h = args[0]
        if self.shield:
            # the new columns again, from base rows detached (the hidden state keeps its full
            # gradient); index_copy_ then gives the matmul's own new columns zero gradient, so the
            # head (or tied embedding) gets none on those rows
            w = module.weight[self.ids].detach().to(self.out_delta.dtype) + self.out_delta
            return out.index_copy_(-1, self.ids, (h.to(w.dtype) @ w.T).to(out.dtype))
        extra = h.to(self.out_delta.dtype) @ self.out_delta.T  # (..., k)
        # in place: the head's matmul does not keep its output for backward, and copying a
        # batch x seq x vocab logits tensor would cost more than the rest of the hook
        return out.index_add_(-1, self.ids, extra.to(out.dtype))

    def attach(self, model) -> "NewRows":
        self.detach()
        self._handles = [model.get_input_embeddings().register_forward_hook(self.embed_hook)]
        head = model.get_output_embeddings()
        if head is not None:
            self._handles.append(head.register_forward_hook(self.head_hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def effective(self, model) -> dict[str, torch.Tensor]:
        """The new rows as the model now sees them: ``embed`` and (untied) ``head``."""
        w_in = full(model.get_input_embeddings().weight)
        out = {"embed": (w_in[self.ids].float() + full(self.embed).float())}
        if not self.tied:
            w_out = full(model.get_output_embeddings().weight)
            out["head"] = w_out[self.ids].float() + full(self.head).float()
        return out

    @torch.no_grad()
    def set_effective(self, model, rows: dict[str, torch.Tensor]) -> None:
        """Make the effective rows equal ``rows`` by setting the deltas (base matrices untouched)."""
        w_in = model.get_input_embeddings().weight
        self.embed.copy_(rows["embed"].to(self.embed.dtype) - w_in[self.ids].to(self.embed.dtype))
        if not self.tied:
            w_out = model.get_output_embeddings().weight
            self.head.copy_(rows["head"].to(self.head.dtype) - w_out[self.ids].to(self.head.dtype))


@torch.no_grad()
def write_rows(model, ids: list[int], rows: dict[str, torch.Tensor], tied: bool) -> None:
    """Write effective rows straight into the embedding (and untied head): used when merging."""
    idx = torch.tensor(ids, dtype=torch.long)
    w_in = model.get_input_embeddings().weight
    w_in[idx] = rows["embed"].to(w_in.dtype)
    if not tied and "head" in rows:
        w_out = model.get_output_embeddings().weight
        w_out[idx] = rows["head"].to(w_out.dtype)


def _is_vision(name: str) -> bool:
    return "vision_tower" in name or "vision_model" in name


def _is_projector(name: str) -> bool:
    return "multi_modal_projector" in name


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter FSDP2 sharded (a DTensor); a collective: every rank calls it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@dataclass
class Plan:
    """What a mode made trainable (``param_groups`` builds the optimizer groups from it)."""
    mode: str
    model: nn.Module  # the model to train (a PeftModel in lora mode)
    rows: NewRows
    trainable: int
    total: int


def lora_config(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, targets=None):
    """A PEFT LoraConfig on the language model's linear layers only (never the embedding, head or
    vision tower), and no ``modules_to_save``."""
    from peft import LoraConfig

    names = tuple(targets) if targets else LORA_LINEARS
    llava = hasattr(model.config, "vision_config")
    prefix = r".*language_model.*\." if llava else r".*\."
    pattern = prefix + "(" + "|".join(names) + ")$"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
                      task_type=None if llava else "CAUSAL_LM")


def trained_tokens(manifest, requested: list[str], log) -> list[str]:
    """The requested tokens whose rows train as new rows: those the manifest records as grafted. A
    token already in the base vocabulary (``--tokens hello``) is no new row: its base row stays
    bit-identical in rows mode, and is neither trained nor exported as one."""
    grafted = set(manifest.contents)
    base = [t for t in requested if t not in grafted]
    if base:
        log(f"already in the base vocabulary, not trained as new rows (base rows stay as they are): "
            f"{', '.join(base[:20])}" + (f" and {len(base) - 20} more" if len(base) > 20 else ""))
    keep = [t for t in requested if t in grafted]
    if not keep:
        raise ParamsError(f"none of the tokens is new ({', '.join(base[:5])} are in the base vocabulary): "
                          f"nothing to train as new rows; list tokens the tokenizer does not have")
    return keep


def prepare(model, mode: str, new_ids: list[int], tied: bool, *, train_projector: bool = False,
            train_vision: bool = False, lora: dict | None = None) -> Plan:
    """Freeze/unfreeze per ``mode`` and attach the new-row deltas; returns the model to train."""
    if mode not in MODES:
        raise ParamsError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    emb = model.get_input_embeddings().weight
    rows = NewRows(new_ids, emb.shape[1], emb.shape[0], tied, dtype=torch.float32)
    setattr(model, ATTR, rows)
    rows.attach(model)

    for name, p in model.named_parameters():
        if mode == "full":
            p.requires_grad_(not _is_vision(name) or train_vision)
        else:
            p.requires_grad_(train_projector and _is_projector(name))
    rows.shield = mode == "full"
    if mode == "lora":
        from peft import get_peft_model

        cfg = lora_config(model, **(lora or {}))
        projector = {n for n, p in model.named_parameters() if p.requires_grad and _is_projector(n)}
        model = get_peft_model(model, cfg)
        for n, p in model.named_parameters():  # PEFT froze everything that is not LoRA
            if n.removeprefix("base_model.model.") in projector:
                p.requires_grad_(True)
    for p in rows.parameters():
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Plan(mode, model, rows, trainable, total)


def param_groups(model, rows: NewRows, lr: float, weight_decay: float, rows_lr: float | None,
                 rows_weight_decay: float | None) -> list[dict]:
    """Optimizer groups: new rows (own LR/WD) and everything else trainable. Biases, norms and the
    vocabulary matrices get no weight decay (decaying a base embedding row would drag it to zero)."""
    row_params = {id(p) for p in rows.parameters()}
    vocab = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        vocab.add(id(head.weight))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in row_params:
            continue
        (no_decay if (p.ndim < 2 or "norm" in n.lower() or id(p) in vocab) else decay).append(p)
    groups = [{"params": list(rows.parameters()), "lr": rows_lr if rows_lr is not None else lr,
               "weight_decay": rows_weight_decay if rows_weight_decay is not None else 0.0,
               "name": "new_rows"}]
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"})
    return groups
