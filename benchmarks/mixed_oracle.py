"""How good can a width allocation be? Every maximal allocation of a small model under a budget.

The digits MLP and cnn-small have three quantized layers each, so every allocation of widths
8/4/3/2/1 can be tried: for each budget of `benchmarks/mixed.py` where mixed precision stayed below
the next larger uniform width (`results/mixed.jsonl`), this quantizes (per channel, with the
same method) every allocation that fits and that no single layer could widen within the budget, and prints the best
test accuracy: an oracle bound (it chooses on the test split), against which the allocation that
`--size-budget` chose and the next larger uniform width compare.

    python benchmarks/mixed_oracle.py
    python benchmarks/mixed_oracle.py --models fashion-cnn-small
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDTHS = (1, 2, 3, 4, 8)
DATA = {"digits-mlp": "digits", "fashion-cnn-small": "fashion-mnist"}


def short_budgets(rows: list[dict], model: str, method: str) -> list[tuple[dict, dict]]:
    """(mixed row, next larger uniform row) where the mixed precision run is less accurate."""
    uniform = sorted((r for r in rows if r["budget"] is None and r["model"] == model and r["method"] == method), key=lambda r: r["bytes"])
    out = []
    for r in sorted((r for r in rows if r["budget"] is not None and r["model"] == model and r["method"] == method), key=lambda r: r["bytes"]):
        larger = min((u for u in uniform if u["bytes"] >= r["bytes"]), key=lambda u: u["bytes"], default=None)
        if larger is not None and r["accuracy"] < larger["accuracy"]:
            out.append((r, larger))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits-mlp,fashion-cnn-small")
    ap.add_argument("--methods", default="gptq,ldnq")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "mixed.jsonl")
    args = ap.parse_args()

    import qexport
    from qadmm.layers import select_layers
    from qadmm.spec import QuantSpec
    from qexport.workflow import float_model, load_data

    warnings.filterwarnings("ignore")
    rows = [json.loads(s) for s in args.results.read_text().splitlines() if s.strip()]
    print("| model | method | budget B | allocation chosen (this version) | best of every allocation (oracle, test) "
          "| next larger uniform |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        data = load_data(DATA[name], None, 0, None)
        model, _, _ = float_model(data, None, str(ROOT / "models" / f"{name}.safetensors"), 0, None, 3e-3, 32, 30, False)
        params = {n: (m.weight.numel(), m.weight.shape[0]) for n, m in select_layers(model, QuantSpec(bits=8, per_channel=True))}

        def size(c: dict[str, int]) -> int:
            return sum(-(-params[n][0] * b // 8) + 4 * params[n][1] for n, b in c.items())

        for method, (mixed, uniform) in ((m, pair) for m in args.methods.split(",") for pair in short_budgets(rows, name, m)):
            budget, best = mixed["budget"], None
            for widths in itertools.product(WIDTHS, repeat=len(params)):
                c = dict(zip(params, widths))
                if size(c) > budget or any(size({**c, n: w}) <= budget for n in c for w in WIDTHS if w > c[n]):
                    continue
                acc = qexport.quantize(model, data, method, per_channel=True, layer_bits=c).meta["accuracy"]["quantized_test"]
                if best is None or acc > best[0]:
                    best = (acc, c, size(c))
            acc, c, used = best
            print(f"| {name} | {method} | {budget} | {mixed['accuracy']:.2f} % | {acc:.2f} % ({', '.join(f'{n}={b}' for n, b in c.items())}, "
                  f"{used} B) | {uniform['accuracy']:.2f} % ({uniform['bits']} bits) |", flush=True)


if __name__ == "__main__":
    main()
