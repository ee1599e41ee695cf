"""Use dalle_fast in your own model: a tiny text-to-image transformer whose attention layers are
``dalle_fast.nn.SparseAttention`` (training) and whose generation uses ``decode_attention`` and
``sample`` with a static KV cache. Runs on CPU in a few seconds:

    python examples/use_in_your_model.py

What it shows:
1. a transformer block on ``dalle_fast.nn.SparseAttention`` with a different mask kind per layer;
2. a few training steps (``sparse_attention`` has autograd);
3. KV-cached decoding with ``decode_attention`` (the cache is written in place at ``pos``) and
   on-device sampling with ``sample`` (top-k, temperature, seeded), checked against the full forward.
"""
import torch
from torch import nn

import dalle_fast
from dalle_fast import Layout, decode_attention, sample

TEXT_LEN, IMAGE_SIZE = 8, 4                   # 8 text positions, then a 4x4 grid of image tokens
SEQ = TEXT_LEN + IMAGE_SIZE ** 2
TEXT_VOCAB, IMAGE_VOCAB, DIM, HEADS = 64, 32, 64, 4
KINDS = ["row", "col", "axial_row", "conv_like"]  # any mix of dalle_fast.KINDS


class Block(nn.Module):
    def __init__(self, layout: Layout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = dalle_fast.nn.SparseAttention(DIM, HEADS, DIM // HEADS, layout)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):                       # x: (batch, seq, DIM)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def step(self, x, k_cache, v_cache, pos):   # one position: x (batch, 1, DIM)
        q, k, v = self.attn.qkv(self.norm1(x))  # each (batch, heads, 1, head_dim)
        out = decode_attention(q, k, v, k_cache, v_cache, pos, self.attn.layout)
        x = x + self.attn.to_out(out.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class TinyDALLE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(TEXT_VOCAB + IMAGE_VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block(Layout(kind, TEXT_LEN, IMAGE_SIZE, kernel_size=3)) for kind in KINDS)
        self.head = nn.Linear(DIM, IMAGE_VOCAB)  # predicts image tokens only, for brevity

    def forward(self, tokens):                  # tokens: (batch, n) ids, image ids offset by TEXT_VOCAB
        x = self.embed(tokens) + self.pos[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)                     # (batch, n, IMAGE_VOCAB): position p predicts token p + 1


@torch.no_grad()
def generate(model, text, *, top_k=8, temperature=1.0, seed=0):
    """text (batch, TEXT_LEN) -> image tokens (batch, IMAGE_SIZE**2) with a static KV cache."""
    b, head_dim = text.shape[0], DIM // HEADS
    caches = [(torch.zeros(b, HEADS, SEQ, head_dim), torch.zeros(b, HEADS, SEQ, head_dim)) for _ in model.blocks]
    seeds = torch.arange(b) + seed
    tokens = text
    logits = None
    for p in range(SEQ - 1):                    # feed position p, draw the token at p + 1
        x = model.embed(tokens[:, p:p + 1]) + model.pos[p]
        pos = torch.tensor(p)
        for block, (kc, vc) in zip(model.blocks, caches):
            x = block.step(x, kc, vc, pos)
        logits = model.head(x[:, 0])
        if p >= TEXT_LEN - 1:
            nxt = sample(logits, seeds=seeds, step=p, top_k=top_k, temperature=temperature)
            tokens = torch.cat([tokens, nxt[:, None] + TEXT_VOCAB], dim=1)
    return tokens[:, TEXT_LEN:] - TEXT_VOCAB


def main():
    torch.manual_seed(0)
    model = TinyDALLE()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.randint(0, TEXT_VOCAB, (8, TEXT_LEN))
    image = (text[:, :1] + torch.arange(IMAGE_SIZE ** 2)) % IMAGE_VOCAB  # a learnable toy target
    seq = torch.cat([text, image + TEXT_VOCAB], dim=1)
    for it in range(10):
        logits = model(seq[:, :-1])[:, TEXT_LEN - 1:]                  # the image predictions
        loss = nn.functional.cross_entropy(logits.reshape(-1, IMAGE_VOCAB), image.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"loss after 10 steps: {loss.item():.3f}")

    model.eval()
    codes = generate(model, text[:2], top_k=1)  # greedy
    # the cached decode equals the full (training) forward, teacher-forced with the same tokens
    with torch.no_grad():
        full = model(torch.cat([text[:2], codes + TEXT_VOCAB], 1)[:, :-1])[:, TEXT_LEN - 1:].argmax(-1)
    assert torch.equal(full, codes), "cached decoding disagrees with the full forward"
    print("greedy codes, cached == full forward:", codes[0].tolist())
    print("sampled codes (top-k 8, seed 1):     ", generate(model, text[:1], seed=1)[0].tolist())


if __name__ == "__main__":
    main()
