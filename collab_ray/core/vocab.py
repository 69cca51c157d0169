"""Vocabulary mapping for fusing models with different tokenizers (GaC, Yu et al. 2024; UniTE, Yao et al. 2024).

Every token string is normalized to the bytes it stands for: byte-level BPE strings ('Ġ' for a space)
are mapped back through the GPT-2 byte table, SentencePiece pieces get '▁' → ' ', and byte-fallback
tokens `<0xNN>` become the single byte NN. The union vocabulary is the set of normalized keys of all
models; each model gets an index array `[V_i] -> union id` (-1 for tokens left out). End-of-sequence
tokens of every model share one key, `EOS`; other special tokens keep their own string as key.

Pure (numpy/torch), no backend calls: build a `TokenMap` from a model's `token_strings()` and info.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Literal, Sequence

import numpy as np
import torch

Key = bytes | str  # normalized text of a token (bytes), or a special token's name (str)
EOS = "<eos>"  # the union key shared by every model's end-of-sequence tokens
Style = Literal["byte_bpe", "sentencepiece", "plain"]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The GPT-2 byte-level table, inverted: printable char -> byte (Radford et al. 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def detect_style(strings: Sequence[str]) -> Style:
    """Which normalization a vocabulary needs: most tokens with 'Ġ' -> byte-level BPE, with '▁' -> SentencePiece."""
    g = sum(s.startswith("Ġ") for s in strings)
    u = sum(s.startswith("▁") for s in strings)
    if g == 0 and u == 0:
        return "plain"
    return "byte_bpe" if g > u else "sentencepiece"


def normalize_token(s: str, style: Style) -> bytes | None:
    """A token string -> the bytes it emits; None when it cannot be read as text (an added control token)."""
    if style == "byte_bpe":
        table = byte_decoder()
        if all(c in table for c in s):
            return bytes(table[c] for c in s)
        return None
    if style == "sentencepiece":
        m = _BYTE_TOKEN.match(s)
        if m:
            return bytes([int(m.group(1), 16)])
        return s.replace("▁", " ").encode("utf-8")
    return s.encode("utf-8")


@dataclass
class TokenMap:
    """One model's tokens as union keys: `keys[id]` (None = never chosen) and key -> ids spelling it."""

    keys: list[Key | None]
    ids_of: dict[Key, list[int]] = field(default_factory=dict)  # ids in increasing order
    style: Style = "plain"

    @classmethod
    def build(
        cls, strings: Sequence[str], *, eos_ids: Iterable[int], special_ids: Iterable[int], style: Style | None = None
    ) -> TokenMap:
        """strings: the raw string of every id ([V]); eos ids map to `EOS`, other special ids to their own name."""
        style = style or detect_style(strings)
        eos, special = set(eos_ids), set(special_ids)
        keys: list[Key | None] = []
        for i, s in enumerate(strings):
            if i in eos:
                keys.append(EOS)
            elif i in special or not s:
                keys.append(s or None)
            else:
                b = normalize_token(s, style)
                keys.append(b if b else s)  # unreadable added tokens are matched by name, like specials
        ids_of: dict[Key, list[int]] = {}
        for i, k in enumerate(keys):
            if k is not None:
                ids_of.setdefault(k, []).append(i)
        return cls(keys, ids_of, style)


@dataclass
class UnionVocab:
    """The union of several models' keys: `keys[u]`, and per model an index array [V_i] -> u (-1: left out)."""

    keys: list[Key]
    index: list[np.ndarray]  # per model, int64 [V_i]

    @classmethod
    def build(cls, maps: Sequence[TokenMap]) -> UnionVocab:
        position: dict[Key, int] = {}
        index = []
        for m in maps:
            idx = np.full(len(m.keys), -1, dtype=np.int64)
            for i, k in enumerate(m.keys):
                if k is not None:
                    idx[i] = position.setdefault(k, len(position))
            index.append(idx)
        keys = [None] * len(position)
        for k, u in position.items():
            keys[u] = k
        return cls(keys, index)

    @property
    def size(self) -> int:
        return len(self.keys)


def to_union(logprobs: torch.Tensor, union_ids: torch.Tensor, size: int) -> torch.Tensor:
    """[n] log-probs of a model's tokens whose union ids are `union_ids` [n] (-1: left out) -> [U].

    Each union key gets its most likely token's log-prob (-inf where absent). Max, not sum, over
    tokens spelling the same key (e.g. 'A' and '<0x41>'): a model's own choice stays its argmax,
    so fusing with weights (1, 0) reproduces that model.
    """
    keep = union_ids >= 0
    out = torch.full((size,), float("-inf"), dtype=torch.float32)
    return out.scatter_reduce(0, union_ids[keep], logprobs[keep].float(), reduce="amax")


def fuse_logprobs(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[M, U] log-probs, [M] weights summing to 1 -> [U] log p with p = Σ_i w_i p_i (GaC)."""
    return torch.logsumexp(rows + torch.log(weights)[:, None], dim=0)


def greedy_split(data: bytes, m: TokenMap) -> list[int]:
    """Spell `data` with `m`'s tokens, longest known prefix first (for bytes that are not valid UTF-8)."""
    ids, i, longest = [], 0, max(len(k) for k in m.ids_of if isinstance(k, bytes))
    while i < len(data):
        for j in range(min(len(data), i + longest), i, -1):
            found = m.ids_of.get(data[i:j])
            if found:
                ids.append(found[0])
                i = j
                break
        else:
            raise ValueError(f"byte {data[i:i + 1]!r} has no token in this vocabulary ({m.style})")
    return ids
