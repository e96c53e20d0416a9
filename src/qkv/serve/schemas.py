"""Pydantic models of every request and response of `qkv serve`, in the OpenAI API's shapes.

Field names, types and nesting follow the `openai` package's own types (`openai.types.chat.
ChatCompletion`, `ChatCompletionChunk`, `openai.types.Completion`, `CreateEmbeddingResponse`,
`CompletionUsage`), so the official client parses every answer. Requests refuse unknown fields
(`extra="forbid"`): an option qkv would silently ignore is an error naming it. Range checks live in
the field constraints, so `/openapi.json` states them too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Caps on what one request may ask for (OpenAI's own: top_logprobs <= 20, n <= 128).
MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_STOP = 4


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- shared sampling fields ---------------------------------------------------------------------
Temperature = Annotated[float | None, Field(ge=0.0, le=2.0, description="0 is greedy; default 1")]
TopP = Annotated[float | None, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int | None, Field(ge=1)]
N = Annotated[int, Field(ge=1, le=MAX_N)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None


class StreamOptions(Request):
    include_usage: bool = False


# -- chat ---------------------------------------------------------------------------------------
class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class JsonSchemaFormat(Request):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatText(Request):
    type: Literal["text"]


class ResponseFormatJsonObject(Request):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class ChatCompletionRequest(Request):
    """POST /v1/chat/completions (OpenAI's `CompletionCreateParams` for chat)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    n: N = 1
    temperature: Temperature = None
    top_p: TopP = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    seed: int | None = None
    stop: Stop = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None


# -- completions --------------------------------------------------------------------------------
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class BeamOptions(Request):
    """The `qkv` extension object of /v1/completions: beam search with a KV cache."""

    num_beams: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    no_repeat_ngram_size: Annotated[int, Field(ge=0)] = 0


class CompletionRequest(Request):
    """POST /v1/completions (OpenAI's legacy completions), with `best_of` and `qkv` as beam search."""

    model: str
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: MaxTokens = None
    n: N = 1
    best_of: Annotated[int | None, Field(ge=1, le=MAX_N)] = None
    temperature: Temperature = None
    top_p: TopP = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    seed: int | None = None
    stop: Stop = None
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    qkv: BeamOptions | None = None


# -- embeddings ---------------------------------------------------------------------------------
class EmbeddingRequest(Request):
    """POST /v1/embeddings."""

    model: str
    input: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


# -- responses ----------------------------------------------------------------------------------
class PromptTokensDetails(Response):
    cached_tokens: int = 0


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(Response):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(Response):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Response):
    content: list[TokenLogprob] | None


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str | None


FinishReason = Literal["stop", "length"]


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(Response):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Embedding(Response):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingUsage(Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qkv"


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Response):
    error: ErrorDetail
