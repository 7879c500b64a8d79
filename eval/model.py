"""The model under evaluation: prompt formatting and the batched generate / score calls the tasks use (loading is
`ctxaware.models.load_model`).

Tasks talk to an `EvalModel`, never to `model.generate` directly, so a test can swap in a stub whose answers are
known and check a metric exactly.
"""

from dataclasses import dataclass

from ctxaware import generation
from ctxaware.switches import GenerationSetup


@dataclass
class StreamedNLL:
    """One sequence scored through a KV cache: summed NLL, tokens scored, K/V bytes held at the end and the bytes a
    full cache of the same tokens would hold (both per sequence)."""

    nll: float
    tokens: int
    kv_bytes: float
    kv_full_bytes: float


class EvalModel:
    def __init__(self, model, tokenizer, *, batch_size: int = 8, setup: GenerationSetup | None = None, progress=True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.setup = setup or GenerationSetup()
        self.progress = progress

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, *, chat: bool, system: str | None = None) -> list[int]:
        """Token ids of a prompt: `text` as the user turn of the chat template, or as plain text after BOS."""
        if not chat:
            return generation.encode_prompt(self.tokenizer, text)
        if not self.has_chat_template:
            raise ValueError(
                "This tokenizer has no chat template: run with `--chat_template off`, or evaluate a chat model."
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return generation.encode_prompt(self.tokenizer, rendered, add_bos=False)

    def encode_continuation(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: int, desc: str = "generate", stop_strings=None
    ) -> list[str]:
        return generation.generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=self.batch_size,
            generate_kwargs=self.setup.generate_kwargs,
            cache_factory=self.setup.cache_factory,
            generate_fn=self.setup.generate,
            desc=desc,
            progress=self.progress,
            stop_strings=stop_strings,
        )

    def loglikelihood(self, requests: list[tuple[list[int], list[int]]], *, desc: str = "score"):
        return generation.loglikelihood(
            self.model, self.tokenizer, requests, batch_size=self.batch_size, desc=desc, progress=self.progress
        )

    def token_nll(self, ids: list[int], *, window: int, stride: int | None = None) -> tuple[float, int]:
        return generation.token_nll(self.model, ids, window=window, stride=stride)

    @property
    def has_kv_cache(self) -> bool:
        """Whether a `--kv_cache` switch set a cache (scoring then streams the text through it)."""
        return self.setup.cache_factory is not None

    def streaming_nll(self, sequences: list[list[int]], *, desc: str = "stream") -> list[StreamedNLL]:
        """Each sequence (all of one length) fed through a fresh cache of the `--kv_cache` switch, `batch_size` rows
        at a time, as generation would feed it (`generation.streaming_token_nll`)."""
        from tqdm.auto import tqdm

        length = len(sequences[0])
        if any(len(s) != length for s in sequences):
            raise ValueError("streaming_nll takes sequences of one length: group them by length first")
        results = []
        starts = range(0, len(sequences), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not self.progress, leave=False):
            rows = sequences[start : start + self.batch_size]
            cache = self.setup.cache_factory(length=length)
            nlls, tokens = generation.streaming_token_nll(self.model, rows, cache)
            held, full = generation.kv_cache_bytes(cache)
            results += [StreamedNLL(nll, tokens, held / len(rows), full / len(rows)) for nll in nlls]
        return results
