"""PEFT adapters trained with PEFT itself, remapped to another vocabulary, loaded back with PEFT;
AdamW resumed after adding tokens with the moments of shared rows preserved."""
from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import word_tokenizer, words

from tokengraft.checkpoint import read_state_dict
from tokengraft.checkpoint.convert import convert
from tokengraft.checkpoint.remap import remap_state_dict

SRC = words(96) + ["<a>", "<b>", "<c>", "<e>"]  # 100 rows
TGT = words(96) + ["<c>", "<d>", "<a>", "<e>", "<f>"]  # 101 rows: <b> dropped, <d> <f> new, <a> <c> moved


def tiny_llama(rows, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def train_steps(model, steps=3, lr=1e-2, seed=0):
    """A few real optimizer steps on sequences that use the added tokens."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(90, 100, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def target_base(src_base):
    """The target base model: the source base's rows moved to the target vocabulary by identity."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**src_base.config.to_dict(), "vocab_size": len(TGT)})
    cfg.tie_word_embeddings = False
    tgt = LlamaForCausalLM(cfg).eval()
    new, _ = remap_state_dict(src_base.state_dict(), SRC, TGT)
    tgt.load_state_dict(new)
    return tgt


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    word_tokenizer(TGT).save_pretrained(d / "target")
    word_tokenizer(SRC).save_pretrained(d / "srctok")
    return d


@pytest.mark.parametrize("kind", ["modules_to_save", "trainable_tokens", "lora_on_vocab"])
def test_peft_adapter_remapped_and_loaded_back(folders, tmp_path, kind):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama(len(SRC))
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    if kind == "modules_to_save":
        cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    elif kind == "lora_on_vocab":  # lm_head.lora_B has vocabulary rows, lora_embedding_A vocabulary columns
        cfg = LoraConfig(r=4, target_modules=["q_proj", "embed_tokens", "lm_head"])
    else:
        cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                         trainable_token_indices={"embed_tokens": [96, 97, 98]})  # <a>, <b>, <c>
    pm = get_peft_model(base, cfg)
    train_steps(pm)
    pm.save_pretrained(tmp_path / "adapter")
    src_logits_ids = torch.tensor([[5, 96, 7, 98, 99]])  # w5 <a> w7 <c> <e>
    with torch.no_grad():
        src_logits = pm(input_ids=src_logits_ids).logits[0]
    src_emb = pm.get_input_embeddings()(src_logits_ids)[0].detach()

    out = tmp_path / "adapter-tgt"
    report = convert(tmp_path / "adapter", folders / "target", out, source_tokenizer=str(folders / "srctok"),
                     log=lambda *a: None)
    assert set(report.dropped.values()) == {"<b>"}
    base2 = tiny_llama(len(SRC))
    base2.load_state_dict(base_sd)
    tgt = PeftModel.from_pretrained(target_base(base2), out).eval()
    tgt_ids = torch.tensor([[5, TGT.index("<a>"), 7, TGT.index("<c>"), TGT.index("<e>")]])
    tgt_emb = tgt.get_input_embeddings()(tgt_ids)[0].detach()
    assert torch.equal(tgt_emb, src_emb)  # trained rows of shared tokens moved with their tokens
    with torch.no_grad():
        tgt_logits = tgt(input_ids=tgt_ids).logits[0]
    # same text, same model: the logits over shared tokens agree (new rows only add columns)
    shared_src = [SRC.index(t) for t in TGT if t in SRC]
    shared_tgt = [TGT.index(t) for t in TGT if t in SRC]
    assert torch.allclose(tgt_logits[:, shared_tgt], src_logits[:, shared_src], atol=1e-5)
    if kind == "trainable_tokens":
        cfg_out = json.loads((out / "adapter_config.json").read_text())
        assert cfg_out["trainable_token_indices"] == {"embed_tokens": [TGT.index("<a>"), TGT.index("<c>")]}
    elif kind == "lora_on_vocab":
        kinds = {r["kind"] for r in report.remapped}
        assert {"lora_B", "lora_embedding_A", "weight"} <= kinds
    else:
        sd, _ = read_state_dict(out)
        assert sd["base_model.model.lm_head.weight"].shape[0] == len(TGT)


def test_adamw_resume_after_adding_tokens_keeps_shared_moments():
    model = tiny_llama(len(SRC))
    opt = train_steps(model, steps=2)
    names = [n for n, _ in model.named_parameters()]
    old = opt.state_dict()
    new_sd, report = remap_state_dict(model.state_dict(), SRC, TGT, optimizer=old, param_names=names)
    tgt = target_base(model)
    tgt.load_state_dict(new_sd)
    opt2 = torch.optim.AdamW(tgt.parameters(), lr=1e-2)
    opt2.load_state_dict(report.optimizer)
    i = names.index("lm_head.weight")
    for moment in ("exp_avg", "exp_avg_sq"):
        m_old, m_new = old["state"][i][moment], opt2.state_dict()["state"][i][moment]
        assert m_new.shape == (len(TGT), 32)
        for tok in ("<a>", "<c>", "<e>", "w3"):
            assert torch.equal(m_new[TGT.index(tok)], m_old[SRC.index(tok)])
        assert torch.count_nonzero(m_new[[TGT.index("<d>"), TGT.index("<f>")]]) == 0
    j = names.index("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(opt2.state_dict()["state"][j]["exp_avg"], old["state"][j]["exp_avg"])
    # training resumes: one more step runs and moves the rows
    ids = torch.tensor([[TGT.index("<a>"), TGT.index("<d>"), 3, 4]])
    before = tgt.lm_head.weight.detach().clone()
    tgt.train()
    tgt(input_ids=ids, labels=ids).loss.backward()
    opt2.step()
    assert not torch.equal(before, tgt.lm_head.weight)
    assert sum(r["kind"] == "moment" for r in report.remapped) == 2  # embed_tokens and lm_head
