"""Quickstart recipe study on DEV splits only (docs/train.md): which loss on a few hundred parallel
sentences raises German and English-German STS without costing English.

One process, the objectives' formulas written out (coordinate MSE = sentence-transformers' MSELoss,
MNRL over (translation, source), the in-batch similarity loss, CoSENT on translated pairs), the
base model as teacher. Parallel data: STS-B train sentences with their DeepL German (stsb_multi_mt
train). Scores: Spearman on a fixed random sample of 500 pairs of each dev set.

``--parallel URI`` trains on a committed synthesize output's ``parallel`` sentences (e.g. the
quickstart's own Gemma translations, ``runs/quickstart/synthesize/<key>``) instead of DeepL.

Run, e.g.: ``python -m benchmarks.quickstart_recipe --n 500 --epochs 2 --lr 5e-5 --mse_scale 0 --en_mse 0 --rel 1 --base 1 --every 1``
(``--mse_scale 1 --en_mse 1`` is the paper's MSE; ``--mnrl 1``, ``--cosent 1`` add those terms).
"""
import os, time, json, argparse, random
os.environ.setdefault("HF_HUB_OFFLINE","1")
import torch, numpy as np
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer
from embedforge.data import DatasetSpec, load_dataset
from embedforge.data.sts import load_stsb_crosslingual
from embedforge.models import resolve_model
p=argparse.ArgumentParser()
p.add_argument("--n",type=int,default=500); p.add_argument("--epochs",type=int,default=3)
p.add_argument("--lr",type=float,default=1e-4); p.add_argument("--bs",type=int,default=32)
p.add_argument("--cosent",type=float,default=0.0); p.add_argument("--en_mse",type=float,default=1.0)
p.add_argument("--src",default="stsb"); p.add_argument("--seed",type=int,default=0)
p.add_argument("--mse_scale",type=float,default=1.0); p.add_argument("--base",type=int,default=0); p.add_argument("--mnrl",type=float,default=0.0); p.add_argument("--rel",type=float,default=0.0); p.add_argument("--every",type=int,default=0)
p.add_argument("--parallel",default=None,help="committed synthesize output whose `parallel` sentences to train on")
a=p.parse_args()
torch.manual_seed(a.seed); random.seed(a.seed)
torch.set_num_threads(2)
path=resolve_model("all-minilm-l6-v2")
model=SentenceTransformer(path); teacher=SentenceTransformer(path); teacher.eval()
en=load_dataset(DatasetSpec(source="stsb_multi_mt",split="train",lang="en"))
de=load_dataset(DatasetSpec(source="stsb_multi_mt",split="train",lang="de"))
pairs=[]; seen=set()
for e1,e2,d1,d2 in zip(en["sentence1"],en["sentence2"],de["sentence1"],de["sentence2"]):
    for e,d in ((e1,d1),(e2,d2)):
        if e not in seen: seen.add(e); pairs.append((e,d))
if a.parallel:
    from embedforge import storage
    par=storage.read_output(a.parallel,"parallel").to_pydict(); seen=set(); pairs=[]
    for e,d in zip(par["source_sentence"],par["sentence"]):
        if (e,d) not in seen: seen.add((e,d)); pairs.append((e,d))
random.Random(0).shuffle(pairs); pairs=pairs[:a.n]
print("parallel pairs",len(pairs),flush=True)
T=teacher.encode([e for e,_ in pairs],convert_to_tensor=True,batch_size=64).clone()
pairs=[(e,d,T[i]) for i,(e,d) in enumerate(pairs)]
# dev sets
ddev=load_dataset(DatasetSpec(source="stsb_multi_mt",split="dev",lang="de")).sample(500,seed=0)
edev=load_dataset(DatasetSpec(source="stsb",split="dev")).sample(500,seed=0)
xdev=load_stsb_crosslingual("en","de","dev").sample(500,seed=0)
def ev(m):
    m.eval(); out={}
    for k,df in (("de",ddev),("en-de",xdev),("en",edev)):
        a1=m.encode(df["sentence1"].to_list(),convert_to_tensor=True,normalize_embeddings=True,batch_size=128)
        a2=m.encode(df["sentence2"].to_list(),convert_to_tensor=True,normalize_embeddings=True,batch_size=128)
        out[k]=round(100*spearmanr((a1*a2).sum(-1).cpu().numpy(),df["score"].to_numpy()).statistic,2)
    m.train(); return out
t0=time.time(); base=ev(model) if a.base else {}; print("base",base,f"{time.time()-t0:.0f}s",flush=True)
# CoSENT data: german + english labeled pairs (first n/2 rows of train)
lab=[(d1,d2,s) for d1,d2,s in zip(de["sentence1"],de["sentence2"],de["score"])][: a.n//2]
opt=torch.optim.AdamW(model.parameters(),lr=a.lr,weight_decay=0.0)
steps=a.epochs*((len(pairs)+a.bs-1)//a.bs); sched=torch.optim.lr_scheduler.LambdaLR(opt,lambda s: min(1,(s+1)/max(1,0.1*steps))*max(0.0,(steps-s)/steps))
def emb(texts):
    f=model.tokenize(texts); return model(f)["sentence_embedding"]
def cosent(e1,e2,y,scale=20.0):
    c=torch.nn.functional.cosine_similarity(e1,e2)*scale
    d=c[None,:]-c[:,None]; mask=(y[:,None]>y[None,:]).float()
    d=d-(1-mask)*1e12; d=torch.cat([torch.zeros(1),d.view(-1)]); return torch.logsumexp(d,0)
step=0; t0=time.time()
for ep in range(a.epochs):
    random.shuffle(pairs)
    for i in range(0,len(pairs),a.bs):
        b=pairs[i:i+a.bs]; idx=None
        ens=[x[0] for x in b]; des=[x[1] for x in b]; t=torch.stack([x[2] for x in b])
        out=emb(des+ens)
        loss=a.mse_scale*torch.nn.functional.mse_loss(out[:len(b)],t)
        if a.en_mse>0: loss=loss+a.en_mse*a.mse_scale*torch.nn.functional.mse_loss(out[len(b):],t)
        if a.rel>0:
            F=torch.nn.functional; sd=F.normalize(out[:len(b)],dim=-1); se=F.normalize(out[len(b):],dim=-1); tn=F.normalize(t,dim=-1)
            tgt=tn@tn.T
            loss=loss+a.rel*(F.mse_loss(sd@se.T,tgt)+F.mse_loss(sd@sd.T,tgt)+F.mse_loss(se@se.T,tgt))
        if a.mnrl>0:
            dn=torch.nn.functional.normalize(out[:len(b)],dim=-1); en_=torch.nn.functional.normalize(out[len(b):],dim=-1)
            sim=20.0*dn@en_.T; y=torch.arange(len(b))
            loss=loss+a.mnrl*0.5*(torch.nn.functional.cross_entropy(sim,y)+torch.nn.functional.cross_entropy(sim.T,y))
        if a.cosent>0:
            lb=random.sample(lab,16); e=emb([x[0] for x in lb]+[x[1] for x in lb])
            loss=loss+a.cosent*cosent(e[:16],e[16:],torch.tensor([x[2] for x in lb]))
        opt.zero_grad(); loss.backward(); opt.step(); sched.step(); step+=1
    if a.every: print("epoch",ep,ev(model),f"{time.time()-t0:.0f}s",flush=True)
print("FINAL",json.dumps(vars(a)),ev(model))
