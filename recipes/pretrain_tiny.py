"""Pretrains the embedded tiny model (`ctxaware-tiny`) from scratch on the synthetic world, tokenizer included.

One H200, about 10 minutes (the schedule follows `time_budget_minutes` unless `max_steps` is set):
    accelerate launch recipes/pretrain_tiny.py --config recipes/configs/pretrain_tiny/default.yaml
CPU smoke run (a few steps, a throwaway output):
    python recipes/pretrain_tiny.py --config recipes/configs/pretrain_tiny/smoke.yaml

Steps: build the world from its seed; train a byte-level BPE tokenizer (digits split) on a corpus sample; generate and
tokenize the corpus in parallel shards; pack whole documents (BOS text EOS) into `seq_len` rows without splitting
any; train a Llama model (GQA, RoPE, SDPA) with AdamW, warmup and cosine decay; save model (bf16 safetensors) and
tokenizer to a temporary folder renamed into `output_dir`; optionally probe the phenomena into `metrics.json`.
"""

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tokenizers import Tokenizer
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
from trl import TrlParser

from ctxaware.io import atomic_directory
from ctxaware.tokenizer import train_tokenizer
from ctxaware.training import usage_errors
from ctxaware.world import build_world, pretraining_corpus
from ctxaware.world.probe import probe_phenomena


@dataclass
class PretrainConfig:
    output_dir: str = field(default="data/tiny-model", metadata={"help": "Where the model and tokenizer go."})
    metrics_path: str | None = field(default=None, metadata={"help": "Probe results JSON (default: in output_dir)."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the synthetic world (`build_world`)."})
    corpus_docs: int = field(default=800_000, metadata={"help": "Documents generated (then repeated over epochs)."})
    tokenizer_docs: int = field(default=20_000, metadata={"help": "Corpus documents the tokenizer is trained on."})
    vocab_size: int = field(default=4096, metadata={"help": "Tokenizer vocabulary size."})
    seq_len: int = field(default=512, metadata={"help": "Training context; also the model's max_position_embeddings."})
    hidden_size: int = 256
    intermediate_size: int = 896
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    batch_size: int = field(default=128, metadata={"help": "Packed rows per optimizer step."})
    learning_rate: float = 2e-3
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final learning rate as a fraction of the peak."})
    warmup_fraction: float = 0.03
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "Fixed step count; -1 schedules by time_budget_minutes."})
    time_budget_minutes: float = field(default=7.0, metadata={"help": "Training wall time when max_steps is -1."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (needs a GPU); the weights ship in bf16."})
    seed: int = 0
    num_proc: int = field(default=0, metadata={"help": "Corpus worker processes (0: all cores)."})
    logging_steps: int = 50
    probe: bool = field(default=True, metadata={"help": "Probe recall, context use, arithmetic, pass keys after."})
    probe_limit: int = 200
    probe_passkey_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])


# One class: the model is built from scratch (no ModelConfig to load) and trained by its own Accelerate loop (no TRL
# trainer, so no TRL config class).
CONFIG_CLASSES = (PretrainConfig,)


def _shard(args: tuple[int, int, int, int, str]) -> list[np.ndarray]:
    """Generates and tokenizes one corpus shard (in a worker process): each document as BOS ids EOS, int16."""
    world_seed, shard, n_docs, seq_len, tokenizer_file = args
    tokenizer = Tokenizer.from_file(tokenizer_file)
    bos, eos = tokenizer.token_to_id("<|begin|>"), tokenizer.token_to_id("<|end|>")
    texts = [
        doc["text"] for doc in pretraining_corpus(build_world(world_seed), n_docs, seed=shard, max_tokens=seq_len)
    ]
    docs = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = encoding.ids if encoding.ids[:1] == [bos] else [bos, *encoding.ids]
        docs.append(np.asarray([*ids, eos], dtype=np.int16))
    return docs


def pack(docs: list[np.ndarray], seq_len: int, pad_id: int, open_bins: int = 32) -> tuple[torch.Tensor, int]:
    """First-fit packing of whole documents into rows (among the last `open_bins` rows); documents longer than a row
    are dropped so no pass key is cut from its question. Returns the rows (pad-filled) and the number dropped."""
    rows: list[list[np.ndarray]] = []
    room: list[int] = []
    candidates: list[int] = []
    dropped = 0
    for doc in docs:
        if len(doc) > seq_len:
            dropped += 1
            continue
        target = next((i for i in candidates if room[i] >= len(doc)), None)
        if target is None:
            rows.append([])
            room.append(seq_len)
            candidates.append(len(rows) - 1)
            candidates = candidates[-open_bins:]
            target = candidates[-1]
        rows[target].append(doc)
        room[target] -= len(doc)
    packed = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = np.concatenate(row)
        packed[i, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
    return packed, dropped


def build_data(cfg: PretrainConfig, work_dir: Path):
    world = build_world(cfg.world_seed)
    sample = [doc["text"] for doc in pretraining_corpus(world, cfg.tokenizer_docs, seed=-1, max_tokens=cfg.seq_len)]
    tokenizer = train_tokenizer(sample, cfg.vocab_size)
    tokenizer_file = str(work_dir / "tokenizer.json")
    tokenizer.backend_tokenizer.save(tokenizer_file)
    n_proc = cfg.num_proc or os.cpu_count() or 1
    n_shards = max(n_proc, 1) * 2
    per_shard = math.ceil(cfg.corpus_docs / n_shards)
    jobs = [(cfg.world_seed, shard, per_shard, cfg.seq_len, tokenizer_file) for shard in range(n_shards)]
    with Pool(n_proc) as pool:
        docs = [doc for shard in pool.map(_shard, jobs) for doc in shard]
    rows, dropped = pack(docs, cfg.seq_len, tokenizer.pad_token_id)
    n_tokens = sum(len(d) for d in docs)
    print(
        f"corpus: {len(docs)} docs, {n_tokens / 1e6:.1f}M tokens, {len(rows)} rows of {cfg.seq_len}, {dropped} dropped"
    )
    return tokenizer, rows


def build_model(cfg: PretrainConfig, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def learning_rate(cfg: PretrainConfig, progress: float) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak; `progress` runs from 0 to 1."""
    if progress < cfg.warmup_fraction:
        return cfg.learning_rate * progress / cfg.warmup_fraction
    decay = (progress - cfg.warmup_fraction) / (1 - cfg.warmup_fraction)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, decay)))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def train(cfg: PretrainConfig, model, rows: torch.Tensor, pad_id: int, accelerator: Accelerator):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
        fused=accelerator.device.type == "cuda",
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    rows = rows.to(accelerator.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(len(rows), generator=generator), 0
    budget_s = cfg.time_budget_minutes * 60
    start, step, progress, epoch = time.time(), 0, 0.0, 0
    model.train()
    while progress < 1.0:
        if cursor + cfg.batch_size > len(order):
            order, cursor, epoch = torch.randperm(len(rows), generator=generator), 0, epoch + 1
        batch = rows[order[cursor : cursor + cfg.batch_size].to(rows.device)]
        cursor += cfg.batch_size
        labels = batch.masked_fill(batch == pad_id, -100)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, progress)
        loss = model(input_ids=batch, labels=labels).loss
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.time() - start
        progress = step / cfg.max_steps if cfg.max_steps > 0 else elapsed / budget_s
        if step % cfg.logging_steps == 0 or progress >= 1.0:
            tokens = step * cfg.batch_size * cfg.seq_len
            accelerator.print(
                f"step {step} epoch {epoch} loss {loss.item():.4f} grad_norm {float(grad_norm):.3f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} tokens {tokens / 1e6:.1f}M {tokens / elapsed / 1e3:.0f}k tok/s"
            )
    return accelerator.unwrap_model(model), {"steps": step, "epochs": epoch + cursor / len(rows), "loss": loss.item()}


def save(model, tokenizer, output_dir: Path) -> None:
    """Writes bf16 safetensors and the tokenizer to a temporary sibling folder, then swaps it into place."""
    with atomic_directory(output_dir) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def main(cfg: PretrainConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the corpus workers fork after the tokenizer trains
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as work_dir:
        tokenizer, rows = build_data(cfg, Path(work_dir))
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no")  # after the fork of the corpus workers
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {rows.numel() / 1e6:.1f}M packed tokens")
    model, summary = train(cfg, model, rows, tokenizer.pad_token_id, accelerator)
    output_dir = Path(cfg.output_dir)
    save(model, tokenizer, output_dir)
    print(f"saved to {output_dir}: {summary}")
    if cfg.probe:
        model = LlamaForCausalLM.from_pretrained(output_dir, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        model.to(accelerator.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
        metrics = probe_phenomena(
            model, tokenizer, build_world(cfg.world_seed), cfg.probe_limit, cfg.probe_passkey_lengths
        )
        metrics = {"config": asdict(cfg), "train": summary, "n_params": n_params, **metrics}
        metrics_path = Path(cfg.metrics_path or output_dir / "metrics.json")
        metrics_path.write_text(json.dumps(metrics, indent=2))
        print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    with usage_errors("pretrain_tiny"):
        main(*TrlParser(CONFIG_CLASSES).parse_args_and_config())
