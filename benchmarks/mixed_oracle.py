"""How good can a width allocation be? Every maximal allocation of the digits MLP under a budget.

The digits MLP has three quantized layers, so every allocation of widths 8/4/3/2/1 can be tried:
for each budget of `benchmarks/mixed.py` where mixed precision stayed below the next larger uniform
width, this quantizes (gptq, per channel) every allocation that fits and that no single layer could
widen within the budget, and prints the best test accuracy: an oracle bound (it chooses on the test
split), against which the allocations (`--size-budget`: earlier versions and this one) and the uniform
widths compare.

    python benchmarks/mixed_oracle.py
"""
from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDTHS = (1, 2, 3, 4, 8)
# budget (B) -> (the accuracy of the greedy allocation (earlier versions), of the exact knapsack on the nearest
# fit's layer errors (the version before this one), of the exact knapsack on gptq's own layer errors (this
# version), of the next larger uniform width), from results/mixed.jsonl and its history
BUDGETS = {2208: (90.25, 90.25, 93.59, 94.99), 3105: (94.99, 94.99, 94.99, 96.38), 3312: (95.26, 95.26, 96.10, 96.38),
           4416: (96.38, 96.66, 96.66, 96.66)}


def main() -> None:
    import qexport
    from qexport.workflow import float_model, load_data

    warnings.filterwarnings("ignore")
    data = load_data("digits", None, 0, None)
    model, _, _ = float_model(data, None, str(ROOT / "models" / "digits-mlp.safetensors"), 0, None, 3e-3, 32, 30, False)
    params = {"body.1": (4096, 64), "body.3": (4096, 64), "body.5": (640, 10)}  # weights, scales (per channel)

    def size(c: dict[str, int]) -> int:
        return sum(-(-params[n][0] * b // 8) + 4 * params[n][1] for n, b in c.items())

    print("| budget B | greedy, nearest-fit errors | exact, nearest-fit errors | exact, gptq's errors (this version) "
          "| best of every allocation (oracle, test) | next larger uniform |")
    print("|---|---|---|---|---|---|")
    for budget, (greedy, exact, own, uniform) in BUDGETS.items():
        best = None
        for widths in itertools.product(WIDTHS, repeat=len(params)):
            c = dict(zip(params, widths))
            if size(c) > budget or any(size({**c, n: w}) <= budget for n in c for w in WIDTHS if w > c[n]):
                continue
            acc = qexport.quantize(model, data, "gptq", per_channel=True, layer_bits=c).meta["accuracy"]["quantized_test"]
            if best is None or acc > best[0]:
                best = (acc, c, size(c))
        acc, c, used = best
        print(f"| {budget} | {greedy:.2f} % | {exact:.2f} % | {own:.2f} % | {acc:.2f} % ({', '.join(f'{n}={b}' for n, b in c.items())}, {used} B) "
              f"| {uniform:.2f} % |", flush=True)


if __name__ == "__main__":
    main()
