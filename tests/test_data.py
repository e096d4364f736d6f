"""Data: the LM token stream and its blocks, training shards (disjoint, complete, reshuffled per epoch),
evaluation shards (each sample exactly once), and resuming part-way into an epoch."""

import json

import torch
from torch.utils.data import TensorDataset

from train.data import IGNORE_INDEX
from train.data.corpus import load_tokenizer, prepare
from train.data.loaders import ShardSampler, batches_forever, eval_loader, train_loader
from train.data.tokenizer import ByteTokenizer


def _write_text(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _corpus(tmp_path, source, **data):
    """The train and validation blocks `task: lm` trains on, for a data section."""
    from train.tasks.lm import TextDataConfig

    cfg = TextDataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **data)
    corpus, tokenizer = prepare(cfg, load_tokenizer(cfg.tokenizer), show_progress=False)
    return corpus, tokenizer


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "naïve café — ∑"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.vocab_size == 259  # 256 bytes + PAD, BOS, EOS


def test_blocks_are_views_of_the_token_stream_with_next_token_targets(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abcdefghij\n")
    (tmp_path / "b.txt").write_bytes(b"klmnop")
    corpus, tok = _corpus(tmp_path, tmp_path / "*.txt", block_size=4, val_fraction=0.01)
    stream = list(b"abcdefghij\n") + [tok.eos_id] + list(b"klmnop") + [tok.eos_id]
    blocks = [corpus.train[i] for i in range(len(corpus.train))] + [
        corpus.val[i] for i in range(len(corpus.val))]
    assert blocks[0]["input_ids"].tolist() == stream[0:4]
    assert blocks[0]["labels"].tolist() == stream[1:5]
    # Every token after the first of each split is a target exactly once (files in sorted
    # order, each followed by EOS); the validation's short tail is padded and ignored.
    targets = [t for b in blocks for t in b["labels"].tolist() if t != IGNORE_INDEX]
    train_targets = [t for i in range(len(corpus.train))
                     for t in corpus.train[i]["labels"].tolist()]
    assert targets[:len(train_targets)] == stream[1:len(train_targets) + 1]
    assert corpus.val[len(corpus.val) - 1]["labels"].tolist()[-1] == IGNORE_INDEX


def test_validation_is_the_held_out_tail(tmp_path):
    src = _write_text(tmp_path / "t.txt", [f"line {i:04d} " + "x" * 20 for i in range(2000)])
    corpus, tok = _corpus(tmp_path, src, block_size=16, val_fraction=0.1)
    text = lambda blocks: "".join(tok.decode(blocks[i]["input_ids"].tolist())  # noqa: E731
                                  for i in range(len(blocks)))
    val_text, train_text = text(corpus.val), text(corpus.train)
    assert "line 1999" in val_text and "line 1999" not in train_text
    assert "line 0000" in train_text and "line 0000" not in val_text
    assert 0.09 < corpus.val_bytes / src.stat().st_size < 0.11


def test_local_jsonl_source_with_text_column(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(40)))
    corpus, _ = _corpus(tmp_path, src, text_column="body", block_size=8, val_fraction=0.25)
    assert len(corpus.train) > 0 and len(corpus.val) > 0


def _indices(loader):
    return [int(i) for (batch,) in loader for i in batch]


def test_training_shards_are_disjoint_complete_and_reshuffled():
    data = TensorDataset(torch.arange(103))
    shards = [train_loader(data, 5, num_replicas=2, rank=r, seed=7) for r in range(2)]
    seen = []
    for loader in shards:
        loader.sampler.set_epoch(0)
        seen.append(_indices(loader))
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == 50  # drop_last: equal work on every rank
    assert len(set(seen[0]) | set(seen[1])) == 100
    shards[0].sampler.set_epoch(1)
    assert _indices(shards[0]) != seen[0]


def test_eval_shards_count_every_sample_once_with_odd_sizes():
    data = TensorDataset(torch.arange(101))
    parts = [_indices(eval_loader(data, 8, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(101))
    assert len(ShardSampler(101, 2, 0)) == 51 and len(ShardSampler(101, 2, 1)) == 50


def test_resuming_mid_epoch_continues_the_same_order():
    data = TensorDataset(torch.arange(60))
    straight = batches_forever(train_loader(data, 4, 1, 0, seed=3))
    expected = [next(straight) for _ in range(25)]  # crosses into epoch 1
    epoch, consumed, _ = expected[9]
    assert (epoch, consumed) == (0, 40)
    resumed = batches_forever(train_loader(data, 4, 1, 0, seed=3), start_epoch=epoch,
                              skip_samples=consumed)
    for want in expected[10:]:
        got = next(resumed)
        assert got[:2] == want[:2]
        assert torch.equal(got[2][0], want[2][0])


def test_resuming_on_a_different_world_size_repeats_and_loses_nothing():
    """Two ranks consume 3 batches each, then the epoch finishes on three ranks: together they
    see every sample of the epoch once (up to the tail that keeps shares equal)."""
    data = TensorDataset(torch.arange(100))
    first = [batches_forever(train_loader(data, 5, 2, r, seed=11)) for r in range(2)]
    seen = [int(i) for it in first for _ in range(3) for i in next(it)[2][0]]
    consumed = 3 * 5 * 2
    rest = []
    for r in range(3):
        loader = train_loader(data, 5, 3, r, seed=11)
        for epoch, _, (batch,) in batches_forever(loader, 0, consumed):
            if epoch > 0:
                break
            rest += batch.tolist()
    assert not set(seen) & set(rest) and len(seen + rest) == len(set(seen + rest))
    assert len(seen) + len(rest) >= 100 - 3 * 5  # at most the last partial round is dropped
