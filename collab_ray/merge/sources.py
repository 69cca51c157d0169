"""Model references of a merge config, resolved to local safetensors directories.

A reference is a local directory, `tiny:NAME`, a Hugging Face Hub id `org/name[@revision]`, or any of
these followed by `+ADAPTER` (a PEFT LoRA adapter, itself a directory or Hub id), as in mergekit.
Hub ids go through `huggingface_hub.snapshot_download` for the configs, tokenizer files and
`*.safetensors` only (pickle weights are never fetched or read); `HF_HUB_OFFLINE=1` resolves from
the local cache alone (`HF_HUB_CACHE` / `HF_HOME`, read at call time). An adapter is merged into
its base with peft (`merge_and_unload`) once per merge, into the merge's work directory, and
read from there like any checkpoint; adapters must be `adapter_model.safetensors`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from collab_ray.core.errors import ModelLoadError

HUB_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]  # never *.bin / *.pt / *.pth
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def split_lora(ref: str) -> tuple[str, str | None]:
    """'base+adapter' -> ('base', 'adapter'); 'base' -> ('base', None)."""
    parts = ref.split("+")
    if len(parts) > 2 or not all(parts):
        raise ModelLoadError(f"model reference {ref!r}: expected MODEL or MODEL+LORA_ADAPTER")
    return parts[0], parts[1] if len(parts) == 2 else None


def resolve_dir(ref: str) -> Path:
    """The local directory of a model reference without an adapter: a directory, tiny:NAME or a Hub id."""
    if ref.startswith("tiny:"):
        from collab_ray.models.tiny import tiny_path

        return tiny_path(ref.removeprefix("tiny:"))
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    match = HUB_ID_RE.match(ref)
    if match is None or ref.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {ref!r}: no such directory, and not a Hub id (org/name[@revision])")
    return hub_snapshot(match["repo"], match["revision"])


def hub_snapshot(repo: str, revision: str | None = None) -> Path:
    """Configs, tokenizer and safetensors weights of Hub model `repo` at `revision` (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    cache = os.environ.get("HF_HUB_CACHE") or (Path(os.environ["HF_HOME"]) / "hub" if os.environ.get("HF_HOME") else None)
    where = f"{repo}@{revision}" if revision else repo
    try:
        path = Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"model {where!r}: not in the local Hub cache{' (HF_HUB_OFFLINE is set)' if offline else ''}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        raise ModelLoadError(f"model {where!r}: {type(e).__name__}: {e}") from None
    except OSError as e:  # network errors
        raise ModelLoadError(f"model {where!r}: cannot download from the Hub ({e}); set HF_HUB_OFFLINE=1 to use the cache") from None
    if not any(path.glob("*.safetensors")) and not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"model {where!r} has no safetensors weights (pickle checkpoints are not read)")
    return path


def merged_lora_dir(ref: str, work: Path) -> Path:
    """Merge the adapter of 'base+adapter' into its base (peft), once, under `work`; the merged directory."""
    base_ref, adapter_ref = split_lora(ref)
    base, adapter = resolve_dir(base_ref), resolve_dir(adapter_ref)
    if not (adapter / "adapter_config.json").is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"LoRA adapter {adapter_ref!r}: needs adapter_config.json and {ADAPTER_WEIGHTS} (pickle adapters are not read)")
    out = work / f"lora-{hashlib.sha256(ref.encode()).hexdigest()[:16]}"
    if (out / "config.json").is_file():
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"LoRA adapter {adapter_ref!r} does not fit model {base_ref!r}: {e}") from None
    out.mkdir(parents=True)
    with torch.no_grad():
        model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja"):
        if (base / name).is_file():
            (out / name).write_bytes((base / name).read_bytes())
    return out
