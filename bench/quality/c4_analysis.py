"""Why C4 (and C5) are hard on unseen templates: two measurements outside the training code.

``ceiling``  The bridging rule applied by a plain number-matching reader to what each input
             composition shows (no model): a step's operands are the numbers written in its text
             other than its own results, known numbers those of the composition's context. A crude
             reader (word numbers such as "third" count as 1/3), so a gauge of what each
             composition carries, not a bound. Then the same kind of reader for C5 on the seed's
             input: DEPENDS when a number written before step_j's last "=" equals one after
             step_i's last "=". Needs no backbone; seconds.
``probe``    Frozen features of ``--inputs`` (default ``problem,earlier_steps,step_j``) from
             ``--backbone`` (default MiniLM) and a standardised logistic regression (scikit-learn,
             balanced weights) on the training templates, scored on the test templates: mean over
             every token (what ``pooling=mean`` trains on), mean over the last field's (step_j's)
             tokens only, and the last token (``pooling=last``). ``--task c5`` probes the DEPENDS
             label instead; ``--layer N`` reads block N's output instead of the last block's
             (0: the token embeddings, before any block). A few minutes for MiniLM on 2 cores,
             about ten for SmolLM2 at ``--instances 8``.

    python bench/quality/c4_analysis.py ceiling --seed 0
    python bench/quality/c4_analysis.py probe --seed 0 --numbers symbols
    python bench/quality/c4_analysis.py probe --seed 0 --numbers keep --inputs step_i,step_j --layer 0
    python bench/quality/c4_analysis.py probe --seed 0 --numbers keep --backbone smollm2 --instances 8
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]
from bench.quality.data import c4_records, c5_records, group_split, gsm_instances  # noqa: E402
from mycelium.data.structural import implicit_operands, numbers_in_text, parse_solution  # noqa: E402

COMPOSITIONS = ("step_i,step_j", "problem,step_i,step_j", "problem,earlier_steps,step_j")
RECORDS = {"c4": c4_records, "c5": c5_records}  # the probe's --task: its records


def _near(x: Fraction, known: set[Fraction]) -> bool:
    # GSM solutions reuse rounded results (0.0909 for 1/11): match to 1e-3 relative.
    return any(abs(float(x) - float(k)) <= 1e-3 * max(1.0, abs(float(k))) for k in known)


def ceiling(seed: int, instances: int) -> None:
    counts = {c: [0, 0, 0] for c in COMPOSITIONS}  # tp, fp, fn
    gsm, _ = gsm_instances(instances, seed)
    for inst in gsm:
        steps = parse_solution(inst.solution)
        label = [bool(m) for m in implicit_operands(inst.question, inst.solution)]
        problem = set(numbers_in_text(inst.question))
        seen: list[set[Fraction]] = []  # per earlier step: the numbers a reader sees, results included
        for j, step in enumerate(steps):
            ops = {x for x in numbers_in_text(step.text) if not _near(x, set(step.values))}
            before = set().union(*seen) if seen else set()
            context = {"step_i,step_j": seen[-1] if seen else set(),
                       "problem,step_i,step_j": problem | (seen[-1] if seen else set()),
                       "problem,earlier_steps,step_j": problem | before}
            for comp, known in context.items():
                pred = any(not _near(x, known) for x in ops)
                c = counts[comp]
                c[0] += pred and label[j]
                c[1] += pred and not label[j]
                c[2] += label[j] and not pred
            seen.append(set(numbers_in_text(step.text)) | set(step.values))
    print(f"visible-number bridging rule, all splits, data seed {seed}, {instances} instances per template:")
    for comp, (tp, fp, fn) in counts.items():
        print(f"  {comp:<32} BRIDGING F1 {2 * tp / (2 * tp + fp + fn):.3f}  (tp {tp}, fp {fp}, fn {fn})")
    tp = fp = fn = 0
    for r in c5_records(gsm, group_split((i.group for i in gsm), seed)):
        result = numbers_in_text(r["step_i"].rsplit("=", 1)[-1]) if "=" in r["step_i"] else frozenset()
        operands = numbers_in_text(r["step_j"].rsplit("=", 1)[0])
        pred, label = bool(result & operands), r["label"] == "DEPENDS"
        tp, fp, fn = tp + (pred and label), fp + (pred and not label), fn + (label and not pred)
    print(f"C5 reader on step_i,step_j (a number before step_j's last '=' equals one after step_i's):\n"
          f"  {'step_i,step_j':<32} DEPENDS F1 {2 * tp / (2 * tp + fp + fn):.3f}  (tp {tp}, fp {fp}, fn {fn})")


def probe(seed: int, instances: int, numbers: str, inputs: str, backbone: str, task: str = "c4",
          layer: int | None = None) -> None:
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mycelium.model.backbone import load_backbone
    from mycelium.model.blocks import last_positions, pool
    from mycelium.tasks import get_task
    from mycelium.text import encode_rows, number_symbols, pad_batch

    gsm, _ = gsm_instances(instances, seed)
    records = RECORDS[task](gsm, group_split((i.group for i in gsm), seed))
    positive = get_task(task).minority_label
    fields = tuple(inputs.split(","))
    model, tok, _ = load_backbone(backbone)
    model.eval()
    rows = [tuple(r[f] for f in fields) for r in records]
    ids = encode_rows(tok, rows, fields, " [SEP] ", 256, context_fields=fields[:2], numbers=numbers)
    # The last field is never cut and ends every sequence: its tokens are the tail (the one
    # trailing special token of encoders, [SEP], is left out).
    tail = [len(tok((number_symbols(row) if numbers == "symbols" else row)[-1], add_special_tokens=False)["input_ids"])
            for row in rows]
    trailing = int(ids[0][-1] == tok.sep_token_id) if tok.sep_token_id is not None else 0
    size = model.config.hidden_size
    every, last, final = (np.zeros((len(ids), size)) for _ in range(3))
    order = np.argsort([len(s) for s in ids])
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            batch = order[start : start + 32]
            x, mask = pad_batch([ids[r] for r in batch], tok.pad_token_id)
            out = model(input_ids=x, attention_mask=mask, output_hidden_states=layer is not None)
            hidden = (out.last_hidden_state if layer is None else out.hidden_states[layer]).float()
            every[batch] = pool(hidden, mask, "mean").numpy()
            final[batch] = pool(hidden, mask, "last").numpy()
            ends = last_positions(mask) + 1 - trailing
            for k, r in enumerate(batch):
                end = int(ends[k])
                last[r] = hidden[k, max(0, end - tail[r]) : end].mean(0).numpy()
    y = np.array([r["label"] == positive for r in records])
    split = np.array([r["split"] for r in records])
    print(f"{task}: frozen {backbone} {'last block' if layer is None else f'layer {layer}'}, {','.join(fields)}, "
          f"numbers={numbers}, data seed {seed}, {instances} instances; logistic regression, test templates:")
    for name, feats in (("mean over every token", every), (f"mean over {fields[-1]}'s tokens", last),
                        ("last token", final)):
        # Standardised: decoder hidden states carry a few huge dimensions that swamp an unscaled fit.
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000))
        clf.fit(feats[split == "train"], y[split == "train"])
        pred = clf.predict(feats)
        print(f"  {name:<28} test {positive} F1 {f1_score(y[split == 'test'], pred[split == 'test']):.3f}"
              f"  (val {f1_score(y[split == 'val'], pred[split == 'val']):.3f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("ceiling", "probe"))
    p.add_argument("--seed", type=int, default=0, help="data seed (templates per split), as bench/quality/run.py")
    p.add_argument("--instances", type=int, default=30, help="instances per GSM template and version")
    p.add_argument("--numbers", default="symbols", choices=("keep", "symbols"), help="probe: number mapping")
    p.add_argument("--inputs", default=COMPOSITIONS[-1], help="probe: the record fields read, in order")
    p.add_argument("--backbone", default="minilm", help="probe: backbone alias, hub id or folder")
    p.add_argument("--task", default="c4", choices=tuple(RECORDS), help="probe: the label probed")
    p.add_argument("--layer", type=int, default=None,
                   help="probe: read this block's output (0: token embeddings; default: the last block)")
    args = p.parse_args()
    if args.what == "ceiling":
        ceiling(args.seed, args.instances)
    else:
        probe(args.seed, args.instances, args.numbers, args.inputs, args.backbone, args.task, args.layer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
