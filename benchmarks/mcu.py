"""Integer C on a microcontroller: the shipped models at 8/4/2/1 bits through `qexport to-c`.

For each model (models/: the digits MLP, Fashion-MNIST cnn-small and ResNet-20) and width, in one run:
`qexport quantize` (gptq, per channel, as a user would from the CLI), `qexport.api.to_c`, then the
C built with the host compiler on the whole test set against the integer reference and onnxruntime
(QOperator file with the same activation parameters: differing outputs, accuracy of the C build),
and the same sources built for a Cortex-M4 (arm-none-eabi-gcc, newlib) and run in QEMU's mps2-an386
on the first `--qemu` test images (differing outputs against the host; text/data/bss of the ELF,
which includes newlib's stdio for the test driver). The 8-bit row is what an int8-weight deployment
(TensorFlow Lite Micro / CMSIS-NN: one byte per weight) needs; the others show what 1-4-bit codes save.

    apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm dataset-fashion-mnist
    python benchmarks/mcu.py --out benchmarks/results/mcu.jsonl
    python benchmarks/mcu.py --models digits-mlp --bits 4,2 --out runs/mcu.jsonl
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"digits-mlp": "digits", "fashion-cnn-small": "fashion-mnist", "fashion-resnet20": "fashion-mnist"}


def one(name: str, bits: int, method: str, qemu: int, tmp: Path) -> dict:
    from qexport import api
    from qexport.artifact import load_artifact
    from qexport.pack import c_integer
    from qexport.workflow import load_data

    data_name = MODELS[name]
    art_path = tmp / f"{name}-{bits}b.qx.safetensors"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qexport", "quantize", "--checkpoint", str(ROOT / "models" / f"{name}.safetensors"),
                    "--data", data_name, "--method", method, "--bits", str(bits), "--per-channel", "--quiet",
                    "-o", str(art_path)], check=True, capture_output=True)
    quantize_s = time.perf_counter() - t
    art = load_artifact(art_path)
    data = load_data(data_name, None, 0, None)
    folder = tmp / f"{name}-{bits}b-c"
    cm = api.to_c(art, folder, data)
    t = time.perf_counter()
    rep = c_integer.verify_folder(folder, art, data.x_test, data.y_test, cortex_m4=qemu)
    params = sum(lc.q.numel() for lc in art.layers.values())
    return {"model": name, "bits": bits, "method": method, "params": params, "quantize_seconds": round(quantize_s, 1),
            "artifact_accuracy": art.meta.get("accuracy", {}).get("quantized_test"), "c_accuracy": rep["accuracy"],
            "samples": rep["samples"], "differing": {k: v["differing_outputs"] for k, v in rep["against"].items()},
            "codes_bytes": cm.flash["codes"], "ideal_codes_bytes": -(-params * bits // 8), "constants_bytes": cm.flash["constants"],
            "arena_bytes": cm.manifest["arena_bytes"], "row_bytes": cm.manifest["row_bytes"],
            "cortex_m4": rep.get("cortex_m4"), "verify_seconds": round(time.perf_counter() - t, 1)}


def table(rows: list[dict]) -> str:
    out = ["| model | bits | C accuracy (test set) | differing: reference / onnxruntime / QEMU | weight codes B (params·N/8) | "
           "vs 8-bit | constants B | RAM B (arena + row) | Cortex-M4 text / data / bss B |",
           "|---|---|---|---|---|---|---|---|---|"]
    eight = {r["model"]: r["codes_bytes"] for r in rows if r["bits"] == 8}
    for r in rows:
        m4 = r.get("cortex_m4") or {}
        s = m4.get("sizes", {})
        d = r["differing"]
        q = f"{m4['differing_outputs']} of {m4['samples']}" if m4 else "-"
        ratio = f"{r['codes_bytes'] / eight[r['model']]:.3f}" if r["model"] in eight else "-"
        out.append(f"| {r['model']} | {r['bits']} ({r['method']}) | {r['c_accuracy']:.2f}% | {d['integer reference']} / "
                   f"{d['onnxruntime qoperator']} / {q} | {r['codes_bytes']} ({r['ideal_codes_bytes']}) | {ratio} | "
                   f"{r['constants_bytes']} | {r['arena_bytes']} + {r['row_bytes']} | "
                   + (f"{s['text']} / {s['data']} / {s['bss']} |" if s else "- |"))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--bits", default="8,4,2,1")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--qemu", type=int, default=100, help="test images run in QEMU's Cortex-M4 (0: none)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "mcu.jsonl")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args()
    done = [json.loads(s) for s in args.out.read_text().splitlines() if s.strip()] if args.out.is_file() else []
    if not args.table:
        from qexport.pack.c_integer import cortex_m4_tools

        if args.qemu and cortex_m4_tools():
            sys.exit(f"--qemu {args.qemu}: {cortex_m4_tools()} (or pass --qemu 0)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                for bits in map(int, args.bits.split(",")):
                    if any(r["model"] == name and r["bits"] == bits for r in done):
                        continue
                    r = one(name, bits, args.method, args.qemu, Path(tmp))
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    done.append(r)
    print(table(done))


if __name__ == "__main__":
    main()
