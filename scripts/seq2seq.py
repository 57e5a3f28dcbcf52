"""LSTM encoder-decoder on Multi30k German -> English: 2 x 512 LSTMs, 256-d embeddings
(bentrevett/pytorch-seq2seq, notebook 1 "Sequence to Sequence Learning with Neural Networks").

Defaults reproduce the tutorial: lower-cased tokens with <sos>/<eos>, vocabularies from train with min_freq 2,
29,000 / 1,014 / 1,000 sentence pairs, encoder and decoder dropout 0.5, all weights uniform(-0.08, 0.08),
teacher forcing 0.5 (one coin per time step for the whole batch), Adam lr 1e-3, batch 128, gradient norm
clipped to 1.0, 10 epochs, cross-entropy over non-pad target tokens, the best-validation-loss epoch is tested.
Validation and test run with teacher forcing off. Tokens come from a regex tokenizer (shared/text.py
`word_punct`), not the tutorial's spaCy models, so the vocabularies differ a little: de 7,882 / en 5,898
(tutorial 7,853 / 5,893). Parameters = 256 de + 769 en + 7,356,416 = 13,909,770 (tutorial 13,898,501).
Upstream result: test loss 3.780, PPL 43.8, BLEU 0.1376.

BLEU: greedy decoding of the 1,000 test sentences (stop at <eos>, at most 25 tokens as the tutorial's
translate_sentence) on the main process; both sides tokenized with `word_punct` and scored by
sacrebleu's BLEU(tokenize="none", smooth_method="none"): the tutorial's HF `evaluate` "bleu" with a
spaCy tokenizer is the same formula (4-gram, no smoothing, one reference). Reported as a fraction (0-1).

Launch (same script everywhere; hardware lives in accelerate_configs/):
    python scripts/seq2seq.py --data_dir ../shared/data
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/seq2seq.py --data_dir ../shared/data
    accelerate launch --config_file accelerate_configs/gpu_2_ddp.yaml scripts/seq2seq.py

`batch_size` is the global batch (split over processes). The study's settings: --batch_size 512 (1 GPU) /
--batch_size 1024 (2 GPUs, 512 per process), --epochs 10.

Expect: the tutorial's test PPL 43.8 and BLEU 0.138 after 10 epochs (no full run of this script recorded yet;
after 20 steps: val PPL 178). Metric: perplexity = exp(mean cross-entropy per target token, test split).
Time, 2-core AMD EPYC CPU shared with other jobs, 1 process: about 2 s per step with OMP_NUM_THREADS=1
(227 steps, ~8 min per epoch, ~80 min for 10); with 2 OpenMP threads and the other core busy, 4-18 s per step.
The tutorial took 16 s per epoch on one GPU.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from sacrebleu.metrics import BLEU
from torch.nn.utils.rnn import pack_padded_sequence

from shared.config import RunConfig
from shared.data import make_loader
from shared.session import Session, run
from shared.text import load_multi30k, pad_pair_collate, word_punct


@dataclass
class Config(RunConfig):
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 128  # global batch (all processes together)
    epochs: int = 10
    embedding_dim: int = 256  # encoder and decoder embeddings
    hidden_dim: int = 512  # LSTM hidden and cell size
    n_layers: int = 2
    dropout: float = 0.5  # on the embeddings and between the LSTM layers
    teacher_forcing: float = 0.5  # probability of feeding the true previous token (training only)
    stepwise: bool = (
        False  # decode one token per LSTM call, as the tutorial (and the study) did: same function, slower
    )
    clip: float = 1.0  # max global gradient norm
    max_decode_len: int = 25  # greedy decoding for BLEU: at most this many tokens (the tutorial's 25)
    # The encoder reads the padding (no packing, as the tutorial), so the loss depends on how far each batch
    # pads: evaluate with the tutorial's batch of 128 rather than the shared default of 1000.
    eval_batch_size: int = 128  # global batch for validation and test
    select_best: bool = True  # test the epoch with the lowest validation loss, as the tutorial does


METRICS = {
    "train/loss": {"label": "train loss (cross-entropy per target token)", "goal": "min"},
    "val/loss": {"label": "validation loss (cross-entropy per target token)", "goal": "min"},
    "val/ppl": {"label": "validation perplexity (exp of the loss)", "goal": "min"},
    "test/loss": {"label": "test loss (cross-entropy per target token)", "goal": "min"},
    "test/ppl": {"label": "test perplexity (exp of the loss)", "goal": "min", "primary": True},
    "test/bleu": {
        "label": "test BLEU-4, greedy decoding (sacrebleu, word_punct tokens)",
        "unit": "fraction",
        "goal": "max",
    },
}
# model_split: the encoder on the first device, the decoder (and its loop) on the second
SPLIT_POINTS = ["decoder"]
# shared knobs this model has no use for (setting one is an error, not a silent no-op)
UNSUPPORTED = {
    "pipeline": "the decoder is a loop over target positions fed by teacher-forcing draws, not a static chain "
    "of stages (docs/strategies.md, 'Why a pipeline does not fit NBoW and Seq2Seq')",
    "microbatches": "the loss is normalised by the global batch's token count",
    "data_on_device": "sentences are token lists padded per batch, not a tensor the device could hold",
    "channels_last": "Seq2Seq has no convolutions",
    "compile": "batches of every padded length would each compile a new graph",
}


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim)
        self.rnn = nn.LSTM(
            cfg.embedding_dim, cfg.hidden_dim, cfg.n_layers, dropout=cfg.dropout, batch_first=True
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src, lengths=None):
        embedded = self.dropout(self.embedding(src))
        if lengths is not None:  # decoding: the states at each sentence's own end, as translating one by one
            embedded = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, cell) = self.rnn(embedded)
        return hidden, cell


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim)
        self.rnn = nn.LSTM(
            cfg.embedding_dim, cfg.hidden_dim, cfg.n_layers, dropout=cfg.dropout, batch_first=True
        )
        self.fc_out = nn.Linear(cfg.hidden_dim, vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens, hidden, cell, project: bool = True):
        """tokens (B,) -> logits (B, V) for one time step, or tokens (B, L) -> logits (B, L, V) for L steps whose
        inputs are all known (one LSTM call); with project=False the LSTM outputs instead of the logits."""
        seq = tokens.dim() == 2
        embedded = self.dropout(self.embedding(tokens if seq else tokens.unsqueeze(1)))
        output, (hidden, cell) = self.rnn(embedded, (hidden, cell))
        if not project:
            return output, hidden, cell
        return self.fc_out(output if seq else output.squeeze(1)), hidden, cell


class Seq2Seq(nn.Module):
    def __init__(self, src_vocab: int, trg_vocab: int, cfg: Config):
        super().__init__()
        self.encoder, self.decoder = Encoder(src_vocab, cfg), Decoder(trg_vocab, cfg)

    def forward(self, src, trg, teacher_force: list[bool], stepwise: bool = False):
        """Logits (B, T-1, V) for trg[:, 1:]. After step t the decoder is fed trg[:, t] if teacher_force[t-1],
        else its own prediction.

        The tutorial runs the decoder one step at a time (`stepwise=True`, kept for reference and for the
        speed benchmark's study-style loop). The default computes the same function faster: a run of steps
        whose inputs are known in advance (teacher-forced) goes through the LSTM in one call, the vocabulary
        projection runs once over all positions at the end, and only a step whose successor is fed its own
        prediction projects its output early. Same parameters, same coins, same logits up to float rounding
        (tests/test_speed.py); dropout masks are drawn per call, so their random values differ.
        """
        hidden, cell = self.encoder(src)
        token, T = trg[:, 0], trg.shape[1]
        if stepwise:
            outputs = []
            for t in range(1, T):
                logits, hidden, cell = self.decoder(token, hidden, cell)
                outputs.append(logits)
                token = trg[:, t] if teacher_force[t - 1] else logits.argmax(1)
            return torch.stack(outputs, 1)
        outs, t = [], 1
        while t < T:
            u = t + 1  # positions t .. u-1: each one's input is known before the segment starts
            while u < T and teacher_force[u - 2]:
                u += 1
            tokens = torch.cat([token.to(trg.device)[:, None], trg[:, t : u - 1]], 1)
            out, hidden, cell = self.decoder(tokens, hidden, cell, project=False)
            outs.append(out)
            if u < T:  # position u is fed the prediction at position u - 1
                token = self.decoder.fc_out(out[:, -1]).argmax(1)
            t = u
        return self.decoder.fc_out(torch.cat(outs, 1))


def build_model(cfg: Config, info: dict) -> Seq2Seq:
    model = Seq2Seq(info["src_vocab_size"], info["trg_vocab_size"], cfg)
    for p in model.parameters():
        nn.init.uniform_(p, -0.08, 0.08)  # every weight and bias, as the tutorial's init_weights
    return model


def pad_as_one_batch(s: Session, t, pad, real_rows=None):
    """Pad (or cut) each data-parallel shard to the length of the global batch's longest real sentence.

    Each rank collates only its own rows, so without this a rank pads to its shard's longest sentence. The
    encoder reads the padding (no packing, as the tutorial), so its states, and the loss, would then differ
    from one process on the same batch; and under FSDP, where every decoder step all-gathers the decoder's
    parameters, ranks taking different numbers of steps would deadlock. `real_rows`: how many of this rank's
    rows are real samples (evaluation's last batch is filled up with repeats, which are dropped later and
    must not lengthen the others). Costs one small gather (and a host sync) per batch.
    """
    if s.dp == 1:
        return t
    longest = (
        (t[:real_rows] != pad).sum(1).max(0, keepdim=True).values if len(t[:real_rows]) else t.new_zeros(1)
    )
    length = int(s.max_over_ranks(longest))
    return t[:, :length] if t.shape[1] >= length else F.pad(t, (0, length - t.shape[1]), value=pad)


def train_one_epoch(s: Session, model, loader, optimizer) -> tuple[float, int]:
    model.train()
    src_pad, pad = s.data.info["src_pad_index"], s.data.info["trg_pad_index"]
    loss_sum, n_tokens, seen = s.epoch_sums(3)  # on the device, reduced once per epoch; kept in checkpoints
    # teacher-forcing coins: a CPU generator, so drawing them never syncs the device
    coins = torch.Generator()
    for batch in s.batches(loader):  # a resumed run skips the batches it already trained on
        src, trg = pad_as_one_batch(s, batch["src"], src_pad), pad_as_one_batch(s, batch["trg"], pad)
        # The tutorial's coin per time step for the whole batch (random.random() < ratio), from a generator
        # re-seeded by (seed, step): every rank draws the same coin for time step t, although each rank pads
        # its shard to its own length (Accelerate shards the batch indices; each rank collates its own rows).
        coins.manual_seed(s.cfg.seed * 1_000_003 + s.step)
        teacher_force = (torch.rand(trg.shape[1] - 1, generator=coins) < s.cfg.teacher_forcing).tolist()
        logits = model(src, trg, teacher_force, stepwise=s.cfg.stepwise)
        target = trg[:, 1:]
        summed = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=pad, reduction="sum")
        tokens = (target != pad).sum()
        # Mean over the tokens of the GLOBAL batch: DDP and FSDP average gradients over the data-parallel
        # ranks, so each divides its sum by the global count / replicas. Per-rank means would weight short
        # shards' tokens more.
        loss = summed * s.dp / s.reduce_sum(tokens)
        optimizer.zero_grad(set_to_none=True)
        s.accelerator.backward(loss)
        if not s.step_ok(loss):  # non-finite loss: stop the run, or skip the step (--on_nan skip)
            continue
        s.accelerator.clip_grad_norm_(model.parameters(), s.cfg.clip)
        optimizer.step()
        loss_sum += summed.detach()
        n_tokens += tokens
        seen += len(trg)
        if s.step_done():  # checkpoint every N steps and on SIGTERM; True at max_steps
            break
    loss_sum, n_tokens, seen = s.reduce_sum(torch.stack([loss_sum, n_tokens, seen])).tolist()
    return loss_sum / n_tokens, int(seen)


@torch.no_grad()
def evaluate(s: Session, model, loader) -> dict:
    """Per-token loss with teacher forcing off (the tutorial's evaluate) over the whole split, each sentence
    counted once across ranks: per-sentence sums of loss and of tokens are gathered, not batch means."""
    model.eval()
    src_pad, pad = s.data.info["src_pad_index"], s.data.info["trg_pad_index"]
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    n_tokens = torch.zeros((), device=s.device, dtype=torch.long)
    n = 0
    for batch in loader:
        real = s.real_rows(len(batch["src"]))
        src = pad_as_one_batch(s, batch["src"], src_pad, real)
        trg = pad_as_one_batch(s, batch["trg"], pad, real)
        logits = model(src, trg, [False] * (trg.shape[1] - 1))
        target = trg[:, 1:]
        losses = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=pad, reduction="none").sum(1)
        counts = (target != pad).sum(1)
        losses, counts = s.gather_for_metrics((losses, counts))  # drops the padding of the last batch
        loss_sum += losses.double().sum()
        n_tokens += counts.sum()
        n += len(losses)
    loss = loss_sum.item() / n_tokens.item()
    return {"loss": loss, "ppl": math.exp(loss), "n_samples": n, "n_tokens": int(n_tokens.item())}


@torch.no_grad()
def bleu(s: Session, model, data) -> dict:
    """Greedy translations of the whole test split on this process, scored with corpus BLEU."""
    model.eval()
    cfg, device, info = s.cfg, s.device, data.info
    src_vocab, trg_vocab, eos = info["src_vocab"], info["trg_vocab"], info["eos_index"]
    loader = make_loader(
        data.test,
        cfg.eval_batch_size,
        shuffle=False,
        seed=cfg.seed,
        collate_fn=pad_pair_collate(info["src_pad_index"], info["trg_pad_index"]),
    )
    hyps, refs = [], []
    for batch in loader:
        hidden, cell = model.encoder(batch["src"].to(device), batch["src_lengths"])
        token = torch.full((len(batch["src"]),), info["sos_index"], device=device)
        done, out = torch.zeros_like(token, dtype=torch.bool), []
        for _ in range(cfg.max_decode_len):
            logits, hidden, cell = model.decoder(token, hidden, cell)
            token = logits.argmax(1).to(device)  # model_split: the decoder may sit on another device
            out.append(token)
            done |= token == eos
            # Under FSDP every decoder step all-gathers parameters: the ranks must stop at the same step,
            # even if a kernel's rounding made one rank's argmax differ.
            if s.all_ranks(done.all()):
                break
        for ids in torch.stack(out, 1).tolist():
            hyps.append(" ".join(trg_vocab.decode(ids[: ids.index(eos)] if eos in ids else ids)))
        refs += [" ".join(word_punct(text)) for text in batch["trg_text"]]
    # tokens are already split; no smoothing, as HF "bleu"
    metric = BLEU(tokenize="none", smooth_method="none")
    score = metric.corpus_score(hyps, [refs])
    examples = [
        {"source": " ".join(src_vocab.decode(src[1:-1])), "reference": ref, "hypothesis": hyp}
        for src, ref, hyp in zip(data.test["src"][:5], refs[:5], hyps[:5], strict=True)
    ]
    detail = {
        "precisions": [p / 100 for p in score.precisions],
        "brevity_penalty": score.bp,
        "hyp_len": score.sys_len,
        "ref_len": score.ref_len,
        "signature": str(metric.get_signature()),
    }
    return {"bleu": score.score / 100, "detail": detail, "examples": examples}


def main():
    with Session(Config, "seq2seq", METRICS, SPLIT_POINTS, UNSUPPORTED) as s:
        cfg = s.cfg
        data = load_multi30k(cfg)
        pads = data.info["src_pad_index"], data.info["trg_pad_index"]
        loaders = s.loaders(data, collate_fn=pad_pair_collate(*pads))  # train, val, test
        model = build_model(cfg, data.info)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=cfg.fused_optimizer)
        # accelerator.prepare per strategy; opens the run record
        model, optimizer, train_loader, val_loader, test_loader = s.prepare(model, optimizer, *loaders)
        for _ in s.epochs():  # resumes where --resume left off; ends early at max_steps
            train_loss, n_train = train_one_epoch(s, model, train_loader, optimizer)
            with s.evaluating():
                val = evaluate(s, model, val_loader)
            s.log_epoch(n_train, {"train/loss": train_loss, "val/loss": val["loss"], "val/ppl": val["ppl"],
                                  "val/n_samples": val["n_samples"]})  # fmt: skip
        s.restore_best(model)
        with s.evaluating():
            test = evaluate(s, model, test_loader)
            # BLEU over the whole test split on every rank with the unwrapped model (FSDP's forward all-gathers
            # parameters, so all ranks must run it); 1,000 short sentences decode in seconds and the ranks agree.
            scored = bleu(s, s.accelerator.unwrap_model(model), data)
        s.finish({"test/loss": test["loss"], "test/ppl": test["ppl"], "test/n_samples": test["n_samples"],
                  "test/n_tokens": test["n_tokens"], "test/bleu": scored["bleu"],
                  "test/bleu_detail": scored["detail"], "test/examples": scored["examples"]})  # fmt: skip


if __name__ == "__main__":
    run(main)
