"""Sequence models: the LSTM baseline's two views agree, and batched sampling is correct."""

import pytest
import torch

from train.data.tokenizer import ByteTokenizer
from train.models.generation import sample
from train.models.sequence import LSTMLM, TransformerLM, build_sequence_model
from train.tasks.lm import SequenceModelConfig


def test_lstm_steps_match_the_full_sequence_pass():
    torch.manual_seed(0)
    model = LSTMLM(256, d_model=32, n_layers=2).eval()
    ids = torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        full = model(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):
            logits, state = model.recurrent().step(ids[:, t], t, state)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_config_picks_the_architecture():
    lstm = build_sequence_model(SequenceModelConfig(arch="lstm", d_model=16, n_layers=1), 256)
    transformer = build_sequence_model(
        SequenceModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32), 256)
    assert isinstance(lstm, LSTMLM) and isinstance(transformer, TransformerLM)
    assert lstm(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 256)


def _tiny_lm():
    torch.manual_seed(0)
    return TransformerLM(256, d_model=32, n_layers=2, n_heads=2, d_ff=64).eval()


def test_batched_sampling_equals_one_prompt_at_a_time():
    """Rows with different prompt lengths share one batch; with greedy-like sampling (top_k=1)
    each row must equal sampling that prompt alone."""
    model, tok = _tiny_lm(), ByteTokenizer()
    prompts = ["a", "hello wor", ""]
    batched = sample(model, tok, prompts, 10, top_k=1)
    single = [sample(model, tok, [p], 10, top_k=1)[0] for p in prompts]
    assert batched == single
    assert all(len(tok.encode(s)) == 10 or "\ufffd" in s for s in batched)


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    model, tok = _tiny_lm(), ByteTokenizer()
    runs = [sample(model, tok, ["x"], 30, temperature=1.5,
                   generator=torch.Generator().manual_seed(s))[0] for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_sampling_uses_the_true_position_of_each_step():
    """The recurrent twin must encode position t at step t (not 0 every time): its logits at
    each step equal the parallel model's logits at that position."""
    model = _tiny_lm()
    ids = torch.randint(0, 256, (2, 9))
    twin, state = model.recurrent(), None
    with torch.no_grad():
        full = model(ids)
        for t in range(ids.shape[1]):
            logits, state = twin.step(ids[:, t], t, state)
            assert torch.allclose(logits, full[:, t], atol=1e-5), t


def test_sampling_past_the_trained_length_restarts_from_a_window():
    """Beyond `context` positions the sampler restarts from the last context/2 tokens: greedy
    output equals the parallel model applied to exactly those windows."""
    model, tok = _tiny_lm(), ByteTokenizer()
    context, prompt, new = 8, "abc", 20
    got = sample(model, tok, [prompt], new, top_k=1, context=context)[0]

    ids, start = tok.encode(prompt), 0
    with torch.no_grad():
        while len(ids) < len(tok.encode(prompt)) + new:
            pos = len(ids) - 1
            if pos - start >= context:
                start = pos - context // 2
            logits = model(torch.tensor([ids[start:]]))[0, -1]
            ids.append(int(logits.argmax()))
    assert got == tok.decode(ids[len(tok.encode(prompt)):])
    assert got != sample(model, tok, [prompt], new, top_k=1)[0]  # the restart did something


def _lm_flops(**model):
    from train.tasks.lm import LMConfig
    from train.tasks.lm import LanguageModelingTask

    def flops(block_size):
        config = LMConfig(task="lm", output_dir="unused", max_steps=1,
                          data={"block_size": block_size},
                          model={"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, **model})
        task = LanguageModelingTask(config)
        return task.flops_per_sample(task.model())
    return flops


def test_lm_flops_are_linear_in_length_for_linear_attention_only():
    linear, full = _lm_flops(), _lm_flops(attention_type="full")
    assert linear(256) == 2 * linear(128)  # O(L d^2) per sample of L tokens: exactly linear
    assert full(256) > 2.1 * full(128)  # softmax attention adds an O(L^2 d) term
    # 2 FLOPs per matmul weight per token, forward + backward = 3x: a lower bound.
    model = TransformerLM(256, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n != "embed.weight")
    assert linear(128) > 3 * 2 * weights * 128


def test_vision_flops_come_from_torchs_counter():
    """resnet18 at 224x224 is 1.82 GMACs forward (torchvision's published figure)."""
    from train.tasks.classify import ClassifyConfig
    from train.tasks.classify import ImageClassificationTask

    config = ClassifyConfig(task="classify", output_dir="unused", max_steps=1,
                            data={"image_size": 224, "max_val_samples": 4})
    task = ImageClassificationTask(config)
    task.datasets()
    flops = task.flops_per_sample(task.model())
    assert flops == pytest.approx(3 * 2 * 1.82e9, rel=0.02)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("shifts", [False, True])
def test_activation_checkpointing_recomputes_the_same_gradients(shifts, dropout):
    """model.activation_checkpointing: the same loss and gradients (layers recomputed in the
    backward), the same parameter names (checkpoints and the recurrent twin unchanged)."""
    from train.tasks.lm import SequenceModelConfig

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = SequenceModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=dropout,
                                  token_shift=shifts, feed_forward_shift=shifts,
                                  activation_checkpointing=checkpointing)
        model = build_sequence_model(cfg, 259)
        ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the same dropout masks: checkpointing replays the RNG state
        model(ids).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_the_sequence_model_code_stands_alone():
    """train.export ships these modules beside the weights: they may import torch,
    fast-transformers, the standard library and each other (relatively), nothing else."""
    import ast
    import sys
    from pathlib import Path

    import train.models

    allowed = {"torch", "fast_transformers", "__future__", *sys.stdlib_module_names}
    for name in train.models.SEQUENCE_MODULES:
        tree = ast.parse((Path(train.models.__file__).parent / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{name}.py imports {roots}"


class _FeedForward(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer._feed_forward(x)[0]


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_feed_forward_keeps_the_pre_activation_not_the_activation(norm, monkeypatch):
    """A layer's feed-forward half: the library's linear2(gelu(linear1(.))) in either norm
    order, with a hand-written backward (checked against finite differences in float64) that
    keeps one tensor of the feed-forward width for the backward, gelu's input, and recomputes
    gelu's output there: a quarter of a layer's saved activations. Made in blocks of rows
    (here 3 of 10, the last one short), as on CPU."""
    from train.models import sequence

    monkeypatch.setattr(sequence, "FEED_FORWARD_ROWS", 3)
    layer = TransformerLM(11, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                          norm=norm).double().encoder.layers[0]
    feed_forward = _FeedForward(layer)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True,
                    generator=torch.Generator().manual_seed(3))
    names, params = zip(*feed_forward.named_parameters())
    assert torch.autograd.gradcheck(
        lambda x, *p: torch.func.functional_call(feed_forward, dict(zip(names, p)), (x,)),
        (x, *params))

    def plain_mlp(h):
        return layer.linear2(torch.nn.functional.gelu(layer.linear1(h)))

    if norm == "pre":
        expected = x + plain_mlp(layer.norm2(x))
    else:
        expected = layer.norm2(layer.norm1(x) + plain_mlp(layer.norm1(x)))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got, _ = layer._feed_forward(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = {p.data_ptr() for p in layer.parameters()}
    assert [t.numel() for t in kept if t.data_ptr() not in weights and t.shape[-1] == 16] == [160]
