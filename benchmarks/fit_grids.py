"""The α/Q fit of this checkout against the fit of an earlier revision, side by side in one run.

For every weight tensor of the shipped models (models/*.safetensors) and every code set, per tensor
and per output channel: the squared weight error ||W - α·Q||² of both fits (how many tensors got
better or worse, the total ratio), the time ratio, and whether refitting α·Q returns the same
codes (the fixed point `qadmm.codes.fit` promises). The earlier fit is read from git
(`git show REV:qadmm/codes.py`), so no second checkout is needed.

    python benchmarks/fit_grids.py --rev 2393f57          # the fit before issue 23
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qadmm import codes as ours  # noqa: E402

CODESETS = [ours.CodeSet(1, "binary"), *(ours.CodeSet(b) for b in (2, 4, 6, 8)), *(ours.CodeSet(b, "thesis") for b in (1, 4, 5, 8))]


def earlier_fit(rev: str):
    """The `fit` of qadmm/codes.py at git revision `rev`, imported from a temp file."""
    src = subprocess.run(["git", "show", f"{rev}:qadmm/codes.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "earlier_codes.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("earlier_codes", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod.fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="2393f57", help="the git revision whose fit to compare against")
    args = ap.parse_args()
    torch.set_num_threads(1)
    theirs = earlier_fit(args.rev)
    rows = defaultdict(lambda: {"n": 0, "better": 0, "worse": 0, "e_ours": 0.0, "e_theirs": 0.0, "t_ours": 0.0,
                                "t_theirs": 0.0, "fixed_ours": 0, "fixed_theirs": 0})
    for ckpt in sorted((ROOT / "models").glob("*.safetensors")):
        for name, w in load_file(str(ckpt)).items():
            if not name.endswith("weight") or w.dim() < 2:
                continue
            for cs in CODESETS:
                for per_channel in (False, True):
                    r = rows[(cs.scheme, cs.bits, per_channel)]
                    t = time.perf_counter()
                    a = ours.fit(w, cs, per_channel)
                    r["t_ours"] += time.perf_counter() - t
                    t = time.perf_counter()
                    b = theirs(w, cs, per_channel)
                    r["t_theirs"] += time.perf_counter() - t
                    r["n"] += 1
                    r["better"] += a.error < b.error * (1 - 1e-6)
                    r["worse"] += a.error > b.error * (1 + 1e-6)
                    r["e_ours"] += a.error
                    r["e_theirs"] += b.error
                    r["fixed_ours"] += torch.equal(ours.fit(a.dequantize(), cs, per_channel).q, a.q)
                    r["fixed_theirs"] += torch.equal(theirs(b.dequantize(), cs, per_channel).q, b.q)
    print(f"weights of {', '.join(p.name for p in sorted((ROOT / 'models').glob('*.safetensors')))}; ours = this checkout, "
          f"earlier = {args.rev}\n")
    print("| code set | α per | tensors | better | worse | error ours / earlier | time ours / earlier | refit = same codes (ours, earlier) |")
    print("|---|---|---|---|---|---|---|---|")
    for (scheme, bits, pc), r in rows.items():
        print(f"| {scheme} {bits}-bit | {'channel' if pc else 'tensor'} | {r['n']} | {r['better']} | {r['worse']} | "
              f"{r['e_ours'] / r['e_theirs']:.4f} | {r['t_ours'] / r['t_theirs']:.2f} | {r['fixed_ours']}, {r['fixed_theirs']} |")


if __name__ == "__main__":
    main()
