"""mergekit's merge YAML as pydantic models, and per-tensor parameter evaluation (filters, gradients).

A user's mergekit YAML loads unchanged: `models` (each with `parameters`) or `slices` of `sources`
with `layer_range`, `base_model`, `merge_method`, global `parameters`, `dtype`, `out_dtype`,
`tokenizer_source` / `tokenizer`, `chat_template`. A parameter value is a scalar, a gradient list (interpolated across the
layers of a slice) or a list of `{filter, value}` conditions (first whose filter is a substring of
the tensor name wins). mergekit keys that collab_ray does not implement (`modules`,
`residual_weight`) are refused with an error naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from collab_ray.core.errors import ConfigError
from collab_ray.core.files import describe_error, parse_yaml, read_yaml, validate
from collab_ray.merge.methods import REQUIRED, Param, get_method

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]
DTYPES = ("float32", "float16", "bfloat16", "float64")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalParameter(_Strict):
    """A parameter value applied to the tensors whose name contains `filter`."""

    value: ScalarOrGradient = Field(description="Scalar, or gradient list interpolated across the layers of a slice.")
    filter: str | None = Field(None, description="Substring of the tensor name; None or '*' matches every tensor.")


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]
Parameters = dict[str, ParameterSetting]


def _model_path(value: str | None) -> str | None:
    if value is not None and (value.count("+") > 1 or value.startswith("+") or value.endswith("+")):
        raise ValueError(f"model reference {value!r}: expected MODEL or MODEL+LORA_ADAPTER")
    return value


class _ModelSource(_Strict):
    model: str = Field(
        description="Model directory (safetensors + config.json), tiny:NAME, Hub id org/name[@revision], "
        "or any of these + a PEFT LoRA adapter ('model+adapter', merged in first)."
    )
    parameters: Parameters | None = Field(None, description="Parameters for this model (highest precedence).")

    _check_model = field_validator("model")(_model_path)


class InputModel(_ModelSource):
    """One input model of the `models:` form."""


class InputSlice(_ModelSource):
    """A contiguous range of layers of one model."""

    layer_range: tuple[int, int] = Field(description="Layers [start, end) of `model` that this source contributes.")

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    """Output layers made by merging the corresponding layers of every source."""

    sources: list[InputSlice] = Field(min_length=1, description="Sources merged layer by layer; same number of layers each.")
    base_model: str | None = Field(None, description="Base model of this slice (overrides the global base_model).")
    parameters: Parameters | None = Field(None, description="Parameters for this slice (over the global ones).")

    _check_base = field_validator("base_model")(_model_path)

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            ranges = [f"{s.model}{list(s.layer_range)}" for s in self.sources]
            raise ValueError(f"all sources of a slice must have the same number of layers: {', '.join(ranges)}")
        return self


class ModelToken(_Strict):
    """A token's embedding taken from one model's row for a given token (id or string)."""

    kind: Literal["model_token"] = Field(description="'model_token'.")
    model: str = Field(description="Model whose embedding row is used (one of the merge's inputs).")
    token_id: int | None = Field(None, description="Row (token id) in that model; exclusive with `token`.")
    token: str | None = Field(None, description="Token string, looked up in that model's tokenizer; exclusive with `token_id`.")

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroToken(_Strict):
    """A zero embedding."""

    kind: Literal["zero"] = Field(description="'zero'.")


class TokenEmbedding(_Strict):
    """Where the embedding (and LM head row) of one output token comes from."""

    source: Union[ModelToken, ZeroToken, str, None] = Field(
        None, description="A model reference (its row for this token), {kind: model_token, …} or {kind: zero}."
    )
    force: bool = Field(False, description="Use `source` for every model, even those that have the token.")


class TokenizerConfig(_Strict):
    """mergekit's `tokenizer:` block: the output vocabulary and per-token embedding sources."""

    source: str = Field("union", description="'union', 'base', or a model reference ('model:NAME' or NAME) whose tokenizer is used.")
    tokens: dict[str, TokenEmbedding] | None = Field(None, description="Tokens to add or whose embeddings to set, by token string.")
    pad_to_multiple_of: int | None = Field(None, gt=0, description="Pad the output vocabulary to a multiple of this (mean rows).")


class MergeConfig(_Strict):
    """A mergekit merge configuration (the subset collab_ray implements; same semantics)."""

    merge_method: str = Field(description="Method name: linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, …")
    models: list[InputModel] | None = Field(None, description="Whole models to merge (exclusive with `slices`).")
    slices: list[OutputSlice] | None = Field(None, description="Output slices built from layer ranges (exclusive with `models`).")
    base_model: str | None = Field(None, description="Base model: task vectors are taken relative to it; config/tokenizer donor.")
    parameters: Parameters | None = Field(None, description="Global parameters (lowest precedence).")
    dtype: str | None = Field(None, description="Inputs are cast to this dtype before merging (float32, float16, bfloat16, float64).")
    out_dtype: str | None = Field(None, description="dtype of the written tensors (default: `dtype`, else the inputs' dtype).")
    tokenizer_source: str | None = Field(
        None,
        description="Output vocabulary: 'base' (the base's, else the first model's), 'union' (all models' tokens) or "
        "'model:NAME' / NAME (that model's tokenizer); embeddings and LM heads are rebuilt on it.",
    )
    tokenizer: TokenizerConfig | None = Field(None, description="Output vocabulary with per-token embedding sources (exclusive with tokenizer_source).")
    chat_template: str | None = Field(None, description="Chat template of the output tokenizer: 'auto' (most common among the models), 'chatml', or a Jinja template.")

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name = v.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"unsupported dtype {v!r}; one of {', '.join(DTYPES)}")
        return name

    _check_base = field_validator("base_model")(_model_path)

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source or a tokenizer block, not both")
        method = get_method(self.merge_method)
        for where, params in self._parameter_blocks():
            for name in params or {}:
                if method.param(name) is None:
                    known = ", ".join(p.name for p in method.params + method.setup)
                    raise ValueError(f"{where}.{name}: unknown parameter for merge_method {self.merge_method!r} (known: {known})")
        return self

    def _parameter_blocks(self):
        yield "parameters", self.parameters
        for i, m in enumerate(self.models or []):
            yield f"models[{i}].parameters", m.parameters
        for i, s in enumerate(self.slices or []):
            yield f"slices[{i}].parameters", s.parameters
            for j, src in enumerate(s.sources):
                yield f"slices[{i}].sources[{j}].parameters", src.parameters


# mergekit keys collab_ray refuses, and why (the generic message for anything else is "unknown key")
UNSUPPORTED = {
    "modules": "multi-module merges are not supported; use 'models' or 'slices'",
    "residual_weight": "residual_weight is not supported",
}


def load_config(source: MergeConfig | dict | str | Path) -> MergeConfig:
    """A MergeConfig from an instance, a dict, YAML text or a YAML file; errors name the key and value."""
    if isinstance(source, MergeConfig):
        return source
    where = "merge config"
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        where, source = str(Path(source)), read_yaml(source, where)
    elif isinstance(source, str):
        source = parse_yaml(source, where)
    return validate(MergeConfig, source, where, describe=_describe)


def _describe(err: ErrorDetails) -> str:
    """A pydantic error; a key mergekit has and collab_ray lacks is named with the reason."""
    if err["type"] != "extra_forbidden":
        return describe_error(err)
    key = str(err["loc"][-1])
    return f"{'.'.join(str(p) for p in err['loc'])}: {UNSUPPORTED.get(key, 'unsupported key')} (key {key!r})"


# ------------------------------------------------------------------------ per-tensor evaluation

_ADAPTERS: dict[type, TypeAdapter] = {}


def validate_value(param: Param, value: Any) -> Any:
    """Coerce `value` to the parameter's type (YAML strings like '1e-3' become numbers)."""
    if value is None:
        return None
    adapter = _ADAPTERS.setdefault(param.type, TypeAdapter(param.type))
    try:
        return adapter.validate_python(value)
    except ValidationError:
        raise ConfigError(f"parameter {param.name!r}: {value!r} is not a valid {param.type.__name__}") from None


def evaluate(setting: ParameterSetting, param: Param, tensor_name: str, t: float) -> Any:
    """Value of `setting` for `tensor_name` at layer position t ∈ [0, 1], or None if no filter matches.

    Gradient lists interpolate linearly between neighbouring numeric values; lists of booleans or
    strings pick the value at index ⌊t·(n−1)⌋ (as mergekit does).
    """
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return validate_value(param, setting)
    if not setting:
        return None
    if isinstance(setting[0], ConditionalParameter):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate(cond.value, param, tensor_name, t)
        return None
    values = [validate_value(param, v) for v in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return validate_value(param, (1 - frac) * values[i0] + frac * values[i1])


def resolve(param: Param, scopes: list[Parameters | None], tensor_name: str, t: float, where: str) -> Any:
    """First non-None value over `scopes` (highest precedence first), else the default; errors name `where`."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate(scope[param.name], param, tensor_name, t)
            if value is not None:
                return value
    if param.default is REQUIRED:
        raise ConfigError(f"missing required parameter {param.name!r} for {where}")
    return param.default



def tokenizer_settings(config: MergeConfig) -> tuple[str, dict[str, TokenEmbedding], int | None] | None:
    """(source, tokens, pad_to_multiple_of) of `tokenizer_source` or the `tokenizer` block, or None (neither)."""
    if config.tokenizer is not None:
        return config.tokenizer.source, dict(config.tokenizer.tokens or {}), config.tokenizer.pad_to_multiple_of
    if config.tokenizer_source is not None:
        return config.tokenizer_source, {}, None
    return None
