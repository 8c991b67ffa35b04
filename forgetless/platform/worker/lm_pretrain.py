"""Pre-train a small GPT-2-style decoder from scratch on a corpus (default: the built-in English `prose`), on CPU in
minutes, and save it as a Hugging Face folder (safetensors + config + its own tokenizer), so causal-LM fine-tuning
starts from a real pre-trained language model built here, with no download.

1. a byte-level BPE tokenizer is trained offline (Hugging Face `tokenizers`) on the corpus' *training* documents (the
   same split by document the causal-LM task uses, so validation and test text stay unseen);
2. a `GPT2LMHeadModel` (tied input/output embeddings) is initialised from a seed;
3. it trains with the platform's own `train_step` (the task kind's next-token loss) and a torch AdamW, linear warm-up
   then cosine decay, and is saved with `backbones.hf.save_pretrained`.

    python -m forgetless.platform.worker.lm_pretrain --out models/prose-gpt2 --steps 600
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from forgetless.backbones.hf import HFBackbone, save_pretrained
from forgetless.backbones.transfer_model import TransferModel
from forgetless.data.lm import load_documents, split_documents, train_tokenizer
from forgetless.data.spec import TaskConfig
from forgetless.data.tasks import TaskData, build_task
from forgetless.platform.worker.evaluation import evaluate
from forgetless.platform.analysis.metrics import perplexity
from forgetless.strategies.base import ParamGroup, Phase, Strategy, TaskInfo
from forgetless.strategies.training import TorchEngine, lr_scheduler, set_train_mode, set_trainable, train_step


@dataclass
class DecoderShape:
    """A GPT-2 configuration; the defaults (~4.3 M parameters with a 4096-token vocabulary) train on 2 CPU cores in
    minutes."""

    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    block_size: int = 128


def new_decoder(out: str | Path, shape: DecoderShape = DecoderShape(), corpus: str = "prose", seed: int = 0,
                split_seed: int = 0) -> Path:
    """A freshly initialised decoder folder with a tokenizer trained on the corpus' training documents."""
    from transformers import GPT2Config, GPT2LMHeadModel  # deferred: optional (the `large` extra), ~3 s to import

    out = Path(out)
    docs = load_documents(corpus)
    train_idx, _, _ = split_documents(len(docs), 0.2, 0.2, split_seed)
    tok = train_tokenizer([docs[i] for i in train_idx], shape.vocab_size, out)
    config = GPT2Config(vocab_size=len(tok), n_positions=shape.block_size, n_embd=shape.n_embd, n_layer=shape.n_layer,
                        n_head=shape.n_head, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        tie_word_embeddings=True)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], list[float]]:
    """lr multiplier: linear warm-up over `warmup` steps, then cosine decay to 10% at `steps`."""

    def mult(step: int) -> list[float]:
        if step < warmup:
            return [(step + 1) / warmup]
        frac = min(1.0, (step - warmup) / max(1, steps - warmup))
        return [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))]

    return mult


class _Pretraining(Strategy):
    """The whole decoder trains on next-token loss (no extra terms): what `train_step` needs of a strategy."""

    name = "lm_pretraining"


def lm_model(folder: str | Path, block_size: int) -> TransferModel:
    """A decoder folder as the platform builds it for one causal-LM task: LM logits + a per-task vocabulary bias."""
    return TransferModel(HFBackbone(str(folder), (1, block_size), output="lm_logits"), [0])


def val_loss(model: TransferModel, task: TaskData, split: str = "val") -> float:
    """Mean token loss of the task's split (the platform's evaluation, one process)."""
    return evaluate(model, [task], split, 0, False, 0, 1, torch.device("cpu"), batch_size=32)[0][1]


def train_decoder(model: TransferModel, task: TaskData, steps: int, lr: float, batch_size: int, seed: int,
                  eval_every: int, log: Callable[[str], None] = print) -> list[dict]:
    """Train every backbone weight on the task's next tokens for `steps` steps; the validation loss every
    `eval_every` steps (the history)."""
    phase = Phase("pretrain", 1, [ParamGroup("decoder", list(model.backbone.parameters()), lr)],
                  lr_multipliers=warmup_cosine(steps, max(1, steps // 20)))
    set_trainable(model, phase)
    opt = torch.optim.AdamW([{"params": phase.trainable(), "lr": lr}], lr=lr, weight_decay=0.01)
    engine = TorchEngine(model, opt, lr_scheduler(opt, phase))
    info, gen = TaskInfo.of(0, task), torch.Generator().manual_seed(seed)
    history, start = [], time.time()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            loss = val_loss(model, task)
            history.append({"step": step, "val_loss": loss, "val_perplexity": perplexity(loss),
                            "seconds": round(time.time() - start, 1)})
            log(f"step {step}: val loss {loss:.3f}, perplexity {perplexity(loss):.1f}")
        if step == steps:
            break
        set_train_mode(model, phase)
        b = torch.randint(0, len(task.x_train), (batch_size,), generator=gen)
        train_step(engine, model, _Pretraining(None, 1, lr), phase, info, task.x_train[b], task.y_train[b], gen)
    return history


def pretrain(out: str | Path, steps: int = 600, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
             shape: DecoderShape = DecoderShape(), corpus: str = "prose", log: Callable[[str], None] = print) -> dict:
    """Tokenizer + decoder from scratch on `corpus`, trained `steps` steps, saved as a Hugging Face folder at `out`."""
    torch.manual_seed(seed)
    out = Path(out)
    new_decoder(out, shape, corpus, seed)
    task = build_task(TaskConfig(kind="causal_lm", dataset=corpus, tokenizer=str(out), block_size=shape.block_size,
                                 max_eval_blocks=64))
    model = lm_model(out, shape.block_size)
    n_params = sum(p.numel() for p in model.backbone.parameters())
    log(f"{corpus}: {len(task.x_train)} training blocks of {shape.block_size} tokens; decoder {n_params:,} parameters")
    history = train_decoder(model, task, steps, lr, batch_size, seed, max(1, steps // 10), log)
    save_pretrained(model.backbone, out)
    summary = {"corpus": corpus, "shape": asdict(shape), "parameters": n_params, "steps": steps, "lr": lr,
               "batch_size": batch_size, "seed": seed, "train_blocks": len(task.x_train), "history": history}
    (out / "pretraining.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m forgetless.platform.worker.lm_pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (a Hugging Face model folder)")
    ap.add_argument("--corpus", default="prose", help="prose | python_code | a text file or folder")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    for f, default in asdict(DecoderShape()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=default)
    a = ap.parse_args(argv)
    shape = DecoderShape(**{f: getattr(a, f) for f in asdict(DecoderShape())})
    pretrain(a.out, a.steps, a.lr, a.batch_size, a.seed, shape, a.corpus)


if __name__ == "__main__":
    main()
