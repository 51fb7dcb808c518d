#!/usr/bin/env python3
"""Validate heldout_v3 JSONL files: JSON per line, fields, ids unique, no duplicate pairs/prompts, counts."""
import json, glob, os, sys, collections
here = os.path.dirname(os.path.abspath(__file__))
KINDS = ["quantity","unit","time_date","entity","negation","modality","opposite_relation","ordering",
         "comparative","audience_register","scope","role_reversal","format","language","task","word_swap"]
ok = True; ids = set(); pairs = set(); prompts = collections.Counter(); counts = {}
for f in sorted(glob.glob(os.path.join(here, '*.jsonl'))):
    name = os.path.basename(f); n = 0
    for ln, line in enumerate(open(f, encoding='utf-8'), 1):
        try: r = json.loads(line)
        except Exception as e: print(f"{name}:{ln} bad JSON {e}"); ok = False; continue
        if set(r) != {"id","a","b","same","kind","note"}: print(f"{name}:{ln} fields {sorted(r)}"); ok = False
        if r["id"] in ids: print(f"{name}:{ln} dup id {r['id']}"); ok = False
        ids.add(r["id"])
        if not r["id"].startswith(f"h3-{r['kind']}-"): print(f"{name}:{ln} id/kind mismatch"); ok = False
        exp = "paraphrases.jsonl" if r["kind"] == "paraphrase" else f"near_miss_{r['kind']}.jsonl"
        if name != exp: print(f"{name}:{ln} kind in wrong file"); ok = False
        if r["same"] is not (r["kind"] == "paraphrase"): print(f"{name}:{ln} same flag wrong"); ok = False
        if not r["a"].strip() or not r["b"].strip() or r["a"] == r["b"]: print(f"{name}:{ln} empty/identical"); ok = False
        if not r["same"] and not r["note"]: print(f"{name}:{ln} missing note"); ok = False
        key = frozenset([r["a"], r["b"]])
        if key in pairs: print(f"{name}:{ln} dup pair"); ok = False
        pairs.add(key); prompts[r["a"]] += 1; prompts[r["b"]] += 1
        for s in (r["a"], r["b"]):
            w = len(s.split())
            if w < 3 or w > 70: print(f"{name}:{ln} length {w} words")
        n += 1
    counts[name] = n
for p, c in prompts.items():
    if c > 1: print(f"duplicate prompt x{c}: {p}"); ok = False
for k in KINDS:
    if counts.get(f"near_miss_{k}.jsonl", 0) < 22: print(f"kind {k} < 22"); ok = False
total = sum(counts.values()); para = counts.get("paraphrases.jsonl", 0)
for k, v in counts.items(): print(f"{k:35s} {v}")
print(f"total {total}, paraphrases {para} ({100*para/total:.1f}%), near misses {total-para}")
if para < 290 or total < 650: ok = False; print("below minimum counts")
print("OK" if ok else "FAILED"); sys.exit(0 if ok else 1)
