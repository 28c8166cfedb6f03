"""Exact rewrites of LoRA factors that keep each module's delta ``s * B @ A`` and change how it is written.

An engine that reads one global (rank, alpha) rule gets, per module, a B with the module's own scale folded in
(``fold_scale``) and, where the format needs one rank, factors zero-padded to it (``pad_rank``); llama.cpp's
GGUF stores attention q/k rows in its own RoPE order (``permute_rows``, the same permutation its converter applies
to the base weights). Folding multiplies B by one float64 factor and rounds once to float32; padding and
permuting only move or add exact zeros.

Pure math: tensors in, tensors out; no file or network I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def fold_scale(B: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * B`` computed in float64 and rounded once to float32 (relative error <= 2**-24 per element).

    A factor of exactly 1.0 returns B as float32 unchanged (bit-exact from any float dtype)."""
    import torch

    if factor == 1.0:
        return B.to(torch.float32)
    return (B.to(torch.float64) * factor).to(torch.float32)


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in) and B (out x r) zero-padded to ``rank`` rows / columns: ``B' @ A' == B @ A`` exactly."""
    import torch

    r = int(A.shape[0])
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    if rank == r:
        return A, B
    A2 = torch.zeros((rank, *A.shape[1:]), dtype=A.dtype)
    B2 = torch.zeros((B.shape[0], rank, *B.shape[2:]), dtype=B.dtype)
    A2[:r] = A
    B2[:, :r] = B
    return A2, B2


def permute_rows(W: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf ``LlamaModel.permute``): within each head, the
    rotate-half RoPE layout of Hugging Face becomes the interleaved one llama.cpp uses. Applied to lora_B, it
    makes ``B' @ A`` the permuted delta, matching the permuted base weight."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = int(W.shape[0])
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of two halves")
    return W.reshape(n_head, 2, rows // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def global_fold_factor(scale: float, rank: int, global_alpha: float) -> float:
    """The factor that makes a rule ``alpha / rank_of_this_tensor`` yield ``scale``: scale * rank / alpha."""
    return scale * rank / global_alpha
