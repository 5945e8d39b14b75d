"""Write a routing ``.npz`` with known structure, for trying ``grouter placement`` and
``train_ep.py --mode precomputed`` without a trained Grouter.

    python examples/distributed/make_routing.py clustered -o routing.npz --experts 16 --clusters 4

``clustered``: experts fall into ``--clusters`` hidden groups; every sample belongs to one group
and each of its tokens picks k distinct experts from that group with probability
``--in-cluster`` (uniformly otherwise). Placement should recover the groups.
"""

from __future__ import annotations

import argparse

import numpy as np

from grouter_pass.distributed.routing_data import RoutingData, save_routing


def clustered(num_samples: int, seq: int, experts: int, clusters: int, top_k: int, in_cluster: float,
              seed: int) -> RoutingData:
    rng = np.random.default_rng(seed)
    groups = rng.permutation(experts).reshape(clusters, experts // clusters)
    sample_group = rng.permutation(np.arange(num_samples) % clusters)
    ids = np.empty((num_samples, seq, top_k), dtype=np.int64)
    for s in range(num_samples):
        local = rng.random(seq) < in_cluster
        for t in range(seq):
            pool = groups[sample_group[s]] if local[t] else np.arange(experts)
            ids[s, t] = rng.choice(pool, size=top_k, replace=False)
    return RoutingData.from_sequences(ids, experts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("clustered",))
    p.add_argument("-o", "--output", default="routing.npz")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--in-cluster", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    routing = clustered(a.samples, a.seq_len, a.experts, a.clusters, a.top_k, a.in_cluster, a.seed)
    save_routing(a.output, routing)
    print(f"wrote {a.output}: {routing.num_samples} samples x {a.seq_len} tokens, E={a.experts}, k={a.top_k}")


if __name__ == "__main__":
    main()
