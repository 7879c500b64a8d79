"""RLHF for summarisation (Stiennon et al., 2020) on TRL: data formatting for SFT, reward modelling, online RL and
DPO; reward functions (the reward model with its bias removed, the missing-EOS penalty); checks on bad input.

Formats, chosen to match `ctxaware eval`'s summarisation task so a model trained here is scored as it was trained:
- Policy: the prompt is `SUMMARY_PROMPT` (`"{post}\\nTL;DR:"`) after the tokenizer's BOS (as
  `ctxaware.generation.encode_prompt` adds it), the completion `" " + summary` followed by EOS.
- Reward model: `reward_model_text(tokenizer, post, summary)`, the reward tokenizer's chat template with the post as
  the user turn and the summary as the assistant turn when it has one, else `"{post}\\nTL;DR: {summary}"`; the
  score is read at the last token. Training, the RL reward and the eval harness all go through this one text.
- Reward normalisation: the mean score of reference summaries (`reward_bias`) is subtracted, so references score 0
  and the policy's reward reads as "better or worse than the reference".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ctxaware.generation import plain_text_bos
from ctxaware.world.preference import SUMMARY_PROMPT


NORMALIZATION_FILE = "reward_normalization.json"
PREFERENCE_COLUMNS = ("chosen", "rejected")


# ---------------------------------------------------------------------------------------------------------- formats
def policy_prompt(tokenizer, post: str) -> str:
    return plain_text_bos(tokenizer) + SUMMARY_PROMPT.format(post=post)


def post_from_prompt(prompt: str, bos_token: str | None = None) -> str:
    """The post inside a TL;DR prompt (the world's or trl-lib/tldr's): everything before the final `TL;DR:`, without
    a leading `bos_token`."""
    if bos_token:
        prompt = prompt.removeprefix(bos_token)
    head, found, _ = prompt.rpartition("TL;DR:")
    return (head if found else prompt).rstrip()


def reward_model_text(tokenizer, post: str, summary: str) -> str:
    """What the reward model reads for one (post, summary), in training, the RL reward and the eval harness."""
    summary = summary.strip()
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": post}, {"role": "assistant", "content": summary}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{post}\nTL;DR: {summary}"


# ------------------------------------------------------------------------------------------------------------- data
def sft_rows(records: Sequence[dict], tokenizer) -> list[dict]:
    """Prompt-completion rows for SFTTrainer (loss on the completion; SFTTrainer appends EOS)."""
    return [
        {"prompt": policy_prompt(tokenizer, r["post"]), "completion": " " + r["reference"].strip()} for r in records
    ]


def rl_rows(records: Sequence[dict], tokenizer) -> list[dict]:
    """Prompts for RLOO; `post` and `reference` ride along to the reward functions as keyword arguments."""
    return [
        {"prompt": policy_prompt(tokenizer, r["post"]), "post": r["post"], "reference": r["reference"].strip()}
        for r in records
    ]


def check_preference_columns(columns: Sequence[str], source: str) -> None:
    missing = [c for c in PREFERENCE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"The preference data {source} has no {' / '.join(missing)} column (columns: {', '.join(columns)}): a "
            "reward model and DPO need pairs with `prompt` (or `post`), `chosen` and `rejected` summaries. Pass a "
            "preference data set such as trl-lib/tldr-preference, or map your columns to these names first."
        )
    if "prompt" not in columns and "post" not in columns:
        raise ValueError(
            f"The preference data {source} has neither a `prompt` nor a `post` column (columns: {', '.join(columns)}): "
            "each pair needs the post its two summaries describe."
        )


def preference_records(rows: Sequence[dict], source: str) -> list[dict]:
    """Pairs normalised to {"post", "chosen", "rejected"} (summaries stripped), from prompt/chosen/rejected rows
    (the world's `preference_pairs`, trl-lib/tldr-preference) or post/chosen/rejected rows."""
    if not rows:
        raise ValueError(f"The preference data {source} is empty.")
    check_preference_columns(list(rows[0]), source)
    pairs = []
    for row in rows:
        chosen, rejected = row["chosen"], row["rejected"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(
                f"The preference data {source} holds conversations in `chosen`/`rejected`; this recipe expects "
                "summary strings (the prompt/chosen/rejected layout of trl-lib/tldr-preference)."
            )
        post = row["post"] if "post" in row else post_from_prompt(row["prompt"])
        pairs.append({"post": post, "chosen": chosen.strip(), "rejected": rejected.strip()})
    return pairs


def summarize_from_feedback_rows(rows) -> list[dict]:
    """openai/summarize_from_feedback (`comparisons`) rows -> post/chosen/rejected: `choice` indexes the summary
    the labeller preferred."""
    pairs = []
    for row in rows:
        info, texts = row["info"], [s["text"].strip() for s in row["summaries"]]
        if not info.get("post"):  # the set's CNN/DM rows carry an article id, not a post
            continue
        # trl-lib/tldr's layout (blank lines between the fields), which SFT and RL prompts are built from
        post = f"SUBREDDIT: r/{info.get('subreddit')}\n\nTITLE: {info.get('title')}\n\nPOST: {info['post']}"
        pairs.append({"post": post, "chosen": texts[row["choice"]], "rejected": texts[1 - row["choice"]]})
    return pairs


def reward_rows(pairs: Sequence[dict], tokenizer, max_length: int | None = None) -> list[dict]:
    """Tokenized pairs (`chosen_ids`, `rejected_ids`) for RewardTrainer, in the reward model's one text format."""

    def ids(post, summary):
        return tokenizer(reward_model_text(tokenizer, post, summary), add_special_tokens=False)["input_ids"]

    rows = [{"chosen_ids": ids(p["post"], p["chosen"]), "rejected_ids": ids(p["post"], p["rejected"])} for p in pairs]
    if max_length is not None:
        rows = [r for r in rows if max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= max_length]
    return rows


def dpo_rows(pairs: Sequence[dict], tokenizer) -> list[dict]:
    """Prompt/chosen/rejected rows for DPOTrainer, in the policy's format."""
    return [
        {"prompt": policy_prompt(tokenizer, p["post"]), "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]}
        for p in pairs
    ]


# ----------------------------------------------------------------------------------------------------------- checks
def check_same_tokenizer(policy_tokenizer, reward_tokenizer, reward_model: str) -> None:
    """RLOO decodes the policy's tokens to text for the reward model: both must tokenize alike, or the reward model
    scores text it never saw in training. Same vocabulary and special tokens are required."""
    if policy_tokenizer.get_vocab() != reward_tokenizer.get_vocab() or (
        policy_tokenizer.eos_token,
        policy_tokenizer.bos_token,
    ) != (reward_tokenizer.eos_token, reward_tokenizer.bos_token):
        raise ValueError(
            f"The reward model {reward_model} uses a different tokenizer from the policy's (vocabulary of "
            f"{len(reward_tokenizer)} vs {len(policy_tokenizer)} tokens, EOS {reward_tokenizer.eos_token!r} vs "
            f"{policy_tokenizer.eos_token!r}). Train the reward model from the SFT policy (`--stage reward`), or pass "
            "`--reward_model_path` to one trained on the policy's tokenizer."
        )


def check_generation_length(tokenizer, references: Sequence[str], max_completion_length: int) -> None:
    """A completion budget below the shortest reference (plus EOS) can end no summary: every sample would take the
    EOS penalty and RL would learn nothing."""
    lengths = sorted(len(tokenizer(" " + r, add_special_tokens=False)["input_ids"]) + 1 for r in references)
    if not lengths:
        return
    if max_completion_length < lengths[0]:
        p95 = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
        raise ValueError(
            f"max_completion_length={max_completion_length} is too short for any summary: the shortest reference "
            f"takes {lengths[0]} tokens with its EOS, so every completion would be cut and get the EOS penalty. Raise "
            f"--max_completion_length to at least {p95} (95% of references fit)."
        )


# ---------------------------------------------------------------------------------------------------------- rewards
@torch.no_grad()
def score_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> list[float]:
    """Reward model scores (logit 0 at each row's last token) of fully formatted texts, right-padded."""
    scores = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = encode_batch(tokenizer, texts[start : start + batch_size], "right", device)
        scores += model(**batch).logits[:, 0].float().tolist()
    return scores


def encode_batch(tokenizer, texts: Sequence[str], padding_side: str, device):
    """Fully formatted texts as one padded batch on `device` (no special tokens added: the texts hold them)."""
    return tokenizer(
        list(texts), return_tensors="pt", padding=True, padding_side=padding_side, add_special_tokens=False
    ).to(device)


def reward_bias(model, tokenizer, posts: Sequence[str], references: Sequence[str], batch_size: int = 16) -> float:
    """Mean raw score of the reference summaries: subtracting it makes references score 0 on average."""
    texts = [reward_model_text(tokenizer, p, r) for p, r in zip(posts, references, strict=True)]
    scores = score_texts(model, tokenizer, texts, batch_size)
    return sum(scores) / len(scores)


def save_reward_normalization(folder: str | Path, bias: float, n_references: int) -> None:
    payload = {"bias": bias, "n_references": n_references, "rule": "normalized reward = raw score - bias"}
    (Path(folder) / NORMALIZATION_FILE).write_text(json.dumps(payload, indent=2))


def load_reward_bias(folder: str | Path) -> float:
    path = Path(folder) / NORMALIZATION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the reward model at {folder} was not normalised. Run `--stage reward` (it writes "
            "the bias on reference summaries), or set `--normalize_reward false`."
        )
    return float(json.loads(path.read_text())["bias"])


def _ends(ids: Sequence[int], eos_token_ids: set[int]) -> bool:
    return bool(ids) and ids[-1] in eos_token_ids


class RewardModelReward:
    """The reward model as an RLOO/GRPO reward function: score of (post, completion) minus `bias`.

    With `score_unfinished=False`, completions that did not end in EOS get `None`: TRL then sums only the other
    reward functions for them, so with `EOSPenalty` they receive exactly the fixed penalty, as in the published
    recipe (the score is replaced, not added to)."""

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, *, bias: float = 0.0, eos_token_ids=(), score_unfinished: bool = False):
        self.model, self.tokenizer, self.bias = model.eval(), tokenizer, bias
        self.eos_token_ids, self.score_unfinished = set(eos_token_ids), score_unfinished

    def __call__(self, prompts, completions, completion_ids=None, post=None, **kwargs) -> list[float | None]:
        posts = post if post is not None else [post_from_prompt(p, self.tokenizer.bos_token) for p in prompts]
        keep = [
            self.score_unfinished or completion_ids is None or _ends(ids, self.eos_token_ids)
            for ids in (completion_ids if completion_ids is not None else [None] * len(completions))
        ]
        texts = [reward_model_text(self.tokenizer, p, c) for p, c, k in zip(posts, completions, keep) if k]
        scores = iter(score_texts(self.model, self.tokenizer, texts) if texts else [])
        return [next(scores) - self.bias if k else None for k in keep]


class EOSPenalty:
    """`penalty` (e.g. -1) for a completion that ran out of tokens before its EOS, 0 for one that ended."""

    __name__ = "eos_penalty"

    def __init__(self, eos_token_ids, penalty: float = -1.0):
        self.eos_token_ids, self.penalty = set(eos_token_ids), penalty

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("EOSPenalty needs `completion_ids` (TRL's RLOO and GRPO trainers pass them).")
        return [0.0 if _ends(ids, self.eos_token_ids) else self.penalty for ids in completion_ids]


# ------------------------------------------------------------------------------------------------------ comparisons
@torch.no_grad()
def sample_summaries(
    policy,
    tokenizer,
    posts: Sequence[str],
    *,
    samples_per_post: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[str]]:
    """`samples_per_post` sampled summaries of each post (the policy's format, cut at EOS, stripped), as RL samples
    them: these are the policy samples a labeller compares."""
    torch.manual_seed(seed)
    device = next(policy.parameters()).device
    summaries = []
    for start in range(0, len(posts), batch_size):
        prompts = [policy_prompt(tokenizer, post) for post in posts[start : start + batch_size]]
        batch = encode_batch(tokenizer, prompts, "left", device)
        out = policy.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples_per_post,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = [
            t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
        summaries += [texts[i : i + samples_per_post] for i in range(0, len(texts), samples_per_post)]
    return summaries


# ------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sequence_kl(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    samples_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 16,
) -> float:
    """Monte-Carlo KL(policy || reference) per summary: the mean over sampled completions y ~ policy (at
    `temperature`, EOS included) of sum_t [log p_policy(y_t) - log p_ref(y_t)], both at that temperature. Prompts go
    `batch_size` at a time (left-padded), each with its `samples_per_prompt` samples."""
    torch.manual_seed(seed)
    device = next(policy.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = encode_batch(tokenizer, prompts[start : start + batch_size], "left", device)
        out = policy.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples_per_prompt,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        width = batch["input_ids"].shape[1]
        prompt_mask = batch["attention_mask"].repeat_interleave(samples_per_prompt, 0)
        completion = out[:, width:]
        is_eos = completion == tokenizer.eos_token_id
        mask = (is_eos.cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
        total += (completion_logprobs(policy, out, prompt_mask, temperature) * mask).sum().item()
        total -= (completion_logprobs(reference, out, prompt_mask, temperature) * mask).sum().item()
        count += len(out)
    return total / count


def completion_logprobs(model, sequences, prompt_mask, temperature: float = 1.0):
    """Per-token log-probabilities (at `temperature`) of the completion part of `sequences`, left-padded prompts
    (`prompt_mask`: 0 on padding) followed by completions: the pads are masked out and the positions counted from
    each row's first real token, as `generate` counted them."""
    width = prompt_mask.shape[1]
    attention_mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, width:])], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(sequences, attention_mask=attention_mask, position_ids=position_ids).logits[:, width - 1 : -1]
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, sequences[:, width:].unsqueeze(-1)).squeeze(-1)


def mean_words(texts: Sequence[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(1, len(texts))
