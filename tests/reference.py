"""A plain, independent implementation of the Mistral/Mixtral forward for one sequence, written for clarity and
not for speed: complex-number RoPE as in Mistral's reference code, K/V repeated to every head, an explicit
(L, L) mask from the window definition, softmax over all experts then top-k renormalised (Hugging Face's order).
Tests compare sirocco's model, cache and engine with it."""

from __future__ import annotations

import math

import torch


def rms(x, w, eps):
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * w.float()


def rope_complex(x, theta):
    # x: (L, heads, D), interleaved pairs (the consolidated layout)
    L, _, D = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(L, dtype=torch.float64), freqs)
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)       # (L, D/2)
    xc = torch.view_as_complex(x.float().reshape(L, x.shape[1], D // 2, 2))
    return torch.view_as_real(xc * rot[:, None, :]).reshape(x.shape)


def window_mask(L, window):
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    m = j <= i
    if window is not None:
        m &= j > i - window
    return m


def reference_logits(sd: dict, args, tokens: torch.Tensor) -> torch.Tensor:
    """(L,) tokens of ONE sequence -> (L, vocab) fp32 logits, from a consolidated-named state dict."""
    sd = {k: v.float() for k, v in sd.items()}
    L = tokens.shape[0]
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"], args.norm_eps)
        q = (x @ sd[p + "attention.wq.weight"].T).view(L, args.n_heads, args.head_dim)
        k = (x @ sd[p + "attention.wk.weight"].T).view(L, args.n_kv_heads, args.head_dim)
        v = (x @ sd[p + "attention.wv.weight"].T).view(L, args.n_kv_heads, args.head_dim)
        q, k = rope_complex(q, args.rope_theta), rope_complex(k, args.rope_theta)
        rep = args.n_heads // args.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(args.head_dim)
        scores = scores.masked_fill(~window_mask(L, args.window_for(i)), float("-inf"))
        att = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).reshape(L, -1)
        h = h + att @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"], args.norm_eps)

        def ffn(x, pre):
            a = torch.nn.functional.silu(x @ sd[pre + "w1.weight"].T) * (x @ sd[pre + "w3.weight"].T)
            return a @ sd[pre + "w2.weight"].T

        if args.moe is None:
            h = h + ffn(x, p + "feed_forward.")
        else:
            probs = torch.softmax(x @ sd[p + "feed_forward.gate.weight"].T, dim=-1)     # (L, E)
            w, idx = torch.topk(probs, args.moe.num_experts_per_tok, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            for e in range(args.moe.num_experts):
                y = ffn(x, p + f"feed_forward.experts.{e}.")                         # every token
                out += y * (w * (idx == e)).sum(-1, keepdim=True)
            h = h + out
    return rms(h, sd["norm.weight"], args.norm_eps) @ sd["output.weight"].T
