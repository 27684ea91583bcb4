"""Mixed precision under a size budget against uniform widths: accuracy vs weight bytes.

For each shipped model (models/, the zoo's MobileNetV2 included) and method: uniform 8/4/3/2/1 bits, then `--size-budget` at five
budgets between them (the midpoints of consecutive uniform sizes, about 6, 3.5, 2.5 and 1.5 bits on
average, and about 2.25 bits), bit choices 8,4,3,2,1, per channel. Bytes are the quantized layers' codes and scales (as
`inspect` counts them); accuracy is on the whole test set (float activations). One JSON line per
run in `--out`, and a table per model.

    python benchmarks/mixed.py --out benchmarks/results/mixed.jsonl
    python benchmarks/mixed.py --models digits-mlp --methods gptq,ldnq --out runs/mixed.jsonl
    python benchmarks/mixed.py --budgets-only --max-steps 4 --out runs/copy-of-mixed.jsonl  # best of 4 allocations
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# shipped checkpoint -> (dataset, model factory: None for qexport's own checkpoints, input normalisation)
MODELS = {"digits-mlp": ("digits", None, None), "fashion-cnn-small": ("fashion-mnist", None, None),
          "fashion-resnet20": ("fashion-mnist", None, None),
          "fashion-mobilenet_v2": ("fashion-mnist", str(ROOT / "benchmarks" / "zoo_models.py") + ":fashion_mobilenet_v2",
                                   (0.0, 255.0))}  # trained on raw pixels / 255 (models/README.md)
CHOICES = (8, 4, 3, 2, 1)


def weight_bytes(art) -> int:
    return sum(-(-lc.q.numel() * lc.codes.storage_bits // 8) + 4 * lc.alpha.numel() for lc in art.layers.values())


def run(model, data, method: str, bits: int, budget: int | None, normalize=None, max_steps: int = 1) -> dict:
    from qexport import api
    from qexport.mixed import Budget

    art = api.quantize(model, data, method, bits, per_channel=True, normalize=normalize,
                       budget=None if budget is None else Budget(size_bytes=budget, bit_choices=CHOICES, max_steps=max_steps))
    acc = art.meta["accuracy"]
    return {"bits": bits if budget is None else None, "budget": budget, "bytes": weight_bytes(art),
            "accuracy": acc["quantized_test"], "float": acc["float_test"],
            "chosen": art.meta.get("mixed_precision", {}).get("chosen"), **({"max_steps": max_steps} if max_steps > 1 else {})}


def table(rows: list[dict]) -> str:
    out = []
    for (model, method) in dict.fromkeys((r["model"], r["method"]) for r in rows):
        rs = sorted((r for r in rows if r["model"] == model and r["method"] == method), key=lambda r: r["bytes"])
        out += [f"**{model}, {method}** (float {rs[0]['float']:.2f} %)", "",
                "| run | weight bytes | avg bits | test accuracy |", "|---|---|---|---|"]
        params = rs[0]["params"]
        for r in rs:
            name = (f"uniform {r['bits']} bits" if r["budget"] is None else f"budget {r['budget']} B"
                    + (f", best of {r['max_steps']}" if r.get("max_steps", 1) > 1 else ""))
            out.append(f"| {name} | {r['bytes']} | {8 * r['bytes'] / params:.2f} | {r['accuracy']:.2f} % |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default="gptq")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "mixed.jsonl")
    ap.add_argument("--max-steps", type=int, default=1,
                    help="allocations compared on the validation split at each budget (qexport.Budget.max_steps)")
    ap.add_argument("--table", action="store_true", help="print the tables of --out and stop")
    ap.add_argument("--budgets-only", action="store_true",
                    help="run the budgets only, from the uniform rows already in --out (after a change to the allocation)")
    args = ap.parse_args()
    done = [json.loads(s) for s in args.out.read_text().splitlines() if s.strip()] if args.out.is_file() else []
    if not args.table:
        from qexport.workflow import float_model, load_data

        args.out.parent.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            data_name, factory, normalize = MODELS[name]
            data = load_data(data_name, None, 0, None)
            model, _, _ = float_model(data, factory, str(ROOT / "models" / f"{name}.safetensors"), 0, None, 3e-3, 32, 30, False)
            params = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight") and m.weight is not None
                         and m.weight.dim() > 1)
            for method in args.methods.split(","):
                key = dict(model=name, method=method, params=params)
                uniform = {r["bits"]: r["bytes"] for r in done if r["budget"] is None and r["model"] == name
                           and r["method"] == method} if args.budgets_only else {}
                for bits in () if args.budgets_only else CHOICES:
                    r = {**key, **run(model, data, method, bits, None, normalize)}
                    uniform[bits] = r["bytes"]
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    done.append(r)
                    with args.out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                pairs = list(zip(CHOICES, CHOICES[1:]))  # midpoints: about 6, 3.5, 2.5 and 1.5 bits, and about 2.25
                budgets = [(uniform[a] + uniform[b]) // 2 for a, b in pairs] + [int(uniform[2] * 1.125)]
                for budget in budgets:
                    r = {**key, **run(model, data, method, 8, budget, normalize, args.max_steps)}
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    done.append(r)
                    with args.out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
    print(table(done))


if __name__ == "__main__":
    main()
