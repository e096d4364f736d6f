"""chunked-causal-linear: same results as fast-transformers' causal-linear (outputs and gradients),
under autocast and torch.compile, and a recurrent twin that reproduces the parallel model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fast_transformers.attention.causal_linear_attention import CausalLinearAttention
from fast_transformers.builders import RecurrentEncoderBuilder, TransformerEncoderBuilder
from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

import train.models.attention as attention
from train.models.attention import (
    NAME,
    ChunkedCausalLinearAttention,
    RecurrentFP32LinearAttention,
    chunked_causal_linear,
)
from train.models.attention_types import ATTENTION_TYPES, CAUSAL, CROSS, ENCODER, check_attention
from train.models.sequence import TokenShift, TransformerLM, build_sequence_model


def _inputs(N, L, H, D, M, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(N, L, H, D, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(N, L, H, M, generator=gen, dtype=dtype)
    grad = torch.randn(N, L, H, M, generator=gen, dtype=dtype)
    return q, k, v, grad


def _run(module, q, k, v, grad, lengths=None):
    """Forward + backward of an attention module; returns [output, dq, dk, dv]."""
    N, L = q.shape[:2]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    key_lengths = LengthMask(lengths if lengths is not None else torch.full((N,), L),
                             max_len=L)
    query_lengths = LengthMask(torch.full((N,), L), max_len=L)
    out = module(*leaves, TriangularCausalMask(L), query_lengths, key_lengths)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def _rel_err(x, ref):
    """max |x - ref| / max |ref| (error relative to the tensor's scale)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# (N, L, H, D, M, chunk): chunks that divide L, that do not, one chunk, chunk > L, M != D.
SHAPES = [
    (2, 37, 3, 8, 8, 16),
    (2, 96, 4, 32, 32, 32),
    (1, 64, 2, 16, 16, 64),
    (2, 130, 2, 16, 12, 32),
    (1, 50, 2, 8, 8, 7),
    (1, 40, 1, 8, 8, 1000),
]


@pytest.fixture(params=["slabs", "one-chunk-slabs", "single-pass"])
def kernel_path(request, monkeypatch):
    """The three ways the kernel walks the sequence: CPU slabs as configured, one chunk per
    slab (many slab boundaries to carry the state across), and the single pass with cumsum
    that CUDA and torch.compile take."""
    if request.param == "one-chunk-slabs":
        monkeypatch.setattr(attention, "CPU_SLAB_ROWS", 1)
    elif request.param == "single-pass":
        monkeypatch.setattr(attention, "_use_slabs", lambda t: False)
    return request.param


@pytest.mark.parametrize("N,L,H,D,M,C", SHAPES)
def test_matches_library_outputs_and_gradients(kernel_path, N, L, H, D, M, C):
    q, k, v, grad = _inputs(N, L, H, D, M)
    expected = _run(CausalLinearAttention(D), q, k, v, grad)
    got = _run(ChunkedCausalLinearAttention(D, causal_chunk_size=C), q, k, v, grad)
    for name, x, ref in zip(["out", "dq", "dk", "dv"], got, expected):
        assert x.shape == ref.shape and x.dtype == torch.float32
        assert _rel_err(x, ref) <= 1e-5, name


def test_matches_library_with_key_length_masks(kernel_path):
    N, L, H, D = 3, 45, 2, 16
    q, k, v, grad = _inputs(N, L, H, D, D, seed=1)
    lengths = torch.tensor([45, 30, 7])
    expected = _run(CausalLinearAttention(D), q, k, v, grad, lengths)
    got = _run(ChunkedCausalLinearAttention(D, causal_chunk_size=16), q, k, v, grad, lengths)
    for name, x, ref in zip(["out", "dq", "dk", "dv"], got, expected):
        assert _rel_err(x, ref) <= 1e-5, name
    # Masked keys really are out: their gradients vanish and changing them changes nothing.
    assert got[2][1, 30:].abs().max() == 0 and got[3][2, 7:].abs().max() == 0
    k2, v2 = k.clone(), v.clone()
    k2[1, 30:], v2[1, 30:] = 5.0, -5.0
    moved = _run(ChunkedCausalLinearAttention(D, causal_chunk_size=16), q, k2, v2, grad, lengths)
    assert torch.equal(moved[0], got[0])


def test_single_position_sequence():
    q, k, v, grad = _inputs(2, 1, 2, 4, 4)
    expected = _run(CausalLinearAttention(4), q, k, v, grad)
    got = _run(ChunkedCausalLinearAttention(4, causal_chunk_size=8), q, k, v, grad)
    for x, ref in zip(got, expected):
        assert torch.allclose(x, ref, rtol=1e-5, atol=1e-6)


def test_feature_map_keeps_its_output_not_the_projection():
    """elu(x) + 1 with the gradient of elu(x) + 1 (infinities and NaN included), but the
    backward holds only what the attention holds anyway: the queries and keys it was given
    are not kept."""
    x = torch.linspace(-6, 6, 97, dtype=torch.float64).requires_grad_()
    feature_map = attention.elu_feature_map(4)
    (got,) = torch.autograd.grad(feature_map(x), x, torch.ones_like(x))
    (expected,) = torch.autograd.grad(F.elu(x) + 1, x, torch.ones_like(x))
    # Not bit-equal: on CPU the map computes exp(x), the more exact of the two below 0.
    assert torch.allclose(feature_map(x), F.elu(x) + 1, rtol=1e-12, atol=0)
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    edges = torch.tensor([float("-inf"), -100.0, -0.0, 0.0, 1e-30, float("inf"), float("nan")])
    assert torch.equal(feature_map(edges).isnan(), edges.isnan())
    assert torch.allclose(feature_map(edges), F.elu(edges) + 1, equal_nan=True)

    q, k, v, grad = _inputs(1, 12, 2, 4, 4)
    q, k = q.requires_grad_(), k.requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        ChunkedCausalLinearAttention(4)(q, k, v, TriangularCausalMask(12),
                                        LengthMask(torch.tensor([12])),
                                        LengthMask(torch.tensor([12])))
    held = {t.untyped_storage().data_ptr() for t in kept}
    assert q.untyped_storage().data_ptr() not in held
    assert k.untyped_storage().data_ptr() not in held


def test_kernel_against_float64_definition():
    """The kernel itself (no module) against the quadratic-form definition in float64."""
    N, L, H, D, M = 2, 70, 2, 8, 5
    q, k, v, _ = _inputs(N, L, H, D, M, seed=3)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    scores = torch.einsum("nlhd,nshd->nhls", q.double(), k.double()).tril()
    expected = torch.einsum("nhls,nshm->nlhm", scores, v.double()) / (
        scores.sum(-1).transpose(1, 2).unsqueeze(-1) + 1e-6)
    got = chunked_causal_linear(q, k, v, chunk_size=16)
    assert _rel_err(got, expected) <= 1e-6


def _decayed_recurrence(q, k, v, decay, eps=1e-6):
    """The definition of a decaying state, one position at a time: S = decay S + k v^T,
    z = decay z + k, out = q S / (q . z + eps)."""
    N, L, H, D = q.shape
    S, z, outs = q.new_zeros(N, H, D, v.shape[-1]), q.new_zeros(N, H, D), []
    for t in range(L):
        S = S * decay.view(1, H, 1, 1) + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        z = z * decay.view(1, H, 1) + k[:, t]
        outs.append((q[:, t].unsqueeze(-2) @ S).squeeze(-2)
                    / ((q[:, t] * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("path", ["one slab", "one-chunk slabs", "two-chunk slabs",
                                  "single pass", "single pass in blocks"])
@pytest.mark.parametrize("L,C", [(37, 4), (40, 8)])
def test_decayed_state_against_its_recurrence(path, L, C, monkeypatch):
    """Outputs and gradients of the kernel with a decay rate per head (one of them 1: no
    decay) against the recurrence that defines it, on every way the kernel walks the sequence."""
    N, H = 2, 3
    if path == "one-chunk slabs":
        monkeypatch.setattr(attention, "CPU_SLAB_ROWS", 1)
    elif path == "two-chunk slabs":
        monkeypatch.setattr(attention, "CPU_SLAB_ROWS", 2 * N * H * C + 1)
    elif path.startswith("single pass"):
        monkeypatch.setattr(attention, "_use_slabs", lambda t: False)
        if path.endswith("blocks"):  # 10 chunks: blocks of 3, then blocks of blocks
            monkeypatch.setattr(attention, "DENSE_SCAN_BLOCK", 3)
    q, k, v, grad = _inputs(N, L, H, 5, 4, seed=11, dtype=torch.float64)
    q, k = (F.elu(t) + 1 for t in (q, k))
    decay = torch.tensor([0.5, 0.9, 1.0])
    leaves = [t.requires_grad_() for t in (q, k, v)]
    got = chunked_causal_linear(*leaves, chunk_size=C, decay=decay)
    expected = _decayed_recurrence(*leaves, decay.double())
    assert _rel_err(got, expected) <= 1e-6
    for x, ref in zip(torch.autograd.grad(got, leaves, grad),
                      torch.autograd.grad(expected, leaves, grad)):
        assert _rel_err(x, ref) <= 1e-6
    assert _rel_err(chunked_causal_linear(q, k, v, chunk_size=C), expected) > 1e-2


def test_multiscale_decay_spans_near_and_far_heads():
    rates = attention.state_decay_rates("multiscale", 4)
    half_lives = torch.log(torch.tensor(0.5)) / torch.log(rates)
    assert half_lives[0] > 2000 and half_lives[-1] < 30
    assert torch.all(half_lives[:-1] > half_lives[1:])
    assert attention.state_decay_rates("none", 4) is None
    with pytest.raises(ValueError, match="unknown state decay"):
        ChunkedCausalLinearAttention(8, state_decay="weekly")


def test_rejects_a_non_causal_mask():
    q, k, v, _ = _inputs(1, 8, 1, 4, 4)
    lengths = LengthMask(torch.tensor([8]))
    with pytest.raises(RuntimeError, match="causal"):
        ChunkedCausalLinearAttention(4)(q, k, v, FullMask(8), lengths, lengths)


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for the test, whatever the machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("decay", ["none", "multiscale"])
@pytest.mark.parametrize("N,L,C", [(4, 300, 32), (1, 2048, 64), (8, 128, 32)])
def test_results_do_not_depend_on_how_many_threads_run_the_slabs(two_threads, monkeypatch,
                                                                 N, L, C, decay):
    """SLAB_THREADS runs each slab on one thread or on all, whichever is faster at the time:
    outputs and gradients must be the same bits either way, or training would not be
    reproducible (nor a resumed run exact)."""
    monkeypatch.setattr(attention.SLAB_THREADS, "enabled", False)
    q, k, v, grad = _inputs(N, L, 4, 32, 32, seed=7)
    module = ChunkedCausalLinearAttention(32, causal_chunk_size=C, state_decay=decay)
    on_two = _run(module, q, k, v, grad)
    torch.set_num_threads(1)
    on_one = _run(module, q, k, v, grad)
    for name, x, ref in zip(["out", "dq", "dk", "dv"], on_one, on_two):
        assert torch.equal(x, ref), name


class _SlabClock:
    """A clock for SLAB_THREADS read at each slab's start and end: a slab lasts
    `seconds[thread count]`, or the next of `stalls` while there are any."""

    def __init__(self, seconds: dict[int, float]):
        self.seconds, self.stalls, self.now, self.in_slab = seconds, [], 0.0, False

    def __call__(self) -> float:
        if self.in_slab:
            self.now += self.stalls.pop(0) if self.stalls else self.seconds[
                torch.get_num_threads()]
        self.in_slab = not self.in_slab
        return self.now


def test_slabs_run_on_the_faster_thread_count_and_follow_the_load(two_threads):
    """Idle, two threads are faster: every slab runs on two but the probes, which run one
    slab on one thread and, lost, come ever rarer. When sharing the cores makes two threads
    slower, a few slabs later the rest move to one thread; when the cores are free again, the
    next probe moves them back. A single slow slab moves nothing."""
    clock = _SlabClock({1: 2.0, 2: 1.0})
    policy = attention._SlabThreads(clock)
    slabs = [(i, (i, i + 1)) for i in range(5)]
    like = torch.empty(0)

    def call() -> list[int]:
        return [torch.get_num_threads() for _ in policy("forward", slabs, 1, like)]

    idle = [call() for _ in range(300)]
    probes = [n for n, counts in enumerate(idle, 1) if counts != [2] * 5]
    assert probes == [1, 3, 7, 15, 31, 63, 127, 255]
    assert all(idle[n - 1] == [2, 2, 1, 2, 2] for n in probes)  # the middle slab
    assert torch.get_num_threads() == 2  # restored after every call

    clock.seconds = {1: 2.0, 2: 20.0}  # shared cores: a few slabs to move
    assert call() == [2, 2, 2, 1, 1]
    shared = [call() for _ in range(200)]  # calls 302 to 501
    # The change of count makes the next call probe; each probe lost doubles the interval.
    probes = [n for n, counts in enumerate(shared, 302) if counts != [1] * 5]
    assert probes == [302, 304, 308, 316, 332, 364, 428]
    assert all(shared[n - 302] == [1, 1, 2, 1, 1] for n in probes)

    clock.seconds = {1: 2.0, 2: 1.0}  # idle again
    calls = [call() for _ in range(130)]
    back = next(n for n, counts in enumerate(calls) if counts[-1] == 2)
    assert back < policy.MAX_PROBE_INTERVAL and calls[back] == [1, 1, 2, 2, 2]
    # A probe won: the next call probes again, and the intervals grow anew.
    assert calls[back + 1:back + 5] == [[2, 2, 1, 2, 2], [2] * 5, [2, 2, 1, 2, 2], [2] * 5]

    clock = _SlabClock({1: 2.0, 2: 1.0})
    policy = attention._SlabThreads(clock)
    assert [call() for _ in range(20)][-1] == [2] * 5
    clock.stalls = [50.0]  # one slab stalls (a page fault, say)
    assert call() == [2] * 5 and call() == [2] * 5

    policy.enabled = False  # off, or on one thread: the slabs as they are
    assert policy("forward", slabs, 1, like) is slabs
    policy.enabled = True
    torch.set_num_threads(1)
    assert policy("forward", slabs, 1, like) is slabs


def test_slab_threads_are_restored_when_the_loop_fails(two_threads):
    policy = attention._SlabThreads()
    policy.seconds_per_row = {("backward", 1): 1.0, ("backward", 2): 2.0}
    policy.next_probe["backward"] = 2  # the first call probes nothing
    with pytest.raises(RuntimeError, match="out of memory"):
        for _ in policy("backward", [(0, (0, 1))], 1, torch.empty(0)):
            assert torch.get_num_threads() == 1
            raise RuntimeError("out of memory")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("L,C", [(64, 16), (300, 64), (512, 16)])
def test_bf16_autocast_runs_and_stays_close_to_fp32(L, C):
    N, H, D = 2, 2, 32
    q, k, v, grad = _inputs(N, L, H, D, D, seed=4)
    module = ChunkedCausalLinearAttention(D, causal_chunk_size=C)
    reference = _run(module, q, k, v, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(module, q, k, v, grad)
    assert got[0].dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 ~ 4e-3); the fp32 cross-chunk state
    # keeps long sequences at that level instead of drifting with the number of chunks.
    assert _rel_err(got[0], reference[0]) <= 1.5e-2
    for x, ref in zip(got[1:], reference[1:]):
        assert torch.isfinite(x).all()
        assert _rel_err(x, ref) <= 6e-2


def test_bf16_inputs_without_autocast():
    q, k, v, grad = _inputs(1, 80, 2, 16, 16, seed=5)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    expected = chunked_causal_linear(q, k, v, 32)
    got = chunked_causal_linear(q.bfloat16(), k.bfloat16(), v.bfloat16(), 32)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, expected) <= 1.5e-2


def _compile_check(backend, decay=None):
    q, k, v, grad = _inputs(2, 40, 2, 8, 8, seed=6)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    leaves = [t.requires_grad_() for t in (q, k, v)]
    eager = chunked_causal_linear(*leaves, 16, decay=decay)
    eager_grads = torch.autograd.grad(eager, leaves, grad)
    compiled = torch.compile(chunked_causal_linear, backend=backend, fullgraph=True)
    out = compiled(*leaves, 16, decay=decay)
    grads = torch.autograd.grad(out, leaves, grad)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    for x, ref in zip(grads, eager_grads):
        assert torch.allclose(x, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decay", [None, (0.5, 0.99)])
def test_torch_compile_traces_the_kernel_whole(decay):
    """Dynamo + AOTAutograd capture forward and backward in one graph (no graph breaks)."""
    torch._dynamo.reset()
    _compile_check("aot_eager", None if decay is None else torch.tensor(decay))


def test_every_attention_spec_matches_the_library_registries():
    """The project's table says what each attention can do; the builders must agree."""
    from fast_transformers.attention_registry import (AttentionRegistry,
                                                      RecurrentAttentionRegistry,
                                                      RecurrentCrossAttentionRegistry)

    for name, spec in ATTENTION_TYPES.items():
        assert name in AttentionRegistry, name
        if CAUSAL in spec.roles:  # an LM samples through the recurrent twin
            assert name in RecurrentAttentionRegistry, name
        if CROSS in spec.roles:
            assert name in RecurrentCrossAttentionRegistry, name
        if ENCODER in spec.roles or CROSS in spec.roles:
            assert not name.startswith("causal"), name


def test_attention_roles_are_checked_by_the_table():
    assert check_attention(NAME, CAUSAL) == NAME
    with pytest.raises(ValueError, match="cannot be used as causal self-attention"):
        check_attention("linear", CAUSAL)  # bidirectional: would see the future
    with pytest.raises(ValueError, match="cannot be used as encoder attention"):
        check_attention(NAME, ENCODER)
    with pytest.raises(ValueError, match="did you mean full"):
        check_attention("fulll", CROSS)


def test_registered_under_both_registries_with_the_chunk_size_and_decay_parameters():
    encoder = TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=8, value_dimensions=8,
        feed_forward_dimensions=16, attention_type=NAME, causal_chunk_size=24,
        state_decay="multiscale").get()
    inner = encoder.layers[0].attention.inner_attention
    assert isinstance(inner, ChunkedCausalLinearAttention) and inner.chunk_size == 24
    assert inner.decay.kind == "multiscale"
    recurrent = RecurrentEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=8, value_dimensions=8,
        feed_forward_dimensions=16, attention_type=NAME).get()
    twin = recurrent.layers[0].attention.inner_attention
    assert isinstance(twin, RecurrentFP32LinearAttention) and twin.decay.kind == "none"


def test_the_lm_config_reaches_both_views_of_the_attention():
    model = _lm(NAME, attention_decay="multiscale")
    for layers in (model.encoder.layers, model.recurrent().encoder.layers):
        assert {layer.attention.inner_attention.decay.kind for layer in layers} == {"multiscale"}


def test_recurrent_state_has_a_fixed_size():
    """Per-token cost cannot grow with position: the state is the same size at every step."""
    module = RecurrentFP32LinearAttention(8)
    q, k, v, _ = _inputs(3, 50, 2, 8, 6, seed=7)
    state, sizes = None, set()
    for t in range(50):
        _, state = module(q[:, t], k[:, t], v[:, t], state=state)
        sizes.add(tuple(tuple(s.shape) for s in state))
        assert all(s.dtype == torch.float32 for s in state)
    assert sizes == {((3, 2, 8, 6), (3, 2, 8))}


def _lm(attention_type, seed=0, **recipe):
    torch.manual_seed(seed)
    return TransformerLM(61, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                         attention_type=attention_type, attention_chunk_size=8, **recipe).eval()


RECIPES = {"post-norm": {}, "pre-norm,tied,gpt2-init": dict(norm="pre", tie_embeddings=True,
                                                             init="gpt2"),
           "post-norm,token-shift": dict(token_shift=True),
           "pre-norm,token-shift": dict(norm="pre", token_shift=True),
           "post-norm,token-shift,decay": dict(token_shift=True, attention_decay="multiscale"),
           "post-norm,both-shifts,decay": dict(token_shift=True, feed_forward_shift=True,
                                               attention_decay="multiscale"),
           "pre-norm,feed-forward-shift": dict(norm="pre", feed_forward_shift=True)}


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
@pytest.mark.parametrize("attention_type", [NAME, "causal-linear"])
def test_recurrent_twin_reproduces_the_parallel_model(attention_type, recipe):
    if attention_type != NAME and "attention_decay" in recipe:
        with pytest.raises(ValueError, match="attention_decay"):
            _lm(attention_type, **recipe)
        return
    model = _lm(attention_type, **recipe)
    ids = torch.randint(0, 61, (3, 29), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for name, p in model.named_parameters():  # shifts away from where they start (at 0
            if name.endswith("shift.mix"):          # the feed-forward's is no shift at all)
                p.uniform_(0.2, 0.8, generator=torch.Generator().manual_seed(len(name)))
        parallel = model(ids)
        twin, state, steps = model.recurrent(), None, []
        for t in range(ids.shape[1]):
            logits, state = twin.step(ids[:, t], t, state)
            steps.append(logits)
    assert (torch.stack(steps, 1) - parallel).abs().max().item() <= 1e-5


@pytest.mark.parametrize("key,start,recipe", [
    ("token_shift", 0.5, {}), ("feed_forward_shift", 0.0, {}),
    ("feed_forward_shift", 0.5, {"feed_forward_shift_start": 0.5})])
def test_shifts_come_from_the_config_and_read_the_previous_position(key, start, recipe):
    """lm_tiny.yaml turns each on in every layer, its mix starting at `start`; with the mix at
    0 the model is exactly the one without it (a shift draws nothing from the random
    generator), at 0.5 it is not."""
    from conftest import ROOT
    from train.tasks import load_config

    cfg = load_config(ROOT / "configs" / "lm_tiny.yaml", ["model.d_model=32", "model.n_heads=4",
                                                          "model.d_ff=64", "model.n_layers=2"])
    assert all(isinstance(getattr(layer, key), TokenShift)
               for layer in build_sequence_model(cfg.model, 61).encoder.layers)
    plain, shifted = _lm(NAME), _lm(NAME, **{key: True}, **recipe)
    mixes = [getattr(layer, key).mix for layer in shifted.encoder.layers]
    assert all(torch.equal(mix, torch.full_like(mix, start)) for mix in mixes)
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for mix in mixes:
            mix.fill_(0.5)
        assert not torch.allclose(shifted(ids), plain(ids))
        for mix in mixes:
            mix.zero_()
        assert torch.equal(shifted(ids), plain(ids))


class _ShiftedProjections(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.shift = TokenShift(5)
        self.projections = nn.ModuleList([nn.Linear(5, 4), nn.Linear(5, 3, bias=False)][:n])

    def forward(self, h):
        return self.shift.project(h, *self.projections)


@pytest.mark.parametrize("n", [1, 2])
def test_token_shift_projects_without_keeping_the_mixed_input(n):
    """Projections of the shifted input (the feed-forward's one, attention's keys and values),
    with a hand-written backward checked against finite differences (float64), keeping for the
    backward only what the layer keeps anyway: its input, the mix and the weights, not the
    mixed input (recomputed instead)."""
    generator = torch.Generator().manual_seed(2)
    module = _ShiftedProjections(n).double()
    with torch.no_grad():
        module.shift.mix.uniform_(generator=generator)
    h = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True, generator=generator)
    names, params = zip(*module.named_parameters())
    assert torch.autograd.gradcheck(
        lambda h, *p: torch.func.functional_call(module, dict(zip(names, p)), (h,)),
        (h, *params))
    mixed = torch.lerp(h, F.pad(h, (0, 0, 1, 0))[:, :-1], module.shift.mix)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got = module(h)
    torch.testing.assert_close(got, tuple(p(mixed) for p in module.projections), rtol=1e-12,
                               atol=1e-12)
    assert {t.data_ptr() for t in kept} == {t.data_ptr() for t in (
        h, module.shift.mix, *(p.weight for p in module.projections))}


@pytest.mark.parametrize("attention_type,recipe", [
    (NAME, {}), (NAME, {"token_shift": True}),
    (NAME, {"token_shift": True, "attention_decay": "multiscale", "feed_forward_shift": True}),
    ("causal-linear", {}), ("causal-linear", {"token_shift": True})])
def test_lm_trains_under_bf16_autocast(attention_type, recipe):
    """Forward + backward of the whole LM under CPU bf16 autocast; the library's fp32-only
    kernel runs through the model's fp32 wrapper. Both stay close to the fp32 loss."""
    model = _lm(attention_type, **recipe).train()
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(9))

    def loss_and_grads():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 61), ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.item(), grads

    loss32, _ = loss_and_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads = loss_and_grads()
    assert abs(loss16 - loss32) <= 2e-2 * abs(loss32)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
