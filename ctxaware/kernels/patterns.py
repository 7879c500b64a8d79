"""Attention patterns: the block-structured masks the kernels iterate over (formulas in the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


PatternKind = Literal["dense", "s2", "sf", "window"]


@dataclass(frozen=True)
class AttentionPattern:
    """Which keys a query may see, on absolute positions (see `ctxaware.kernels` for the exact formulas).

    Build with the constructors: `AttentionPattern.dense()`, `.s2(group_size)`, `.sf(group_size, sinks=4)`,
    `.sliding_window(window, sinks=0)`; `group_size_ratio` instead of `group_size` resolves G against the key length of each
    call (LongLoRA's G = N/4 is `group_size_ratio=0.25`).
    """

    kind: PatternKind = "dense"
    group_size: int | None = None
    group_size_ratio: float | None = None
    sinks: int | None = None
    window: int | None = None
    shifted_head_fraction: float = 0.5

    def __post_init__(self):
        if self.kind not in ("dense", "s2", "sf", "window"):
            raise ValueError(f"unknown pattern kind {self.kind!r}: use 'dense', 's2', 'sf' or 'window'")
        if self.sinks is None:
            object.__setattr__(self, "sinks", 4 if self.kind == "sf" else 0)
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.kind == "s2" and self.sinks:
            raise ValueError("the s2 pattern has no sink tokens: use kind='sf' for S^2 plus sinks")
        if self.kind in ("s2", "sf"):
            if (self.group_size is None) == (self.group_size_ratio is None):
                raise ValueError(f"pattern {self.kind!r} needs exactly one of group_size or group_size_ratio")
            if self.group_size is not None and self.group_size <= 0:
                raise ValueError(f"group_size must be a positive int, got {self.group_size}")
            if self.group_size_ratio is not None and not 0 < self.group_size_ratio <= 1:
                raise ValueError(f"group_size_ratio must be in (0, 1], got {self.group_size_ratio}")
            if not 0 <= self.shifted_head_fraction <= 1:
                raise ValueError(f"shifted_head_fraction must be in [0, 1], got {self.shifted_head_fraction}")
            if self.shifted_head_fraction > 0 and self.group_size is not None and self.group_size % 2:
                raise ValueError(
                    f"group_size={self.group_size} is odd but shifted heads move groups by G/2: use an even "
                    "group_size, or shifted_head_fraction=0"
                )
        elif self.group_size is not None or self.group_size_ratio is not None:
            raise ValueError(f"group_size only applies to the 's2' and 'sf' patterns, not {self.kind!r}")
        if self.kind == "window":
            if self.window is None or self.window <= 0:
                raise ValueError(f"the window pattern needs window >= 1, got {self.window}")
        elif self.window is not None:
            raise ValueError(f"window only applies to the 'window' pattern, not {self.kind!r}")

    @classmethod
    def dense(cls) -> AttentionPattern:
        return cls("dense")

    @classmethod
    def s2(cls, group_size: int | None = None, *, group_size_ratio: float | None = None, **kw) -> AttentionPattern:
        return cls("s2", group_size=group_size, group_size_ratio=group_size_ratio, **kw)

    @classmethod
    def sf(
        cls, group_size: int | None = None, sinks: int = 4, *, group_size_ratio: float | None = None, **kw
    ) -> AttentionPattern:
        return cls("sf", group_size=group_size, group_size_ratio=group_size_ratio, sinks=sinks, **kw)

    @classmethod
    def sliding_window(cls, window: int, sinks: int = 0) -> AttentionPattern:
        return cls("window", window=window, sinks=sinks)

    def resolve_group_size(self, key_len: int) -> int:
        """G for a call with `key_len` keys: `group_size`, or `group_size_ratio * key_len` rounded to an even int."""
        if self.group_size is not None:
            return self.group_size
        if self.group_size_ratio is None:
            return 0
        if self.shifted_head_fraction > 0:
            return max(2, 2 * round(self.group_size_ratio * key_len / 2))
        return max(1, round(self.group_size_ratio * key_len))

    def describe(self, key_len: int) -> str:
        """The pattern as it applies to a call with `key_len` keys, e.g. `sf(G=512, sinks=4)` or `dense`."""
        if self.kind in ("s2", "sf"):
            shifted = "" if self.shifted_head_fraction == 0.5 else f", shifted={self.shifted_head_fraction:g}"
            sinks = f", sinks={self.sinks}" if self.sinks else ""
            return f"{self.kind}(G={self.resolve_group_size(key_len)}{sinks}{shifted})"
        if self.kind == "window":
            return f"window(W={self.window}, sinks={self.sinks})"
        return "dense"

    def num_shifted_heads(self, num_q_heads: int) -> int:
        """Shifted heads are the LAST `floor(num_q_heads * shifted_head_fraction)` query heads."""
        if self.kind not in ("s2", "sf"):
            return 0
        return int(num_q_heads * self.shifted_head_fraction)


def pattern_mask(
    pattern: AttentionPattern | None,
    num_q_heads: int,
    q_len: int,
    k_len: int,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, Hq or 1, q_len, k_len), True = query may attend to key; queries are the last q_len."""
    pattern = pattern or AttentionPattern.dense()
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    mask = mask[None, None]
    if pattern.kind in ("s2", "sf"):
        g = pattern.resolve_group_size(k_len)
        same = q_pos // g == k_pos // g
        shifted = (q_pos + g // 2) // g == (k_pos + g // 2) // g
        heads = torch.arange(num_q_heads, device=device) >= num_q_heads - pattern.num_shifted_heads(num_q_heads)
        allowed = torch.where(heads[:, None, None], shifted[None], same[None])
        allowed = allowed | (k_pos < pattern.sinks)[None]
        mask = mask & allowed[None]
    elif pattern.kind == "window":
        near = (q_pos - k_pos < pattern.window) & (k_pos - q_pos < pattern.window)
        mask = mask & (near | (k_pos < pattern.sinks))[None, None]
    if key_padding_mask is not None:
        real = key_padding_mask.to(device=device, dtype=torch.bool)
        mask = mask & real[:, None, None, :] & real[:, None, k_len - q_len :, None]
    if doc_ids is not None:
        doc_ids = doc_ids.to(device)
        mask = mask & (doc_ids[:, None, k_len - q_len :, None] == doc_ids[:, None, None, :])
    return mask
