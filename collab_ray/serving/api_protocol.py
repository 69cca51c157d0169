"""Request bodies of the HTTP API (OpenAI's, with vLLM's extras), validated strictly.

Every field the API accepts is declared here with its bounds; an unknown field, a known but
unsupported one, or a value of the wrong JSON type (no string-to-int coercion) is a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**63 - 1  # seeds are signed-64-bit safe (seed + i for n choices stays in range)

# fields that OpenAI or vLLM define and this server does not implement: a 400 that says so
UNSUPPORTED = {
    "tools": "tools (function calling) are not supported by this server",
    "functions": "functions (function calling) are not supported by this server",
    "function_call": "function_call is not supported by this server",
    "response_format": "response_format json_object/json_schema (constrained decoding) is not supported; only {\"type\": \"text\"}",
    "guided_json": "guided decoding is not supported by this server",
    "guided_regex": "guided decoding is not supported by this server",
    "guided_choice": "guided decoding is not supported by this server",
    "guided_grammar": "guided decoding is not supported by this server",
    "structured_outputs": "structured outputs are not supported by this server",
    "suffix": "suffix (insertion) is not supported by this server",
    "best_of": "best_of greater than n is not supported by this server",
    "stop_token_ids": "stop_token_ids is not supported; use stop strings",
    "audio": "audio output is not supported by this server",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported by this server",
    "web_search_options": "web search is not supported by this server",
    "tool_choice": "tool_choice other than 'none' or 'auto' is not supported (no tools)",
    "continuous_usage_stats": "stream_options.continuous_usage_stats is not supported",
    "use_beam_search": "beam search is not supported by this server",
    "min_p": "min_p is not supported by this server",
    "prompt_logprobs": "prompt_logprobs is not supported; use echo with logprobs",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="Send a last chunk with `usage` (and `choices: []`).")
    continuous_usage_stats: bool | None = Field(None, description="vLLM: usage on every chunk (only false is accepted).")


class _Sampling(_Strict):
    """Fields shared by both endpoints (OpenAI defaults; vLLM extras marked)."""

    model: str = Field(min_length=1, max_length=256, description="Pipeline name (GET /v1/models lists them).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (bounded by server.max_tokens_limit).")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature; 0 = greedy (default 1).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1).")
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="vLLM: keep the k most likely tokens; -1 or 0 keeps all.")
    n: int | None = Field(None, ge=1, le=128, description="Completions to return per prompt (default 1).")
    stream: bool | None = Field(None, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (only with stream).")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings, each 1-256 characters.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for reproducible sampling, 0 ≤ seed < 2^63.")
    ignore_eos: bool | None = Field(None, description="vLLM: keep generating past end-of-sequence.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Penalty per earlier occurrence in the output.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Penalty for any earlier occurrence in the output.")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="vLLM: penalty for tokens in the prompt or output (1 = off).")
    logit_bias: dict[str, float] | None = Field(None, description="{token id: bias in [-100, 100]}, at most 300 entries.")
    min_tokens: int | None = Field(None, ge=0, description="vLLM: tokens generated before end-of-sequence may end the output.")
    user: str | None = Field(None, max_length=256, description="End-user id, written to the access log.")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any):
        if isinstance(data, dict):
            for key, value in data.items():
                if key in UNSUPPORTED and key not in cls.model_fields:
                    raise UnsupportedField(key, UNSUPPORTED[key])
        return data

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return stop


class UnsupportedField(ValueError):
    """A field this server knows but does not implement."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


TokenIds = list[Annotated[int, Field(ge=0, le=2**31 - 1)]]


class CompletionBody(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="Prompt text, a list of them, a list of token ids, or a list of such lists."
    )
    logprobs: int | None = Field(None, ge=0, le=20, description="Return log-probs of each token and this many alternatives.")
    echo: bool | None = Field(None, description="Return the prompt before the completion (with its log-probs when asked).")
    best_of: int | None = Field(None, ge=1, le=128, description="Only best_of == n is supported (no extra candidates).")
    suffix: str | None = Field(None, description="Not supported: only null or an empty string is accepted.")


class TextPart(_Strict):
    type: Literal["text"] = Field(description="A text part; image, audio and file parts are refused.")
    text: str = Field(description="The text.")


class OtherPart(BaseModel):
    """Any other content part: refused with a 400 naming its type."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="Part type.")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(description="Who speaks.")
    content: str | list[Union[TextPart, OtherPart]] | None = Field(
        None, description="Text, or a list of text parts (joined); null only for an assistant."
    )
    name: str | None = Field(None, max_length=256, description="Speaker name, passed to the chat template.")
    tool_calls: list[Any] | None = Field(None, description="Refused unless empty: tools are not supported.")
    tool_call_id: str | None = Field(None, description="Refused: tools are not supported.")
    refusal: str | None = Field(None, description="An assistant's earlier refusal; only null is accepted.")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(description="Only 'text' is supported.")
    json_schema: dict | None = Field(None, description="Refused: constrained decoding is not supported.")


class ChatBody(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens.")
    logprobs: bool | None = Field(None, description="Return log-probs of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token (needs logprobs: true).")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'} is supported.")
    tools: list[Any] | None = Field(None, description="Only null or [] is accepted: tools are not supported.")
    tool_choice: str | dict | None = Field(None, description="Only null, 'none' or 'auto' (without tools) is accepted.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; has no effect since no tools are called.")


class TokenizeBody(_Strict):
    """POST /tokenize (vLLM): text or chat messages -> token ids of the pipeline's output model."""

    model: str = Field(min_length=1, max_length=256, description="Pipeline name.")
    prompt: str | None = Field(None, description="Text to tokenize.")
    messages: list[ChatMessage] | None = Field(None, description="Chat messages, rendered with the chat template.")
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (e.g. BOS) to a prompt.")
    add_generation_prompt: bool = Field(True, description="End rendered messages with the assistant's turn.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeBody(_Strict):
    """POST /detokenize (vLLM): token ids -> text."""

    model: str = Field(min_length=1, max_length=256, description="Pipeline name.")
    tokens: TokenIds = Field(description="Token ids of the pipeline's output model.")
