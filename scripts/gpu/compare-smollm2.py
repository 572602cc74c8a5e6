"""Compares the outputs of scripts/gpu/parity-smollm2.sh with the transformers fixture.

usage: compare-smollm2.py FIXTURE.json DIR [BF16_FIXTURE.json]   (prints one JSON summary)

FIXTURE is the committed transformers run (CPU, f32). BF16_FIXTURE, when given, is transformers' own
bf16 run on CUDA (scripts/fixtures/smollm2_reference.py --device cuda --dtype bfloat16): the bf16
rows are then also compared with it, since bf16 rounding alone can flip a near-tied greedy token.
"""
import json
import sys
from pathlib import Path

fixture = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
bf16_fixture = json.loads(Path(sys.argv[3]).read_text()) if len(sys.argv) > 3 else None
summary = {}


def new_ids(fx, case_name):
    case = next(c for c in fx["chat"]["cases"] if c["name"] == case_name)
    ids = case["new_ids"]
    # The fixture keeps the EOS that ended generation; ours stops before it.
    if case.get("stopped_on_eos") and ids and ids[-1] in fx["chat"]["eos_token_ids"]:
        ids = ids[:-1]
    return ids


def prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


for dt in ("f32", "bf16"):
    ppl = json.loads((out / f"ppl_{dt}.json").read_text())
    want = [r["mean_nll"] for r in fixture["ppl"]["records"]]
    got = [r["mean_nll"] for r in ppl["records"]]
    summary[f"ppl_{dt}"] = {
        "max_abs_record_nll_diff": max(abs(a - b) for a, b in zip(got, want)),
        "overall_nll_diff": abs(ppl["mean_nll"] - fixture["ppl"]["mean_nll"]),
    }
    if dt == "bf16" and bf16_fixture is not None:
        want16 = [r["mean_nll"] for r in bf16_fixture["ppl"]["records"]]
        summary["ppl_bf16"]["vs_transformers_bf16_cuda"] = {
            "max_abs_record_nll_diff": max(abs(a - b) for a, b in zip(got, want16)),
            "overall_nll_diff": abs(ppl["mean_nll"] - bf16_fixture["ppl"]["mean_nll"]),
            "transformers_bf16_vs_f32_overall": abs(bf16_fixture["ppl"]["mean_nll"] - fixture["ppl"]["mean_nll"]),
        }
    for case in fixture["chat"]["cases"]:
        want_ids = new_ids(fixture, case["name"])
        for mode in ("fused", "candle"):
            g = json.loads((out / f"{case['name']}_{dt}_{mode}.json").read_text())
            ids = g["tokens"]
            row = {
                "identical": ids == want_ids,
                "matching_prefix": prefix(ids, want_ids),
                "reference_len": len(want_ids),
                "decode_tokens_per_s": round(g["decode_tokens_per_s"], 1),
                "tokens": ids,
            }
            if dt == "bf16" and bf16_fixture is not None:
                want16 = new_ids(bf16_fixture, case["name"])
                row["vs_transformers_bf16_cuda"] = {
                    "identical": ids == want16,
                    "matching_prefix": prefix(ids, want16),
                    "reference_len": len(want16),
                    "transformers_bf16_vs_f32_prefix": prefix(want16, want_ids),
                }
            summary[f"{case['name']}_{dt}_{mode}"] = row
print(json.dumps(summary, indent=1))
