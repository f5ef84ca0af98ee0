"""``--quantize int8``: dynamic int8 linear layers keep every prompt path working (the injection hooks sit on
the layer modules, which quantization rewrites inside) and agree with float32 on labels; CUDA is refused."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from bbt_client.protocol import PromptBatch
from server_stub.__main__ import parse_args
from server_stub.engine.int8 import OUTLIER_CHANNELS, Int8Linear, Int8Sibling, quantize_linear_int8
from server_stub.engine.loading import check_precision
from server_stub.engine.model import PromptedLM
from server_stub.testing import run_server

TEXTS = ["a great movie , loved it", "the plot was slow and dull", "terrible", "good actors but a bad film",
         "one of the best films this year", "i wanted my money back", "fine", "an utter mess"]
WORDS = ["great", "bad"]
TEMPLATE = "{text} It was {mask} ."


def _prompt_batches(lm: PromptedLM, seed: int) -> dict[str, PromptBatch]:
    """Prompts large enough (a few embedding stds) that labels depend on them: broken hooks would show."""
    rng = np.random.default_rng(seed)
    D, L, n, C = lm.hidden_size, lm.num_layers, 4, 6
    s = 3 * lm.embedding_std
    base = rng.normal(0, s, (L, n, D)).astype(np.float32)
    return {
        "shallow": PromptBatch("shallow", candidates=rng.normal(0, s, (C, n, D)).astype(np.float32)),
        "deep": PromptBatch("deep", candidates=rng.normal(0, s, (C, L, n, D)).astype(np.float32)),
        "deep-split": PromptBatch("deep", base=base, layer=1, candidates=rng.normal(0, s, (C, n, D)).astype(np.float32)),
        "add": PromptBatch("shallow", candidates=rng.normal(0, s, (C, n, D)).astype(np.float32), mode="add"),
        "deep-add": PromptBatch("deep", candidates=rng.normal(0, s, (C, L, n, D)).astype(np.float32), mode="add"),
    }


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_int8_agrees_with_float32_on_labels_for_every_prompt_path(which, tiny_bert_dir, default_model_dir):
    path = tiny_bert_dir if which == "tiny" else default_model_dir
    torch.manual_seed(0)
    fp32 = PromptedLM(path, device="cpu")
    int8 = PromptedLM(path, device="cpu", quantize="int8")
    assert int8.quantization == "int8" and fp32.quantization is None
    assert int8.answer_layer is not None  # checked in float32 before quantizing, then follows the int8 modules
    dense = int8.layers[0].intermediate.dense
    assert isinstance(dense, Int8Linear) and len(dense._outliers) == min(OUTLIER_CHANNELS, dense.in_features)
    agree, diffs, signal = {}, [], {}
    for kind, batch in _prompt_batches(fp32, seed=3).items():
        a = fp32.score(TEMPLATE, TEXTS, WORDS, batch).logits
        b = int8.score(TEMPLATE, TEXTS, WORDS, batch).logits
        assert a.shape == b.shape == (batch.num_candidates, len(TEXTS), len(WORDS))
        agree[kind] = float((a.argmax(-1) == b.argmax(-1)).mean())
        diffs.append(float(np.abs(a - b).max()))
        signal[kind] = float(np.corrcoef(_candidate_effect(a), _candidate_effect(b))[0, 1])
    assert max(diffs) > 0  # the int8 path really is a different computation
    assert np.mean(list(agree.values())) >= 0.95 and min(agree.values()) >= 0.9, agree
    if which == "tiny":
        # What each candidate prompt changes survives quantization: the hooks act on the int8 model. (On MiniLM
        # int8 noise is as large as these differences -- a finding for tuning, see benchmarks/server_throughput.)
        assert min(v for k, v in signal.items() if k != "deep-split") >= 0.8, signal


def test_int8_linear_rounds_each_token_alone():
    """A row's output does not depend on its batch-mates (the stock per-batch scale made one large candidate
    coarsen every other's), and it stays close to float32 where the stock kernel does not."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(6, 64) * torch.linspace(0.1, 3, 6)[:, None]
    loud = torch.cat([x, 200 * torch.randn(3, 64)])  # a batch-mate with entries ~100x larger
    with torch.no_grad():
        ours, exact = Int8Linear(lin), lin(x)
        lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
        stock = torch.ao.nn.quantized.dynamic.Linear.from_float(lin)
        assert torch.equal(ours(x), ours(loud)[:6])
        assert not torch.allclose(stock(x), stock(loud)[:6], atol=1e-3)
        err = (ours(loud)[:6] - exact).abs().max() / exact.abs().max()
        assert err < 0.02 < (stock(loud)[:6] - exact).abs().max() / exact.abs().max(), err
        const = torch.full((2, 64), 0.7)  # a row with no range: its midpoint carries it all
        assert torch.allclose(ours(const), lin(const), atol=0.02)
        assert ours(x.view(2, 3, 64)).shape == (2, 3, 48)


def test_outlier_channels_found_by_calibration_stay_float32():
    """A channel far louder than the rest in every token (as BERT-style models have) would set each token's
    range; calibration finds it, it bypasses int8, and the rest are rounded on their own range."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    x = torch.randn(6, 64)
    x[:, 5] *= 60
    with torch.no_grad():
        exact, plain = model(x), Int8Linear(model[0])(x)
        assert quantize_linear_int8(model, calibrate=lambda: model(x), outliers=2) == 1
        ours = model[0]
        assert isinstance(ours, Int8Linear) and 5 in ours._outliers.tolist()
        err = (ours(x) - exact).abs().max() / exact.abs().max()
        assert err < ((plain - exact).abs().max() / exact.abs().max()) / 4, err
        assert torch.equal(ours(x), ours(torch.cat([x, 200 * torch.randn(3, 64)]))[:6])  # still batch-independent


def test_int8_linear_leaves_its_input_as_it_was():
    """The outlier channels are zeroed in the input itself for the range and put back (no copy of the input):
    the caller's tensor must come back bit for bit, and a tensor that may not be written (autograd history,
    not contiguous) takes the copying path to the same output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    x = torch.randn(2, 5, 64)
    x[..., [3, 40]] *= 50
    with torch.no_grad():
        quantize_linear_int8(model, calibrate=lambda: model(x), outliers=2)
    lin = model[0]
    before = x.clone()
    with torch.inference_mode():
        y = lin(x)
    assert torch.equal(x, before)
    assert torch.equal(lin(x.detach().requires_grad_()), y)  # grad enabled: never written in place
    wide = torch.zeros(2, 5, 128)
    wide[..., ::2] = x
    with torch.inference_mode():
        assert torch.equal(lin(wide[..., ::2]), y)  # a strided view: copied, not written
        assert torch.equal(wide[..., ::2], before)


class _Attention(torch.nn.Module):
    """Three projections of one input (as BERT's query/key/value) and one of another tensor."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (torch.nn.Linear(32, n) for n in (16, 16, 24, 8))

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x), self.out(x[..., :32] * 2)


def test_linears_reading_one_tensor_share_one_int8_product():
    """Query, key and value read the same tensor: one fused product serves all three, bit for bit what each
    would give alone, in any call order; a member called with another tensor is not handed a kept part."""
    import copy

    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(3, 5, 32)
    x[..., 7] *= 40
    alone = copy.deepcopy(model)
    with torch.no_grad():
        quantize_linear_int8(model, calibrate=lambda: model(x), outliers=2)
    assert all(isinstance(getattr(model, n), Int8Sibling) for n in "qkv") and isinstance(model.out, Int8Linear)
    idx = model.q.shared._outliers
    solo = {n: Int8Linear(getattr(alone, n), idx) for n in "qkv"}
    calls = []
    model.q.shared.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        want = {n: solo[n](x) for n in "qkv"}
        for order in ("qkv", "vkq", "kqv"):
            got = {n: getattr(model, n)(x) for n in order}
            assert all(torch.equal(got[n], want[n]) for n in "qkv"), order
        assert len(calls) == 3  # one product per pass over q, k and v
        other = torch.randn(3, 5, 32)
        assert torch.equal(model.q(x), want["q"])  # keeps k and v of x ...
        assert torch.equal(model.k(other), solo["k"](other))  # ... which another tensor does not get
        assert torch.equal(model.v(other), solo["v"](other))
    y = x.clone()
    with torch.no_grad():  # outside inference mode torch tracks in-place changes: a changed input is recomputed
        first = model.q(y)
        y.mul_(2)
        assert torch.equal(model.k(y), solo["k"](y)) and torch.equal(first, want["q"])


def _candidate_effect(logits: np.ndarray) -> np.ndarray:
    """Each candidate's label margin minus the mean over candidates, per text: what the prompt alone changes."""
    margin = logits[..., 0] - logits[..., 1]
    return (margin - margin.mean(0, keepdims=True)).ravel()


def test_server_reports_int8_in_model_and_health(tiny_bert_dir):
    with run_server(tiny_bert_dir, quantize="int8", threads=1) as url:
        assert httpx.get(url + "/v1/model").json()["quantization"] == "int8"
        assert httpx.get(url + "/v1/health").json()["quantization"] == "int8"
    with run_server(tiny_bert_dir, threads=1) as url:
        info = httpx.get(url + "/v1/model").json()
        assert info["quantization"] is None and info["dtype"] == "float32"


def test_cli_flag_and_refusals(tiny_bert_dir):
    assert parse_args(["--quantize", "int8"]).quantize == "int8"
    assert parse_args([]).quantize is None
    assert parse_args(["--quantize", "int8"]).int8_outliers == OUTLIER_CHANNELS
    assert parse_args(["--quantize", "int8", "--int8-outliers", "0"]).int8_outliers == 0
    for bad in (["--int8-outliers", "4"], ["--quantize", "int8", "--int8-outliers", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    plain = PromptedLM(tiny_bert_dir, device="cpu", quantize="int8", int8_outliers=0)
    assert len(plain.layers[0].intermediate.dense._outliers) == 0  # last round's form: every channel rounded
    with pytest.raises(ValueError, match="CPU only"):
        check_precision(torch.device("cuda"), "float32", "int8")
    with pytest.raises(ValueError, match="float16 is for CUDA"):
        check_precision(torch.device("cpu"), "float16", None)
    with pytest.raises(ValueError, match="quantizes float32"):
        check_precision(torch.device("cpu"), "bfloat16", "int8")
    check_precision(torch.device("cpu"), "bfloat16", None)  # allowed, only slower here
    check_precision(torch.device("cuda"), "float16", None)
