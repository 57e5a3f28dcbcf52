"""A small GPT: a decoder-only Transformer language model on the English side of Multi30k, 2.3M parameters.

Not one of the study's six: the worked example of your own model (docs/scripts.md, "Your own model"), written
from mlp.py's skeleton. The model is nanoGPT's (karpathy/nanoGPT model.py: pre-LayerNorm blocks, causal
attention through torch.nn.functional.scaled_dot_product_attention, GELU MLP, learned positions, N(0, 0.02)
init), small enough to train on a CPU: 4 layers, 4 heads, 128 wide, 32-token context, no weight tying (so model
split and pipeline may put the embedding and the output layer on different devices).

Data: Multi30k's 29,000 / 1,014 / 1,000 English image captions, lower-cased words and punctuation (the seq2seq
script's tokens and vocabulary: min_freq 2, 5,893 tokens with <unk> <pad> <sos> <eos>), each sentence ending
in <eos>, concatenated into one stream per split and cut into 32-token sequences (nanoGPT's way; no padding,
every batch the same shape). Metric: perplexity, exp(mean cross-entropy per token) over the whole split.

Launch (same script everywhere; hardware lives in accelerate_configs/):
    python scripts/transformer_lm.py --data_dir data
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/transformer_lm.py --data_dir data
    accelerate launch --config_file accelerate_configs/cpu_2proc_pipeline.yaml scripts/transformer_lm.py --strategy pipeline

`batch_size` is the global batch in sequences (split over processes). Expect: test perplexity about 25 after
10 epochs (measured 24.8, seed 0; a Kneser-Ney trigram on the same tokens reaches 32.0: docs/quality.md); on one
core of the 2-core CPU, about 2 minutes per epoch.
"""

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import RunConfig
from shared.data import Data
from shared.session import Session, run
from shared.text import load_multi30k


@dataclass
class Config(RunConfig):
    lr: float = 1e-3  # AdamW learning rate (nanoGPT's for its small character model)
    weight_decay: float = 0.1
    batch_size: int = 64  # global batch in sequences (all processes together)
    epochs: int = 10
    block_size: int = 32  # tokens per sequence (the context)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    select_best: bool = True  # test the epoch with the lowest validation loss


METRICS = {
    "train/loss": {"label": "train loss (cross-entropy per token)", "goal": "min"},
    "val/loss": {"label": "validation loss (cross-entropy per token)", "goal": "min"},
    "val/ppl": {"label": "validation perplexity", "goal": "min"},
    "test/loss": {"label": "test loss (cross-entropy per token)", "goal": "min"},
    "test/ppl": {"label": "test perplexity", "goal": "min", "primary": True},
}
# model_split / pipeline stages start at these layers, best first: 2 stages put the final LayerNorm and the
# output layer (a third of the parameters, half the work) on the second device
SPLIT_POINTS = ["ln_f", "block2", "block1"]
# shared knobs this model has no use for (setting one is an error, not a silent no-op)
UNSUPPORTED = {"channels_last": "the Transformer has no convolutions"}


def load_english(cfg: Config) -> Data:
    """Multi30k's English sentences as one token stream per split, cut into block_size + 1 token rows
    (input and next-token target overlap by all but one token)."""
    pairs = load_multi30k(replace(cfg, limit_train=0, limit_eval=0))  # --limit_* count sequences, below

    def sequences(split: dict) -> dict:
        stream = torch.cat([ids[1:] for ids in split["trg"]])  # drop <sos>: each sentence ends in <eos>
        n = (len(stream) - 1) // cfg.block_size
        rows = stream[: n * cfg.block_size + 1].unfold(0, cfg.block_size + 1, cfg.block_size)
        return {"x": rows[:, :-1].contiguous(), "y": rows[:, 1:].contiguous()}

    vocab = pairs.info["trg_vocab"]
    info = {
        "vocab_size": len(vocab),
        "tokens": "word_punct, lower-cased; the seq2seq script's English vocabulary",
    }
    splits = [sequences(s) for s in (pairs.train, pairs.val, pairs.test)]
    return Data.from_splits(cfg, "multi30k-en", pairs.source, pairs.location, *splits, info=info)


def inputs(batch: dict, cfg: Config, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as (input, target): token ids (B, T) and the next token at each position (B, T)."""
    return batch["x"], batch["y"]


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per token: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


class Embedding(nn.Module):
    """Token plus learned position embeddings (GPT-2)."""

    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.tok(ids) + self.pos(pos))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, 2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def init_weights(module: nn.Module):
    """GPT-2's init: N(0, 0.02) for every Linear and Embedding, zero biases (LayerNorm keeps 1 and 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_model(cfg: Config, info: dict) -> nn.Sequential:
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
    blocks = {f"block{i}": Block(cfg) for i in range(cfg.n_layer)}
    model = nn.Sequential(
        OrderedDict(embed=Embedding(info["vocab_size"], cfg), **blocks, ln_f=nn.LayerNorm(cfg.n_embd),
             head=nn.Linear(cfg.n_embd, info["vocab_size"], bias=False))
    )  # fmt: skip
    model.apply(init_weights)
    return model


def train_one_epoch(s: Session, model, loader, optimizer) -> tuple[float, int]:
    model.train()
    loss_sum, seen = s.epoch_sums(2)  # on the device, reduced once per epoch; kept in checkpoints
    for batch in s.batches(loader):  # a resumed run skips the batches it already trained on
        x, y = inputs(batch, s.cfg, s.gen)
        optimizer.zero_grad(set_to_none=True)
        if s.micro_batched:  # a pipeline schedule, or --microbatches N accumulated under no_sync
            loss = s.micro_batch_step(model, x, y, lm_loss)
        else:
            loss = lm_loss(model(x), y)
            s.accelerator.backward(loss)
        if not s.step_ok(loss):  # non-finite loss: stop the run, or skip the step (--on_nan skip)
            continue
        optimizer.step()
        loss_sum += loss.detach() * len(y)  # every sequence has block_size tokens
        seen += len(y)
        if s.step_done():  # checkpoint every N steps and on SIGTERM; True at max_steps
            break
    loss_sum, seen = s.reduce_sum(torch.stack([loss_sum, seen])).tolist()
    return loss_sum / seen, int(seen)


@torch.no_grad()
def evaluate(s: Session, model, loader) -> dict:
    """Token-weighted loss and perplexity over the whole split, each sequence counted once across ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    n = 0
    for batch in loader:
        x, y = inputs(batch, s.cfg)
        losses = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)  # per sequence
        losses = s.gather_for_metrics(losses)  # drops the padding of the last batch
        loss_sum += losses.double().sum()
        n += len(losses)
    loss = loss_sum.item() / n
    return {"loss": loss, "ppl": float(torch.tensor(loss).exp()), "n_samples": n}


def main():
    with Session(Config, "transformer_lm", METRICS, SPLIT_POINTS, UNSUPPORTED) as s:
        cfg = s.cfg
        data = load_english(cfg)
        loaders = s.loaders(data)  # train (resident on the device with --data_on_device), val, test
        model = build_model(cfg, data.info)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fused_optimizer
        )
        # accelerator.prepare per strategy; opens the run record; --compile warms up on inputs(batch) and the loss
        model, optimizer, train_loader, val_loader, test_loader = s.prepare(
            model, optimizer, *loaders, inputs=inputs, loss_fn=lm_loss
        )
        for _ in s.epochs():  # resumes where --resume left off; ends early at max_steps
            train_loss, n_train = train_one_epoch(s, model, train_loader, optimizer)
            with s.evaluating():
                val = evaluate(s, model, val_loader)
            s.log_epoch(n_train, {"train/loss": train_loss, "val/loss": val["loss"], "val/ppl": val["ppl"],
                                  "val/n_samples": val["n_samples"]})  # fmt: skip
        s.restore_best(model)
        with s.evaluating():
            test = evaluate(s, model, test_loader)
        s.finish({"test/loss": test["loss"], "test/ppl": test["ppl"], "test/n_samples": test["n_samples"]})


if __name__ == "__main__":
    run(main)
