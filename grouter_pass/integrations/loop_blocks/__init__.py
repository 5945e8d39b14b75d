"""Pre-Dynamo rewrite of MoE blocks whose expert loop breaks the graph.

transformers 4.x-style blocks (``for e in range(E): torch.where(...)``, ``index_add_``),
``bincount().tolist()`` + ``split`` loops and DBRX's loop over ``nonzero()`` cannot be captured in
one Dynamo graph, so the graph pass never sees their experts. This module finds such blocks **by
structure** and replaces their ``forward`` (on the instance, reversibly) with one written in the
``grouter`` ops, after proving on random inputs that it computes the same outputs and gradients:

1. *Candidates* (shapes and parameter roles only): the lowest module that holds one router, a
   ``Linear(H -> E)``, and the experts: a ``ModuleList`` of E identical MLPs, or parameters with
   a leading expert dim (``[E, ., .]``, or flat ``[E*F, H]`` as in DBRX).
2. *Trace*: Dynamo is run on the block with a random ``[B, T, H]`` input. No graph break means
   nothing to do (the graph pass will handle the block). Otherwise the first graph holds the
   gating: the usual canonicalize + parse + family classification gives its ``GatingSpec``; the
   router is identified by identity of its weight among the graph's inputs.
3. *Experts*: which weight is the gate, the up and the down projection, in which layout, and which
   activation, is found by search: every assignment consistent with the shapes is built and the
   one that reproduces the block's output on random inputs is kept (an ambiguous or empty search
   leaves the block alone, with the reason).
4. *Outputs*: the replacement returns the same structure as the original (the MoE output, and the
   router logits when the block returns them).
5. *Proof*: forward outputs and input gradients of the replacement and the original agree on
   random inputs (spread and skewed routing), in train and eval mode; a block whose output is
   random in training (router jitter, dropout) is left alone.

The graph breaks of each block before and after are logged (counted in isolated Dynamo regions,
so nothing the caller compiled is reset).

One module per step: ``candidates`` (1), ``gating`` (2), ``roles`` (3), ``forward`` (4),
``proof`` (5); ``install`` runs them in order and installs the result.
"""

from grouter_pass.integrations.loop_blocks.candidates import find_loop_block_candidates
from grouter_pass.integrations.loop_blocks.install import (
    LoopBlockRewrite,
    restore_loop_blocks,
    rewrite_loop_block,
    rewrite_loop_blocks,
)

__all__ = ["LoopBlockRewrite", "find_loop_block_candidates", "restore_loop_blocks", "rewrite_loop_block",
           "rewrite_loop_blocks"]
