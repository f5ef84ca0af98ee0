"""How far can *any* prompt take the default model? White-box prompt tuning as a ceiling for the black-box methods.

    python benchmarks/whitebox_ceiling.py [--tasks sst2,agnews] [--steps 60] [--test-limit 1000]

Runs the same model, template, label words and few-shot split as the tuning jobs (16-shot, seed 42), but
with full gradients: Adam directly on a free (n, D) shallow prompt through a local copy of the model
(:class:`bbt_client.methods.gdfo.student.Student` with all layers = the server's default model, tied head). If even this
stays at chance on a task, the mask-slot readout of the model carries no signal for it and no black-box
method can be expected to beat zero-shot there. A second check, independent of the label words: a
logistic-regression probe fitted on the same few-shot examples' mask-slot hidden states -- if it stays near
chance too, the signal is not at the mask slot at all. Last line: one JSON object per task with the
zero-shot (initial prompt), trained-prompt train and test accuracy, and the probe's test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from bbt_client.config import TaskConfig
from bbt_client.methods.gdfo.student import STUDENT_MINILM, Student, require_torch
from bbt_client.tasks.datasets import load_task_data


def _accuracy(student, prompt, enc_chunks, label_ids, labels) -> float:
    torch = require_torch()
    with torch.no_grad():
        pred = torch.cat([student.label_logits(prompt[None], enc, label_ids)[0].argmax(-1) for enc in enc_chunks])
    return float((pred.numpy() == labels).mean())


def linear_probe(student, prompt, enc_train, test_chunks, ytrain, ytest, l2: float = 1e-2, steps: int = 200) -> float:
    """Test accuracy of an L2-regularised softmax regression on the mask-slot hidden states."""
    torch = require_torch()
    with torch.no_grad():
        xtr = student.mask_states(prompt[None], enc_train)[0]
        xte = torch.cat([student.mask_states(prompt[None], enc)[0] for enc in test_chunks])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    k = int(ytrain.max()) + 1
    w = torch.zeros(xtr.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytrain) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(-1).numpy() == ytest).mean())


def ceiling(task_name: str, steps: int, prompt_tokens: int, test_limit: int | None, lr: float,
            patience: int | None = None) -> dict:
    """``patience``: stop once the training loss has not fallen by 0.1% in that many steps (convergence)."""
    torch = require_torch()
    torch.manual_seed(0)
    data = load_task_data(TaskConfig(name=task_name, shots=16, test_limit=test_limit), seed=42)
    student = Student(STUDENT_MINILM, num_layers=None, trainable="bitfit")  # the server's default model
    for p in student.model.parameters():
        p.requires_grad_(False)
    label_ids = student.label_ids(data.task.label_words)
    enc_train = student.encode(data.task.template, data.train.texts, prompt_tokens)
    test_chunks = [student.encode(data.task.template, data.test.texts[i:i + 64], prompt_tokens)
                   for i in range(0, len(data.test.texts), 64)]
    ytrain = torch.tensor(np.asarray(data.train.labels))
    rng = np.random.default_rng(42)
    init = rng.standard_normal((prompt_tokens, student.hidden_size)).astype(np.float32) * student.embedding_std
    prompt = torch.tensor(init, requires_grad=True)
    before = _accuracy(student, prompt.detach(), test_chunks, label_ids, data.test.labels)
    probe = linear_probe(student, prompt.detach(), enc_train, test_chunks, ytrain, np.asarray(data.test.labels))
    opt = torch.optim.Adam([prompt], lr=lr)
    t0 = time.perf_counter()
    best, since = float("inf"), 0
    for step in range(steps):
        loss = torch.nn.functional.cross_entropy(student.label_logits(prompt[None], enc_train, label_ids)[0], ytrain)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        since = 0 if value < best * 0.999 else since + 1
        best = min(best, value)
        if patience is not None and since >= patience:
            break
    train_acc = _accuracy(student, prompt.detach(), [enc_train], label_ids, data.train.labels)
    after = _accuracy(student, prompt.detach(), test_chunks, label_ids, data.test.labels)
    row = {"task": task_name, "test_examples": len(data.test.labels), "steps": step + 1,
           "initial_prompt_test_accuracy": round(before, 4), "final_train_loss": round(float(loss.detach()), 4),
           "trained_train_accuracy": round(train_acc, 4), "trained_test_accuracy": round(after, 4),
           "linear_probe_test_accuracy": round(probe, 4),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{task_name}: initial prompt {before:.3f} -> white-box tuned {after:.3f} test "
          f"(train acc {train_acc:.3f}, loss {float(loss.detach()):.3f}, {row['seconds']} s); "
          f"linear probe on the mask state {probe:.3f}", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sst2,agnews")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prompt-tokens", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--test-limit", type=int, default=1000)
    args = ap.parse_args(argv)
    rows = [ceiling(t, args.steps, args.prompt_tokens, args.test_limit, args.lr) for t in args.tasks.split(",")]
    print(json.dumps({r["task"]: r for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
