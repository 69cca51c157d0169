"""The output vocabulary of a merge (mergekit's `tokenizer_source` / `tokenizer:` and `chat_template`).

`build_vocabulary` makes the output tokenizer — the base's (`base`; the first model's when there
is no base_model), one model's (`model:NAME` or a model reference), or the union of every model's
tokens (`union`: the base's vocabulary, then the tokens it lacks, added tokens with their
settings) — plus `tokens` the config adds, and for each model the row of every output token in
that model's embedding (−1 where it lacks the token). `Vocabulary.align` rebuilds one vocabulary
tensor (embedding or LM head, rows = tokens) of every input on the output vocabulary, as mergekit
does: a model's own row where it has the token; else, for a token in exactly one model that
model's row, for one the base has the base's row, otherwise the mean over the models that have
it; a token no model has gets zeros; a `tokens:` entry names its source (a model, a model's token,
or zero) and with `force` replaces every model's row. Rows padded up to `pad_to_multiple_of` are
the mean of the real ones.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from collab_ray.core.errors import ConfigError

if TYPE_CHECKING:
    from collab_ray.merge.config import TokenEmbedding
    from collab_ray.merge.io import ModelFiles

log = logging.getLogger(__name__)

# Chat templates known by name (`chat_template: chatml`); any other value is a Jinja template or `auto`.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


MERGEKIT_ONLY_TEMPLATES = ("alpaca", "llama3", "mistral", "exaone")


@dataclass
class Vocabulary:
    """The output tokenizer and, per model reference, where each output token sits in that model."""

    tokenizer: Any  # transformers PreTrainedTokenizerBase
    size: int  # output rows (the vocabulary padded to pad_to_multiple_of)
    rows: dict[str, torch.Tensor]  # model ref -> [V] int64, the model's row of each output token id, −1 if absent
    vocabs: dict[str, dict[str, int]]  # model ref -> its own token -> id (for `tokens: {source: {kind: model_token}}`)
    tokens: dict[str, TokenEmbedding]  # the config's `tokens:` entries
    token_ids: dict[str, int]  # output vocabulary: token -> id

    def align(self, refs: list[str], tensors: list[torch.Tensor], base: str | None) -> list[torch.Tensor]:
        """Every [r_m, *E] vocabulary tensor of the models `refs` rebuilt as [size, *E] on the output vocabulary."""
        vocab = len(self.token_ids)
        rows = torch.stack([self.rows[r] for r in refs])  # [M, V]
        present = rows >= 0
        forced = torch.zeros(vocab, dtype=torch.bool)
        configured = torch.zeros(vocab, dtype=torch.bool)
        for token, cfg in self.tokens.items():
            if token in self.token_ids:
                configured[self.token_ids[token]] = True
                forced[self.token_ids[token]] = cfg.force
        defaults = self._defaults(refs, tensors, rows, present, configured, forced, base)  # {id: [*E]}
        out = []
        for m, tensor in enumerate(tensors):
            new = torch.zeros((self.size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            own = present[m] & ~forced  # [V]
            new[:vocab][own] = tensor[rows[m][own]]
            if defaults:
                ids = torch.tensor([i for i in defaults if not own[i]], dtype=torch.long)
                if len(ids):
                    new[ids] = torch.stack([defaults[int(i)] for i in ids]).to(new)
            missing = ~own.clone()
            missing[list(defaults)] = False
            if missing.any():
                log.error("model %s: no embedding for %d tokens (zeros), e.g. id %d", refs[m], int(missing.sum()), int(missing.nonzero()[0]))
            if self.size > vocab:  # padding rows: the mean embedding (Hewitt 2021)
                new[vocab:] = new[:vocab].mean(dim=0)
            out.append(new)
        return out

    def _defaults(self, refs, tensors, rows, present, configured, forced, base) -> dict[int, torch.Tensor]:
        """Row of every token that some model lacks (or whose `tokens:` entry forces it): its source's."""
        count = present.sum(0)  # [V]
        needed = forced | (count < len(refs))
        defaults: dict[int, torch.Tensor] = {}
        base_m = refs.index(base) if base in refs else None
        like = tensors[0]
        id_to_token = {i: t for t, i in self.token_ids.items()} if configured.any() else {}
        for i in needed.nonzero().reshape(-1).tolist():
            if configured[i]:
                defaults[i] = self._configured(id_to_token[i], i, refs, tensors, rows)
            elif count[i] == 1:
                m = int(present[:, i].nonzero()[0])
                defaults[i] = tensors[m][rows[m, i]]
            elif count[i] == 0:
                log.warning("token id %d is in no model: zero embedding", i)
                defaults[i] = torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
            elif base_m is not None and present[base_m, i]:
                defaults[i] = tensors[base_m][rows[base_m, i]]
            else:
                total = torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
                for m in range(len(refs)):
                    if present[m, i]:
                        total = total + tensors[m][rows[m, i]]
                defaults[i] = total / int(count[i])
        return defaults

    def _configured(self, token: str, i: int, refs, tensors, rows) -> torch.Tensor:
        cfg = self.tokens[token].source
        like = tensors[0]
        if cfg is None:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: a token needs a source (a model, {{kind: model_token, …}} or {{kind: zero}})")
        if not isinstance(cfg, str) and cfg.kind == "zero":
            return torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
        model = cfg if isinstance(cfg, str) else cfg.model
        if model not in refs:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: source model {model!r} is not an input of this tensor ({refs})")
        m = refs.index(model)
        if isinstance(cfg, str):
            if rows[m, i] < 0:
                raise ConfigError(f"tokenizer.tokens[{token!r}]: model {model!r} does not have the token")
            return tensors[m][rows[m, i]]
        source_id = cfg.token_id
        if source_id is None:
            if cfg.token not in self.vocabs[model]:
                raise ConfigError(f"tokenizer.tokens[{token!r}]: token {cfg.token!r} is not in model {model!r}")
            source_id = self.vocabs[model][cfg.token]
        if not 0 <= source_id < tensors[m].shape[0]:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: token_id {source_id} is out of range for model {model!r}")
        return tensors[m][source_id]


def _load_tokenizer(files: ModelFiles):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(files.path)


def build_vocabulary(
    source: str,
    models: list[ModelFiles],
    base: ModelFiles | None,
    tokens: dict[str, TokenEmbedding] | None = None,
    pad_to_multiple_of: int | None = None,
    source_model: ModelFiles | None = None,
) -> Vocabulary:
    """The output vocabulary for `source` ('base', 'union', or 'model' with `source_model`) over `models`
    (every referenced model, config order); `base` is the base model, else the first model."""
    base = base or models[0]
    try:
        base_tokenizer = _load_tokenizer(base)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"tokenizer: cannot load the tokenizer of {base.ref!r} (the base): {e}") from None
    tokenizers = {base.ref: base_tokenizer}
    for files in models:
        if files.ref not in tokenizers:
            try:
                tokenizers[files.ref] = _load_tokenizer(files)
            except (OSError, ValueError, TypeError) as e:
                log.warning("no tokenizer for %s (%s); assuming the base's", files.ref, e)
    if source == "base":
        out = base_tokenizer
    elif source == "union":
        out = _union(base_tokenizer, [(f, tokenizers[f.ref]) for f in [base, *models] if f.ref in tokenizers])
    else:
        try:
            out = _load_tokenizer(source_model)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"tokenizer source {source_model.ref!r}: cannot load its tokenizer: {e}") from None
    existing = set(out.get_vocab())
    for token in tokens or {}:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    token_ids = out.get_vocab()
    size = len(token_ids)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    rows, vocabs = {}, {}
    for files in [base, *models]:
        own = (tokenizers.get(files.ref) or base_tokenizer).get_vocab()
        limit = _vocab_size(files, len(own))
        index = torch.full((len(token_ids),), -1, dtype=torch.long)
        for token, i in token_ids.items():
            j = own.get(token, -1)
            index[i] = j if j < limit else -1  # ids past the model's embedding rows (padding tokens) are absent
        rows[files.ref], vocabs[files.ref] = index, own
    return Vocabulary(out, size, rows, vocabs, dict(tokens or {}), token_ids)


def _vocab_size(files: ModelFiles, default: int) -> int:
    config = files.config.get("text_config", files.config) if "vocab_size" not in files.config else files.config
    return int(config.get("vocab_size") or default)


def _union(base_tokenizer, tokenizers: list) -> Any:
    """The base's tokenizer plus every token the others have: plain tokens (by id) first, then added tokens
    with their settings (the first model's where they differ)."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for files, tokenizer in tokenizers:
        limit = _vocab_size(files, tokenizer.vocab_size)
        specials = {info.content for info in tokenizer.added_tokens_decoder.values()}
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if i < limit and token not in specials:
                plain.setdefault(token)
        for i, info in sorted(tokenizer.added_tokens_decoder.items()):
            if i < limit:
                if info.content in added and added[info.content] != info:
                    log.warning("token %r is added with different settings in several models; using the first", info.content)
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory(prefix="collab-ray-tokenizer-") as tmp:  # a copy: the base's stays as it is
        base_tokenizer.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp)
    known = base_tokenizer.get_vocab()
    for token in plain:
        if token not in known and token not in added:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def resolve_chat_template(value: str, models: list[ModelFiles]) -> str | None:
    """`chat_template`: 'auto' (the template most models have), a name from CHAT_TEMPLATES, or a Jinja template."""
    if value == "auto":
        templates = []
        for files in models:
            try:
                template = _load_tokenizer(files).chat_template
            except (OSError, ValueError, TypeError):
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                templates.append(template.strip())
        return Counter(templates).most_common(1)[0][0] if templates else None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        known = ", ".join(["auto", *CHAT_TEMPLATES])
        hint = "; mergekit's alpaca, llama3, mistral and exaone are not built in: give the template itself" if value in MERGEKIT_ONLY_TEMPLATES else ""
        raise ConfigError(f"chat_template {value!r} is neither a Jinja template nor a known name ({known}){hint}")
    return value
