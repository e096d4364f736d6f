"""Sampling from sequence models through their recurrent twins (O(1) per token)."""

from __future__ import annotations

import torch


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled next tokens, (N, V) logits -> (N,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float().cpu() / temperature  # sampled on the CPU: one generator anywhere
    if top_k:
        kth = torch.topk(scaled, min(top_k, scaled.shape[-1])).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    picked = torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator).squeeze(1)
    return picked.to(logits.device)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None,
           context: int | None = None) -> list[str]:
    """Continue each prompt by `max_new_tokens` tokens, all prompts in one batch.

    Every row steps through positions 0, 1, 2, ...: while a row is still inside its prompt the
    prompt token is fed, afterwards the sampled one. Returns the continuations only.

    `context` is the sequence length the model was trained on. It never saw later positions, so
    when the state reaches it, sampling restarts from a fresh state primed with the last
    context/2 tokens (about twice the cost per token, and text that stays coherent).
    """
    stepper = model.recurrent()
    device = next(stepper.parameters()).device
    newline = tokenizer.encode("\n")
    rows = [tokenizer.encode(p) or newline for p in prompts]  # empty prompt: start at a newline
    lengths = [len(r) for r in rows]
    total = max(lengths) + max_new_tokens
    tokens = torch.zeros(len(rows), total, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    in_prompt = torch.arange(total).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)

    state, start = None, 0  # start: the absolute position the current state began at
    for pos in range(total - 1):
        if context and pos - start >= context:
            start, state = pos - context // 2, None
            for p in range(start, pos):
                _, state = stepper.step(tokens[:, p].to(device), p - start, state)
        logits, state = stepper.step(tokens[:, pos].to(device), pos - start, state)
        nxt = pick_tokens(logits, temperature, top_k, generator).cpu()
        tokens[:, pos + 1] = torch.where(in_prompt[:, pos + 1], tokens[:, pos + 1], nxt)
    return [tokenizer.decode(tokens[i, n: n + max_new_tokens].tolist())
            for i, n in enumerate(lengths)]
