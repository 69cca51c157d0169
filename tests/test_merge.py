"""Merging tiny llama checkpoints: equality with mergekit, properties, streaming I/O, errors, soups, CLI.

Checkpoints (a base and three fine-tunes = base + seeded noise) are made once per module. mergekit
runs in one subprocess for all comparison configs (`mergekit-yaml` itself for one of them, its
`run_merge` — what `mergekit-yaml` calls — for the rest), on CPU.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from collab_ray.core.errors import ConfigError, ModelLoadError
from collab_ray.merge import greedy_soup, load_config, merge, merge_to_state_dict, uniform_soup
from collab_ray.merge.cli import register

pytest.importorskip("mergekit")

LAYERS = 4


def _llama_config(hidden=64, layers=LAYERS, vocab=256):
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


def _save(state: dict, config, out: Path) -> Path:
    out.mkdir(parents=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _noisy(state: dict, seed: int, scale: float = 0.01) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base, ft0..ft2 (base + noise), ft0copy, vocab260 (4 extra embedding rows), badshape."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("ckpts")
    config = _llama_config()
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    paths = {"base": _save(base, config, root / "base")}
    for i in range(3):
        paths[f"ft{i}"] = _save(_noisy(base, 100 + i), config, root / f"ft{i}")
    paths["ft0copy"] = Path(shutil.copytree(paths["ft0"], root / "ft0copy"))
    bigger = _noisy(base, 200)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        bigger[name] = torch.cat([bigger[name], torch.randn(4, 64)])
    paths["vocab260"] = _save(bigger, _llama_config(vocab=260), root / "vocab260")
    bad = _noisy(base, 300)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 64)
    paths["badshape"] = _save(bad, config, root / "badshape")
    return paths


def _yaml(text: str, paths: dict) -> dict:
    """A mergekit YAML (model names substituted by their directories) as a dict."""
    config = yaml.safe_load(textwrap.dedent(text))

    def sub(node):
        if isinstance(node, dict):
            return {k: (str(paths[v]) if k in ("model", "base_model", "source", "tokenizer_source") and isinstance(v, str) and v in paths and not (k.endswith("source") and v in ("base", "union")) else sub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        return node

    return sub(config)


# Real-world shaped mergekit configs with non-trivial weights/densities, per-tensor filters and gradients.
CONFIGS = {
    "linear": """
        models:
          - model: ft0
            parameters: {weight: 0.5}
          - model: ft1
            parameters:
              weight: [{filter: mlp, value: 0.9}, {value: 0.3}]
          - model: ft2
            parameters: {weight: [0.1, 0.4]}
        merge_method: linear
        dtype: float32
    """,
    "task_arithmetic": """
        models:
          - model: ft0
            parameters: {weight: 0.7}
          - model: ft1
            parameters: {weight: -0.3}
          - model: ft2
            parameters: {weight: [0.2, 0.6, 0.5]}
        merge_method: task_arithmetic
        base_model: base
        parameters: {lambda: 0.8}
        dtype: float32
        out_dtype: float16
    """,
    "ties": """
        models:
          - model: ft0
            parameters: {weight: 0.6, density: [0.3, 0.7]}
          - model: ft1
            parameters:
              weight: [{filter: self_attn, value: 0.2}, {value: 0.5}]
              density: 0.5
          - model: ft2
            parameters: {weight: 0.3, density: 0.6}
        merge_method: ties
        base_model: base
        parameters: {normalize: true, int8_mask: true}
        dtype: float32
    """,
    "breadcrumbs": """
        models:
          - model: base
          - model: ft0
            parameters: {weight: 0.5, density: 0.8, gamma: 0.05}
          - model: ft1
            parameters: {weight: 0.4, density: [0.6, 0.9], gamma: 0.02}
        merge_method: breadcrumbs
        base_model: base
        dtype: float32
    """,
    "slerp": """
        slices:
          - sources:
              - model: base
                layer_range: [0, 4]
              - model: ft0
                layer_range: [0, 4]
        merge_method: slerp
        base_model: base
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
    """,
    "model_stock": """
        models:
          - model: ft0
          - model: ft1
          - model: ft2
        merge_method: model_stock
        base_model: base
        dtype: float32
    """,
    "model_stock_filter_wise": """
        models:
          - model: ft0
          - model: ft1
        merge_method: model_stock
        base_model: base
        parameters: {filter_wise: true}
    """,
    "ties_slices": """
        slices:
          - sources:
              - model: base
                layer_range: [0, 2]
              - model: ft0
                layer_range: [0, 2]
                parameters: {weight: [0.2, 0.9], density: 0.4}
              - model: ft1
                layer_range: [2, 4]
                parameters: {weight: 0.5, density: 0.7}
            parameters: {normalize: false}
          - sources:
              - model: base
                layer_range: [2, 4]
              - model: ft0
                layer_range: [2, 4]
                parameters: {weight: 0.4, density: 0.5}
              - model: ft2
                layer_range: [0, 2]
                parameters: {weight: 0.6, density: [0.9, 0.2]}
        merge_method: ties
        base_model: base
    """,
    "passthrough": """
        slices:
          - sources:
              - model: ft0
                layer_range: [0, 3]
          - sources:
              - model: ft1
                layer_range: [1, 4]
        merge_method: passthrough
        dtype: float32
    """,
    "breadcrumbs_ties": """
        models:
          - model: ft0
            parameters: {weight: 0.7, density: 0.6, gamma: 0.1}
          - model: ft1
            parameters: {weight: 0.5, density: 0.7}
        merge_method: breadcrumbs_ties
        base_model: base
    """,
    "dare_linear_dense": """
        models:
          - model: ft0
            parameters: {weight: 0.7, density: 1.0}
          - model: ft2
            parameters: {weight: 0.2}
        merge_method: dare_linear
        base_model: base
        parameters: {normalize: true}
    """,
    "della_dense": """
        models:
          - model: ft0
            parameters: {weight: 0.6, density: 1.0, epsilon: 0.1}
          - model: ft1
            parameters: {weight: 0.4, density: 1.0}
        merge_method: della
        base_model: base
        parameters: {lambda: 0.9}
    """,
    "della_linear_dense": """
        models:
          - model: ft0
            parameters: {weight: 0.6, density: 1.0}
          - model: ft1
            parameters: {weight: 0.4, density: 1.0}
        merge_method: della_linear
        base_model: base
    """,
    "sce": """
        models:
          - model: ft0
          - model: ft1
          - model: ft2
        merge_method: sce
        base_model: base
        parameters: {select_topk: [0.3, 0.8]}
        dtype: float32
    """,
    "sce_all": """
        models:
          - model: ft0
          - model: ft1
        merge_method: sce
        base_model: base
        parameters: {int8_mask: true}
    """,
    "nuslerp": """
        models:
          - model: ft0
            parameters: {weight: 0.3}
          - model: ft1
            parameters: {weight: [0.9, 0.2]}
        merge_method: nuslerp
        base_model: base
        dtype: float32
    """,
    "nuslerp_rows": """
        models:
          - model: ft0
            parameters: {weight: 1.0}
          - model: ft2
            parameters: {weight: 2.0}
        merge_method: nuslerp
        parameters: {nuslerp_flatten: false, nuslerp_row_wise: [{filter: mlp, value: true}, {value: false}]}
    """,
    "multislerp": """
        models:
          - model: ft0
            parameters: {weight: 0.5}
          - model: ft1
            parameters: {weight: 0.3}
          - model: ft2
            parameters: {weight: [0.2, 0.6]}
        merge_method: multislerp
        base_model: base
        dtype: float32
    """,
    "karcher": """
        models:
          - model: ft0
          - model: ft1
          - model: ft2
        merge_method: karcher
        parameters: {max_iter: 20, tol: 1.0e-6}
    """,
    "arcee_fusion": """
        models:
          - model: ft1
        merge_method: arcee_fusion
        base_model: base
        dtype: float32
    """,
    "nearswap": """
        slices:
          - sources:
              - model: base
                layer_range: [0, 4]
              - model: ft0
                layer_range: [0, 4]
        merge_method: nearswap
        base_model: base
        parameters:
          t: [{filter: self_attn, value: [0.001, 0.02]}, {value: 0.008}]
    """,
    "ram": """
        models:
          - model: ft0
          - model: ft1
          - model: ft2
        merge_method: ram
        base_model: base
        parameters: {epsilon: 0.008}
    """,
    "ramplus_tl": """
        models:
          - model: ft0
          - model: ft1
        merge_method: ramplus_tl
        base_model: base
        parameters: {epsilon: 0.01, r: 0.5, alpha: 0.8}
    """,
}

MERGEKIT_RUNNER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(config))), out, options)
"""


@pytest.fixture(scope="module")
def mergekit_outputs(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    for name, text in CONFIGS.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(_yaml(text, ckpts)))
    cli = ["mergekit-yaml", str(root / "slerp.yaml"), str(root / "slerp"), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(cli, check=True, capture_output=True, env=offline)
    rest = [arg for name in CONFIGS if name != "slerp" for arg in (str(root / f"{name}.yaml"), str(root / name))]
    subprocess.run([sys.executable, "-c", MERGEKIT_RUNNER, *rest], check=True, capture_output=True, env=offline)
    return root


def _load_dir(path: Path) -> dict:
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _assert_same(ours: dict, theirs: dict, atol=1e-6):
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape and ours[name].dtype == theirs[name].dtype, name
        diff = (ours[name].double() - theirs[name].double()).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_mergekit(name, ckpts, mergekit_outputs, tmp_path):
    out = merge(mergekit_outputs / f"{name}.yaml", tmp_path / "out", progress=False)
    _assert_same(_load_dir(out), _load_dir(mergekit_outputs / name))
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (out, mergekit_outputs / name))
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"]


def test_cli_merge_matches_mergekit_and_shards(ckpts, mergekit_outputs, tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["merge", str(mergekit_outputs / "ties.yaml"), str(tmp_path / "out"), "--out-shard-size", "200KB", "--no-progress"])
    assert args.func(args) == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same(_load_dir(tmp_path / "out"), _load_dir(mergekit_outputs / "ties"))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a loadable HF checkpoint
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()

    args = parser.parse_args(["merge", str(tmp_path / "missing.yaml"), str(tmp_path / "out2")])
    assert args.func(args) == 2 and not (tmp_path / "out2").exists()


def _merged(text: str, paths: dict, **kw) -> dict:
    return merge_to_state_dict(_yaml(text, paths), **kw)


def test_identical_models_merge_to_that_model(ckpts):
    ft0 = load_file(ckpts["ft0"] / "model.safetensors")
    for method, extra in [
        ("linear", "parameters: {weight: 0.4}"),
        ("ties", "parameters: {weight: 0.4, density: 0.5}"),
        ("task_arithmetic", "parameters: {weight: 0.4}"),
        ("model_stock", ""),
    ]:
        merged = _merged(
            f"""
            models:
              - model: ft0copy
                {extra}
              - model: ft0copy
                {extra}
            merge_method: {method}
            base_model: ft0
            """ if method != "linear" else f"""
            models:
              - model: ft0
                {extra}
              - model: ft0copy
                {extra}
            merge_method: linear
            """,
            ckpts,
        )
        _assert_same(merged, ft0)
    slerped = _merged("models: [{model: ft0}, {model: ft0copy}]\nmerge_method: slerp\nbase_model: ft0\nparameters: {t: 0.3}", ckpts)
    _assert_same(slerped, ft0)


def test_linear_single_weight_one_is_that_model(ckpts):
    merged = _merged("models: [{model: ft1, parameters: {weight: 1.0}}]\nmerge_method: linear", ckpts)
    ft1 = load_file(ckpts["ft1"] / "model.safetensors")
    assert all(torch.equal(merged[k], ft1[k]) for k in ft1)


def test_ties_full_density_one_model_is_task_arithmetic(ckpts):
    common = "base_model: base\nmodels: [{model: ft2, parameters: {weight: 0.7, density: 1.0}}]\nparameters: {normalize: false}\n"
    ties = _merged(common + "merge_method: ties", ckpts)
    ta = _merged(common.replace(", density: 1.0", "") + "merge_method: task_arithmetic", ckpts)
    _assert_same(ties, ta, atol=0)


def test_dare_rescales_and_is_deterministic_by_seed(ckpts):
    text = "base_model: base\nmodels: [{model: ft0, parameters: {weight: 1.0, density: 0.3}}]\nmerge_method: "
    base, ft0 = (load_file(ckpts[n] / "model.safetensors") for n in ("base", "ft0"))
    for method in ("dare_linear", "dare_ties"):
        one, again, other = (_merged(text + method, ckpts, seed=s) for s in (1, 1, 2))
        assert all(torch.equal(one[k], again[k]) for k in one)
        assert any(not torch.equal(one[k], other[k]) for k in one)
        name = "model.embed_tokens.weight"  # 16k entries
        delta, merged_delta = ft0[name] - base[name], one[name] - base[name]
        kept = merged_delta.abs() > 1e-7
        assert abs(kept.float().mean().item() - 0.3) < 0.02
        scale = (merged_delta[kept] / delta[kept]).mean().item()
        assert abs(scale * 0.3 - 1) < 0.05


def test_tokenizer_source_base_crops_and_pads_embedding_rows(ckpts, caplog):
    text = "models: [{model: base, parameters: {weight: 0.5}}, {model: vocab260, parameters: {weight: 0.5}}]\nmerge_method: linear\n"
    with pytest.raises(ConfigError, match="vocabulary sizes differ.*tokenizer_source"):
        _merged(text, ckpts)
    merged = _merged(text + "base_model: base\ntokenizer_source: base", ckpts)
    base, big = (load_file(ckpts[n] / "model.safetensors") for n in ("base", "vocab260"))
    name = "model.embed_tokens.weight"
    assert merged[name].shape == (256, 64)
    assert torch.allclose(merged[name], (base[name] + big[name][:256]) / 2, atol=1e-6)
    assert "cropping/padding" in caplog.text


def test_errors_name_the_problem_and_leave_no_output(ckpts, tmp_path):
    out = tmp_path / "out"
    cases = [
        ("merge_method: ties\nmodels: [{model: ft0}\n", ConfigError, "invalid YAML"),
        ("merge_method: ties\nmodules: {}\nmodels: [{model: ft0}]", ConfigError, "modules"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: ft0, parameters: {weigth: 1}}]", ConfigError, "weigth"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: ft0, parameters: {density: 0.5}}]", ConfigError, "weight"),
        ("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: 1}}, {model: nowhere, parameters: {weight: 1}}]", ModelLoadError, "nowhere"),
        ("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: 1}}, {model: badshape, parameters: {weight: 1}}]", ConfigError, "up_proj.*badshape"),
        ("merge_method: slerp\nbase_model: base\nmodels: [{model: ft0}, {model: ft1}]\nparameters: {t: 0.5}", ConfigError, "exactly 2"),
    ]
    for text, error, pattern in cases:
        config = _yaml(text, ckpts) if "invalid" not in pattern else text
        with pytest.raises(error, match=pattern):
            merge(load_config(config) if isinstance(config, dict) else config, out, progress=False)
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    truncated = Path(shutil.copytree(ckpts["ft1"], tmp_path / "truncated"))  # header fine, data cut short
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    ckpts = {**ckpts, "truncated": truncated}
    with pytest.raises(Exception):
        merge(_yaml("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: 1}}, {model: truncated, parameters: {weight: 1}}]", ckpts), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated"]  # no OUT_DIR, no partial dir

    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        merge(_yaml("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: 1}}]", ckpts), out, progress=False)


def test_soups(ckpts, tmp_path):
    models = [str(ckpts[n]) for n in ("ft0", "ft1", "ft2")]
    noisy = _save(_noisy(load_file(ckpts["base"] / "model.safetensors"), 400, scale=0.5), _llama_config(), tmp_path / "noisy")
    base = load_file(ckpts["base"] / "model.safetensors")

    def score(state):  # closer to the base is better (stands in for a validation metric)
        return -sum((state[k] - base[k]).pow(2).sum().item() for k in base)

    chosen = greedy_soup([str(noisy), *models], score)
    assert str(noisy) not in chosen and len(chosen) == 3
    out = uniform_soup(chosen, tmp_path / "soup", progress=False)
    expected = _merged("models: [{model: ft0, parameters: {weight: 1}}, {model: ft1, parameters: {weight: 1}}, {model: ft2, parameters: {weight: 1}}]\nmerge_method: linear", ckpts)
    _assert_same(_load_dir(out), expected)


RSS_SCRIPT = """
import re, sys
from collab_ray.merge import merge
import torch, safetensors, transformers  # everything the merge imports, before the baseline

def status(key):  # kB -> bytes; VmHWM (peak RSS) starts afresh at exec, unlike ru_maxrss
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

baseline = status("VmRSS")
merge(sys.argv[1], sys.argv[2], progress=False)
print(baseline, status("VmHWM") - baseline)
"""


def test_peak_rss_of_three_checkpoint_merge(tmp_path):
    """Peak RSS (VmHWM) increase over the post-import baseline (interpreter + torch ≈ 250 MB, excluded) of a
    TIES merge of three ~88 MB checkpoints onto a base stays below 1.5× one checkpoint. TIES holds one
    tensor per input at once (sign election needs all task vectors), so the largest tensor (the
    12 MB embedding, 14% of the model) plus scratch dominates the peak."""
    config = _llama_config(hidden=512, layers=6, vocab=6000)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.randn(6000, 512, generator=g) * 0.02
    state["model.norm.weight"] = torch.ones(512)
    for i in range(6):
        p = f"model.layers.{i}."
        for proj, shape in [("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (256, 512)), ("self_attn.v_proj", (256, 512)), ("self_attn.o_proj", (512, 512)), ("mlp.gate_proj", (1024, 512)), ("mlp.up_proj", (1024, 512)), ("mlp.down_proj", (512, 1024))]:
            state[p + proj + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(512)
        state[p + "post_attention_layernorm.weight"] = torch.ones(512)
    paths = {"base": _save(state, config, tmp_path / "base")}
    for i in range(3):
        paths[f"ft{i}"] = _save(_noisy(state, i), config, tmp_path / f"ft{i}")
    del state
    size = (paths["base"] / "model.safetensors").stat().st_size
    assert size > 80e6
    text = "base_model: base\nmerge_method: ties\nmodels:\n" + "".join(f"  - {{model: ft{i}, parameters: {{weight: 0.3, density: 0.5}}}}\n" for i in range(3))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_yaml(text, paths)))
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "m.yaml"), str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    baseline, increase = map(int, run.stdout.split())
    assert increase < 1.5 * size, f"peak RSS increase {increase / 1e6:.0f} MB (over {baseline / 1e6:.0f} MB) vs checkpoint {size / 1e6:.0f} MB"


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """The tiny llama (with its tokenizer) and two noisy variants, plus an evaluation text."""
    from collab_ray.models.tiny import corpus, tiny_path

    root = tmp_path_factory.mktemp("tiny")
    base = Path(shutil.copytree(tiny_path("llama-bpe"), root / "base"))
    paths = {"base": base}
    for i, scale in enumerate((0.01, 0.3)):
        paths[f"v{i}"] = Path(shutil.copytree(base, root / f"v{i}"))
        state = _noisy(load_file(base / "model.safetensors"), 500 + i, scale)
        save_file(state, str(paths[f"v{i}"] / "model.safetensors"), metadata={"format": "pt"})
    paths["text"] = root / "eval.txt"
    paths["text"].write_text(corpus()[:4000], encoding="utf-8")
    return paths


def test_fisher_merge_and_perplexity_soup(tiny_with_tokenizer, tmp_path):
    from collab_ray.merge import perplexity_scorer

    p = tiny_with_tokenizer
    fisher = f"merge_method: fisher\nparameters: {{fisher_data: {p['text']}, fisher_batches: 2, fisher_batch_size: 1, fisher_seq_len: 32}}\n"
    same = merge_to_state_dict(_yaml(fisher + "models: [{model: base}, {model: base}]", p))
    base = load_file(p["base"] / "model.safetensors")
    _assert_same(same, base, atol=1e-6)
    mixed = merge_to_state_dict(_yaml(fisher + "models: [{model: base}, {model: v1}]", p))
    plain = merge_to_state_dict(_yaml("merge_method: linear\nmodels: [{model: base, parameters: {weight: 1}}, {model: v1, parameters: {weight: 1}}]", p))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(mixed[name], plain[name], atol=1e-4)  # Fisher weights differ from uniform ones
    v1 = load_file(p["v1"] / "model.safetensors")[name]
    lo, hi = torch.minimum(base[name], v1), torch.maximum(base[name], v1)
    assert torch.all((mixed[name] >= lo - 1e-7) & (mixed[name] <= hi + 1e-7))  # a per-entry convex combination

    score = perplexity_scorer(p["text"], p["base"], seq_len=32, max_tokens=256)
    assert score(base) > score(load_file(p["v1"] / "model.safetensors"))  # heavy noise hurts perplexity
    assert greedy_soup([str(p["v1"]), str(p["base"]), str(p["v0"])], score)[0] == str(p["base"])


EXAMPLES = Path(__file__).parent.parent / "examples" / "merges"


def test_examples_are_valid_configs():
    from collab_ray.merge.stages import plan_stages, read_documents

    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert len(examples) >= 5
    for path in examples:
        docs = read_documents(path)
        if docs is None:
            load_config(path)
        else:
            stages, final = plan_stages(docs)
            for config in [*(c for _, c in stages), final]:
                load_config(config)


def test_tiny_examples_merge_without_edits(tmp_path, monkeypatch):
    """Every tiny-*.yaml example (mergekit's examples/ in kind: each method, tokenizer union, LoRA,
    multi-stage, frankenmerge) merges as it is, on the checkpoints make_tiny_finetunes.py builds."""
    import importlib.util

    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("make_tiny_finetunes", EXAMPLES / "make_tiny_finetunes.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    monkeypatch.chdir(tmp_path)  # the examples name runs/merge-demo/… relative to the working directory
    monkeypatch.setattr(sys, "argv", ["make_tiny_finetunes.py"])
    make.main()
    examples = sorted(EXAMPLES.glob("tiny-*.yaml"))
    assert len(examples) >= 12
    for path in examples:
        out = merge(path, tmp_path / "out" / path.stem, progress=False)
        assert (out / "config.json").is_file() and list(out.glob("*.safetensors")), path.name


# ------------------------------------------------------------------------------------ tokenizers

TOKENIZER_CONFIGS = {
    "union": """
        models:
          - model: tok_a
            parameters: {weight: 0.7}
          - model: tok_b
            parameters: {weight: 0.4}
        merge_method: task_arithmetic
        base_model: tok_base
        tokenizer_source: union
        dtype: float32
    """,
    "base": """
        models:
          - model: tok_base
          - model: tok_a
            parameters: {weight: 0.5, density: 0.6}
          - model: tok_b
            parameters: {weight: 0.5, density: 0.6}
        merge_method: ties
        base_model: tok_base
        tokenizer_source: base
    """,
    "block": """
        models:
          - model: tok_a
            parameters: {weight: 1.0}
          - model: tok_b
            parameters: {weight: 3.0}
        merge_method: linear
        tokenizer:
          source: union
          pad_to_multiple_of: 8
          tokens:
            "<|both|>": {source: tok_a, force: true}
            "<|a1|>": {source: {kind: model_token, model: tok_b, token: "<s>"}}
            "<|new|>": {source: {kind: zero}}
        chat_template: "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\\n{% endfor %}"
    """,
    "model": """
        models:
          - model: tok_a
          - model: tok_b
        merge_method: nuslerp
        parameters: {weight: 1.0}
        base_model: tok_base
        tokenizer_source: tok_b
        chat_template: auto
    """,
    "base_without_base_model": """
        models:
          - model: tok_a
            parameters: {weight: 0.5}
          - model: tok_a2
            parameters: {weight: 0.5}
        merge_method: linear
        tokenizer_source: base
    """,
}


@pytest.fixture(scope="module")
def tok_ckpts(tmp_path_factory):
    """The tiny llama with its tokenizer (tok_base) and fine-tunes with different added tokens:
    tok_a (+<|a1|>, <|both|>), tok_a2 (tok_a's tokenizer, other weights), tok_b (+<|b1|>, <|both|>, special <|b2|>)."""
    from transformers import AutoTokenizer

    from collab_ray.models.tiny import tiny_path

    root = tmp_path_factory.mktemp("tok")
    base = Path(shutil.copytree(tiny_path("llama-bpe"), root / "tok_base"))
    state = load_file(base / "model.safetensors")
    paths = {"tok_base": base}
    for name, plain, special, seed in [("tok_a", ["<|a1|>", "<|both|>"], [], 1), ("tok_a2", ["<|a1|>", "<|both|>"], [], 2), ("tok_b", ["<|b1|>", "<|both|>"], ["<|b2|>"], 3)]:
        out = paths[name] = Path(shutil.copytree(base, root / name))
        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.add_tokens(plain)
        if special:
            tokenizer.add_special_tokens({"additional_special_tokens": special})
        tokenizer.save_pretrained(out)
        grown = _noisy(state, 600 + seed)
        g = torch.Generator().manual_seed(seed)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            grown[key] = torch.cat([grown[key], torch.randn(len(tokenizer) - grown[key].shape[0], grown[key].shape[1], generator=g)])
        save_file(grown, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "vocab_size": len(tokenizer)}))
    return paths


MERGEKIT_TOKENIZER_RUNNER = MERGEKIT_RUNNER.replace("copy_tokenizer=False", "copy_tokenizer=True")


@pytest.fixture(scope="module")
def mergekit_tokenizer_outputs(tok_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit-tok")
    args = []
    for name, text in TOKENIZER_CONFIGS.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(_yaml(text, tok_ckpts)))
        args += [str(root / f"{name}.yaml"), str(root / name)]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", MERGEKIT_TOKENIZER_RUNNER, *args], capture_output=True, text=True, env=offline)
    assert run.returncode == 0, run.stderr[-3000:]
    return root


@pytest.mark.parametrize("name", list(TOKENIZER_CONFIGS))
def test_tokenizer_options_match_mergekit(name, tok_ckpts, mergekit_tokenizer_outputs, tmp_path):
    """Same tokens, same rows per token, same added-token settings and chat template. Token ids are
    compared through the token strings: mergekit orders a union by its set of referenced models, which
    changes from process to process; collab-ray takes the models in config order."""
    from transformers import AutoTokenizer

    theirs_dir = mergekit_tokenizer_outputs / name
    out = merge(theirs_dir.with_suffix(".yaml"), tmp_path / "out", progress=False)
    ours_t, theirs_t = (AutoTokenizer.from_pretrained(d) for d in (out, theirs_dir))
    ours_v, theirs_v = ours_t.get_vocab(), theirs_t.get_vocab()
    assert ours_v.keys() == theirs_v.keys()
    order = torch.tensor([theirs_v[token] for token, _ in sorted(ours_v.items(), key=lambda item: item[1])])
    ours, theirs = _load_dir(out), _load_dir(theirs_dir)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # theirs' rows in our token order (padding rows last)
        theirs[key] = torch.cat([theirs[key][order], theirs[key][len(order) :]])
    _assert_same(ours, theirs)
    assert {t.content: t.special for t in ours_t.added_tokens_decoder.values()} == {t.content: t.special for t in theirs_t.added_tokens_decoder.values()}
    assert ours_t.chat_template == theirs_t.chat_template
    ours_cfg, theirs_cfg = (json.loads((d / "config.json").read_text()) for d in (out, theirs_dir))
    assert ours_cfg["vocab_size"] == theirs_cfg["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]


def test_tokenizer_source_model_prefix_and_errors(tok_ckpts, tmp_path):
    text = "models: [{model: tok_a, parameters: {weight: 1}}, {model: tok_b, parameters: {weight: 1}}]\nmerge_method: linear\n"
    plain = merge_to_state_dict(_yaml(text + "tokenizer_source: tok_b", tok_ckpts))
    prefixed = merge_to_state_dict(_yaml(text + f"tokenizer_source: model:{tok_ckpts['tok_b']}", tok_ckpts))
    _assert_same(prefixed, plain)
    with pytest.raises(ConfigError, match="not both"):
        load_config(_yaml(text + "tokenizer_source: union\ntokenizer: {source: base}", tok_ckpts))
    with pytest.raises(ConfigError, match="vocabulary sizes differ.*tokenizer_source"):
        merge_to_state_dict(_yaml(text, tok_ckpts))
    with pytest.raises(ConfigError, match="'nonsense'"):
        merge(_yaml(text + "tokenizer_source: union\nchat_template: nonsense", tok_ckpts), tmp_path / "out", progress=False)
    merged = merge(_yaml(text + "tokenizer_source: union\nchat_template: chatml", tok_ckpts), tmp_path / "chatml", progress=False)
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(merged).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"


# ------------------------------------------------------------------------- LoRA, Hub ids

def _lora_adapter(model_dir: Path, out: Path, seed: int, rank: int = 4) -> Path:
    """A PEFT LoRA adapter (safetensors) for `model_dir` with random A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    return out


@pytest.fixture(scope="module")
def lora_ckpts(tok_ckpts, tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lora")
    return {**tok_ckpts, "lora1": _lora_adapter(tok_ckpts["tok_base"], root / "lora1", 1), "lora2": _lora_adapter(tok_ckpts["tok_base"], root / "lora2", 2)}


LORA_CONFIG = """
    models:
      - model: tok_base+lora1
        parameters: {weight: 0.6}
      - model: tok_base+lora2
        parameters: {weight: 0.4}
    merge_method: task_arithmetic
    base_model: tok_base
    dtype: float32
"""


def test_lora_references_match_mergekit(lora_ckpts, tmp_path):
    config = _yaml(LORA_CONFIG, {})
    for m in config["models"]:
        base, adapter = m["model"].split("+")
        m["model"] = f"{lora_ckpts[base]}+{lora_ckpts[adapter]}"
    config["base_model"] = str(lora_ckpts["tok_base"])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    runner = MERGEKIT_RUNNER.replace("copy_tokenizer=False", f"copy_tokenizer=False, lora_merge_cache={str(tmp_path / 'cache')!r}")
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", runner, str(tmp_path / "m.yaml"), str(tmp_path / "theirs")], capture_output=True, text=True, env=offline)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = merge(tmp_path / "m.yaml", tmp_path / "ours", progress=False)
    _assert_same(_load_dir(ours), _load_dir(tmp_path / "theirs"))
    assert not list(tmp_path.glob("collab-ray-models-*"))  # merged adapters are temporary

    pickled = Path(shutil.copytree(lora_ckpts["lora1"], tmp_path / "pickled"))
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        merge_to_state_dict({"merge_method": "linear", "models": [{"model": f"{lora_ckpts['tok_base']}+{pickled}", "parameters": {"weight": 1}}]})


def _hub_cache(root: Path, repo: str, files: dict[str, Path], commit: str, tag: str = "main") -> None:
    """Lay `files` out as huggingface_hub's cache does: blobs by hash, snapshots/<commit>/ links, refs/<tag>."""
    import hashlib

    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / tag).write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


HUB_SCRIPT = """
import sys
from collab_ray.merge import merge
merge(sys.argv[1], sys.argv[2], progress=False)
"""


def test_hub_ids_resolve_offline_from_the_cache(ckpts, tmp_path):
    cache = tmp_path / "hub"
    files = {n: ckpts["ft0"] / n for n in ("config.json", "model.safetensors")}
    _hub_cache(cache, "acme/ft0", files, "a" * 40)
    _hub_cache(cache, "acme/ft1", {n: ckpts["ft1"] / n for n in ("config.json", "model.safetensors")}, "b" * 40, tag="v1")
    _hub_cache(cache, "acme/pickled", {"config.json": ckpts["ft1"] / "config.json", "pytorch_model.bin": ckpts["ft1"] / "config.json"}, "c" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    env.pop("HF_HOME", None)
    text = "merge_method: linear\nmodels: [{model: acme/ft0, parameters: {weight: 0.3}}, {model: acme/ft1@v1, parameters: {weight: 0.7}}]\n"
    (tmp_path / "hub.yaml").write_text(text)
    run = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "hub.yaml"), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    local = _yaml("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: 0.3}}, {model: ft1, parameters: {weight: 0.7}}]", ckpts)
    _assert_same(_load_dir(tmp_path / "out"), merge_to_state_dict(local))
    for ref, message in [("acme/pickled", "no safetensors"), ("acme/missing", "not in the local Hub cache"), (f"acme/ft0@{'d' * 40}", "not in the local Hub cache")]:
        (tmp_path / "bad.yaml").write_text(f"merge_method: linear\nmodels: [{{model: {ref}, parameters: {{weight: 1}}}}]\n")
        run = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "bad.yaml"), str(tmp_path / "bad")], capture_output=True, text=True, env=env)
        assert run.returncode != 0 and message in run.stderr, (ref, run.stderr[-2000:])


def test_extract_lora_round_trip(lora_ckpts, tmp_path):
    """base+lora1 merged, its LoRA extracted by the CLI at the adapter's rank, applied with peft to the base:
    the same model; at a lower rank, the best rank-r approximation of each difference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = {"merge_method": "task_arithmetic", "base_model": str(lora_ckpts["tok_base"]), "dtype": "float32",
              "models": [{"model": f"{lora_ckpts['tok_base']}+{lora_ckpts['lora1']}", "parameters": {"weight": 1.0}}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    target = merge_to_state_dict(config)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    for rank in (4, 2):
        args = parser.parse_args(["merge", str(tmp_path / "m.yaml"), str(tmp_path / f"lora{rank}"), "--extract-lora", str(rank), "--no-progress"])
        assert args.func(args) == 0
        adapter = json.loads((tmp_path / f"lora{rank}" / "adapter_config.json").read_text())
        assert adapter["r"] == rank and "model.layers.0.self_attn.q_proj" in adapter["target_modules"]
        model = AutoModelForCausalLM.from_pretrained(lora_ckpts["tok_base"], dtype=torch.float32)
        restored = PeftModel.from_pretrained(model, tmp_path / f"lora{rank}").merge_and_unload().state_dict()
        name = "model.layers.1.mlp.down_proj.weight"
        if rank == 4:
            _assert_same({k: restored[k] for k in target}, target, atol=1e-5)
        else:
            base = load_file(lora_ckpts["tok_base"] / "model.safetensors")[name]
            s = torch.linalg.svdvals(target[name] - base)
            error = torch.linalg.matrix_norm(restored[name] - target[name])
            assert error.item() == pytest.approx(s[2:].square().sum().sqrt().item(), rel=1e-3)  # Eckart–Young: the tail singular values
    with pytest.raises(ConfigError, match="base_model"):
        merge({"merge_method": "linear", "models": [{"model": str(lora_ckpts["tok_a"]), "parameters": {"weight": 1}}]}, tmp_path / "x", extract_lora=2, progress=False)


def test_multi_stage_merge_runs_in_dependency_order_and_cleans_up(ckpts, tmp_path):
    stages = {  # the final merge first and a stage before the stage it uses: order comes from the references
        "final": "merge_method: slerp\nbase_model: base\nmodels: [{model: base}, {model: mixed}]\nparameters: {t: 0.3}\n",
        "mixed": "name: mixed\nmerge_method: task_arithmetic\nbase_model: base\nmodels: [{model: pair, parameters: {weight: 0.5}}, {model: ft2, parameters: {weight: 0.5}}]\n",
        "pair": "name: pair\nmerge_method: linear\nmodels: [{model: ft0, parameters: {weight: 1}}, {model: ft1, parameters: {weight: 1}}]\n",
    }
    text = "---\n".join(yaml.safe_dump(_yaml(t, ckpts)) for t in stages.values())
    (tmp_path / "multi.yaml").write_text(text)
    out = merge(tmp_path / "multi.yaml", tmp_path / "out" / "model", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]  # intermediates removed

    pair = merge(_yaml(stages["pair"].replace("name: pair\n", ""), ckpts), tmp_path / "pair", progress=False)
    mixed = merge(_yaml(stages["mixed"].replace("name: mixed\n", ""), {**ckpts, "pair": pair}), tmp_path / "mixed", progress=False)
    expected = merge_to_state_dict(_yaml(stages["final"], {**ckpts, "mixed": mixed}))
    _assert_same(_load_dir(out), expected)
    _assert_same(merge_to_state_dict(text), expected)

    cycle = "name: a\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n---\nname: b\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        merge(cycle, tmp_path / "cycle", progress=False)
    with pytest.raises(ConfigError, match="stage 'bad'.*weigth"):
        merge("name: bad\nmerge_method: linear\nmodels: [{model: x, parameters: {weigth: 1}}]\n---\nmerge_method: linear\nmodels: [{model: bad, parameters: {weight: 1}}]\n", tmp_path / "bad", progress=False)
    assert not (tmp_path / "cycle").exists() and not (tmp_path / "bad").exists()
