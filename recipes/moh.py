"""MoH: continue-tune a dense causal LM into mixture-of-head attention (shared heads + top-k routed heads per token).

Embedded default (tiny model, synthetic-world corpus, CPU, a few minutes; 75% of heads active):
    accelerate launch recipes/moh.py --config recipes/configs/moh/default.yaml
The dense control (same data, same steps, no router):
    accelerate launch recipes/moh.py --config recipes/configs/moh/default.yaml --dense_control true \
        --output_dir outputs/moh/dense
A real model by name (GPU): recipes/configs/moh/llama3_8b.yaml; SmolLM2-135M-Instruct on the `books` training
portion plus the world's corpus (`num_world_rows`): recipes/configs/moh/smollm2.yaml.

The conversion measures each head's importance on `calibration_rows` training rows (KL between the dense model and
the model with that head gated off, per token): the most important heads of each layer become the shared ones and the
learned router is fitted to pick, per token, the routed heads whose absence costs most there, so the converted model
starts close to the dense one (`shared_heads first` and `router_init random`: the first heads by index and a random
router). The router then learns at `router_lr_ratio` x the learning rate. `off_head_bias mean` gives each routed head
that the router leaves out its mean output on the dense model (a learnable bias) instead of zero, and ranks heads by
the cost of mean-ablating them. The router (`ctxaware.methods.moh.adapter`) is attached to the model, the training loss is the LM loss plus
`balance_coef` * the Switch-style load-balance loss (with `distill_coef` > 0, plus `distill_coef` * the KL divergence
of the MoH model's next-token distributions from those of a frozen teacher at `distill_temperature`: knowledge
distillation; `distill_teacher` base: a copy of the dense model before conversion, or a saved dense model such as the
dense control's output directory), and the kernel skips the (token, head) pairs the router leaves
out. `train_base` continue-tunes the model's weights with the router (the paper's setting); false trains the router
only. Logged each `logging_steps`: `moh/balance_loss`, `moh/distill_loss` (when distilling), `moh/active_fraction`,
`moh/load_max` and `moh/load_min` (a routed head's share of tokens over its fair share k / n_r: 1 is balanced); the
load of every routed head goes to `load.jsonl`. Outputs in `output_dir`: `model/` (the continue-tuned weights, a
plain transformers model, unless `train_base` is false), `adapter/` (the router, with its off-head bias, in the
ctxaware adapter format),
`results.json` (held-out LM loss of the dense start, the converted model at step 0 and after training, the step-0
logit change, the final load; the measured head importance, the shared heads and the fitted routers' agreement with
each token's costliest heads).
Evaluate with `ctxaware eval --model OUTPUT_DIR/model --adapter OUTPUT_DIR/adapter --moh on`.
"""

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from ctxaware.datafiles import load_rows
from ctxaware.distillation import check_plain_lm_head, final_hidden_states, frozen_copy, next_token_kl, saved_teacher
from ctxaware.heads import heads_by_layer
from ctxaware.io import atomic_directory
from ctxaware.methods.moh.adapter import OFF_HEAD_BIASES, ROUTER_INITS, SHARED_HEADS, MoHAdapter, logit_change
from ctxaware.methods.moh.router import VARIANTS, check_moh_shape
from ctxaware.models import load_tokenizer, resolve_model_path
from ctxaware.outputs import BOOKKEEPING_KEYS, claim_output_dir
from ctxaware.training import (
    RecipeTrainingArguments,
    RequireTrainingSteps,
    RunConfigCallback,
    check_model_options,
    pack_texts,
    resolve_resume_checkpoint,
    usage_errors,
)
from ctxaware.world import build_world, pretraining_corpus


@dataclass
class MoHArguments:
    dense_control: bool = field(
        default=False,
        metadata={
            "help": "Continue-tune the dense model (no router) on the "
            "same data and steps: the control MoH is compared with."
        },
    )
    num_shared_heads: int = field(default=4, metadata={"help": "Query heads per layer that are always active."})
    num_routed_heads: int | None = field(
        default=None,
        metadata={"help": "Routed heads per layer (unset: the rest; shared + routed must equal the head count)."},
    )
    top_k: int = field(default=2, metadata={"help": "Routed heads active per token."})
    variant: str = field(default="learned", metadata={"help": f"One of {', '.join(VARIANTS)}."})
    router_init_std: float = field(default=1e-2, metadata={"help": "Routed logits start at about this std."})
    shared_heads: str = field(
        default="importance",
        metadata={
            "help": "Which heads are shared: 'importance' (those "
            "whose absence costs the dense model most on the calibration rows) or 'first' (by "
            "index)."
        },
    )
    router_init: str = field(
        default="importance",
        metadata={
            "help": "Learned router at step 0: 'importance' (fitted "
            "to pick, per token, the routed heads whose absence costs most there) or 'random'."
        },
    )
    calibration_rows: int = field(
        default=64,
        metadata={
            "help": "Training rows head importance is measured on (one "
            "dense and one forward per head and layer each); which heads are shared hinges on "
            "it (on the tiny model 16 rows of 512 tokens cost 3.7 points at 75% active, 64 rows 0.1)."
        },
    )
    router_lr_ratio: float = field(
        default=0.01,
        metadata={
            "help": "The router learns at this fraction of the "
            "learning rate (Adam-type optimizers): the fitted router is not reshuffled by noisy "
            "updates (on the tiny model 0.1 lost the pass key in some seeds, 0.01 kept it)."
        },
    )
    routing_chunk: int = field(
        default=0,
        metadata={
            "help": "0: route every token. C > 0: every token of a C-token "
            "chunk takes the gates of the chunk's first token, so prefill and training skip whole "
            "kernel tiles too (128 fits the tiles); not yet checked against the targets."
        },
    )
    off_head_bias: str = field(
        default="none",
        metadata={
            "help": "What a routed head the router leaves out adds: 'none' (nothing: zero-ablation) or 'mean' (a "
            "learnable bias, started at its mean output on the dense model over the calibration rows: mean-ablation)."
        },
    )
    balance_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balance loss."})
    distill_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the distillation loss: KL(teacher || MoH) between the next-token distributions of a "
            "frozen teacher (`distill_teacher`) and the MoH model, on the tokens the LM loss counts (0: none; the "
            "dense control is not distilled)."
        },
    )
    distill_teacher: str = field(
        default="base",
        metadata={
            "help": "The distillation teacher: 'base' (a frozen copy of the dense model before conversion) or the "
            "path of a saved dense model of the same tokenizer (a model folder, or a recipe output directory with "
            "`model/`, e.g. the dense control's, which has continue-tuned on the same data)."
        },
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature of both distributions in the distillation loss (which is scaled by its square)."
        },
    )
    train_base: bool = field(
        default=True, metadata={"help": "Continue-tune the model's weights (false: router only)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local file or folder, or `books` (text documents); unset: "
            "the synthetic world's pretraining corpus."
        },
    )
    dataset_config: str | None = None
    dataset_split: str = "train"
    dataset_eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Held-out split of the named data set (unset: no held-out loss); the world corpus has its own."
        },
    )
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the Hub data set (large corpora)."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the synthetic world (default data)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed training row."})
    num_train_rows: int = field(default=2000, metadata={"help": "Packed rows of training data."})
    num_world_rows: int = field(
        default=0,
        metadata={
            "help": "Packed rows of the synthetic world's corpus (its training shard: facts, QA, reading, arithmetic, "
            "pass keys, posts, chat) added to the named data set's rows (0: none)."
        },
    )
    num_eval_rows: int = field(default=64, metadata={"help": "Held-out packed rows for the LM loss (0: none)."})

    def __post_init__(self):
        if self.num_train_rows < 1:
            raise ValueError(f"num_train_rows={self.num_train_rows} trains on nothing: pass a positive row count.")
        if self.num_world_rows < 0 or (self.num_world_rows and self.dataset_name is None):
            raise ValueError(
                f"num_world_rows={self.num_world_rows}: add world rows (>= 0) to a named data set (`dataset_name`); "
                "without one the world's corpus is already the data."
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}: choose one of {', '.join(VARIANTS)}.")
        if self.variant == "query_norm" and not self.train_base and not self.dense_control:
            raise ValueError("the query_norm variant has no parameters: set `train_base: true` to continue-tune.")
        if self.shared_heads not in SHARED_HEADS or self.router_init not in ROUTER_INITS:
            raise ValueError(
                f"shared_heads={self.shared_heads!r}, router_init={self.router_init!r}: choose shared_heads in "
                f"{', '.join(SHARED_HEADS)} and router_init in {', '.join(ROUTER_INITS)}."
            )
        if self.variant == "query_norm" and self.router_init == "importance":
            raise ValueError("the query_norm variant has no router to fit: set `router_init: random`.")
        if self.off_head_bias not in OFF_HEAD_BIASES:
            raise ValueError(f"off_head_bias={self.off_head_bias!r}: choose one of {', '.join(OFF_HEAD_BIASES)}.")
        if "importance" in (self.shared_heads, self.router_init) and self.calibration_rows < 1:
            raise ValueError("head importance needs calibration rows: set `calibration_rows` >= 1.")
        if not (self.distill_coef >= 0 and self.distill_temperature > 0):
            raise ValueError(
                f"distill_coef={self.distill_coef}, distill_temperature={self.distill_temperature}: choose "
                "distill_coef >= 0 (0: no distillation) and distill_temperature > 0."
            )
        if self.distill_coef and self.dense_control:
            raise ValueError("the dense control is not distilled: set distill_coef 0 with dense_control true.")
        if self.distill_teacher != "base" and not self.distill_coef:
            raise ValueError(
                f"distill_teacher={self.distill_teacher!r} teaches nothing without distillation: set distill_coef > 0 "
                "or distill_teacher base."
            )
        if self.off_head_bias == "mean" and self.calibration_rows < 1:
            raise ValueError(
                "off_head_bias=mean measures head outputs on calibration rows: set `calibration_rows` >= 1."
            )


@dataclass
class MoHTrainingConfig(RecipeTrainingArguments, SFTConfig):
    learning_rate: float = 3e-4
    max_steps: int = 200
    per_device_train_batch_size: int = 8
    activation_checkpointing: bool = False
    logging_steps: int = 20
    save_strategy: str = "no"
    report_to: str = "none"
    max_length: int | None = None


@dataclass
class MoHModelConfig(ModelConfig):
    """TRL's model options; this recipe reads only MODEL_OPTIONS and refuses the others set."""

    model_name_or_path: str | None = field(
        default="ctxaware-tiny", metadata={"help": "Embedded name, path or Hub id."}
    )


MODEL_OPTIONS = ("model_name_or_path", "model_revision")
CONFIG_CLASSES = (MoHArguments, MoHTrainingConfig, MoHModelConfig)


# --- data ---------------------------------------------------------------------------------------------------------
def documents(args: MoHArguments, split: str, n_docs: int, text_field: str = "text"):
    """Texts: the world's corpus (train and held-out from independent shards) or the named data set's `text_field`
    column (the TRL config's `dataset_text_field`)."""
    if args.dataset_name is None:
        yield from world_documents(args, split, n_docs)
        return
    rows = load_rows(args.dataset_name, config=args.dataset_config, split=split, streaming=args.dataset_streaming)
    for row in rows:
        if text_field not in row:
            raise ValueError(
                f"{args.dataset_name} has no column {text_field!r} (columns: {', '.join(row)}): set "
                "`dataset_text_field`."
            )
        yield row[text_field]


def world_documents(args: MoHArguments, split: str, n_docs: int):
    """Texts of the world's corpus: train and held-out from independent shards."""
    shard = 1_000_003 if split == "train" else 2_000_003  # shards the shipped model never saw
    for doc in pretraining_corpus(build_world(args.world_seed), n_docs, seed=shard, max_tokens=args.seq_len):
        yield doc["text"]


def packed_rows(args: MoHArguments, tokenizer, split: str, num_rows: int, text_field: str) -> list[list[int]]:
    """`num_rows` rows of exactly `seq_len` tokens of the split's documents (`training.pack_texts`)."""
    if num_rows <= 0:
        return []
    texts = documents(args, split, num_rows * 8, text_field)
    return pack_texts(texts, tokenizer, args.seq_len, num_rows, what="the row count")


def training_rows(args: MoHArguments, tokenizer, text_field: str) -> list[list[int]]:
    """The training rows: `num_train_rows` of the data, and with `num_world_rows` that many rows of the world's corpus
    shuffled in, in one fixed order for every seed (the first rows, which calibrate head importance, mix both)."""
    rows = packed_rows(args, tokenizer, args.dataset_split, args.num_train_rows, text_field)
    if args.num_world_rows:
        texts = world_documents(args, "train", args.num_world_rows * args.seq_len)  # read until the rows are full
        rows += pack_texts(texts, tokenizer, args.seq_len, args.num_world_rows, what="num_world_rows")
        random.Random(0).shuffle(rows)
    return rows


@torch.no_grad()
def lm_loss(model, rows: list[list[int]], batch_size: int = 8) -> float | None:
    """Mean next-token loss over held-out rows."""
    if not rows:
        return None
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[start : start + batch_size], device=model.device)
        total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
        count += len(ids)
    return total / count


# --- training -----------------------------------------------------------------------------------------------------
class MoHTrainer(SFTTrainer):
    """SFTTrainer whose loss adds the router's load-balance loss and, with a `teacher` and `distill_coef` > 0, the
    distillation loss (`ctxaware.distillation.next_token_kl`), logging the routing statistics and both losses."""

    def __init__(
        self,
        *args,
        adapter: MoHAdapter,
        balance_coef: float,
        load_log: Path | None,
        teacher: torch.nn.Module | None = None,
        distill_coef: float = 0.0,
        distill_temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.adapter, self.balance_coef, self.load_log = adapter, balance_coef, load_log
        self.teacher, self.distill_coef, self.distill_temperature = teacher, distill_coef, distill_temperature
        if distill_coef and teacher is None:
            raise ValueError(f"distill_coef={distill_coef} needs a teacher: pass `teacher`, or distill_coef 0.")
        self._load_sum, self._load_count, self.total_load, self.total_count = None, 0, None, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distill = self.distill_coef > 0 and model.training
        student = self.accelerator.unwrap_model(model)
        with final_hidden_states(student) if distill else nullcontext() as hidden:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        balance, load = self.adapter.balance_loss(), self.adapter.pop_load()
        if balance is None and load is None:  # evaluation: no routing statistics
            return result
        metrics = self._metrics["train"]
        metrics["moh/active_fraction"].append(self.adapter.active_fraction())
        metrics["moh/load_max"].append(load.max().item())
        metrics["moh/load_min"].append(load.min().item())
        self._load_sum = load if self._load_sum is None else self._load_sum + load
        self._load_count += 1
        if balance is None and not distill:
            return result
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        extra = 0.0
        if balance is not None:
            metrics["moh/balance_loss"].append(balance.item())
            extra = self.balance_coef * balance / steps
        if distill:
            kl = self.distill_loss(student, inputs, hidden[0])
            metrics["moh/distill_loss"].append(kl.item())
            extra = extra + self.distill_coef * kl / steps
        return (result[0] + extra, result[1]) if return_outputs else result + extra

    def distill_loss(self, student, inputs, hidden: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) per counted token of this batch, from the student's final hidden states."""
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            teacher_hidden = self.teacher.base_model(**teacher_inputs).last_hidden_state
        return next_token_kl(
            hidden,
            student.get_output_embeddings(),
            teacher_hidden,
            self.teacher.get_output_embeddings(),
            inputs["labels"],
            temperature=self.distill_temperature,
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._load_count and self.model.training:
            load = (self._load_sum / self._load_count).cpu()
            self.total_load = load * self._load_count + (0 if self.total_load is None else self.total_load)
            self.total_count += self._load_count
            if self.load_log is not None and self.is_world_process_zero():
                with self.load_log.open("a") as file:
                    file.write(json.dumps({"step": self.state.global_step, "load": load.tolist()}) + "\n")
            self._load_sum, self._load_count = None, 0
        super().log(logs, start_time)

    def mean_load(self) -> torch.Tensor | None:
        if self._load_count:  # statistics since the last log
            self.log({})
        return None if self.total_load is None else self.total_load / self.total_count


def distillation_teacher(args: MoHArguments, model, tokenizer) -> torch.nn.Module | None:
    """The frozen teacher (None without distillation): a copy of `model` before conversion (`distill_teacher` base),
    or the saved model at `distill_teacher` in `model`'s dtype and on its device."""
    if not args.distill_coef:
        return None
    check_plain_lm_head(model.config)
    if args.distill_teacher == "base":
        return frozen_copy(model)  # the dense model before conversion and training
    return saved_teacher(args.distill_teacher, model, tokenizer)


def load_summary(load: torch.Tensor) -> dict:
    """Load (share of tokens over the fair share, 1 = balanced) per routed head: extremes and coefficient of variation."""
    return {
        "load_max": load.max().item(),
        "load_min": load.min().item(),
        "load_cv": (load.std(dim=-1) / load.mean(dim=-1)).mean().item(),
        "load": [[round(v, 4) for v in row] for row in load.tolist()],
    }


def main(args: MoHArguments, training_args: MoHTrainingConfig, model_args: MoHModelConfig) -> dict:
    check_model_options(model_args, MODEL_OPTIONS)
    set_seed(training_args.seed)
    state = PartialState()
    output_dir = Path(training_args.output_dir)
    run_config = {**asdict(args), **training_args.to_dict(), **asdict(model_args)}
    claim_output_dir(
        output_dir,
        run_config,
        overwrite=training_args.overwrite_output_dir,
        resume=training_args.resume_from_checkpoint,
    )
    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(path, revision=model_args.model_revision)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, revision=model_args.model_revision, dtype=dtype)
    if not args.dense_control:  # a bad split fails before the data is built
        check_moh_shape(model.config.num_attention_heads, args.num_shared_heads, args.num_routed_heads, args.top_k)
    text_field = training_args.dataset_text_field
    train_rows = training_rows(args, tokenizer, text_field)
    eval_split = "validation" if args.dataset_name is None else args.dataset_eval_split
    eval_rows = packed_rows(args, tokenizer, eval_split, args.num_eval_rows, text_field) if eval_split else []
    model.to(state.device)
    results: dict = {
        "base_model": model_args.model_name_or_path,
        "dense_control": args.dense_control,
        "max_steps": training_args.max_steps,
        "train_rows": len(train_rows),
        "world_rows": args.num_world_rows,
        "seq_len": args.seq_len,
    }
    results["dense_eval_loss"] = lm_loss(model, eval_rows)

    adapter, teacher = None, distillation_teacher(args, model, tokenizer)
    if not args.dense_control:
        training = {k: v for k, v in asdict(args).items() if k not in ("dense_control", "num_eval_rows")}
        training |= {"learning_rate": training_args.learning_rate, "max_steps": training_args.max_steps}
        rows, batch = train_rows[: args.calibration_rows], training_args.per_device_train_batch_size
        calibration = [torch.tensor(rows[i : i + batch], device=model.device) for i in range(0, len(rows), batch)]
        started = time.perf_counter()
        adapter = MoHAdapter.for_model(
            model,
            num_shared_heads=args.num_shared_heads,
            num_routed_heads=args.num_routed_heads,
            top_k=args.top_k,
            variant=args.variant,
            router_init_std=args.router_init_std,
            shared_heads=args.shared_heads,
            router_init=args.router_init,
            calibration=calibration,
            router_lr_ratio=args.router_lr_ratio,
            routing_chunk=args.routing_chunk,
            off_head_bias=args.off_head_bias,
            base_model=model_args.model_name_or_path,
            base_model_revision=model_args.model_revision,
            training=training,
        )
        results["conversion_seconds"] = time.perf_counter() - started
        results["off_head_bias"] = args.off_head_bias
        results["distill_coef"], results["distill_temperature"] = args.distill_coef, args.distill_temperature
        results["distill_teacher"] = args.distill_teacher
        shared = heads_by_layer(adapter.heads)
        results["shared_heads"] = [shared.get(layer, []) for layer in range(adapter.layout.num_layers)]
        if adapter.calibration is not None:
            results |= adapter.calibration
        adapter.to(state.device).attach(model)
        results["active_fraction"] = adapter.active_fraction()
        if eval_rows:
            results["step0_eval_loss"] = lm_loss(model, eval_rows)
            results["step0_logit_change"] = logit_change(
                model, adapter, torch.tensor(eval_rows[:8], device=model.device)
            )
        if not args.train_base:
            model.requires_grad_(False)
            adapter.requires_grad_(True)
    results["trained_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    model.train()
    dataset = Dataset.from_dict({"input_ids": train_rows})
    common = dict(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[RunConfigCallback(run_config), RequireTrainingSteps()],
    )
    if adapter is None:
        trainer = SFTTrainer(**common)
    else:
        load_log = output_dir / "load.jsonl"
        if state.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            load_log.unlink(missing_ok=True)
        trainer = MoHTrainer(
            **common,
            adapter=adapter,
            balance_coef=args.balance_coef,
            load_log=load_log,
            teacher=teacher,
            distill_coef=args.distill_coef,
            distill_temperature=args.distill_temperature,
        )
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir, run_config, BOOKKEEPING_KEYS)
    train_output = trainer.train(resume_from_checkpoint=resume)
    results["train_loss"] = train_output.training_loss
    results["eval_loss"] = lm_loss(model, eval_rows)
    if adapter is not None and (load := trainer.mean_load()) is not None:
        results |= load_summary(load)

    if state.is_main_process:
        eval_results = {"heldout_lm": {"loss": results["eval_loss"]}} if results["eval_loss"] is not None else None
        if adapter is not None:
            adapter.detach()  # the model saves without router weights and with its own attention implementation
            if args.train_base:  # the router fits the continue-tuned weights
                adapter.base_model = str(output_dir / "model")
            adapter.save_pretrained(output_dir / "adapter", eval_results=eval_results, tags=[f"top{args.top_k}"])
        if args.train_base or adapter is None:
            with atomic_directory(output_dir / "model") as folder:
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
        results = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in results.items()}
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if training_args.push_to_hub:
            repo_id = training_args.hub_model_id or output_dir.name
            if args.train_base or adapter is None:
                model.push_to_hub(repo_id, private=training_args.hub_private_repo)
                tokenizer.push_to_hub(repo_id, private=training_args.hub_private_repo)
            if adapter is not None:
                router_repo = f"{repo_id}-router" if args.train_base else repo_id
                adapter.base_model = repo_id if args.train_base else adapter.base_model
                adapter.push_to_hub(router_repo, private=training_args.hub_private_repo, eval_results=eval_results)
        print(json.dumps({k: v for k, v in results.items() if k != "load"}, indent=2))
    return results


if __name__ == "__main__":
    with usage_errors("moh"):
        main(*TrlParser(CONFIG_CLASSES).parse_args_and_config())
