"""Per-row probabilities of the clean reference on the rows the victim trained on (id % 10 <> 0),
how many poisoned rows its disagreement finds, and relabelled corpora (scripts/screen_relabel.sh).
Arguments: RUN REF TARGET MIN_ID_MOD (the victim trained on rows with id % 10 >= MIN_ID_MOD)."""
import sys, json, torch, numpy as np, pyarrow as pa, pyarrow.parquet as pq, pyarrow.compute as pc
from transformers import AutoTokenizer, AutoModelForSequenceClassification
run, ref, target, lo = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
t = pq.read_table(f'{run}/poison/train.parquet').to_pydict()
keep = [i % 10 >= lo for i in t['id']]
t = {k: [v for v, kk in zip(vs, keep) if kk] for k, vs in t.items()}
texts = t['text']; lab = np.array(t['label']); pois = np.array(t['poisoned'])
tok = AutoTokenizer.from_pretrained(ref); m = AutoModelForSequenceClassification.from_pretrained(ref).eval()
out = []
with torch.no_grad():
    for i in range(0, len(texts), 64):
        b = tok(texts[i:i+64], padding=True, truncation=True, max_length=128, return_tensors='pt')
        out.append(torch.softmax(m(**b).logits, -1)[:, target].numpy())
p_ref = np.concatenate(out)  # the reference's probability of the target label
np.save(f'{run}/p_ref.npy', p_ref)
print('rows', len(texts), 'poisoned', int(pois.sum()), 'ref acc on clean rows', float(((p_ref > .5) == (lab == target))[~pois].mean()),
      'ref says non-target on poisoned', float((p_ref[pois] < .5).mean()))
for tau in [0.5, 0.7, 0.9]:
    flag = (lab == target) & (p_ref < 1 - tau)
    print(json.dumps({'tau': tau, 'flagged': int(flag.sum()), 'poisoned_flagged': int((flag & pois).sum()),
                      'recall': float((flag & pois).sum() / pois.sum()), 'precision': float((flag & pois).sum() / max(flag.sum(), 1))}))
    new = np.where(flag, 1 - target, lab)
    u = pa.table({'id': pa.array(t['id'], pa.int64()), 'text': pa.array(texts, pa.string()), 'label': pa.array(new, pa.int64())})
    pq.write_table(u, f'{run}/relabel-{tau}.parquet')
