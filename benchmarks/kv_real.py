"""Presses on real pretrained weights: RULER-style synthetic tasks on internvl-smollm2 (SmolLM2-135M-Instruct's
weights as InternVL's language model), text only — accuracy and peak KV of every press at kvpress's compression
ratios 0.25 / 0.5 / 0.75.

    mmreason models build internvl-smollm2 /tmp/ivs-bench                 # once, offline (~50 s)
    python benchmarks/kv_real.py --checkpoint /tmp/ivs-bench              # ~1k-token prompts, 50 rows per task
    python benchmarks/kv_real.py --checkpoint CKPT --context 4096 --rows 100 --gpu --threads 8   # longer, on a GPU

Tasks, generated here from a seed, with RULER's templates, answer prefixes and scoring (Hsieh et al. 2024,
arXiv 2404.06654; NVIDIA/RULER scripts/data/synthetic):

- `niah_single` (RULER's niah_single_1): "One of the special magic numbers for {key} is: {value}." (key an
  adjective-noun word, value 7 digits) once in a haystack of "The grass is green. The sky is blue. ..." lines.
- `niah_multikey` (niah_multikey_1's shape: `--keys` needles with different keys, one asked for; RULER draws
  that task's haystack from Paul Graham's essays, which are not here offline, so it is the same repeated
  lines).
- `vt` (variable_tracking): one chain of `--hops` assignments "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ",
  ... between noise lines; the question asks for every variable that holds the value; a short solved
  example of the task goes first (RULER's in-context example, its names randomised).

The haystack is grown until the prompt (chat template, context, question, answer prefix) reaches `--context`
tokens. A reply scores the fraction of the expected values it contains, case-insensitively (RULER's
`string_match_all`); accuracy is the mean.

kvpress's benchmark shape (its pipeline and RULER dataset): the prompt is split before the question; the
context (chat template's user header + task text) is prefilled and compressed by the press, then the question
(+ end of turn, assistant header, RULER's answer prefix) is fed on the compressed cache and the answer decoded
greedily. (Our `KvpressPress` compresses a generation's first forward; in `jobs.evaluate` that forward is the
whole prompt, question included — here it is the context alone, as in kvpress.) kvpress presses and CoSRe
act on the context only; our TOVA keeps `1 − ratio` of the tokens seen at every step, question and answer
included. Each batch of contexts is prefilled once under `PromptRecorder` and every press replayed on it
(`Session.replay_prompt`: the same caches as a prefill under the press; 22 prefills become one). Peak KV is
`KVMeter`'s, as in benchmarks/kv_presses.py: the cache's high-water mark over the full cache at the end.

DARE needs a router fitted on this model (the dare stage's knockout fit); `--dare-trial` times that fit on
one short row and extrapolates it to this benchmark's rows (see the README for why it is not in the grid).
Writes benchmarks/results/kv_real.json, kv_real.png (accuracy vs compression per press, a panel per task)
and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import string
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from kv_presses import KVPRESS  # noqa: E402

from mmreason.hardware import local_device, torch_dtype  # noqa: E402
from mmreason.kv import KVMeter, make_press  # noqa: E402
from mmreason.kv.base import PromptRecorder  # noqa: E402
from mmreason.latent.coconut import GenerationSettings, decode  # noqa: E402
from mmreason.models.base import position_ids  # noqa: E402

TASKS = ("niah_single", "niah_multikey", "vt")
COMPRESSIONS = (0.25, 0.5, 0.75)
MAX_NEW_TOKENS = {"niah_single": 16, "niah_multikey": 16, "vt": 30}
"""A 7-digit value is ~9 tokens with its period; RULER gives variable tracking 30 tokens (it gives NIAH 128,
but a reply that goes on after the value scores the same)."""

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_TEMPLATE = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz "
                 "you about the number afterwards.\n{context}\n")
NIAH_QUESTION = "What is the special magic number for {query} mentioned in the provided text?"
NIAH_PREFIX = " The special magic number for {query} mentioned in the provided text is"
VT_TEMPLATE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {query}, they are: ")
"""RULER's templates (scripts/data/synthetic/constants.py; NIAH's in its one-needle, one-value wording); the
context part ends where RULER's question starts, which is where kvpress's RULER dataset splits it."""

ADJECTIVES = ("ancient", "bitter", "brave", "bright", "calm", "clever", "crooked", "curious", "damp", "eager",
              "elegant", "fancy", "fierce", "gentle", "giant", "glossy", "grumpy", "hollow", "humble", "icy",
              "jolly", "lively", "lonely", "lucky", "mighty", "modern", "narrow", "nervous", "noisy", "polite",
              "proud", "quiet", "rapid", "rusty", "shiny", "silent", "sleepy", "smooth", "sour", "steep", "sticky",
              "swift", "tender", "thirsty", "tiny", "wild", "windy", "wooden", "young", "zealous")
NOUNS = ("anchor", "badge", "basket", "beacon", "bicycle", "blanket", "bottle", "bridge", "button", "camera",
         "candle", "canyon", "castle", "cloud", "compass", "cottage", "crystal", "dragon", "engine", "feather",
         "forest", "garden", "guitar", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder",
         "lantern", "meadow", "mirror", "needle", "ocean", "orchard", "pencil", "pillow", "planet", "pocket",
         "river", "saddle", "shovel", "tunnel", "violin", "wagon", "window", "walnut", "tractor", "trumpet")
"""Keys are adjective-noun words, as RULER's (which come from the wonderwords lists)."""


# --- the tasks ------------------------------------------------------------------------------------
def niah(rng: random.Random, n_haystack: int, n_keys: int = 1) -> dict[str, Any]:
    """RULER's NIAH with the repeated-lines haystack: `n_keys` needles (distinct keys, 7-digit values) at random
    lines among `n_haystack` noise lines; the question asks for one key's value."""
    keys: list[str] = []
    while len(keys) < n_keys:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in keys:
            keys.append(key)
    values = [str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in keys]
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    rng.shuffle(needles)
    lines = [NOISE] * n_haystack
    for at, needle in zip(sorted(rng.sample(range(n_haystack), len(needles)), reverse=True), needles):
        lines.insert(at, needle)
    asked = rng.randrange(n_keys)
    return {"context": NIAH_TEMPLATE.format(context="\n".join(lines)),
            "question": NIAH_QUESTION.format(query=keys[asked]), "answer_prefix": NIAH_PREFIX.format(query=keys[asked]),
            "outputs": [values[asked]]}


def _chain(rng: random.Random, hops: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"] + [f"VAR {names[j + 1]} = VAR {names[j]} "
                                                                for j in range(hops)]
    return names, chain


def _vt_text(rng: random.Random, n_noise: int, hops: int) -> tuple[str, str, list[str]]:
    """RULER's variable-tracking context (noise lines with one chain inserted in order), value, variables."""
    names, chain = _chain(rng, hops)
    lines = [NOISE + "\n"] * n_noise
    for j, at in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
        lines.insert(at + j, chain[j])
    context = " ".join(lines).replace(". \n", ".\n")
    return context, chain[0].split("=")[-1].strip(), names


def variable_tracking(rng: random.Random, n_noise: int, hops: int = 4, icl: bool = True) -> dict[str, Any]:
    """RULER's variable tracking (one chain of `hops` assignments in `n_noise` noise lines), after one solved
    example of it with a short noise (`icl`)."""
    example = ""
    if icl:
        text, value, names = _vt_text(rng, hops + 1, hops)
        example = (VT_TEMPLATE.format(context=text) + VT_QUESTION.format(query=value)
                   + VT_PREFIX.format(n=hops + 1, query=value) + " ".join(names) + "\n\n")
    text, value, names = _vt_text(rng, n_noise, hops)
    return {"context": example + VT_TEMPLATE.format(context=text), "question": VT_QUESTION.format(query=value),
            "answer_prefix": VT_PREFIX.format(n=hops + 1, query=value), "outputs": names}


def make_row(task: str, rng: random.Random, size: int, keys: int, hops: int) -> dict[str, Any]:
    """One row of `task` with `size` haystack / noise lines."""
    if task == "niah_single":
        row = niah(rng, size, 1)
    elif task == "niah_multikey":
        row = niah(rng, size, keys)
    elif task == "vt":
        row = variable_tracking(rng, size, hops)
    else:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return {"task": task, **row}


def split_prompt(family: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(context ids, question ids) as kvpress's pipeline makes them: the chat template around the context, cut
    where the question goes; the question gets the rest of the template (end of turn, assistant header) and
    the answer prefix."""
    cut = "#" * (len(row["context"]) + 10)  # kvpress's separator: a string the text cannot hold
    text = family.prompt_text(row["context"] + cut)
    if cut not in text:
        raise ValueError("split_prompt: the chat template changed the context")
    context, suffix = text.split(cut)
    tokenize = lambda s: family.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [] if family.chat_template is not None else [family.tokenizer.bos_token_id]
    return bos + tokenize(context), tokenize(row["question"] + suffix + row["answer_prefix"])


def make_rows(family: Any, task: str, n: int, context: int, seed: int, keys: int = 4,
              hops: int = 4) -> list[dict[str, Any]]:
    """`n` rows of `task` whose prompts fill up to `context` tokens: the haystack size is grown on a probe row
    (RULER's search), then each row is cut back a line at a time if its own prompt is longer."""
    def length(row: dict[str, Any]) -> int:
        c, q = split_prompt(family, row)
        return len(c) + len(q)

    floor = keys + 1 if task == "niah_multikey" else (hops + 2 if task == "vt" else 2)
    probe, size = random.Random(f"{seed}-probe"), floor
    smallest = length(make_row(task, random.Random(probe.random()), floor, keys, hops))
    if smallest > context:
        raise SystemExit(f"--context {context}: too short for {task}, whose smallest prompt is {smallest} tokens")
    step = 16
    while step:  # grow by 16 lines, then 4, then 1
        while length(make_row(task, random.Random(probe.random()), size + step, keys, hops)) <= context:
            size += step
        step //= 4
    rows = []
    for i in range(n):
        row_seed = f"{seed}-{task}-{i}"
        lines = size
        row = make_row(task, random.Random(row_seed), lines, keys, hops)
        while length(row) > context:
            if lines == floor:
                raise SystemExit(f"--context {context}: too short for {task} row {i}")
            lines -= 1
            row = make_row(task, random.Random(row_seed), lines, keys, hops)
        row["index"], row["lines"] = i, lines
        rows.append(row)
    return rows


def string_match_all(reply: str, outputs: list[str]) -> float:
    """RULER's score of one reply: the fraction of expected values it contains, case-insensitively."""
    reply = reply.strip().lower()
    return sum(o.lower() in reply for o in outputs) / len(outputs)


# --- the presses ----------------------------------------------------------------------------------
def settings_grid(compressions: tuple[float, ...] = COMPRESSIONS) -> list[dict[str, Any]]:
    """No press, then per compression ratio r: our TOVA (keeps 1 − r of the tokens seen) and CoSRe on text
    (8 shared slots + 1 − r of the text as residual entries), and the kvpress baselines at ratio r."""
    out: list[dict[str, Any]] = [{"press": "none", "compression": 0.0, "settings": {}}]
    for r in compressions:
        kept = round(1 - r, 4)
        out.append({"press": "tova", "compression": r, "settings": {"factor": kept}})
        out.append({"press": "cosre", "compression": r, "settings": {"slots": 8, "residual_text": kept}})
        out += [{"press": f"kvpress:{m}", "compression": r, "settings": {"compression_ratio": r}} for m in KVPRESS]
    return out


def collate(family: Any, prompts: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded context ids and their mask, on the model's device."""
    width = max(len(c) for c, _ in prompts)
    pad = family.tokenizer.pad_token_id
    ids = [[pad] * (width - len(c)) + c for c, _ in prompts]
    mask = [[0] * (width - len(c)) + [1] * len(c) for c, _ in prompts]
    dev = family.model.device
    return torch.tensor(ids, device=dev), torch.tensor(mask, device=dev)


@torch.no_grad()
def answer(family: Any, cache: Any, context_mask: torch.Tensor, questions: list[list[int]],
           max_new_tokens: int) -> list[list[int]]:
    """kvpress's `generate_answer`, for a batch: the questions (left-padded) on the context's cache, then
    greedy decoding (`coconut.decode`) up to eos; the generated ids per row."""
    width = max(len(q) for q in questions)
    pad = family.tokenizer.pad_token_id
    dev = family.model.device
    ids = torch.tensor([[pad] * (width - len(q)) + q for q in questions], device=dev)
    q_mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in questions], device=dev)
    mask = torch.cat([context_mask, q_mask], dim=1)
    pos = position_ids(mask)[:, -width:]
    out = family.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
    return decode(family, out.logits[:, -1], cache, mask, pos[:, -1:] + 1, GenerationSettings(max_new_tokens))


def run_task(family: Any, rows: list[dict[str, Any]], settings: list[dict[str, Any]], batch_size: int,
             log=print) -> dict[str, Any]:
    """Every setting on every row: per batch, one prefill of the contexts under `PromptRecorder`, then per
    setting the press replayed on it, the questions and the answers, metered. Returns per setting the
    scores, replies, `KVMeter` records and seconds, and the prefill seconds."""
    model = family.model
    out = {"prefill_seconds": 0.0, "by_setting": [{"scores": [], "replies": [], "records": [], "seconds": 0.0}
                                                  for _ in settings]}
    presses = [make_press(s["press"], s["settings"]) for s in settings]  # bad settings fail before any forward
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [split_prompt(family, r) for r in chunk]
        ids, mask = collate(family, prompts)
        t0 = time.perf_counter()
        with torch.no_grad(), PromptRecorder()(family) as recorded:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                  logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        out["prefill_seconds"] += prefill_s
        for setting, press, acc in zip(settings, presses, out["by_setting"]):
            t0 = time.perf_counter()
            with press(family) if press is not None else nullcontext() as session:
                if session is not None:
                    session.replay_prompt(recorded)
                    cache = session.cache
                else:
                    cache = copy.deepcopy(recorded.cache)
                with KVMeter(model, session) as meter:
                    meter.prompt_done(cache, ids.shape[1], prefill_s + time.perf_counter() - t0)
                    replies = answer(family, cache, mask, [q for _, q in prompts], MAX_NEW_TOKENS[chunk[0]["task"]])
            texts = [family.tokenizer.decode(r, skip_special_tokens=True) for r in replies]
            acc["scores"] += [string_match_all(t, r["outputs"]) for t, r in zip(texts, chunk)]
            acc["replies"] += texts
            acc["records"] += meter.records
            acc["seconds"] += time.perf_counter() - t0
        done = min(start + batch_size, len(rows))
        log(f"  {chunk[0]['task']}: {done}/{len(rows)} rows, prefill {prefill_s:.1f}s, "
            f"{sum(a['seconds'] for a in out['by_setting']):.0f}s in presses so far", flush=True)
    return out


def summarise(task: str, settings: list[dict[str, Any]], measured: dict[str, Any], model: Any) -> list[dict[str, Any]]:
    """One result row per setting: accuracy, n, and `KVMeter.summary`'s fractions."""
    rows = []
    for setting, acc in zip(settings, measured["by_setting"]):
        meter = KVMeter(model)
        meter.records = acc["records"]
        kv = meter.summary()
        n = len(acc["scores"])
        rows.append({"task": task, "press": setting["press"], "compression": setting["compression"],
                     "settings": setting["settings"], "n": n, "accuracy": sum(acc["scores"]) / n,
                     "kv_fraction_peak": kv["kv_fraction_peak"], "kv_fraction_prefill": kv["kv_fraction_prefill"],
                     "seconds": acc["seconds"], "replies": acc["replies"][:3]})
    return rows


# --- DARE's router fit, timed --------------------------------------------------------------------
def dare_trial(family: Any, task: str, context: int, seed: int, full_context_row_seconds: float | None,
               full_context_tokens: int | None) -> dict[str, Any]:
    """The dare stage's knockout fit (`fit_router_by_knockout`: per token, the answer's loss with it evicted —
    ~one forward of the row per token — then the router fitted) on one row of `task` cut to `context` tokens,
    timed; extrapolated to the benchmark's rows as measured-tokens × one row's forward time there."""
    from mmreason.kv import DareRouter
    from mmreason.train.stages.dare import DareStageConfig, fit_router_by_knockout

    row = make_rows(family, task, 1, context, seed)[0]
    c, q = split_prompt(family, row)
    enc_row = {"id": "trial", "prompt": row["context"] + row["question"], "steps": [],
               "answer": " ".join(row["outputs"]), "images": []}
    cfg = DareStageConfig(rho_text=0.5, rho_vis=1.0, layer=0, window=8, router_context=3, masks="decode",
                          backbone="full", router_fit="knockout", fit_rows=1, fit_epochs=200)
    router = DareRouter(family.model.config.get_text_config().hidden_size, cfg.router_width, cfg.router_context)
    t0 = time.perf_counter()
    metrics = fit_router_by_knockout(family, router, [enc_row], cfg)
    seconds = time.perf_counter() - t0
    tokens = len(family.encode(enc_row).input_ids)
    out = {"task": task, "tokens": tokens, "prompt_tokens": len(c) + len(q), "seconds": seconds,
           "measure_seconds": metrics["dare_fit_measure_s"], "fit_rows_default": DareStageConfig.fit_rows}
    if full_context_row_seconds and full_context_tokens:
        per_row = full_context_tokens * full_context_row_seconds
        out.update({"extrapolated_row_seconds": per_row, "extrapolated_tokens": full_context_tokens,
                    "extrapolated_fit_hours": per_row * DareStageConfig.fit_rows / 3600})
    return out


# --- report ----------------------------------------------------------------------------------------
def label(press: str) -> str:
    """A press's name in the table and the plot."""
    ours = {"none": "no press", "tova": "TOVA (ours)", "cosre": "CoSRe (ours, text)"}
    return ours.get(press, press.replace("kvpress:", "kvpress "))


def table(results: list[dict[str, Any]], tasks: list[str]) -> str:
    """Accuracy (peak KV fraction) per press × compression, a column per task."""
    order = list(dict.fromkeys(r["press"] for r in results))
    keys = sorted({(r["press"], r["compression"]) for r in results}, key=lambda k: (k[1], order.index(k[0])))
    by = {(r["task"], r["press"], r["compression"]): r for r in results}
    head = ["press", "ratio", *tasks, "mean"]
    lines = []
    for press, ratio in keys:
        cells = [by.get((t, press, ratio)) for t in tasks]
        accs = [c["accuracy"] for c in cells if c]
        lines.append([label(press), f"{ratio:.2f}"] +
                     [f"{c['accuracy']:.3f} ({c['kv_fraction_peak']:.2f})" if c else "-" for c in cells] +
                     [f"{sum(accs) / len(accs):.3f}" if accs else "-"])
    width = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, width)))

    return "\n".join([fmt(head)] + [fmt(line) for line in lines])


def plot(results: list[dict[str, Any]], tasks: list[str], png: Path, title: str) -> None:
    """Accuracy vs compression ratio, a line per press (no press at ratio 0 starts every line), a panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.2), squeeze=False)
    presses = [p for p in dict.fromkeys(r["press"] for r in results) if p != "none"]
    for ax, task in zip(axes[0], tasks):
        base = next((r for r in results if r["task"] == task and r["press"] == "none"), None)
        for press in presses:
            pts = sorted((r["compression"], r["accuracy"]) for r in results
                         if r["task"] == task and r["press"] == press)
            if base:
                pts = [(0.0, base["accuracy"])] + pts
            ours = not press.startswith("kvpress:")
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", lw=2 if ours else 1,
                    ls="-" if ours else "--", label=label(press))
        ax.set_title(task)
        ax.set_xlabel("compression ratio (fraction of the context's KV removed)")
        ax.set_ylabel("accuracy (string match)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    from mmreason.models import load_backbone

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/ivs-bench",
                        help="an internvl-smollm2 checkpoint (`mmreason models build internvl-smollm2 DIR`)")
    parser.add_argument("--backbone", default="internvl-smollm2")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--rows", type=int, default=50, help="rows per task")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens per row (context + question)")
    parser.add_argument("--keys", type=int, default=4, help="niah_multikey: needles (one asked for)")
    parser.add_argument("--hops", type=int, default=4, help="vt: assignments in the chain")
    parser.add_argument("--compressions", default="0.25,0.5,0.75")
    parser.add_argument("--batch-size", type=int, default=25, help="rows prefilled and decoded together")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a 2-core machine shared with other jobs, two threads spin-wait "
                             "on each other and ran 2-5x slower)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dare-trial", action="store_true",
                        help="time DARE's knockout router fit on one row of --dare-trial-context tokens")
    parser.add_argument("--dare-trial-context", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/kv_real.json"))
    args = parser.parse_args()

    wall0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    family = load_backbone(args.backbone, args.checkpoint, dtype=torch_dtype(args.precision))
    family.model.to(local_device(args.gpu)).eval()
    tasks = [t for t in args.tasks.split(",") if t]
    settings = settings_grid(tuple(float(c) for c in args.compressions.split(",")))
    results, timings, lengths = [], {}, {}
    for task in tasks:
        t0 = time.perf_counter()
        rows = make_rows(family, task, args.rows, args.context, args.seed, args.keys, args.hops)
        for row in rows:  # the generator's own check: every expected value is in the context
            assert all(o in row["context"] for o in row["outputs"]), row
        prompt_tokens = [sum(map(len, split_prompt(family, r))) for r in rows]
        lengths[task] = {"min": min(prompt_tokens), "max": max(prompt_tokens),
                         "mean": sum(prompt_tokens) / len(prompt_tokens), "lines": rows[0]["lines"]}
        print(f"{task}: {len(rows)} rows, prompts {lengths[task]['min']}-{lengths[task]['max']} tokens", flush=True)
        measured = run_task(family, rows, settings, args.batch_size)
        task_rows = summarise(task, settings, measured, family.model)
        results += task_rows
        timings[task] = {"seconds": time.perf_counter() - t0, "prefill_seconds": measured["prefill_seconds"],
                         "press_seconds": {f"{r['press']} {r['compression']}": r["seconds"] for r in task_rows}}
        for r in task_rows:
            print(f"  {label(r['press']):<28} ratio {r['compression']:.2f}  accuracy {r['accuracy']:.3f}  "
                  f"kv_fraction_peak {r['kv_fraction_peak']:.3f}  {r['seconds']:.0f}s", flush=True)

    dare: dict[str, Any] = {"ran": False, "reason": "not timed (run with --dare-trial)"}
    if args.dare_trial:
        per_row = timings[tasks[0]]["prefill_seconds"] / args.rows if tasks else None
        dare = {"ran": False, "trial": dare_trial(family, tasks[0] if tasks else "niah_single",
                                                  args.dare_trial_context, args.seed, per_row,
                                                  round(lengths[tasks[0]]["mean"]) if tasks else None)}
        print(f"DARE knockout fit, trial: {json.dumps(dare['trial'])}", flush=True)

    wall = time.perf_counter() - wall0
    print()
    print(table(results, tasks))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, tasks, out.with_suffix(".png"),
         f"{args.backbone}, text only: RULER-style tasks, ~{args.context}-token prompts, {args.rows} rows per task")
    report = {"backbone": args.backbone, "checkpoint": args.checkpoint,
              "settings": {"tasks": tasks, "rows": args.rows, "context": args.context, "keys": args.keys,
                           "hops": args.hops, "compressions": args.compressions, "batch_size": args.batch_size,
                           "threads": args.threads, "device": str(family.model.device), "precision": args.precision,
                           "seed": args.seed, "max_new_tokens": {t: MAX_NEW_TOKENS[t] for t in tasks},
                           "prompt_tokens": lengths, "machine": platform.machine()},
              "command": " ".join(["python", "benchmarks/kv_real.py", *sys.argv[1:]]),
              "wall_seconds": wall, "timings": timings, "dare": dare,
              "results": [{k: v for k, v in r.items() if k != "seconds"} for r in results]}
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwall {wall:.0f}s; wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
