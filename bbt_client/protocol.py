"""Wire protocol v1 between the client and a bbt inference server.

Both sides import this module and nothing else of each other, so the contract lives in one place.
Prompt and logit tensors travel as base64 of little-endian raw bytes with an explicit shape and dtype:
JSON number lists would be ~4x larger and slow to parse for a (20, 50, 1024) population.

Routes (all JSON, documented with examples in docs/protocol.md):

- ``GET  /v1/health``    -> :class:`Health` (never needs the API key)
- ``GET  /v1/model``     -> :class:`ModelInfo`
- ``POST /v1/tokenize``  :class:`TokenizeRequest` -> :class:`TokenizeResponse`
- ``POST /v1/score``     :class:`ScoreRequest` -> :class:`ScoreResponse`

Errors are ``4xx``/``5xx`` with an :class:`ErrorResponse` body. :class:`PromptBatch` is a prompt spec
decoded to numpy arrays, the form both the client's tuners and the server's model work with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = "1"

#: Placeholders a template may contain. ``{text}`` (alias ``{text_a}``) and ``{mask}`` are required.
TEXT_SLOT = "{text}"
TEXT_A_SLOT = "{text_a}"
TEXT_B_SLOT = "{text_b}"
MASK_SLOT = "{mask}"


def ends_with_mask(template: str) -> bool:
    """Whether a next-token (causal) model can read the template: its one ``{mask}`` ends it."""
    return template.count(MASK_SLOT) == 1 and template.rstrip().endswith(MASK_SLOT)


DType = Literal["float32", "float16"]
_NP_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tensor(_Model):
    """A dense array: ``data`` is base64 of the little-endian bytes, row-major, of ``shape``."""

    dtype: DType = "float32"
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    data: str

    @model_validator(mode="after")
    def _check_size(self) -> "Tensor":
        expected = int(np.prod(self.shape, dtype=np.int64)) * _NP_DTYPES[self.dtype].itemsize
        # base64 length without decoding: 4 chars per 3 bytes, padded.
        if len(self.data) != 4 * ((expected + 2) // 3):
            raise ValueError(
                f"tensor data holds {len(self.data)} base64 chars but shape {self.shape} "
                f"of {self.dtype} needs {expected} bytes"
            )
        return self

    @classmethod
    def from_array(cls, array: np.ndarray, dtype: DType = "float32") -> "Tensor":
        arr = np.ascontiguousarray(np.asarray(array), dtype=_NP_DTYPES[dtype])
        return cls(dtype=dtype, shape=list(arr.shape), data=base64.b64encode(arr.tobytes()).decode("ascii"))

    def to_array(self) -> np.ndarray:
        """Decode to a float32 array (float16 is widened). Raises ValueError on bad base64."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"tensor data is not valid base64: {exc}") from None
        arr = np.frombuffer(raw, dtype=_NP_DTYPES[self.dtype]).reshape(self.shape)
        return arr.astype(np.float32)


def tensor_digest(array: np.ndarray) -> str:
    """Content address of a prompt tensor: sha256 over shape and float32 little-endian bytes."""
    arr = np.ascontiguousarray(np.asarray(array), dtype="<f4")
    h = hashlib.sha256(repr(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


class TensorRef(_Model):
    """A tensor the server may already hold, named by :func:`tensor_digest`.

    Sent without ``tensor`` when the client believes the server cached it; the server answers
    409 ``unknown_tensor`` if not, and the client resends it with ``tensor`` set.
    """

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tensor: Tensor | None = None


# ---------------------------------------------------------------- model info


class ModelInfo(_Model):
    """What a client needs to build projections and verbalizers for this model."""

    protocol: str = PROTOCOL_VERSION
    name: str
    kind: Literal["masked", "causal"]
    architecture: str
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    #: std of the word-embedding matrix: the scale of a shallow prompt (BBT) / layer-0 deep prompt.
    embedding_std: float
    #: std of each layer's input hidden states on reference text, length ``num_layers``;
    #: entry 0 is the embedding output. BBTv2's designed projection scales layer l by it.
    hidden_std: list[float]
    #: Limits the server enforces, so a client can size requests without trial and error.
    max_prompt_tokens: int
    max_candidates: int
    max_texts: int
    max_body_bytes: int
    #: Relative cost hint: tokens processed per request are reported in usage either way.
    device: str
    #: Prompt modes this server understands (older servers: replace only).
    prompt_modes: list[PromptMode] = Field(default_factory=lambda: ["replace"])
    #: Token ids the slots hold in ``add`` mode when a request names none (the first ``max_prompt_tokens``;
    #: a prompt of n tokens uses the first n).
    default_slot_token_ids: list[int] | None = None
    #: One digest per served parameter tensor (:mod:`bbt_client.lm.weight_digests`): lets a client prove a local
    #: model (GDFO's student) shares no weights with this one. None: the server does not say.
    weight_digests: list[Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]] | None = None
    #: None: weights as trained (in ``dtype``); "int8": linear layers quantized (logits differ slightly).
    quantization: str | None = None
    #: Weight/activation dtype the server computes in (older servers: not said).
    dtype: str | None = None

    @model_validator(mode="after")
    def _check_layers(self) -> "ModelInfo":
        if len(self.hidden_std) != self.num_layers:
            raise ValueError("hidden_std must have one entry per layer")
        return self


class Health(_Model):
    status: Literal["ok"] = "ok"
    protocol: str = PROTOCOL_VERSION
    model: str
    #: As :attr:`ModelInfo.quantization`.
    quantization: str | None = None


# ---------------------------------------------------------------- tokenize


class TokenizeRequest(_Model):
    words: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(default_factory=list, max_length=1000)
    texts: list[Annotated[str, Field(max_length=100_000)]] = Field(default_factory=list, max_length=10_000)


class WordTokens(_Model):
    word: str
    #: Token ids of the word as it appears at the answer slot (a leading space for BPE models).
    ids: list[int]

    @property
    def single_token(self) -> bool:
        return len(self.ids) == 1


class TokenizeResponse(_Model):
    words: list[WordTokens]
    #: Tokens each text occupies when encoded alone, without special tokens.
    text_token_counts: list[int]


# ---------------------------------------------------------------- score


class NoPrompt(_Model):
    """Zero-shot: the template alone, no prompt tokens."""

    kind: Literal["none"] = "none"


#: How a prompt acts on its n slots (see docs/protocol.md "Prompt modes"):
#: - ``replace``: the slots hold nothing of their own; layer 0's prompt replaces their *word* embeddings (position
#:   and type embeddings and the embedding LayerNorm still apply) and layer l >= 1's replaces layer l's input;
#: - ``add``: the slots hold real tokens (``slot_token_ids``, or the server's defaults); each layer's prompt is
#:   *added* to the slot states — layer 0's to the embedding output after its LayerNorm — so an all-zero prompt
#:   is exactly the unprompted model reading those tokens (the BBT/BBTv2 reference code's ``cat_or_add="add"``).
PromptMode = Literal["replace", "add"]


class _SlotSpec(_Model):
    mode: PromptMode = "replace"
    #: ``add`` only: the n token ids the slots hold; None = the server's defaults (``/v1/model`` names them).
    slot_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=4096)

    @model_validator(mode="after")
    def _check_slots(self) -> "_SlotSpec":
        if self.slot_token_ids is not None and self.mode != "add":
            raise ValueError("slot_token_ids are only meaningful with mode 'add'")
        return self


class ShallowPrompt(_SlotSpec):
    """BBT: ``candidates`` (C, n, D) act on the n prompt slots at the input layer (see :data:`PromptMode`)."""

    kind: Literal["shallow"] = "shallow"
    candidates: Tensor


class DeepPrompt(_SlotSpec):
    """BBTv2: prompts at every layer; index 0 acts at the input embeddings, l >= 1 on layer l's input.

    Two forms:
    - ``candidates`` (C, L, n, D) and no ``base``: every layer of every candidate is sent;
    - ``base`` (L, n, D), ``layer`` l and ``candidates`` (C, n, D): candidate c is ``base`` with layer l
      replaced by ``candidates[c]``. This is what BBTv2 asks in each step, and lets the server reuse the
      lower layers' activations and skip receiving the unchanged layers again (see :class:`TensorRef`).
    - ``base`` alone: one candidate, the base itself.
    """

    kind: Literal["deep"] = "deep"
    base: TensorRef | None = None
    layer: int | None = Field(default=None, ge=0)
    candidates: Tensor | None = None

    @model_validator(mode="after")
    def _check_form(self) -> "DeepPrompt":
        if self.base is None:
            if self.candidates is None or self.layer is not None:
                raise ValueError("a deep prompt without base needs candidates (C, L, n, D) and no layer")
        elif (self.layer is None) != (self.candidates is None):
            raise ValueError("a deep prompt with base needs both layer and candidates (C, n, D), or neither")
        return self


PromptSpec = Annotated[Union[NoPrompt, ShallowPrompt, DeepPrompt], Field(discriminator="kind")]


#: ``text``: discrete prompts as strings, client-side only (text APIs); protocol v1's wire has no such spec.
PromptKind = Literal["none", "shallow", "deep", "text"]

#: How a text prompt joins a rendered query: ``prompt + TEXT_PROMPT_SEPARATOR + rendered`` (nothing added for an
#: empty prompt). Prepended, as BDPL does, so it works with any template, causal or masked.
TEXT_PROMPT_SEPARATOR = " "


def join_text_prompt(prompt: str, rendered: str) -> str:
    """The sequence a text-only endpoint reads: the prompt string, one space, then the rendered template."""
    return f"{prompt}{TEXT_PROMPT_SEPARATOR}{rendered}" if prompt else rendered


@dataclass(frozen=True)
class PromptBatch:
    """A prompt spec decoded to arrays, as both sides hold it: C candidates, all scored on the same texts.

    - ``none``: zero-shot, C = 1.
    - ``shallow``: ``candidates`` (C, n, D).
    - ``deep``: ``candidates`` (C, L, n, D); or ``base`` (L, n, D) + ``layer`` + ``candidates`` (C, n, D)
      (candidate c = base with layer ``layer`` replaced); or ``base`` alone (C = 1).
    - ``text``: ``texts`` holds C prompt strings, each joined before the rendered template by
      :func:`join_text_prompt`. Client-side only: backends for text APIs send it; protocol v1 has no wire form.
    """

    kind: PromptKind
    candidates: np.ndarray | None = None
    base: np.ndarray | None = None
    layer: int | None = None
    mode: PromptMode = "replace"
    slot_token_ids: tuple[int, ...] | None = None
    texts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.kind == "text") != (self.texts is not None):
            raise ValueError("a text prompt batch needs texts (one string per candidate), and only it takes them")
        if self.texts is not None:
            object.__setattr__(self, "texts", tuple(self.texts))
            if not self.texts or not all(isinstance(t, str) for t in self.texts):
                raise ValueError("texts must be a non-empty sequence of strings")

    @property
    def num_candidates(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return 1 if self.candidates is None else int(self.candidates.shape[0])

    @property
    def num_prompt_tokens(self) -> int:
        """Continuous prompt slots; 0 for zero-shot and text prompts (a text prompt's tokens are the backend's to
        count, see ``estimate_tokens``)."""
        if self.kind in ("none", "text"):
            return 0
        ref = self.base if self.base is not None else self.candidates
        return int(ref.shape[-2])

    def full(self) -> np.ndarray | None:
        """Every candidate's complete prompt: (C, n, D) shallow or (C, L, n, D) deep; None for zero-shot and text."""
        if self.kind in ("none", "text"):
            return None
        if self.kind == "shallow" or self.base is None:
            return self.candidates
        if self.layer is None:
            return self.base[None]
        out = np.repeat(self.base[None], self.num_candidates, axis=0)
        out[:, self.layer] = self.candidates
        return out

    @classmethod
    def zero_shot(cls) -> "PromptBatch":
        return cls(kind="none")

    @classmethod
    def from_texts(cls, texts: "list[str] | tuple[str, ...]") -> "PromptBatch":
        return cls(kind="text", texts=tuple(texts))


class ScoreRequest(_Model):
    """Score label words at the answer slot for every (candidate prompt, text) pair.

    The sequence is ``[special] [n prompt slots] template-with-text [special]``; for a masked LM the
    answer slot is the mask token at ``{mask}``; for a causal LM ``{mask}`` must end the template and the
    answer slot is the next token.
    """

    template: str = Field(min_length=1, max_length=2000)
    texts: list[Annotated[str, Field(max_length=100_000)]] = Field(min_length=1)
    text_pairs: list[Annotated[str, Field(max_length=100_000)]] | None = None
    label_words: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(min_length=2, max_length=1000)
    prompt: PromptSpec = Field(default_factory=NoPrompt)
    #: Echoed back; lets a client match responses and logs to requests.
    request_id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _check_template(self) -> "ScoreRequest":
        has_text = TEXT_SLOT in self.template or TEXT_A_SLOT in self.template
        if not has_text or MASK_SLOT not in self.template:
            raise ValueError("template must contain {text} (or {text_a}) and {mask}")
        if self.template.count(MASK_SLOT) != 1:
            raise ValueError("template must contain exactly one {mask}")
        if (TEXT_B_SLOT in self.template) != (self.text_pairs is not None):
            raise ValueError("text_pairs must be given exactly when the template has {text_b}")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError("text_pairs must be as long as texts")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError("label_words must be distinct")
        return self


class LayerStatsRequest(_Model):
    """Ask the server for the scale of each layer's input on *these* texts (``POST /v1/layer_stats``).

    BBTv2's designed projection scales layer l's prompt by σ̂_l; the reference code measures σ̂_l on the job's own
    few-shot training batch in its template, prompt slots included (holding ``slot_token_ids`` or the server's
    defaults, nothing added), clipping outliers at μ ± ``clip_sigmas``·σ for ``clip_rounds`` rounds first.
    """

    template: str = Field(min_length=1, max_length=2000)
    texts: list[Annotated[str, Field(max_length=100_000)]] = Field(min_length=1, max_length=4096)
    text_pairs: list[Annotated[str, Field(max_length=100_000)]] | None = None
    prompt_tokens: int = Field(ge=1, le=4096)
    slot_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=4096)
    clip_rounds: int = Field(default=5, ge=0, le=50)
    clip_sigmas: float = Field(default=3.0, gt=0)


class LayerStatsResponse(_Model):
    #: Length L. Entry 0: std of the word-embedding matrix (what the reference scales layer 0 by); entry l >= 1:
    #: std over every position of every text of layer l's input, after the clipping rounds.
    hidden_std: list[float]
    texts: int
    tokens: int


class Usage(_Model):
    """Metering for one request: what a hosted endpoint would bill."""

    candidates: int
    sequences: int
    forward_passes: int
    tokens_processed: int


class ServerUsage(_Model):
    """``GET /v1/usage``: what the server computed since it started (counted when the work finishes, whether
    or not the caller was still there to hear the answer)."""

    #: Scoring requests computed: ``/v1/score`` and the OpenAI face's completions/chat requests.
    requests: int = 0
    #: Prompts scored on a text batch: the unit of an API call in protocol v1 (BBT's count).
    candidates: int = 0
    #: (prompt, text) sequences run through the model.
    sequences: int = 0
    #: Non-pad tokens processed, prompt slots included.
    tokens: int = 0
    #: Requests waiting for the model right now (load, and a fact tests can synchronise on).
    queue_depth: int = 0


class ScoreResponse(_Model):
    #: (C, N, K) float32: label-word logits per candidate, text and label word (order of label_words).
    logits: Tensor
    usage: Usage
    model: str
    request_id: str | None = None


class ErrorDetail(_Model):
    code: str
    message: str


class ErrorResponse(_Model):
    error: ErrorDetail


#: Error codes a client may act on.
ERROR_UNKNOWN_TENSOR = "unknown_tensor"
ERROR_UNAUTHORIZED = "unauthorized"
ERROR_BAD_REQUEST = "bad_request"
ERROR_TOO_LARGE = "too_large"
ERROR_OVERLOADED = "overloaded"
