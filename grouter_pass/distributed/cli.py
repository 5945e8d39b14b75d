"""``grouter placement`` and ``grouter traffic``: the offline half of expert parallelism.

    grouter placement ROUTING --ep 8 -o placement.npz    # expert permutation + sample -> rank table
    grouter traffic ROUTING --ep 8 16 32                 # cross-rank traffic with / without placement

``ROUTING`` is a routing ``.npz`` or a pre-dispatched dataset directory (``grouter predispatch``),
read as its packed windows of ``--seq-len`` tokens (see :mod:`grouter_pass.distributed.routing_data`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from grouter_pass.distributed.placement import PlacementConfig, build_placement
from grouter_pass.distributed.placement_file import save_placement
from grouter_pass.distributed.routing_data import load_routing
from grouter_pass.distributed.traffic import TrafficConfig, format_table, simulate_traffic

log = logging.getLogger(__name__)


def _placement(args: argparse.Namespace) -> int:
    routing = load_routing(args.routing, seq_len=args.seq_len)
    config = PlacementConfig(ep_size=args.ep, entropy_threshold=args.entropy_threshold,
                             refine_rounds=args.refine_rounds, progress=not args.no_progress)
    placement = build_placement(routing, config)
    save_placement(args.output, placement)
    meta = placement.metadata
    print(f"wrote {args.output}: E={placement.num_experts} over ep={placement.ep_size} ranks, "
          f"{routing.num_samples} samples, {100 * meta['local_slot_fraction']:.1f}% of token-expert pairs local, "
          f"{meta['filtered_samples']} high-entropy samples placed last")
    return 0


def _traffic(args: argparse.Namespace) -> int:
    routing = load_routing(args.routing, seq_len=args.seq_len)
    traffic = TrafficConfig(hidden=args.hidden, moe_layers=args.moe_layers, bytes_per_element=args.bytes_per_element,
                            samples_per_rank_per_step=args.samples_per_rank)
    placement_config = PlacementConfig(ep_size=1, refine_rounds=args.refine_rounds, progress=not args.no_progress)
    rows = simulate_traffic(routing, tuple(args.ep), traffic=traffic, placement_config=placement_config)
    print(f"routing {args.routing}: {routing.num_samples} samples, {routing.num_tokens} tokens, "
          f"E={routing.num_experts}, k={routing.top_k}; hidden={traffic.hidden}, {traffic.moe_layers} MoE layers, "
          f"{traffic.bytes_per_element} B/element, {traffic.samples_per_rank_per_step} samples per rank per step")
    print(format_table(rows))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``placement`` and ``traffic`` to the ``grouter`` command line."""
    p = subparsers.add_parser("placement", help="expert grouping + sample placement for expert parallelism",
                              description="Build a placement file (expert permutation + sample -> rank table) "
                                          "from a routing file (Grouter paper section 3.4.2).")
    p.add_argument("routing", type=Path, help="routing .npz (ids [T, k] + offsets, or ids [S, seq, k]) or a "
                   "pre-dispatched dataset directory")
    p.add_argument("--seq-len", type=int, default=None, help="window length for a pre-dispatched directory "
                   "(default: its stored seq_len)")
    p.add_argument("--ep", type=int, required=True, help="expert-parallel size (ranks or nodes)")
    p.add_argument("-o", "--output", type=Path, default=Path("placement.npz"),
                   help="where to write the placement (.npz)")
    p.add_argument("--entropy-threshold", type=float, default=None,
                   help="bits over phi/k above which a sample is a filler (default 0.98*log2(E))")
    p.add_argument("--refine-rounds", type=int, default=2,
                   help="rounds of alternating expert regrouping and sample placement")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_placement)

    t = subparsers.add_parser("traffic", help="simulated cross-rank all-to-all traffic with and without placement")
    t.add_argument("routing", type=Path, help="pre-dispatched dataset directory (routing.json beside the tokens)")
    t.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the pre-dispatch's seq_len)")
    t.add_argument("--ep", type=int, nargs="+", default=[8, 16, 32], help="expert-parallel sizes to simulate")
    t.add_argument("--hidden", type=int, default=TrafficConfig.hidden, help="model hidden size (bytes per token moved)")
    t.add_argument("--moe-layers", type=int, default=TrafficConfig.moe_layers, help="MoE layers per step")
    t.add_argument("--bytes-per-element", type=int, default=TrafficConfig.bytes_per_element,
                   help="bytes per activation element (2 for bf16)")
    t.add_argument("--samples-per-rank", type=int, default=TrafficConfig.samples_per_rank_per_step,
                   help="samples per rank per step")
    t.add_argument("--refine-rounds", type=int, default=2,
                   help="rounds of alternating expert regrouping and sample placement")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_traffic)
