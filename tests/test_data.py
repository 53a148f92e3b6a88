"""Data pipeline and tokenizers: packing invariants, SFT masks, sources, sharding, resume, validation."""

import dataclasses
import json

import numpy as np
import pytest

from rl.tasks.arithmetic import synthetic_example
from train.data import DataConfig, load_records, make_iterator, render_prompt, validate_vocab
from train.tokenizer import TAGS, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

BYTE = ByteTokenizer()
KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def it_for(cfg, batch=4, records=None, tok=BYTE, pi=0, pc=1):
    return make_iterator(cfg, batch, tok, records=records, process_index=pi, process_count=pc)


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def tokens_of(batch, r, s, e):
    """The whole token sequence of a segment: its inputs, plus the row's final token when that is its target."""
    toks = [int(x) for x in batch["inputs"][r, s:e]]
    return toks + [int(batch["targets"][r, e - 1])] if batch["loss_mask"][r, e - 1] else toks


def segments(batch):
    """(row, segment id, start, end) of every segment, checking the layout: ids 1..k left to right, padding last."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        n_real = int((seg > 0).sum())
        assert (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all(), seg
        ids = seg[:n_real]
        starts = [0] + [i for i in range(1, n_real) if ids[i] != ids[i - 1]] if n_real else []
        assert [int(ids[s]) for s in starts] == list(range(1, len(starts) + 1)), ids
        for j, s in enumerate(starts):
            e = starts[j + 1] if j + 1 < len(starts) else n_real
            out.append((r, j + 1, s, e))
    return out


def check_layout(batch, seq_len, eos):
    """Shapes/dtypes; positions restart per segment; trained targets stay inside their segment."""
    for k in KEYS:
        assert batch[k].shape[1] == seq_len
        assert batch[k].dtype == (np.float32 if k == "loss_mask" else np.int32), k
    inp, tgt, mask, pos, seg = (batch[k] for k in KEYS)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert (mask[seg == 0] == 0).all()  # no loss on padding
    for r, _, s, e in segments(batch):
        np.testing.assert_array_equal(pos[r, s:e], np.arange(e - s))
        for i in range(s, e):
            if mask[r, i]:
                if i + 1 < e:
                    assert tgt[r, i] == inp[r, i + 1]
                else:  # a segment's last input with a trained target: the sequence goes on to the row's end
                    assert i == seq_len - 1
        if not mask[r, e - 1]:  # a sequence that ends in the row ends with eos, whose next token is not trained
            assert inp[r, e - 1] == eos


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip_and_tags():
    tok = load_tokenizer("byte")
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 263
    assert len({tok.pad_id, tok.bos_id, tok.eos_id, *tok.special.values()}) == 7
    assert set(tok.special) == set(TAGS)
    text = "héllo → 世界\n<think>2+2=4</think> <answer>4</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for t in TAGS:
        assert ids.count(tok.special[t]) == 1 and tok.encode(t) == [tok.special[t]]
    assert all(0 <= i < tok.vocab_size for i in ids)
    # control tokens never come from text; decode can leave them out
    assert tok.encode("<eos>") == list(b"<eos>")
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "<bos>hi<eos><pad>"
    assert tok.decode([tok.bos_id, *tok.encode("<think>x"), tok.eos_id], skip_special_tokens=True) == "<think>x"
    assert tok.decode([0xE4]) == "\ufffd"  # invalid utf-8 is replaced, not raised


def _train_hf(path, with_config=False):
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<s>", "</s>", *TAGS]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([synthetic_example(0, i)["text"] for i in range(200)], trainer)
    tok.save(str(path / "tokenizer.json"))
    if with_config:
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    return path / "tokenizer.json"


def test_hf_tokenizer(tmp_path):
    file = _train_hf(tmp_path)
    tok = load_tokenizer(str(file))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size <= 320
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (1, 2, 3)
    assert tok.special == {t: 4 + i for i, t in enumerate(TAGS)}
    text = "Q: 12+7=? A: 19\nWhat is 3*4? <think>3*4=12</think> <answer>12</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.special["<think>"]) == 1
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size  # a directory holding tokenizer.json
    validate_vocab(tok, 512)
    # tokenizer_config.json beside the file names the special tokens
    d = tmp_path / "cfg"
    d.mkdir()
    assert load_tokenizer(str(_train_hf(d, with_config=True))).eos_id == 1
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_validate_vocab():
    validate_vocab(BYTE, 512)
    validate_vocab(BYTE, 263)
    with pytest.raises(ValueError, match=r"263.*256"):
        validate_vocab(BYTE, 256)


# ---------------------------------------------------------------------------------------------------------------
# Config and sources


@pytest.mark.parametrize("kw, field", [
    ({"seq_len": 1}, "data.seq_len"), ({"seq_len": 8.0}, "data.seq_len"), ({"kind": "rl"}, "data.kind"),
    ({"source": "csv"}, "data.source"), ({"source": "jsonl"}, "data.path"), ({"seed": -1}, "data.seed"),
    ({"chat_template": "User: {q}"}, "data.chat_template"), ({"chat_template": "no field"}, "data.chat_template"),
    ({"num_workers": -1}, "data.num_workers"), ({"text_field": ""}, "data.text_field"),
    ({"shuffle": 1}, "data.shuffle"), ({"num_epochs": -1}, "data.num_epochs"),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kw)


def test_config_frozen_and_errors():
    cfg = DataConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seq_len = 3
    with pytest.raises(ValueError, match="records"):
        it_for(DataConfig(source="memory"))
    with pytest.raises(ValueError, match="data.text_field"):
        it_for(DataConfig(source="memory"), records=[{"body": "x"}])
    with pytest.raises(ValueError, match="data.response_field"):
        it_for(DataConfig(source="memory", kind="sft"), records=[{"prompt": "x"}])
    with pytest.raises(ValueError, match="batch_size"):
        it_for(DataConfig(), batch=3, pc=2)


def test_missing_files(tmp_path):
    for source in ("jsonl", "parquet"):
        missing = tmp_path / f"missing.{source}"
        with pytest.raises(FileNotFoundError, match="missing"):
            it_for(DataConfig(source=source, path=str(missing)))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        it_for(DataConfig(source="parquet", path=str(tmp_path)))  # a directory without data files


def test_synthetic_is_deterministic_and_correct():
    a, b = synthetic_example(3, 17), synthetic_example(3, 17)
    assert a == b and a != synthetic_example(4, 17)
    for i in range(50):
        ex = synthetic_example(0, i)
        expr = ex["prompt"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == ex["answer"]  # our own arithmetic strings
        assert ex["response"].endswith(f"<answer>{ex['answer']}</answer>") and ex["response"].startswith("<think>")
        for line in ex["text"].split("\n"):
            q, ans = line.removeprefix("Q: ").split("=? A: ")
            assert str(eval(q)) == ans


def _sft_records(n):
    return [{"prompt": f"p{i} " * (i % 3 + 1), "response": f"<think>r{i}</think> <answer>{i}</answer>"}
            for i in range(n)]


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document {i}: " + "abc" * i for i in range(10)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    recs = load_records(DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl")))
    assert [r["text"] for r in recs] == docs

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    table = pa.table({"prompt": [r["prompt"] for r in _sft_records(12)],
                      "response": [r["response"] for r in _sft_records(12)], "extra": list(range(12))})
    pq.write_table(table.slice(0, 7), pq_dir / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(7), pq_dir / "train-00001-of-00002.parquet")
    cfg = DataConfig(source="parquet", kind="sft", path=str(pq_dir))
    assert list(load_records(cfg)) == [{k: r[k] for k in ("prompt", "response")} for r in _sft_records(12)]
    assert len(load_records(DataConfig(source="parquet", kind="sft",
                                       path=str(pq_dir / "train-00001-of-00002.parquet")))) == 5
    # datasets.save_to_disk layout: Arrow IPC stream files listed in state.json
    arrow_dir = tmp_path / "disk"
    arrow_dir.mkdir()
    with pa.OSFile(str(arrow_dir / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (arrow_dir / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert load_records(DataConfig(source="parquet", kind="sft", path=str(arrow_dir)))[3] == \
        {k: _sft_records(12)[3][k] for k in ("prompt", "response")}
    with pytest.raises(ValueError, match="data.text_field"):
        load_records(DataConfig(source="parquet", path=str(pq_dir)))

    # both go through the pipeline; one epoch sees every record exactly once
    for cfg in (DataConfig(source="jsonl", path=str(tmp_path), shuffle=False, num_epochs=1, seq_len=64),
                DataConfig(source="parquet", kind="sft", path=str(pq_dir), num_epochs=1, seq_len=64)):
        it = it_for(cfg, batch=2)
        batches = list(it)
        assert batches and it.stats["batches"] == len(batches)
        n_seq = sum(len(segments(b)) for b in batches)
        assert n_seq <= (10 if cfg.kind == "pretrain" else 12)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining packing


def test_pretrain_packing_invariants_synthetic():
    cfg = DataConfig(seq_len=96)
    for b in take(it_for(cfg, batch=8), 6):
        check_layout(b, 96, BYTE.eos_id)
        assert b["loss_mask"].mean() > 0.8  # packing leaves little padding


def test_pretrain_documents_are_whole_and_every_pair_trained_once():
    docs = [f"doc{i} " * (i % 7 + 1) for i in range(40)]
    cfg = DataConfig(source="memory", seq_len=48, shuffle=False, num_epochs=1)
    batches = list(it_for(cfg, batch=4, records=docs))
    encoded = {(BYTE.bos_id, *BYTE.encode(d), BYTE.eos_id) for d in docs}
    seen = []
    for b in batches:
        check_layout(b, 48, BYTE.eos_id)
        for r, _, s, e in segments(b):
            full = tuple(tokens_of(b, r, s, e))
            assert full in encoded  # a whole document: bos ... eos, nothing from a neighbour
            assert b["loss_mask"][r, s:e - 1].all()
            seen.append(full)
    assert len(seen) == len(set(seen))
    total = sum(b["loss_mask"].sum() for b in batches)
    assert total == sum(len(d) - 1 for d in seen)


def test_pretrain_long_documents_are_chunked_with_overlap():
    long = "".join(chr(ord("a") + i % 26) for i in range(300))
    cfg = DataConfig(source="memory", seq_len=32, shuffle=False, num_epochs=1, pack=False)
    batches = list(it_for(cfg, batch=2, records=[long]))
    ids = [BYTE.bos_id, *BYTE.encode(long), BYTE.eos_id]
    pieces = []
    for b in batches:
        check_layout(b, 32, BYTE.eos_id)
        for r, _, s, e in segments(b):
            pieces.append((tokens_of(b, r, s, e), b["loss_mask"][r, s:e]))
    # consecutive chunks overlap by one token and rebuild the document; every next-token pair is trained once
    rebuilt = pieces[0][0]
    for p, _ in pieces[1:]:
        assert p[0] == rebuilt[-1]
        rebuilt += p[1:]
    # drop_remainder may leave out the last chunks of the single epoch: compare the prefix
    assert rebuilt == ids[:len(rebuilt)]
    assert sum(m.sum() for _, m in pieces) == len(rebuilt) - 1


def test_unpacked_rows_hold_one_sequence():
    cfg = DataConfig(seq_len=200, pack=False)
    for b in take(it_for(cfg, batch=4), 3):
        check_layout(b, 200, BYTE.eos_id)
        assert (b["segment_ids"].max(axis=1) == 1).all()


# ---------------------------------------------------------------------------------------------------------------
# SFT


def _check_sft(batches, cfg, records, tok=BYTE):
    by_prompt = {tuple(([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(render_prompt(cfg, r["prompt"]))):
                 r for r in records}
    n = 0
    for b in batches:
        check_layout(b, cfg.seq_len, tok.eos_id)
        for r, _, s, e in segments(b):
            inp, tgt, m = b["inputs"][r, s:e], b["targets"][r, s:e], b["loss_mask"][r, s:e]
            k = int(np.argmax(m))  # first trained position: its input is the prompt's last token
            prompt = tuple(int(x) for x in inp[:k + 1])
            assert prompt in by_prompt
            n_trained = len(tokens_of(b, r, s, e)) - 1 - k
            assert not m[:k].any() and m[k:k + n_trained].all() and not m[k + n_trained:].any()
            want = tok.encode(cfg.response_sep + by_prompt[prompt]["response"]) + [tok.eos_id]
            assert list(tgt[m > 0]) == want
            n += 1
    return n


def test_sft_loss_mask_only_on_response():
    recs = _sft_records(30)
    cfg = DataConfig(kind="sft", source="memory", seq_len=80, num_epochs=1)
    batches = list(it_for(cfg, batch=4, records=recs))
    assert _check_sft(batches, cfg, recs) >= 24
    # synthetic SFT rows too, one example per row
    cfg = DataConfig(kind="sft", seq_len=96, pack=False)
    for b in take(it_for(cfg, batch=4), 3):
        check_layout(b, 96, BYTE.eos_id)
        assert (b["segment_ids"].max(axis=1) == 1).all()
        text = BYTE.decode(b["inputs"][0][b["segment_ids"][0] > 0])
        assert text.startswith("<bos>User: What is ") and "\nAssistant: <think>" in text


def test_sft_truncation_and_drops_are_counted():
    recs = [{"prompt": "short", "response": "x" * 100},  # truncated from the response end
            {"prompt": "p" * 100, "response": "never fits"},  # no room for a response token: dropped
            {"prompt": "ok", "response": "fine"}]
    cfg = DataConfig(kind="sft", source="memory", seq_len=40, shuffle=False, num_epochs=1, pack=False)
    it = it_for(cfg, batch=2, records=recs)
    (b,) = list(it)
    assert it.stats["truncated"] == 1 and it.stats["dropped"] == 1 and it.stats["sequences"] == 2
    check_layout(b, 40, BYTE.eos_id)
    prompt = [BYTE.bos_id, *BYTE.encode("User: short\nAssistant:")]
    ids = prompt + BYTE.encode(" " + "x" * 100)
    np.testing.assert_array_equal(b["inputs"][0], ids[:40])
    np.testing.assert_array_equal(b["targets"][0], ids[1:41])
    assert b["loss_mask"][0].sum() == 41 - len(prompt) and not b["loss_mask"][0][:len(prompt) - 1].any()
    assert BYTE.decode(b["targets"][1][b["loss_mask"][1] > 0]) == " fine<eos>"


def test_sft_with_hf_tokenizer(tmp_path):
    tok = load_tokenizer(str(_train_hf(tmp_path)))
    recs = _sft_records(12)
    cfg = DataConfig(kind="sft", source="memory", seq_len=64, num_epochs=1)
    assert _check_sft(list(it_for(cfg, batch=2, records=recs, tok=tok)), cfg, recs, tok) >= 10


# ---------------------------------------------------------------------------------------------------------------
# Determinism, sharding, resume


def test_deterministic_given_seed():
    cfg = DataConfig(seq_len=64)
    a, b = take(it_for(cfg), 4), take(it_for(cfg), 4)
    assert same_batches(a, b)
    c = take(it_for(DataConfig(seq_len=64, seed=1)), 4)
    assert not same_batches(a, c)
    # process index/count default to JAX's (one process here); the tokenizer defaults to cfg.tokenizer
    assert same_batches(take(make_iterator(cfg, 4), 4), a)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_processes_read_their_own_shards_and_match_one_process(kind):
    cfg = DataConfig(kind=kind, seq_len=64, num_shards=4)
    glob = take(it_for(cfg, batch=8), 3)  # one process building all four shards
    parts = [take(it_for(cfg, batch=8, pi=i, pc=4), 3) for i in range(4)]
    for step, g in enumerate(glob):
        for k in KEYS:
            assert all(p[step][k].shape[0] == 2 for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[step][k] for p in parts]), g[k])
        rows = [tuple(p[step]["inputs"][r]) for p in parts for r in range(2)]
        assert len(set(rows)) == 8  # different rows on different processes
    # two processes of two shards each give the same global batches
    halves = [take(it_for(cfg, batch=8, pi=i, pc=2), 3) for i in range(2)]
    assert same_batches([{k: np.concatenate([h[s][k] for h in halves]) for k in KEYS} for s in range(3)], glob)
    # num_shards=0 means one per process; the single-process default is the whole pipeline as one shard
    assert make_iterator(DataConfig(kind=kind), 8, BYTE, process_index=1, process_count=2).shards == (1,)
    with pytest.raises(ValueError, match="data.num_shards"):
        it_for(DataConfig(num_shards=3), batch=6, pi=0, pc=2)
    with pytest.raises(ValueError, match="num_shards 4"):
        it_for(cfg, batch=6)


def _docs_in(batches):
    """The documents ('doc <id> ...') whose start appears in a list of pretraining batches."""
    text = "".join(bytes(int(t) for t in row if 0 < t < 256).decode("latin-1")
                   for b in batches for row in b["inputs"])
    return [int(w.split()[0]) for w in text.split("doc ")[1:]]


@pytest.mark.parametrize("source", ["memory", "jsonl", "parquet"])
def test_each_process_reads_only_its_records(source, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import train.streaming as streaming

    docs = [f"doc {i} " + "x" * (i % 7) for i in range(120)]
    path, records = "", None
    if source == "memory":
        records = docs
    elif source == "jsonl":
        monkeypatch.setattr(streaming, "JSONL_BLOCK_BYTES", 200)  # ~8 blocks
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=15)
    read = []
    real = streaming.read_block
    monkeypatch.setattr(streaming, "read_block", lambda b, f: read.append(b) or real(b, f))
    cfg = DataConfig(source=source, path=str(path), seq_len=32, num_epochs=1, shuffle_window=16)
    seen, blocks = [], []
    for i in range(2):
        read.clear()
        seen.append(_docs_in(list(it_for(cfg, batch=4, records=records, pi=i, pc=2))))
        blocks.append(set(read))
    assert not set(seen[0]) & set(seen[1])  # disjoint shares of one epoch
    assert len(seen[0]) + len(seen[1]) > 90 and all(len(s) == len(set(s)) for s in seen)
    if source == "memory":  # records i::2 after one global shuffle
        assert set(seen[0]) | set(seen[1]) <= set(range(120))
    else:
        assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]  # no block is read by both processes
        assert len(blocks[0] | blocks[1]) == len(streaming.list_blocks([str(path)], {"text": "data.text_field"}))


@pytest.mark.parametrize("cfg, records", [
    (DataConfig(seq_len=48), None),
    (DataConfig(kind="sft", seq_len=64), None),
    (DataConfig(kind="sft", seq_len=64, pack=False), None),
    # long documents: states in the middle of a chunked document
    (DataConfig(source="memory", seq_len=16, seed=5), ["x" * n for n in range(1, 90, 7)]),
])
def test_resume_gives_identical_batches(cfg, records):
    ref = it_for(cfg, batch=4, records=records, pi=1, pc=2)
    want = take(ref, 12)
    for k in (0, 1, 3, 7):
        it = it_for(cfg, batch=4, records=records, pi=1, pc=2)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
        it2 = it_for(cfg, batch=4, records=records, pi=1, pc=2)
        it2.set_state(state)
        assert same_batches(take(it2, 4), want[k:k + 4]), k
        assert it2.stats["batches"] == k + 4
    with pytest.raises(ValueError, match="seq_len"):
        it_for(DataConfig(kind=cfg.kind, source=cfg.source, seq_len=cfg.seq_len + 1, pack=cfg.pack, seed=cfg.seed),
               batch=4, records=records).set_state(state)


def test_streamed_source_resumes_mid_block_and_mid_window(tmp_path, monkeypatch):
    import train.streaming as streaming

    monkeypatch.setattr(streaming, "JSONL_BLOCK_BYTES", 300)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " + "y" * (i % 11)}) + "\n"
                                              for i in range(200)))
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl"), seq_len=24, shuffle_window=8, num_shards=2)
    want = take(it_for(cfg, batch=4, pi=1, pc=2), 12)
    for k in (1, 5):
        it = it_for(cfg, batch=4, pi=1, pc=2)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        assert set(state["shards"]) == {"1"}  # a process saves (and here, without peers, gathers) its own shards
        it2 = it_for(cfg, batch=4, pi=1, pc=2)
        it2.set_state(state)
        assert same_batches(take(it2, 4), want[k:k + 4]), k
    # a state of another sharding is refused with the way out
    with pytest.raises(ValueError, match="set data.num_shards"):
        it_for(dataclasses.replace(cfg, num_shards=0), batch=4).set_state(state)


def test_version_1_state_restores_as_one_shard():
    cfg = DataConfig(seq_len=48)
    it = it_for(cfg)
    take(it, 3)
    v2 = it.get_state()
    shard = v2["shards"]["0"]
    v1 = {"version": 1, "config": {k: v for k, v in v2["config"].items() if k not in ("num_shards", "shuffle_window")},
          "stats": shard["stats"], "pipeline": shard["pipeline"]}
    it2 = it_for(cfg)
    it2.set_state(json.loads(json.dumps(v1)))
    assert same_batches(take(it2, 3), take(it, 3)) and it2.stats["batches"] == 6


def test_more_shards_than_blocks_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b c"] * 10}), tmp_path / "one.parquet", row_group_size=5)  # 2 blocks
    cfg = DataConfig(source="parquet", path=str(tmp_path / "one.parquet"), num_epochs=1, num_shards=4)
    with pytest.raises(ValueError, match="data.num_shards: 4 shards but .* 2 blocks x 1 epochs"):
        it_for(cfg, batch=4)
    it_for(dataclasses.replace(cfg, num_epochs=2), batch=4)  # 4 blocks over 4 shards: fine
