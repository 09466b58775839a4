"""Opacus ghost clipping on a causal transformer LM: its DP step against its own plain gradient.

The PyTorch side of ``benchmarks/extensions_attention.py``: the same shape of model
(Embedding(96, 128) as a one-hot Linear -> 2 pre-LN blocks of Opacus
``DPMultiheadAttention`` (4 heads, causal) and a 4x GELU MLP -> LayerNorm -> Linear(96);
batch 32, T = 128, float32; no rotary positions, which Opacus's attention lacks), timed
in interleaved rounds in one process (medians; CPU ms is the process's CPU time over
all threads):

- ``torch plain gradient``: mean token cross-entropy, ``loss.backward()``.
- ``Opacus ghost clipping``: ``PrivacyEngine.make_private(..., grad_sample_mode="ghost")``
  with its wrapped criterion; ``loss.backward()`` runs Opacus's two passes (per-example
  norms by ghost clipping, then the clipped sum). No optimizer step or noise in either,
  as for fbp's ``DP clipped sum`` against its plain gradient.

The ratio (ghost clipping / plain) is the number to set beside fbp's clipped-sum ratio.

Usage:
  python benchmarks/opacus_attention.py [--time 128] [--rounds 10]
  python benchmarks/opacus_attention.py --quick     # tiny sizes
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def lm(vocab: int, width: int, heads: int, blocks: int) -> torch.nn.Module:
    """The PyTorch causal LM, sequence-first throughout (Opacus's attention merges heads
    in the standard layout only sequence-first, and every layer must agree on the batch
    axis for Opacus's per-example hooks)."""
    from opacus.layers import DPMultiheadAttention

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
            self.attn = DPMultiheadAttention(width, heads)
            self.ff1 = torch.nn.Linear(width, 4 * width)
            self.ff2 = torch.nn.Linear(4 * width, width)

        def forward(self, x, mask):  # x: (T, batch, width)
            a = self.ln1(x)
            x = x + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
            return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # Embedding as a bias-free Linear of one-hot ids: Opacus's ghost norm of
            # torch.nn.Embedding fails on sequence-first ids (a .view of a transpose).
            self.emb = torch.nn.Linear(vocab, width, bias=False)
            self.blocks = torch.nn.ModuleList([Block() for _ in range(blocks)])
            self.ln = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, ids):  # ids: (T, batch) -> logits (T, batch, vocab)
            t = ids.shape[0]
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
            x = self.emb(F.one_hot(ids, vocab).float())
            for b in self.blocks:
                x = b(x, mask)
            return self.head(self.ln(x))

    return LM()


def steps(quick: bool, time: int) -> dict:
    """name -> zero-argument callable running one gradient computation."""
    from opacus import PrivacyEngine

    vocab, width, heads, blocks, batch = (16, 16, 2, 1, 4) if quick else (96, 128, 4, 2, 32)
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, time + 1))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    x_tb = x.T.contiguous()  # the models are sequence-first
    plain = lm(vocab, width, heads, blocks)

    def plain_step():
        plain.zero_grad()
        logits = plain(x_tb).transpose(0, 1)  # (batch, T, vocab)
        F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1)).backward()

    private = lm(vocab, width, heads, blocks)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure RNG and accountant notices
        model, opt, criterion, _ = PrivacyEngine().make_private(
            module=private,
            optimizer=torch.optim.SGD(private.parameters(), lr=0.0),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="ghost",
            criterion=torch.nn.CrossEntropyLoss(),
            poisson_sampling=False,
            batch_first=False,
        )

    def ghost_step():
        opt.zero_grad()
        logits = model(x_tb).transpose(0, 1)  # per-sequence losses need (batch, T, vocab)
        criterion(logits.reshape(-1, vocab), y.reshape(-1), shape=logits.shape).backward()

    return {"torch plain gradient": plain_step, "Opacus ghost clipping": ghost_step}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds")
    ap.add_argument("--time", type=int, default=None, help="sequence length (default 128)")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    time = args.time or (8 if args.quick else 128)
    rounds = args.rounds or (2 if args.quick else 10)
    torch.set_num_threads(os.cpu_count() or 1)
    # torch's notice when Opacus's hooked backward reaches integer (one-hot) inputs
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    fns = steps(args.quick, time)
    load = common.load()
    cpu: dict[str, list[float]] = {}
    times = common.interleaved(fns, rounds=rounds, warmup=2, cpu=cpu)
    base = "torch plain gradient"
    print(f"Machine: {common.machine()}; torch {torch.__version__}; load before {load}.")
    print(f"T={time}, median of {rounds} interleaved rounds.\n")
    rows = []
    for name in fns:
        med, cmed = common.median(times[name]), common.median(cpu[name])
        rows.append(
            [
                name,
                f"{1e3 * med:.1f} {common.spread(times[name])}",
                f"{1e3 * cmed:.1f}",
                f"{med / common.median(times[base]):.2f}x",
                f"{cmed / common.median(cpu[base]):.2f}x",
            ]
        )
    print(common.table(["variant", "ms", "CPU ms", "time ratio", "CPU-time ratio"], rows))


if __name__ == "__main__":
    main()
