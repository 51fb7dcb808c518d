#!/usr/bin/env python3
"""Convert hand-written src/*.txt lines ("a ||| b ||| note") into JSONL files."""
import json, glob, os
base = os.path.dirname(os.path.abspath(__file__))
out_dir = os.path.dirname(base)
def rows(files):
    for f in files:
        for line in open(f, encoding='utf-8'):
            line = line.strip()
            if not line: continue
            parts = [p.strip() for p in line.split('|||')]
            assert len(parts) in (2, 3), (f, line)
            yield parts
# paraphrases
para = sorted(glob.glob(os.path.join(base, 'paraphrase*.txt')))
with open(os.path.join(out_dir, 'paraphrases.jsonl'), 'w', encoding='utf-8') as o:
    for i, p in enumerate(rows(para), 1):
        if i % 2 == 0: p = [p[1], p[0]] + p[2:]   # alternate which side is the casual/longer one
        o.write(json.dumps({"id": f"h3-paraphrase-{i:03d}", "a": p[0], "b": p[1], "same": True,
                            "kind": "paraphrase", "note": ""}, ensure_ascii=False) + "\n")
for f in sorted(glob.glob(os.path.join(base, 'nm_*.txt'))):
    kind = os.path.basename(f)[3:-4]
    with open(os.path.join(out_dir, f'near_miss_{kind}.jsonl'), 'w', encoding='utf-8') as o:
        for i, p in enumerate(rows([f]), 1):
            if i % 3 == 0: p = [p[1], p[0]] + p[2:]   # vary which side carries the change
            note = p[2] if len(p) == 3 else ""
            o.write(json.dumps({"id": f"h3-{kind}-{i:03d}", "a": p[0], "b": p[1], "same": False,
                                "kind": kind, "note": note}, ensure_ascii=False) + "\n")
