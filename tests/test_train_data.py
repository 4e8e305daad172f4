"""Data and pre-flight: chat templates, labels only on assistant turns, image expansion, truncation
that never cuts an image, and each data problem the pre-flight must catch. Tokenizer + processor
only (no model weights)."""
from __future__ import annotations

import json
import os

import pytest

IMG = "<image>"


@pytest.fixture(scope="module")
def proc(llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def tok(proc):
    return proc.tokenizer


@pytest.fixture(scope="module")
def img_id(tok):
    return tok.convert_tokens_to_ids(IMG)


def rec(q="What is it?", a="A cat.", image="x.jpg", rid="r1"):
    r = {"id": rid, "conversations": [{"from": "human", "value": (IMG + "\n" if image else "") + q},
                                       {"from": "gpt", "value": a}]}
    if image:
        r["image"] = image
    return r


def test_image_token_count_comes_from_the_processor(proc, img_id):
    from tokengraft.train.data import image_token_count

    assert image_token_count(proc, img_id) == 49  # 7 x 7 patches of a 224 px CLIP tower


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "vicuna", "llama3", "internlm2"])
def test_labels_cover_only_assistant_turns(tok, img_id, template):
    from tokengraft.train.data import IGNORE, encode, renderer

    r = {"id": "m", "image": "x.jpg", "conversations": [
        {"from": "human", "value": IMG + "\nFirst?"}, {"from": "gpt", "value": "One."},
        {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "Two."}]}
    e = encode(r, tok, renderer(tok, template), image_token_id=img_id, n_image_tokens=49)
    assert e.dropped is None
    assert e.input_ids.count(img_id) == 49
    learned = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE])
    assert "One." in learned and "Two." in learned
    assert "First" not in learned and "Second" not in learned and "user" not in learned.lower()
    assert all(lab == IGNORE for t, lab in zip(e.input_ids, e.labels) if t == img_id)
    full = encode(r, tok, renderer(tok, template), image_token_id=img_id, n_image_tokens=49, train_on="all")
    assert sum(lab != IGNORE for lab in full.labels) > sum(lab != IGNORE for lab in e.labels)


def test_truncation_never_cuts_an_image(tok, img_id):
    from tokengraft.train.data import encode, renderer

    render = renderer(tok, "chatml")
    long_answer = "word " * 200
    e = encode(rec(a=long_answer), tok, render, image_token_id=img_id, n_image_tokens=49, max_length=80)
    assert e.dropped is None and len(e.input_ids) == 80 and e.input_ids.count(img_id) == 49
    late = rec(q="word " * 60 + IMG + " and?", image="x.jpg")
    late["conversations"][0]["value"] = "word " * 60 + IMG + " and?"
    e = encode(late, tok, render, image_token_id=img_id, n_image_tokens=49, max_length=80)
    assert e.dropped and "cut an image" in e.dropped


def test_image_without_placeholder_gets_one_and_count_mismatch_is_caught(tok, img_id):
    from tokengraft.train.data import encode, renderer

    r = rec()
    r["conversations"][0]["value"] = "What is it?"
    e = encode(r, tok, renderer(tok, "chatml"), image_token_id=img_id, n_image_tokens=49)
    assert e.dropped is None and e.input_ids.count(img_id) == 49
    r2 = rec(image=["a.jpg", "b.jpg"])
    e2 = encode(r2, tok, renderer(tok, "chatml"), image_token_id=img_id, n_image_tokens=49)
    assert e2.dropped and "placeholder" in e2.dropped


def test_collator_pads_and_dataset_loads_real_images(tmp_path, tok, proc, img_id):
    from tokengraft.demo.data import make_grounding_dataset
    from tokengraft.train.data import IGNORE, Collator, LlavaDataset, load_records

    d = make_grounding_dataset(tmp_path, n_train=3, n_eval=1, bins=4, text_only=1)
    ds = LlavaDataset(load_records(d["train"]), tok, proc, d["image_folder"], "chatml", image_token_id=img_id)
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["pixel_values"].shape[0] == 3  # the text-only sample adds no image
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_load_records_json_and_jsonl_and_errors(tmp_path):
    from tokengraft.train.data import DataError, load_records

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(rec(rid=str(i))) for i in range(3)) + "\n")
    assert len(load_records(tmp_path / "a.jsonl")) == 3
    (tmp_path / "b.json").write_text(json.dumps([rec()]))
    assert len(load_records(tmp_path / "b.json")) == 1
    (tmp_path / "c.json").write_text(json.dumps([{"id": 1, "conversation": []}]))
    with pytest.raises(DataError, match="conversations"):
        load_records(tmp_path / "c.json")
    (tmp_path / "d.jsonl").write_text(json.dumps(rec()) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:2"):
        load_records(tmp_path / "d.jsonl")


def test_preflight_catches_each_problem(tmp_path, tok, img_id):
    from PIL import Image

    from tokengraft.train.preflight import preflight

    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    records = [
        rec(a="<ref>cat</ref> here", image="ok.jpg", rid="good"),
        rec(image="missing.jpg", rid="no-file"),
        rec(image="broken.jpg", rid="corrupt"),
        rec(a="<box>12</box> " + "long " * 300, image="ok.jpg", rid="too-long"),
    ]
    rep = preflight(records, tok, ["<ref>", "</ref>", "<never>"], image_folder=tmp_path, template="chatml",
                    max_length=100, image_token_id=img_id, n_image_tokens=49)
    assert [s for s, _ in rep.missing_images] == ["no-file"]
    assert [s for s, _, _ in rep.unreadable_images] == ["corrupt"]
    assert [s for s, _, _ in rep.too_long] == ["too-long"]
    assert rep.token_counts == {"<ref>": 1, "</ref>": 1, "<never>": 0}
    assert set(rep.unknown_tags) == {"<box>", "</box>"}  # written in the data, never added
    text = " ".join(p.message for p in rep.problems)
    for needle in ("missing image", "unreadable", "<box>", "<never>"):
        assert needle in text, needle
    # callers decide by code, never by the wording
    assert [p.code for p in rep.problems] == ["missing-images", "unreadable-images", "unknown-tags",
                                              "tokens-never-appear"]
    nofolder = preflight(records[1:2], tok, [], template="chatml", image_token_id=img_id, n_image_tokens=49)
    assert [p.code for p in nofolder.problems] == ["no-image-folder"]
    assert "too long: sample too-long" in rep.format()


def test_tokens_from_data_in_natural_order():
    from tokengraft.train.preflight import PreflightError, tokens_from_data

    records = [rec(a="<box><loc_10><loc_2></box>", image=None), rec(a="<loc_1><image>", image=None)]
    assert tokens_from_data(records, r"<loc_\d+>|</?box>") == ["</box>", "<box>", "<loc_1>", "<loc_2>", "<loc_10>"]
    with pytest.raises(PreflightError, match="nothing in the data"):
        tokens_from_data(records, r"<zzz>")
    with pytest.raises(PreflightError, match="not a valid regular expression"):
        tokens_from_data(records, r"(")


def test_cli_preflight_only_fails_on_unknown_tags_with_one_line(tmp_path, llava_dir, capsys):
    from tokengraft.cli import main

    data = tmp_path / "d.json"
    data.write_text(json.dumps([rec(a="<ref>a</ref><box>1</box>", image=None, rid="t")]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {llava_dir}\ndata: {data}\noutput_dir: {tmp_path / 'run'}\ntokens: '<ref>,</ref>'\n"
                   f"init: mean\ntemplate: chatml\n")
    assert main(["train", str(cfg), "--preflight-only"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(err) == 1 and err[0].startswith("tokengraft train: error: pre-flight")
    assert "<box>" in err[0] and "--tokens" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(["train", str(cfg), "--preflight-only", "--tokens", "from-data </?(ref|box)>"]) == 0


def test_config_keys_are_flags(tmp_path):
    from tokengraft.cli import build_parser
    from tokengraft.commands.train import config_from_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: d.json\noutput_dir: o\nmode: lora\nlr: 0.5\n")
    args = build_parser().parse_args(["train", str(cfg), "--lr", "0.25", "--max-steps", "7", "--no-progress"])
    c = config_from_args(args)
    assert (c.mode, c.lr, c.max_steps, c.progress, c.model) == ("lora", 0.25, 7, False, "m")
    cfg.write_text("model: m\nlearning_rate: 1\n")
    from tokengraft.train.config import TrainError

    with pytest.raises(TrainError, match="unknown key"):
        config_from_args(build_parser().parse_args(["train", str(cfg)]))


# -- linear-time rendering (issue 23, item 5) -----------------------------------------------------

def old_segments(msgs, render):
    """The quadratic reference: every assistant turn renders its two prefixes (the code before issue 23)."""
    out, cursor = [], 0
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(msgs[:j], True), render(msgs[: j + 1], False)
        assert upto.startswith(prompt) and len(prompt) >= cursor
        out.append((prompt[cursor:], False))
        out.append((upto[len(prompt):], True))
        cursor = len(upto)
    full = render(msgs, False)
    out.append((full[cursor:], False))
    return [(t, a) for t, a in out if t]


def conversation(n, system=False, first="human", salt=0):
    turns = [{"from": "system", "value": "Be brief."}] if system else []
    who = first
    for i in range(n):
        turns.append({"from": who, "value": f"{who} {i * 7 + salt}: " + "word " * ((i + salt) % 4)})
        who = "gpt" if who == "human" else "human"
    return {"id": f"c{n}", "conversations": turns}


@pytest.fixture(scope="module")
def fixture_records(tmp_path_factory):
    """The repository's data: the demo's grounding dataset, this file's records, and long chats."""
    from tokengraft.demo.data import make_grounding_dataset
    from tokengraft.train.data import load_records

    d = make_grounding_dataset(tmp_path_factory.mktemp("demo"), n_train=6, n_eval=2, bins=4, text_only=2)
    recs = load_records(d["train"]) + load_records(d["eval"])
    recs += [rec(), rec(image=None), rec(a="<box>1</box>", image=["a.jpg"])]
    recs += [conversation(n, system=s) for n in (2, 3, 5, 8, 41) for s in (False, True)]
    return recs + [conversation(4, first="gpt")]


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "vicuna", "llama3", "internlm2"])
def test_linear_rendering_gives_exactly_the_old_tokens_and_labels(tok, img_id, fixture_records, template):
    from tokengraft.train.data import IGNORE, encode, messages_of, renderer, segments

    render = renderer(tok, template)
    compared = 0
    for r in fixture_records:
        msgs = messages_of(r)
        if template == "tokenizer" and msgs[0]["role"] == "assistant":
            continue  # transformers refuses to render an empty prompt (both ways: a DataError now)
        old = old_segments(msgs, render)
        assert segments(msgs, render) == old, r["id"]
        ids = []
        for text, asst in old:
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += [t for p in piece for t in ([p] * 49 if p == img_id else [p])]
        e = encode(r, tok, render, image_token_id=img_id, n_image_tokens=49, max_length=10**6)
        assert e.input_ids == ids, r["id"]
        learned = "".join(t for t, a in old if a)
        assert tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE]) == \
            tok.decode(tok(learned, add_special_tokens=False)["input_ids"]), r["id"]
        compared += 1
    assert compared >= len(fixture_records) - 1


class Counted:
    """A renderer that counts the messages it renders: the work, without timing anything."""

    def __init__(self, render):
        self.render, self.calls, self.messages = render, 0, 0

    def __call__(self, msgs, gen):
        self.calls += 1
        self.messages += len(msgs)
        return self.render(msgs, gen)


@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
def test_rendering_work_is_linear_in_the_turns(tok, template):
    from tokengraft.train.data import messages_of, renderer, segments

    work = {}
    for n in (400, 800):
        c = Counted(renderer(tok, template))
        segments(messages_of(conversation(n)), c)
        work[n] = c.messages
    # linear: twice the turns is about twice the work (quadratic would be 4x); 400 turns cost about
    # 10 rendered messages a turn (the old split rendered ~80,000 messages for 400 turns)
    assert work[800] < 2.2 * work[400] and work[400] < 12 * 400, work


def test_a_12000_turn_record_preflights_in_seconds(tok):
    import time

    from tokengraft.train.preflight import preflight

    r = conversation(12000)
    r["conversations"][1]["value"] += " <ref>x</ref>"
    t0 = time.time()
    rep = preflight([r], tok, ["<ref>", "</ref>"], template="tokenizer", max_length=100)
    assert time.time() - t0 < 120  # a complexity guard, not a benchmark: quadratic never finished
    assert rep.token_counts == {"<ref>": 1, "</ref>": 1} and rep.too_long[0][1] > 12000
    assert len(rep.encoded) == 1 and rep.encoded[0].full_length == rep.too_long[0][1]


def test_a_template_that_is_not_local_is_split_exactly_or_refused(tok):
    """A template whose text for a turn depends on its absolute position is split prefix by prefix
    (same result as before); beyond EXACT_LIMIT turns it is refused in one line instead of hanging.
    One that is not a growing prefix (the system text moves into the last user turn) is refused."""
    from tokengraft.train.data import EXACT_LIMIT, DataError, messages_of, segments

    def numbered(msgs, gen):
        s = "".join(f"[{i}] {m['role']}: {m['content']}\n" for i, m in enumerate(msgs))
        return s + (f"[{len(msgs)}] assistant: " if gen else "")

    msgs = messages_of(conversation(30))
    assert segments(msgs, numbered) == old_segments(msgs, numbered)
    with pytest.raises(DataError, match="quadratic"):
        segments(messages_of(conversation(EXACT_LIMIT + 2)), numbered)

    def system_last(msgs, gen):
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        return "".join(f"{m['role']}: {m['content']}{' (be brief)' if i == last else ''}\n"
                       for i, m in enumerate(msgs)) + ("assistant: " if gen else "")

    with pytest.raises(DataError, match="growing prefixes"):
        segments(messages_of(conversation(6)), system_last)


def test_pre_flight_encodings_are_the_datasets(tok, img_id, fixture_records):
    """Rendered once: the dataset takes the pre-flight's encodings, equal to encoding afresh."""
    from tokengraft.train.data import LlavaDataset
    from tokengraft.train.preflight import preflight

    recs = [r for r in fixture_records if not r.get("image")]
    rep = preflight(recs, tok, [], template="chatml", max_length=256, check_images=False)
    shared = LlavaDataset(recs, tok, None, None, "chatml", 256, encoded=rep.encoded, log=lambda *a: None)
    fresh = LlavaDataset(recs, tok, None, None, "chatml", 256, log=lambda *a: None)
    assert [(e.input_ids, e.labels) for e in shared.items] == [(e.input_ids, e.labels) for e in fresh.items]


def test_fifo_data_file_and_image_are_refused_before_reading(tmp_path, tok, img_id):
    from tokengraft.train.data import DataError, load_records
    from tokengraft.train.preflight import preflight

    fifo = tmp_path / "train.json"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_records(fifo)  # would block forever on open
    os.mkfifo(tmp_path / "pic.jpg")
    rep = preflight([rec(image="pic.jpg")], tok, [], image_folder=tmp_path, template="chatml",
                    image_token_id=img_id, n_image_tokens=49)
    assert [p.code for p in rep.problems] == ["unreadable-images"] and "regular file" in rep.problems[0].message
