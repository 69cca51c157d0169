"""Tiny llama checkpoints for tests and benchmarks, built deterministically on first use.

Each is a real Hugging Face directory (config.json, model.safetensors, tokenizer files, chat
template), trained for a few seconds on a bundled text so its distributions look like a language
model's rather than noise. Two tokenizer families, so heterogeneous-vocabulary strategies can be
tested: byte-level BPE ('Ġ' for spaces, GPT-2 style) and SentencePiece-style ('▁' Metaspace with
byte fallback, llama style).

Sources: `tiny:llama-bpe` (target), `tiny:llama-bpe-small` (a smaller draft sharing its
tokenizer), `tiny:llama-sp` (another vocabulary).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

from collab_ray.core.errors import ConfigError
from collab_ray.models.cache import building, cache_root

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
BUILD_VERSION = 1  # bump when the build recipe changes: cached checkpoints are rebuilt


@dataclass(frozen=True)
class TinySpec:
    tokenizer: str  # "bpe" (byte-level) or "sp" (SentencePiece-style)
    vocab_size: int  # tokenizer vocabulary (trained merges + specials [+ 256 byte tokens for sp])
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    seed: int
    train_steps: int


TINY: dict[str, TinySpec] = {
    "llama-bpe": TinySpec("bpe", 512, hidden=64, layers=2, heads=4, kv_heads=2, seed=0, train_steps=150),
    "llama-bpe-small": TinySpec("bpe", 512, hidden=32, layers=1, heads=2, kv_heads=1, seed=1, train_steps=150),
    "llama-sp": TinySpec("sp", 640, hidden=64, layers=2, heads=4, kv_heads=2, seed=2, train_steps=150),
}


def corpus() -> str:
    return files("collab_ray.models").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")


def tiny_path(name: str) -> Path:
    """Directory of tiny checkpoint `name`, built (once, atomically) if missing."""
    if name not in TINY:
        raise ConfigError(f"unknown tiny model {name!r}; available: {', '.join(TINY)}")
    spec = TINY[name]
    digest = hashlib.sha256(json.dumps([BUILD_VERSION, asdict(spec), corpus()]).encode()).hexdigest()[:12]
    out = cache_root() / "tiny" / f"{name}-{digest}"
    if not (out / "config.json").is_file():
        build_tiny(name, out)
    return out


def build_tiny(name: str, out_dir: str | Path) -> Path:
    """Train the tokenizer and model of `name` and save them to `out_dir` (atomic rename)."""
    spec = TINY[name]
    with building(Path(out_dir)) as tmp:
        tokenizer = _train_tokenizer(spec)
        model = _train_model(spec, tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _train_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = corpus().splitlines()
    if spec.tokenizer == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            special_tokens=SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(lines, trainer)
    else:
        tok = _train_sentencepiece_style(spec, lines)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _train_sentencepiece_style(spec: TinySpec, lines: list[str]):
    """BPE over '▁'-marked words with byte fallback (<0xNN> tokens), as llama/SentencePiece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size - 256, special_tokens=SPECIAL, show_progress=False)
    base.train_from_iterator(lines, trainer)
    trained = json.loads(base.to_str())["model"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    ordered = SPECIAL + byte_tokens + [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL]
    vocab = {t: i for i, t in enumerate(ordered)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(SPECIAL)
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _train_model(spec: TinySpec, tokenizer):
    """A llama model fitted for `train_steps` Adam steps to next-token prediction on the corpus."""
    import torch

    model = new_llama(
        tokenizer, seed=spec.seed, hidden=spec.hidden, layers=spec.layers, heads=spec.heads, kv_heads=spec.kv_heads,
        max_positions=512,
    )
    ids = torch.tensor(tokenizer(corpus())["input_ids"])  # one long stream
    seq, batch = 48, 16
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(spec.train_steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def new_llama(tokenizer, *, seed: int, hidden: int, layers: int, heads: int, kv_heads: int, max_positions: int):
    """An untrained llama model over `tokenizer` (seeded; FFN 2·hidden wide, untied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)
