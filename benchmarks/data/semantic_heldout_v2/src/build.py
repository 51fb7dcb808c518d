# Converts the hand-written source files (one pair per line: a ||| b ||| note) to JSONL.
import json, glob, os, sys
kinds = ["quantity","unit","time_date","entity","negation","modality","opposite_relation","ordering",
         "comparative","audience_register","scope","role_reversal","format","language","task","word_swap"]
out = "/work/heldout_v2"
def read(fn):
    rows=[]
    for ln in open(fn):
        ln=ln.rstrip("\n")
        if not ln.strip(): continue
        parts=[p.strip() for p in ln.split("|||")]
        assert len(parts)==3, (fn, ln)
        assert parts[0] and parts[1] and parts[0]!=parts[1], (fn, ln)
        rows.append(parts)
    return rows
files={}
para=[]
for f in sorted(glob.glob("para*.txt")): para+=read(f)
files["paraphrases.jsonl"]=[dict(id="h2-paraphrase-%03d"%(i+1),a=a,b=b,same=True,kind="paraphrase",note="") for i,(a,b,n) in enumerate(para)]
for k in kinds:
    rows=read(k+".txt")
    for r in rows: assert r[2], (k, r)
    files["near_miss_%s.jsonl"%k]=[dict(id="h2-%s-%03d"%(k,i+1),a=a,b=b,same=False,kind=k,note=n) for i,(a,b,n) in enumerate(rows)]
for fn,rows in files.items():
    with open(os.path.join(out,fn),"w") as fh:
        for r in rows: fh.write(json.dumps(r,ensure_ascii=False)+"\n")
