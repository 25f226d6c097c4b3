#!/usr/bin/env python3
"""Hugging Face transformers DeepseekV3 reference tool for Shoal.

Subcommands (each prints exactly one JSON object on stdout; logs go to stderr):

  loss        --model-dir DIR --tokens FILE --seq-len N [--batch B]
              mean next-token cross-entropy of DeepseekV3ForCausalLM over a raw little-endian u32
              token file, split into consecutive non-overlapping windows of seq_len+1 tokens.
  random      --config config.json --out DIR --seed S
              randomly initialised DeepseekV3ForCausalLM (fp32) with a non-zero
              e_score_correction_bias, saved with save_pretrained (safetensors); MTP layers are
              appended in the official checkpoint layout when the config asks for them.
  bench-train --config config.json --batch B --seq-len N --steps N --warmup W --threads T
              AdamW training-step throughput on random tokens (peer of Shoal's tokens/s bench).

Everything runs on CPU, deterministically (torch.manual_seed), with no network access
(HF_HUB_OFFLINE=1). Run it with the venv made by scripts/hf/setup_venv.sh.
"""

from __future__ import annotations

import os

# Never touch the network: set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[hf_tool] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _imports():
    import numpy as np
    import torch
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    return np, torch, transformers, DeepseekV3Config, DeepseekV3ForCausalLM


def load_config(path: str):
    """Read an HF-style config.json into a DeepseekV3Config.

    DeepseekV3Config's default num_key_value_heads is 128 (not num_attention_heads); a config that
    omits it would give eager attention num_key_value_groups = heads // 128 (0 for small models),
    so it is filled with num_attention_heads here and reported as a fix-up.
    """
    _, _, _, DeepseekV3Config, _ = _imports()
    with open(path) as f:
        raw = json.load(f)
    fixups = []
    if "num_key_value_heads" not in raw and "num_attention_heads" in raw:
        raw["num_key_value_heads"] = raw["num_attention_heads"]
        fixups.append("num_key_value_heads := num_attention_heads")
    raw.pop("architectures", None)
    raw.pop("model_type", None)
    raw.pop("transformers_version", None)
    cfg = DeepseekV3Config(**raw)
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg, fixups


def set_threads(torch, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass  # can only be set once, before any parallel work


# --------------------------------------------------------------------------------------------- loss


def read_windows(np, torch, path: str, seq_len: int, max_windows: int, vocab: int):
    """Raw little-endian u32 ids -> [n_windows, seq_len+1] int64, consecutive and non-overlapping."""
    ids = np.fromfile(path, dtype="<u4")
    win = seq_len + 1
    n_win = len(ids) // win
    if max_windows:
        n_win = min(n_win, max_windows)
    if n_win == 0:
        sys.exit(f"token file has {len(ids)} tokens, fewer than seq_len+1 = {win}")
    windows = torch.from_numpy(ids[: n_win * win].astype(np.int64)).view(n_win, win)
    if int(windows.max()) >= vocab:
        sys.exit(f"token id {int(windows.max())} >= vocab_size {vocab}")
    return windows


def windows_nll(torch, logits_fn, windows, batch: int):
    """Sum of next-token NLL (float64 log-softmax of the logits) over all targets, plus per-window means."""
    total, count, per_window = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            chunk = windows[start : start + batch]
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            logp = torch.log_softmax(logits_fn(inputs).to(torch.float64), dim=-1)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [b, seq]
            total += float(nll.sum())
            count += nll.numel()
            per_window.extend(float(x) for x in nll.mean(dim=-1))
    return total, count, per_window


def load_hf(torch, DeepseekV3ForCausalLM, model_dir: str, experts_impl: str):
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation=experts_impl,
        local_files_only=True,
        output_loading_info=True,
    )
    model.eval()
    return model, info


def cmd_loss(args) -> None:
    np, torch, transformers, _, DeepseekV3ForCausalLM = _imports()
    torch.manual_seed(0)
    set_threads(torch, args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    t0 = time.perf_counter()
    model, info = load_hf(torch, DeepseekV3ForCausalLM, args.model_dir, args.experts_impl)
    load_s = time.perf_counter() - t0

    windows = read_windows(np, torch, args.tokens, args.seq_len, args.max_windows, model.config.vocab_size)
    n_win = windows.shape[0]
    t0 = time.perf_counter()
    total, count, window_losses = windows_nll(
        torch, lambda x: model(input_ids=x, use_cache=False).logits, windows, args.batch
    )
    fwd_s = time.perf_counter() - t0

    out = {
        "loss": total / count,
        "tokens": count,
        "windows": n_win,
        "seq_len": args.seq_len,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "experts_implementation": model.config._experts_implementation,
        "missing_keys": sorted(info.get("missing_keys", [])),
        "unexpected_keys": sorted(info.get("unexpected_keys", [])),
        "mismatched_keys": [list(map(str, m)) for m in info.get("mismatched_keys", [])],
        "load_s": round(load_s, 3),
        "forward_s": round(fwd_s, 3),
    }
    if args.per_window:
        out["window_losses"] = window_losses
    emit(out)


def cmd_spec_check(args) -> None:
    """HF loss vs reference_forward.py (independent re-implementation of the README behaviour list)."""
    np, torch, transformers, _, DeepseekV3ForCausalLM = _imports()
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reference_forward as ref

    set_threads(torch, args.threads)
    model, info = load_hf(torch, DeepseekV3ForCausalLM, args.model_dir, "eager")
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    tensors = {}
    for f in sorted(Path(args.model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    windows = read_windows(np, torch, args.tokens, args.seq_len, args.max_windows, cfg["vocab_size"])

    hf_total, count, hf_w = windows_nll(torch, lambda x: model(input_ids=x, use_cache=False).logits, windows, 4)
    out = {"tokens": count, "transformers": transformers.__version__, "hf_loss": hf_total / count}
    for name, dt in (("ref_fp64", torch.float64), ("ref_fp32", torch.float32)):
        total, _, per_w = windows_nll(torch, lambda x: ref.forward(cfg, tensors, x, dt), windows, 4)
        out[f"{name}_loss"] = total / count
        out[f"{name}_abs_diff"] = abs(total / count - out["hf_loss"])
        out[f"{name}_max_window_diff"] = max(abs(a - b) for a, b in zip(per_w, hf_w))
    out["ok"] = out["ref_fp64_abs_diff"] < args.tol
    emit(out)
    if not out["ok"]:
        sys.exit(1)


# ------------------------------------------------------------------------------------------- random


def _mtp_tensors(torch, cfg, model, k: int, gen, norm_std: float) -> dict:
    """Random MTP module k in the official DeepSeek-V3 checkpoint layout (layer num_hidden_layers+k).

    DeepseekV3ForCausalLM has no MTP parameters, so these are made here: the decoder block comes from a
    freshly initialised DeepseekV3DecoderLayer (MoE, since its index >= first_k_dense_replace) and is
    saved under the same per-expert names as the main layers; enorm/hnorm/shared_head.norm/eh_proj
    are the MTP extras; embed_tokens and shared_head.head are copies of the main model's, as in the
    released files.
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    idx = cfg.num_hidden_layers + k
    layer = DeepseekV3DecoderLayer(cfg, idx)
    std = cfg.initializer_range
    h = cfg.hidden_size
    tensors = {}
    for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            continue
        t = torch.empty(p.shape, dtype=torch.float32)
        if "layernorm" in name:
            t.fill_(1.0)
            t.add_(torch.randn(t.shape, generator=gen) * norm_std)
        elif name.endswith("e_score_correction_bias"):
            t.normal_(0.0, 0.02, generator=gen)
        else:
            t.normal_(0.0, std, generator=gen)
        tensors[f"model.layers.{idx}.{name}"] = t
    inter = cfg.moe_intermediate_size
    for j in range(cfg.n_routed_experts):
        pre = f"model.layers.{idx}.mlp.experts.{j}"
        tensors[f"{pre}.gate_proj.weight"] = torch.empty(inter, h).normal_(0.0, std, generator=gen)
        tensors[f"{pre}.up_proj.weight"] = torch.empty(inter, h).normal_(0.0, std, generator=gen)
        tensors[f"{pre}.down_proj.weight"] = torch.empty(h, inter).normal_(0.0, std, generator=gen)
    pre = f"model.layers.{idx}"
    tensors[f"{pre}.enorm.weight"] = 1 + torch.randn(h, generator=gen) * norm_std
    tensors[f"{pre}.hnorm.weight"] = 1 + torch.randn(h, generator=gen) * norm_std
    tensors[f"{pre}.eh_proj.weight"] = torch.empty(h, 2 * h).normal_(0.0, std, generator=gen)
    tensors[f"{pre}.shared_head.norm.weight"] = 1 + torch.randn(h, generator=gen) * norm_std
    tensors[f"{pre}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    tensors[f"{pre}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return tensors


def _append_tensors(out: Path, extra: dict) -> None:
    """Add tensors to a save_pretrained directory (single file or sharded index)."""
    from safetensors.torch import load_file, save_file

    index = out / "model.safetensors.index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        shard = "model-mtp.safetensors"
        save_file({k: v.contiguous() for k, v in extra.items()}, str(out / shard), metadata={"format": "pt"})
        for k in extra:
            meta["weight_map"][k] = shard
        meta.setdefault("metadata", {})["total_size"] = meta.get("metadata", {}).get("total_size", 0) + sum(
            v.numel() * v.element_size() for v in extra.values()
        )
        index.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    else:
        path = out / "model.safetensors"
        tensors = load_file(str(path))
        tensors.update(extra)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _saved_tensors(out: Path) -> list[dict]:
    from safetensors import safe_open

    rows = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                rows.append({"name": k, "shape": list(sl.get_shape()), "dtype": sl.get_dtype(), "file": f.name})
    rows.sort(key=lambda r: r["name"])
    return rows


def cmd_random(args) -> None:
    np, torch, transformers, _, DeepseekV3ForCausalLM = _imports()
    cfg, fixups = load_config(args.config)
    if args.init_std:
        cfg.initializer_range = args.init_std
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(cfg).to(torch.float32)
    model.eval()

    # Non-zero e_score_correction_bias so that selection-only bias is exercised. std 0.02 is the
    # same order as the spread of the sigmoid scores at init, so it changes which experts win.
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_bias = 0
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * args.bias_std)
                n_bias += 1
        # HF initialises every RMSNorm weight to 1, which would hide a norm applied with the wrong
        # weight; 1 + N(0, norm_std) makes every norm weight matter.
        if args.norm_std:
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(torch.randn(p.shape, generator=gen) * args.norm_std)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)

    n_mtp = 0 if args.no_mtp else int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)
    if n_mtp:
        extra = {}
        for k in range(n_mtp):
            extra.update(_mtp_tensors(torch, cfg, model, k, gen, args.norm_std))
        _append_tensors(out, extra)

    rows = _saved_tensors(out)
    emit(
        {
            "out": str(out),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "seed": args.seed,
            "config_fixups": fixups,
            "bias_layers": n_bias,
            "bias_std": args.bias_std,
            "norm_std": args.norm_std,
            "initializer_range": cfg.initializer_range,
            "mtp_layers_written": n_mtp,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tensor_count": len(rows),
            "tensors": rows,
        }
    )


# -------------------------------------------------------------------------------------- bench-train


def cmd_bench_train(args) -> None:
    np, torch, transformers, _, DeepseekV3ForCausalLM = _imports()
    import torch.nn.functional as F

    set_threads(torch, args.threads)
    torch.manual_seed(args.seed)
    cfg, fixups = load_config(args.config)
    cfg._attn_implementation = args.attn_impl
    model = DeepseekV3ForCausalLM(cfg).to(torch.float32)
    if args.experts_impl:
        model.set_experts_implementation(args.experts_impl)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    total_steps = args.warmup + args.steps
    gen = torch.Generator().manual_seed(args.seed + 7)
    data = torch.randint(0, cfg.vocab_size, (total_steps, args.batch, args.seq_len + 1), generator=gen)
    use_bf16 = args.dtype == "bf16"

    times, losses = [], []
    for step in range(total_steps):
        batch = data[step]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), targets.reshape(-1))
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if step >= args.warmup:
            times.append(dt)
        log(f"step {step} loss {losses[-1]:.4f} {dt:.3f}s{' (warmup)' if step < args.warmup else ''}")

    step_s = statistics.median(times)
    emit(
        {
            "tokens_per_s": args.batch * args.seq_len / step_s,
            "step_s": step_s,
            "step_s_all": times,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": args.dtype,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "parameters": sum(p.numel() for p in model.parameters()),
            "attn_implementation": cfg._attn_implementation,
            "experts_implementation": model.config._experts_implementation,
            "config_fixups": fixups,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
        }
    )


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("loss", help="mean next-token cross-entropy of an HF checkpoint on a u32 token file")
    q.add_argument("--model-dir", required=True)
    q.add_argument("--tokens", required=True, help="raw little-endian u32 token ids")
    q.add_argument("--seq-len", type=int, required=True)
    q.add_argument("--batch", type=int, default=4)
    q.add_argument("--max-windows", type=int, default=0, help="use at most this many windows (0 = all)")
    q.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    q.add_argument(
        "--experts-impl",
        default="eager",
        choices=["eager", "grouped_mm", "batched_mm"],
        help="HF experts kernel; eager is the per-expert loop in modeling_deepseek_v3.py",
    )
    q.add_argument("--per-window", action="store_true", help="also print the mean loss of every window")
    q.set_defaults(func=cmd_loss)

    q = sub.add_parser("random", help="save a randomly initialised DeepseekV3ForCausalLM")
    q.add_argument("--config", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--bias-std", type=float, default=0.02, help="std of the random e_score_correction_bias")
    q.add_argument("--norm-std", type=float, default=0.1, help="RMSNorm weights = 1 + N(0, norm_std); 0 keeps HF's ones")
    q.add_argument("--init-std", type=float, default=0.0, help="override config initializer_range (0 = keep)")
    q.add_argument("--no-mtp", action="store_true", help="do not append num_nextn_predict_layers MTP layers")
    q.set_defaults(func=cmd_random)

    q = sub.add_parser("spec-check", help="HF loss vs the independent reference_forward.py")
    q.add_argument("--model-dir", required=True)
    q.add_argument("--tokens", required=True)
    q.add_argument("--seq-len", type=int, required=True)
    q.add_argument("--max-windows", type=int, default=4)
    q.add_argument("--threads", type=int, default=0)
    q.add_argument("--tol", type=float, default=1e-5, help="max |hf_loss - ref_fp64_loss|")
    q.set_defaults(func=cmd_spec_check)

    q = sub.add_parser("bench-train", help="AdamW training throughput on random tokens")
    q.add_argument("--config", required=True)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--steps", type=int, default=10)
    q.add_argument("--warmup", type=int, default=2)
    q.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    q.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = CPU autocast, fp32 master weights")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--grad-clip", type=float, default=0.0, help="clip grad norm (0 = off)")
    q.add_argument("--attn-impl", default="eager", choices=["eager", "sdpa"])
    q.add_argument(
        "--experts-impl",
        default=None,
        choices=["eager", "grouped_mm", "batched_mm"],
        help="HF experts kernel (default: what transformers picks, grouped_mm)",
    )
    q.set_defaults(func=cmd_bench_train)

    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
