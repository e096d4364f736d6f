"""Padded-sequence models through the shared loop: an encoder-decoder (seq2seq) decoded by its
recurrent twin, and a mean-pooled sequence classifier; length masks, length-grouped batches,
exact metrics across ranks, and `train.generate` for seq2seq runs."""

import json
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (ROOT, read_jsonl, read_wandb_run, run_exported_readme, run_torchrun,
                      single_process_metrics, train_here)
from train.export import main as export
from train.generate import main as generate
from train.errors import ConfigError
from train.tasks import load_config as load
from train.data.loaders import LengthGroupedSampler, ResumableDistributedSampler
from train.data.padded import PadPairs, pair_datasets
from train.data.tokenizer import ByteTokenizer, build_tokenizer
from train.models.seq2seq import Seq2SeqTransformer, SequenceClassifier

SEQ2SEQ = ROOT / "configs" / "seq2seq_tiny.yaml"
TEXT_CLASSIFY = ROOT / "configs" / "text_classify_tiny.yaml"
QUIET = ["wandb.mode=disabled", "progress_bar=false"]
SMALL_S2S = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_encoder_layers=1",
             "model.n_decoder_layers=1", "data.builtin_examples=600", "data.batch_size=16",
             "data.eval_batch_size=32", "optim.warmup_steps=2"]
SMALL_CLS = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_layers=1",
             "data.builtin_examples=600", "data.batch_size=16", "data.eval_batch_size=32",
             "optim.warmup_steps=2"]
VOCAB = ByteTokenizer().vocab_size


def padded_batch(lengths: list[int], width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (len(lengths), width), generator=g)
    return ids, torch.tensor(lengths)


# --- models ---

@pytest.mark.parametrize("self_attention,cross_attention,chunk", [
    ("chunked-causal-linear", "linear", 4),  # the default pair; chunk 4 does not divide 11
    ("causal-linear", "linear", 64),  # the library's compiled kernel
    ("full", "full", 64),
])
def test_recurrent_decoder_matches_the_parallel_decoder(self_attention, cross_attention, chunk):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(VOCAB, 32, 2, 2, 4, 64, self_attention_type=self_attention,
                               cross_attention_type=cross_attention,
                               attention_chunk_size=chunk).eval()
    source, source_lengths = padded_batch([9, 5, 1], 9)
    target, _ = padded_batch([11] * 3, 11, seed=1)
    twin = model.recurrent()  # RecurrentDecoderBuilder decoder, weights loaded with strict=True
    assert type(twin.decoder).__name__ == "RecurrentTransformerDecoder"
    with torch.no_grad():
        parallel = model(source, source_lengths, target)
        memory, memory_mask = twin.encode(source, source_lengths)
        state, steps = None, []
        for position in range(target.shape[1]):
            logits, state = twin.step(target[:, position], position, memory, memory_mask, state)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, dim=1), parallel, atol=1e-5, rtol=0)


def test_padding_content_never_reaches_the_outputs():
    torch.manual_seed(0)
    classifier = SequenceClassifier(VOCAB, 3, 32, 2, 4, 64).eval()
    seq2seq = Seq2SeqTransformer(VOCAB, 32, 1, 1, 4, 64).eval()
    ids, lengths = padded_batch([12, 4, 7], 12)
    other = ids.clone()
    for row, n in enumerate(lengths.tolist()):
        other[row, n:] = torch.randint(0, 256, (12 - n,))  # different padding, same real tokens
    wider = torch.cat([other, torch.full((3, 5), 7)], dim=1)  # and more of it
    target, _ = padded_batch([6] * 3, 6, seed=2)
    with torch.no_grad():
        base = classifier(ids, lengths)
        assert torch.equal(classifier(other, lengths), base)
        assert torch.allclose(classifier(wider, lengths), base, atol=1e-6)
        base = seq2seq(ids, lengths, target)
        assert torch.equal(seq2seq(other, lengths, target), base)
        assert torch.allclose(seq2seq(wider, lengths, target), base, atol=1e-6)
        # Real tokens do count: changing one moves the logits.
        other[1, 0] = (other[1, 0] + 1) % 256
        assert not torch.allclose(classifier(other, lengths), classifier(ids, lengths))


def test_batched_decoding_equals_one_row_at_a_time():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(VOCAB, 32, 1, 1, 4, 64).eval()
    eos = 258
    with torch.no_grad():
        model.head.bias[eos] = 2.0  # some rows end early, at different steps
    source, lengths = padded_batch([7, 3, 5, 1], 7)
    twin = model.recurrent()
    batched = twin.decode(source, lengths, 257, eos, max_new_tokens=12)
    alone = [twin.decode(source[i:i + 1, : int(n)], lengths[i:i + 1], 257, eos, 12)[0]
             for i, n in enumerate(lengths)]
    assert batched == alone
    assert all(eos not in row for row in batched)  # EOS ends a row and is not returned
    assert len({len(row) for row in batched}) > 1, [len(row) for row in batched]


# --- data ---

def test_builtin_pairs_are_a_fixed_problem_with_held_out_inputs():
    config = load(SEQ2SEQ, ["output_dir=/tmp/x", "data.builtin_examples=2000"])
    tokenizer = build_tokenizer("byte")
    train, val = pair_datasets(config.data, tokenizer, seed=0)
    again, _ = pair_datasets(config.data, tokenizer, seed=99)  # the data does not follow the seed
    assert (len(train), len(val)) == (1900, 100)
    assert train["source_ids"][:50] == again["source_ids"][:50]
    seen = {bytes(x) for x in train["source_ids"]}
    assert not any(bytes(x) in seen for x in val["source_ids"])
    for src, tgt in zip(val["source_ids"], val["target_ids"]):
        assert sorted(src) == tgt

    batch = PadPairs(256, 257, 258)([{"source_ids": [5, 6, 7], "target_ids": [1]},
                                     {"source_ids": [9], "target_ids": [2, 3, 4]}])
    assert batch["source"].tolist() == [[5, 6, 7], [9, 256, 256]]
    assert batch["source_lengths"].tolist() == [3, 1]
    assert batch["target_in"].tolist() == [[257, 1, 256, 256], [257, 2, 3, 4]]
    assert batch["labels"].tolist() == [[1, 258, -100, -100], [2, 3, 4, 258]]


def test_length_grouped_batches_cut_padding_and_resume_on_any_world_size():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(4000)]
    data = list(range(len(lengths)))

    def padding(sampler, batch):
        order = list(sampler)
        return sum(batch * max(lengths[i] for i in order[s:s + batch]) - sum(lengths[i] for i in
                   order[s:s + batch]) for s in range(0, len(order) - batch + 1, batch))

    kw = dict(shuffle=True, seed=3, drop_last=True)
    grouped = LengthGroupedSampler(data, lengths, 1024, num_replicas=1, rank=0, **kw)
    plain = ResumableDistributedSampler(data, num_replicas=1, rank=0, **kw)
    assert sorted(grouped) == data  # still every sample once per epoch
    assert padding(grouped, 32) < padding(plain, 32) / 5
    grouped.set_epoch(1)
    assert list(grouped) != list(LengthGroupedSampler(data, lengths, 1024, num_replicas=1,
                                                      rank=0, **kw))  # reshuffled per epoch

    # 2 ranks consume 64 positions each; 3 ranks take over the rest: nothing repeated or lost.
    two = [LengthGroupedSampler(data, lengths, 1024, num_replicas=2, rank=r, **kw) for r in (0, 1)]
    done = [i for s in two for i in list(s)[:64]]
    three = [LengthGroupedSampler(data, lengths, 1024, num_replicas=3, rank=r, **kw) for r in range(3)]
    for s in three:
        s.set_epoch(0, skip=128)
    rest = [i for s in three for i in s]
    assert len(set(done) | set(rest)) == len(done) + len(rest) >= len(data) - 3


# --- end to end ---

@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("s2s") / "run"
    _, error = train_here(SEQ2SEQ, f"output_dir={out}", "max_steps=200", "eval_every=100",
                          "checkpoint_every=200", "wandb.mode=offline", "progress_bar=false",
                          "model.d_model=64", "model.d_ff=256", "data.builtin_examples=4000",
                          "data.batch_size=32", "optim.lr=2e-3", "data.val_fraction=0.05",
                          "seq2seq.decode_examples=4")
    assert error is None
    return out


@pytest.mark.slow
def test_seq2seq_run_learns_and_logs_token_and_exact_match_metrics(seq2seq_run):
    rows = read_jsonl(seq2seq_run / "metrics.jsonl")
    evals = [r for r in rows if "val/exact_match" in r]
    assert [r["step"] for r in evals] == [100, 200]
    assert all(r["val/count"] == 200 for r in evals)
    assert evals[-1]["val/token_accuracy"] > 0.6
    assert evals[-1]["val/exact_match"] >= evals[0]["val/exact_match"]
    assert " -> " in evals[-1]["decoded"]
    train_rows = [r for r in rows if "tokens_per_s" in r]
    assert train_rows and all(r["tokens_per_s"] > 0 and r["source_tokens_per_s"] > 0
                              for r in train_rows)
    assert all(0 < r["mfu"] < 1 for r in train_rows)

    # The decoded examples reach W&B as a table, one per evaluation.
    history = read_wandb_run(seq2seq_run)["history"]
    tables = [h for h in history if "val/decoded_examples/_type" in h]
    assert len(tables) == 2
    assert all(t["val/decoded_examples/_type"] == "table-file" for t in tables)
    assert all(t["val/decoded_examples/nrows"] == 4 for t in tables)
    files = sorted(seq2seq_run.glob("wandb/offline-run-*/files/media/table/val/*.table.json"))
    table = json.loads(files[-1].read_text())
    assert table["columns"] == ["step", "source", "target", "decoded", "exact"]
    assert all(sorted(row[1]) == list(row[2]) for row in table["data"])


@pytest.mark.slow
def test_generate_decodes_source_texts_from_a_seq2seq_run(seq2seq_run, capsys):
    assert generate([str(seq2seq_run), "--source", "dcba", "--source", "zyxw"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("\t" in line for line in lines)
    assert [line.split("\t")[0] for line in lines] == ["dcba", "zyxw"]
    assert generate([str(seq2seq_run), "--source", "hello", "--temperature", "1.0",
                     "--num-samples", "3", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert generate([str(seq2seq_run), "--source", ""]) == 2
    assert "source" in capsys.readouterr().err


@pytest.mark.slow
def test_an_exported_seq2seq_model_decodes_like_generate_without_this_project(
        seq2seq_run, tmp_path, capsys):
    exported = tmp_path / "export"
    assert export([str(seq2seq_run), str(exported)]) == 0
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "config.yaml", "model.json", "model.safetensors", "modeling"]  # bytes
    expected = []
    capsys.readouterr()
    for source in ("dcba", "hello world"):
        assert generate([str(seq2seq_run), "--source", source]) == 0
        expected.append(capsys.readouterr().out.rstrip("\n").split("\t", 1)[1])
    printed = run_exported_readme(exported,
                                  'print(generate("dcba")); print(generate("hello world"))')
    assert printed.splitlines() == expected


@pytest.mark.slow
@pytest.mark.parametrize("config,small,exact_keys", [
    (SEQ2SEQ, SMALL_S2S, ["val/exact_match", "val/token_accuracy"]),
    (TEXT_CLASSIFY, SMALL_CLS, ["val/accuracy", "val/macro_f1"]),
])
def test_two_ranks_metrics_are_exact_on_an_odd_validation_set(tmp_path, config, small, exact_keys):
    run = tmp_path / "run"
    # 600 examples, val_fraction 0.0525 -> 31 validation rows: 16 + 15 across the ranks.
    run_torchrun(2, "train", config, f"output_dir={run}", "max_steps=6", "log_every=3",
                 "eval_every=6", "checkpoint_every=6", "data.val_fraction=0.0525", *small, *QUIET)
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r][-1]
    assert logged["val/count"] == 31
    single = single_process_metrics(run)
    assert single["val/count"] == 31
    assert single["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-5)
    for key in exact_keys:
        assert single[key] == logged[key], key


@pytest.mark.slow
def test_text_classifier_learns_the_majority_letter(tmp_path):
    rows, _ = train_here(TEXT_CLASSIFY, f"output_dir={tmp_path / 'run'}", "max_steps=150",
                         "eval_every=150", "data.builtin_examples=4000", *QUIET)
    final = [r for r in rows if "val/accuracy" in r][-1]
    assert final["val/count"] == 400
    assert final["val/accuracy"] > 0.8 and final["val/macro_f1"] > 0.8


@pytest.mark.slow
def test_local_pairs_with_a_user_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    rows = [{"question": " ".join(rng.choices(words, k=rng.randint(1, 5)))} for _ in range(300)]
    for row in rows:
        row["answer"] = " ".join(reversed(row["question"].split()))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([r["question"] for r in rows],
                                  trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    run = tmp_path / "run"
    rows, _ = train_here(SEQ2SEQ, f"output_dir={run}", f"data.source={data}",
                         "data.source_column=question", "data.target_column=answer",
                         f"data.tokenizer={tmp_path / 'tokenizer.json'}", "max_steps=4",
                         "log_every=2", "eval_every=4", "checkpoint_every=4", *SMALL_S2S, *QUIET)
    final = [r for r in rows if "val/loss" in r][-1]
    assert final["val/count"] == 15  # a seeded 5% of the 300 rows
    assert generate([str(run), "--source", "alpha beta"]) == 0
    assert capsys.readouterr().out.startswith("alpha beta\t")


@pytest.mark.parametrize("override,message", [
    ("data.source=builtin:sorting", "unknown builtin"),
    ("data.tokenizer=missing/tokenizer.json", "data.tokenizer"),
    ("model.cross_attention_type=local", "'local' cannot be used as cross attention"),
    ("model.encoder_attention_type=causal-linear", "'causal-linear' cannot be used as encoder attention"),
    ("data.source_column=question", "data.source_column='question' is not a column"),
])
def test_bad_seq2seq_input_is_refused_naming_the_key(tmp_path, override, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"src": "ba", "tgt": "ab"}\n' * 20)
    extra = [f"data.source={pairs}"] if "source_column" in override else []
    _, error = train_here(SEQ2SEQ, f"output_dir={tmp_path / 'run'}", *extra, override,
                          "max_steps=1", *QUIET)
    assert isinstance(error, ConfigError) and error.exit_code == 2
    assert message in str(error)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "run").exists()


def test_labelled_texts_from_local_files_number_string_labels(tmp_path):
    from train.data.padded import PadTexts, labelled_text_datasets

    rows = [("good film", "pos"), ("bad film", "neg"), ("fine", "meh")] * 10
    (tmp_path / "reviews.csv").write_text(
        "review,sentiment\n" + "".join(f"{t},{label}\n" for t, label in rows))
    config = load(TEXT_CLASSIFY, ["output_dir=/tmp/x", f"data.source={tmp_path / 'reviews.csv'}",
                                  "data.text_column=review", "data.label_column=sentiment",
                                  "data.val_fraction=0.2"])
    tokenizer = build_tokenizer("byte")
    train, val, classes = labelled_text_datasets(config.data, tokenizer, seed=0)
    assert classes == ["meh", "neg", "pos"] and (len(train), len(val)) == (24, 6)
    names = {tokenizer.decode(r["ids"]): classes[r["label"]] for r in train}
    assert names == {"good film": "pos", "bad film": "neg", "fine": "meh"}
    batch = PadTexts(tokenizer.pad_id)([train[0], train[1]])
    assert batch["ids"].shape == (2, int(batch["lengths"].max()))

    bad = load(TEXT_CLASSIFY, ["output_dir=/tmp/x", f"data.source={tmp_path / 'reviews.csv'}",
                               "data.text_column=review", "data.label_column=stars"])
    with pytest.raises(ConfigError, match="data.label_column='stars' is not a column"):
        labelled_text_datasets(bad.data, tokenizer, seed=0)


class DeviceReads(TorchDispatchMode):
    """Records every op that copies a tensor's value to the host (`.item()`, `bool(t)`)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["chunked-causal-linear", "full"])
def test_forward_and_backward_never_wait_for_the_device(attention):
    """The library's LengthMask and FullMask read `all_ones` back from the device; the models'
    own masks know it up front, so a training step can run ahead of a GPU."""
    from fast_transformers.masking import LengthMask

    other = "full" if attention == "full" else "linear"  # encoder and cross attention
    kinds = dict(self_attention_type=attention, encoder_attention_type=other,
                 cross_attention_type=other)
    seq2seq = Seq2SeqTransformer(VOCAB, 32, 1, 1, 4, 64, **kinds)
    classifier = SequenceClassifier(VOCAB, 3, 32, 1, 4, 64, attention_type=other)
    source, lengths = padded_batch([9, 3, 5], 9)
    target, _ = padded_batch([7] * 3, 7, seed=1)
    with DeviceReads() as probe:
        LengthMask(lengths)  # the probe sees a read when there is one
    assert probe.reads
    seq2seq(source, lengths, target)  # makes the causal mask of this length, once
    with DeviceReads() as probe:
        seq2seq(source, lengths, target).sum().backward()
        classifier(source, lengths).sum().backward()
    assert probe.reads == []
