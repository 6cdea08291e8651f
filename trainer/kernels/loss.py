"""Linear + cross-entropy over the 201,088-token vocabulary, in chunks of tokens.

Full logits for a 4,096-token sequence are 3.3 GB in fp32; most positions of a chat sample are
prompt (label -100) and need no logits at all. So the loss first keeps only the trained positions,
then walks them ``chunk_tokens`` at a time: logits for one chunk, its log-sum-exp and target logit,
and — in the same pass — the gradients with respect to the hidden states and the output weight.
Backward then only scales those by the incoming gradient. Peak extra memory is one chunk's logits
(chunk x vocab, fp32) plus one gradient buffer of the hidden states (and of the weight when it trains).

The reference, ``reference_linear_cross_entropy``, is the plain ``logits = h @ W.T`` + ``F.cross_entropy``
it must match (fp32: values and gradients within 1e-5).

Returns the *summed* loss and the number of trained tokens: the loop divides by the trained-token
count taken across ranks and accumulation steps, so every trained token weighs the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int):
        n = hidden.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulation of the weight gradient across chunks; cast once at the end.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            y = targets[start:start + chunk_tokens]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d(sum CE)/d logits = softmax - onehot, computed in place over the chunk's logits.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(h.shape[0], device=h.device), y] -= 1.0
                g = probs.to(weight.dtype)
                if need_h:
                    grad_h[start:start + chunk_tokens] = g @ weight
                if need_w:
                    grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None


def select_trained(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to (tokens, hidden) and keep only positions whose target is not -100."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    return h.index_select(0, keep), y.index_select(0, keep)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (-100 = not trained).

    ``hidden``: (..., H); ``weight``: (V, H); ``targets``: same leading shape as ``hidden``, already
    aligned (target t is what position t must predict). Returns ``(loss_sum, trained_tokens)``, both
    0-d tensors on ``hidden``'s device; ``trained_tokens`` is int64.
    """
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    h, y = select_trained(hidden, targets)
    count = torch.tensor(y.numel(), dtype=torch.int64, device=hidden.device)
    if y.numel() == 0:
        # Keep the graph connected so every rank runs the same backward (FSDP needs it).
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float(), count
    if y.min() < 0 or y.max() >= weight.shape[0]:
        raise ValueError(f"target ids must be -100 or in [0, {weight.shape[0]}); got {int(y.min())}..{int(y.max())}")
    return _ChunkedLinearCE.apply(h, weight, y, int(chunk_tokens)), count


def reference_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference: full logits, then F.cross_entropy(reduction='sum')."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    y = targets.reshape(-1)
    loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (y != IGNORE_INDEX).sum()


def shift_packed_labels(labels: torch.Tensor, seq_lens: list[list[int]] | None = None) -> torch.Tensor:
    """Turn per-token labels (Hugging Face convention: labels[t] is token t, -100 = not trained) into
    next-token targets: target[t] = labels[t + 1], and -100 where t + 1 starts a new packed segment
    (a segment never predicts the first token of the next one) and at the end of each row.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if seq_lens is not None:
        for row, lens in enumerate(seq_lens):
            end = 0
            for n in lens:
                end += n
                if 0 < end <= labels.shape[1]:
                    targets[row, end - 1] = IGNORE_INDEX
    return targets
