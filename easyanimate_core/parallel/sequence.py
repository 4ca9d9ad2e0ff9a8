"""Sequence parallelism for the V5 / V5.1 transformer: one sample's video tokens split over several processes.

Every layer but attention works token by token, so each rank runs the blocks on its own shard of the video tokens
(and on all the text tokens, which are few). Attention needs every token:

- Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns "my tokens, all heads" into "all tokens of my
  ranks' group, my share of the heads"; attention runs per head as on one GPU; a second all-to-all turns it back.
  The text tokens are on every rank already: each takes its heads' slice, and the text outputs are all-gathered.
- Ring (Liu et al. 2023): the shards of a ring group's ranks stay apart; keys and values go round the ring, and each
  rank merges the partial attention of its queries over every shard by their log-sum-exp (exact, not approximate).

With both (unified sequence parallelism, as xDiT), Ulysses runs inside a ring. The video output is all-gathered at
the end, so every rank returns what one process would. Text tokens sit first in the joint sequence, as the blocks
lay them out; RoPE rotates each shard by its tokens' global positions (the caller shards the table with the tokens).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .. import attention as attention_module
from .layout import ParallelGroups

# Query rows per chunk of the ring's explicit attention: bounds its [rows x keys] float32 scores.
RING_QUERY_CHUNK = 2048


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention [B, h, Lq, d] in float32 and the natural log-sum-exp of each query's scores [B, h, Lq].

    PyTorch's fused flash kernels return both (CPU: tested equal to the explicit computation within 1e-6; CUDA
    half precision: not run here, no GPU); anything they refuse takes the explicit, query-chunked computation."""
    fused = None
    if q.device.type == "cpu":
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    elif q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        fused = torch.ops.aten._scaled_dot_product_flash_attention
    if fused is not None:
        try:
            out, lse = fused(q, k, v)[:2]
            if lse.shape == q.shape[:3]:
                return out.float(), lse.float()
        except RuntimeError:
            pass
    return attention_with_lse_explicit(q, k, v)


def attention_with_lse_explicit(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_lse`` computed step by step in float32, ``RING_QUERY_CHUNK`` queries at a time."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    k32, v32 = k.float(), v.float()
    for start in range(0, q.shape[2], RING_QUERY_CHUNK):
        scores = (q[:, :, start : start + RING_QUERY_CHUNK].float() * scale) @ k32.transpose(-1, -2)
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse[..., None]) @ v32)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def merge_attention(out, lse, out_more, lse_more) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A (out, lse) and over keys B -> attention over A and B."""
    merged = torch.logaddexp(lse, lse_more)
    return out * torch.exp(lse - merged)[..., None] + out_more * torch.exp(lse_more - merged)[..., None], merged


class SequenceParallel:
    """Shards the video tokens of one transformer call over ``groups.sequence_group`` and runs its attention."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups
        self.layout = groups.layout

    # -- tokens ------------------------------------------------------------------------------------------------

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous share of ``x`` along ``dim`` (tokens)."""
        return x.chunk(self.layout.sequence, dim=dim)[self.groups.shard_index].contiguous()

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's share of ``x`` put back in token order along ``dim``."""
        parts = [torch.empty_like(x) for _ in range(self.layout.sequence)]
        dist.all_gather(parts, x.contiguous(), group=self.groups.sequence_group)
        return torch.cat(parts, dim=dim)

    # -- attention ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def joint_attention(self, text_tokens: int):
        """Inside the block, the model's attention runs sequence-parallel over [``text_tokens`` text ; this rank's
        video tokens] (the blocks' joint layout); the backend installed before runs the local attention."""
        local = attention_module.current_attention_backend()

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.attention(q, k, v, text_tokens, local)

        with attention_module.using_attention(run):
            yield

    def attention(self, q, k, v, text_tokens: int, local=attention_module.sdpa_attention) -> torch.Tensor:
        """q, k, v [B, H, S + n, d] (S text tokens, n this rank's video tokens) -> attention output, same layout."""
        s, u = text_tokens, self.layout.ulysses
        heads = q.shape[1] // u
        mine = slice(self.groups.ulysses_index * heads, (self.groups.ulysses_index + 1) * heads)
        # Ulysses: my heads of every video token of my group; my heads of the (replicated) text.
        q_vid, k_vid, v_vid = (self._tokens_to_heads(t[:, :, s:]) for t in (q, k, v))
        q_all = torch.cat([q[:, mine, :s], q_vid], 2)
        k_txt, v_txt = k[:, mine, :s], v[:, mine, :s]
        if self.layout.ring == 1:
            out = local(q_all, torch.cat([k_txt, k_vid], 2), torch.cat([v_txt, v_vid], 2))
        else:
            out = self._ring_attention(q_all, k_txt, v_txt, k_vid, v_vid).to(q.dtype)
        out_txt, out_vid = out[:, :, :s], out[:, :, s:]
        if u > 1:
            parts = [torch.empty_like(out_txt) for _ in range(u)]
            dist.all_gather(parts, out_txt.contiguous(), group=self.groups.ulysses_group)
            out_txt = torch.cat(parts, 1)
        return torch.cat([out_txt, self._heads_to_tokens(out_vid)], 2)

    def _tokens_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] (my tokens, all heads) -> [B, H/u, u*n, d] (my group's tokens, my heads)."""
        u = self.layout.ulysses
        if u == 1:
            return t
        b, h, n, d = t.shape
        send = t.reshape(b, u, h // u, n, d).transpose(0, 1).contiguous()  # [u (to rank), B, H/u, n, d]
        received = torch.empty_like(send)  # [u (from rank), B, H/u, n, d]
        dist.all_to_all_single(received, send, group=self.groups.ulysses_group)
        return received.permute(1, 2, 0, 3, 4).reshape(b, h // u, u * n, d)

    def _heads_to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``_tokens_to_heads``: [B, H/u, u*n, d] -> [B, H, n, d]."""
        u = self.layout.ulysses
        if u == 1:
            return t
        b, h, m, d = t.shape
        send = t.reshape(b, h, u, m // u, d).permute(2, 0, 1, 3, 4).contiguous()  # [u (to rank), B, H/u, n, d]
        received = torch.empty_like(send)  # [u (from rank: its heads), B, H/u, n, d]
        dist.all_to_all_single(received, send, group=self.groups.ulysses_group)
        return received.transpose(0, 1).reshape(b, h * u, m // u, d)

    def _ring_attention(self, q, k_txt, v_txt, k_vid, v_vid) -> torch.Tensor:
        """Attention of q over the text and every ring rank's video keys, merged by log-sum-exp (float32)."""
        ranks, index = self.groups.ring_ranks, self.groups.ring_index
        out, lse = attention_with_lse(q, torch.cat([k_txt, k_vid], 2), torch.cat([v_txt, v_vid], 2))
        travelling = torch.stack([k_vid, v_vid]).contiguous()
        for _ in range(len(ranks) - 1):
            arriving = torch.empty_like(travelling)
            sent = dist.isend(travelling, ranks[(index + 1) % len(ranks)])
            received = dist.irecv(arriving, ranks[(index - 1) % len(ranks)])
            sent.wait()
            received.wait()
            travelling = arriving
            out, lse = merge_attention(out, lse, *attention_with_lse(q, travelling[0], travelling[1]))
        return out


def gather_branches(groups: ParallelGroups, prediction: torch.Tensor) -> torch.Tensor:
    """CFG-parallel: this rank's branch prediction -> both, in branch order [uncond ; cond] along the batch."""
    parts = [torch.empty_like(prediction) for _ in range(2)]
    dist.all_gather(parts, prediction.contiguous(), group=groups.cfg_group)
    return torch.cat(parts, 0)
