"""Independent, minimal DeepSeek-V3 forward pass written from the behaviour list in README.md.

It reads the checkpoint tensors by their safetensors names (no transformers code) and is what the
Rust model follows; `hf_tool.py spec-check` runs it beside transformers' DeepseekV3ForCausalLM and
compares the losses, which checks the behaviour list itself. Deliberately plain (loops over tokens
for routing, interleaved RoPE kept in its interleaved layout) so that it is not a copy of HF's code.
"""

from __future__ import annotations

import math

import torch


def _cfg_rope(cfg: dict) -> dict:
    """rope parameters from either the v5 `rope_parameters` dict or the legacy rope_theta/rope_scaling."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(cfg: dict, seq: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [seq, rope_dim/2]: angle(pos, i) = pos * inv_freq[i]."""
    d = cfg["qk_rope_head_dim"]
    rp = _cfg_rope(cfg)
    base = rp["rope_theta"]
    # computed in fp32 exactly like transformers (modeling_deepseek_v3.py:91, :96)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    attn_factor = 1.0
    if rp["rope_type"] == "yarn":
        factor = rp["factor"]
        orig = rp["original_max_position_embeddings"]
        beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

        def corr_dim(rot):
            return (d * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = math.floor(corr_dim(beta_fast)), math.ceil(corr_dim(beta_slow))
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extra = 1 - ramp  # weight of the un-scaled (extrapolated) frequency
        pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attn_factor = (
            yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if (m and m_all) else yarn_mscale(factor, 1.0)
        )
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return (ang.cos() * attn_factor).to(dtype), (ang.sin() * attn_factor).to(dtype)


def softmax_scale(cfg: dict) -> float:
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rp = _cfg_rope(cfg)
    if rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
        m = yarn_mscale(rp["factor"], rp["mscale_all_dim"])
        scale = scale * m * m
    return scale


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i; result stays interleaved. x: [..., seq, d]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope_interleave=false: rotate pairs (x[i], x[i+d/2]) by angle i."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def silu(x):
    return x * torch.sigmoid(x)


def route(cfg: dict, x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor):
    """x: [T, H] -> (expert ids [T, k], weights [T, k]). Token by token, on purpose."""
    e, g, tg, k = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    per = e // g
    scores = torch.sigmoid(x @ gate_w.T)  # unbiased affinities
    ids_all, w_all = [], []
    for s in scores:
        choice = s + bias  # bias only for selection
        gscore = [sorted(choice[j * per : (j + 1) * per].tolist(), reverse=True)[:2] for j in range(g)]
        gscore = torch.tensor([sum(v) for v in gscore])
        groups = torch.topk(gscore, tg).indices.tolist()
        allowed = [j * per + i for j in groups for i in range(per)]  # experts outside: never chosen
        cand = torch.tensor(allowed)
        top = cand[torch.topk(choice[cand], k).indices]
        w = s[top]
        if cfg.get("norm_topk_prob", True):
            w = w / (w.sum() + 1e-20)
        ids_all.append(top)
        w_all.append(w * cfg["routed_scaling_factor"])
    return torch.stack(ids_all), torch.stack(w_all)


def forward(cfg: dict, t: dict, ids: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """ids: [B, S] int64 -> logits [B, S, V] in `dtype`."""
    t = {k: v.to(dtype) for k, v in t.items()}
    B, S = ids.shape
    H = cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kvr = cfg["kv_lora_rank"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    cos, sin = rope_tables(cfg, S, dtype)  # [S, rope/2]
    rot = rope_interleaved if cfg.get("rope_interleave", True) else rope_half
    scale = softmax_scale(cfg)
    causal = torch.full((S, S), float("-inf"), dtype=dtype).triu(1)

    x = t["model.embed_tokens.weight"][ids]  # [B, S, hidden]
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
        # --- MLA
        if cfg.get("q_lora_rank"):
            qa = rms_norm(h @ t[p + "self_attn.q_a_proj.weight"].T, t[p + "self_attn.q_a_layernorm.weight"], 1e-6)
            q = qa @ t[p + "self_attn.q_b_proj.weight"].T
        else:
            q = h @ t[p + "self_attn.q_proj.weight"].T
        q = q.view(B, S, H, nope + rope).transpose(1, 2)  # per head [nope | rope]
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        kva = h @ t[p + "self_attn.kv_a_proj_with_mqa.weight"].T  # [latent | k_rope]
        latent = rms_norm(kva[..., :kvr], t[p + "self_attn.kv_a_layernorm.weight"], 1e-6)
        k_rope = kva[..., kvr:][:, None]  # [B, 1, S, rope], one head shared by all heads
        kvb = (latent @ t[p + "self_attn.kv_b_proj.weight"].T).view(B, S, H, nope + vd).transpose(1, 2)
        k_nope, v = kvb[..., :nope], kvb[..., nope:]  # per head [k_nope | v]
        q_rope = rot(q_rope, cos, sin)
        k_rope = rot(k_rope, cos, sin)
        att = (q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)) * scale + causal
        att = torch.softmax(att, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, S, H * vd)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        # --- FFN
        h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        if li < cfg.get("first_k_dense_replace", 0):
            m = p + "mlp."
            y = (silu(h @ t[m + "gate_proj.weight"].T) * (h @ t[m + "up_proj.weight"].T)) @ t[m + "down_proj.weight"].T
        else:
            m = p + "mlp."
            flat = h.reshape(-1, h.shape[-1])
            gate_w = t[m + "gate.weight"].to(torch.float64)
            bias = t[m + "gate.e_score_correction_bias"].to(torch.float64)
            eids, ew = route(cfg, flat.to(torch.float64), gate_w, bias)
            y = torch.zeros_like(flat)
            for tok in range(flat.shape[0]):
                for e, w in zip(eids[tok].tolist(), ew[tok].tolist()):
                    ep = f"{m}experts.{e}."
                    xe = flat[tok]
                    ye = silu(t[ep + "gate_proj.weight"] @ xe) * (t[ep + "up_proj.weight"] @ xe)
                    y[tok] += w * (t[ep + "down_proj.weight"] @ ye)
            s = m + "shared_experts."
            y = y + (silu(flat @ t[s + "gate_proj.weight"].T) * (flat @ t[s + "up_proj.weight"].T)) @ t[
                s + "down_proj.weight"
            ].T
            y = y.view_as(h)
        x = x + y
    x = rms_norm(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
    return x @ head.T
