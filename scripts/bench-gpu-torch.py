"""PyTorch baselines for scripts/gpu-check.sh: one training step (forward + backward + AdamW)
of a Llama with the benchmark's shapes (12 layers, d_model 768, 12 heads, d_ffn 2048, vocab
32000, RMSNorm, RoPE, SwiGLU, untied head), batch 8 x seq 1024, fp32 weights with bf16
autocast (what memc's `--dtype bf16` computes). Modes: `eager`, `compile` (torch.compile),
`ckpt` (eager with every block under torch.utils.checkpoint, use_reentrant=False: Hugging
Face's gradient_checkpointing, the baseline of memc's `--remat full`) and `compile-budget`
(torch.compile with torch._functorch.config.activation_memory_budget = 0.2). Prints one JSON
line per mode: step_ms (median), tokens_per_s, peak_bytes (torch.cuda.max_memory_allocated).

    python3 bench-gpu-torch.py [--steps 10] [--modes eager,compile,ckpt,compile-budget]

Pure PyTorch (no transformers needed on the GPU machine); attention is SDPA with is_causal,
as transformers' Llama uses on GPU.
"""
import argparse, json, math, statistics, time

import torch
import torch.utils.checkpoint
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--modes", default="eager,compile,ckpt,compile-budget")
ap.add_argument("--layers", type=int, default=12)
ap.add_argument("--hidden", type=int, default=768)
ap.add_argument("--heads", type=int, default=12)
ap.add_argument("--ffn", type=int, default=2048)
ap.add_argument("--vocab", type=int, default=32000)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=1024)
ap.add_argument("--device", default="cuda", help="cpu for a quick check of this script")
a = ap.parse_args()


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(torch.nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.h = h
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = torch.nn.Linear(d, f, bias=False), torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        y = self.n1(x)
        q, k, v = (m(y).view(b, s, self.h, d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, s, d))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Llama(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(a.vocab, a.hidden)
        self.blocks = torch.nn.ModuleList(Block(a.hidden, a.heads, a.ffn) for _ in range(a.layers))
        self.norm = RMSNorm(a.hidden)
        self.head = torch.nn.Linear(a.hidden, a.vocab, bias=False)
        hd = a.hidden // a.heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        t = torch.outer(torch.arange(a.seq).float(), inv)
        emb = torch.cat((t, t), dim=-1)
        self.register_buffer("cos", emb.cos()[None, None], persistent=False)
        self.register_buffer("sin", emb.sin()[None, None], persistent=False)

    checkpoint = False

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            if self.checkpoint:
                x = torch.utils.checkpoint.checkpoint(
                    blk, x, self.cos.to(x.dtype), self.sin.to(x.dtype), use_reentrant=False
                )
            else:
                x = blk(x, self.cos.to(x.dtype), self.sin.to(x.dtype))
        return self.head(self.norm(x))


def run(mode):
    torch.manual_seed(0)
    model = Llama().to(a.device)
    model.checkpoint = mode == "ckpt"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    import torch._functorch.config as fconfig

    fconfig.activation_memory_budget = 0.2 if mode == "compile-budget" else 1.0
    fwd = torch.compile(model) if mode.startswith("compile") else model
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)

    def step():
        with torch.autocast(a.device, dtype=torch.bfloat16):
            logits = fwd(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, a.vocab).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(times)
    print(json.dumps({"mode": f"pytorch {mode}", "step_ms": round(ms, 2), "tokens_per_s": round(a.batch * a.seq / ms * 1e3),
                      "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, "loss": round(loss.item(), 4),
                      "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)
    del model, opt, fwd
    if cuda:
        torch.cuda.empty_cache()


for mode in a.modes.split(","):
    run(mode)
