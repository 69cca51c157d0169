"""Make the checkpoints the tiny example merges use: the tiny model and three short fine-tunes of it.

    python examples/merges/make_tiny_finetunes.py   # -> runs/merge-demo/{base,ft-a,ft-b,ft-c,ft-tools,lora-a}, eval.txt
    collab-ray merge examples/merges/tiny-ties.yaml runs/merge-demo/ties

Each fine-tune trains the tiny llama (`tiny:llama-bpe`) for a few Adam steps on a different third
of its corpus, so the task vectors differ the way real fine-tunes do; `ft-tools` is ft-c with two
added tokens (for the tokenizer examples) and `lora-a` a PEFT LoRA adapter of the base (for
`model+adapter` references). Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from collab_ray.models.tiny import corpus, tiny_path


def finetune(base: Path, out: Path, text: str, seed: int, steps: int = 30) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 49, (8,), generator=gen)
        x = torch.stack([ids[s : s + 48] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def add_tokens(source: Path, out: Path, tokens: list[str]) -> None:
    """`source` with `tokens` added to its tokenizer and new embedding / LM head rows (the mean row)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def lora_adapter(base: Path, out: Path, rank: int = 4) -> None:
    """A rank-`rank` LoRA adapter of `base` on the attention projections (random B: a made-up fine-tune)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/merge-demo", help="where the checkpoints go")
    root = Path(parser.parse_args().out)
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if not base.is_dir():
        shutil.copytree(tiny_path("llama-bpe"), base)
    lines = corpus().splitlines()
    thirds = [lines[i::3] for i in range(3)]
    for seed, (name, part) in enumerate(zip(("ft-a", "ft-b", "ft-c"), thirds)):
        if not (root / name).is_dir():
            finetune(base, root / name, "\n".join(part), seed)
    if not (root / "ft-tools").is_dir():
        add_tokens(root / "ft-c", root / "ft-tools", ["<|tool|>", "<|result|>"])
    if not (root / "lora-a").is_dir():
        lora_adapter(base, root / "lora-a")
    (root / "eval.txt").write_text("\n".join(lines[::7]), encoding="utf-8")
    print(f"checkpoints in {root}: base, ft-a, ft-b, ft-c, ft-tools, lora-a; evaluation text {root / 'eval.txt'}")


if __name__ == "__main__":
    main()
