"""Quickstart: compile a transformers MoE model with the grouter pass, train one step, see what
was rewritten. (The same code as in README.md.)

    python examples/quickstart.py
"""

import torch
import transformers

from grouter_pass import GrouterConfig, apply_grouter, grouter_reports

cfg = transformers.AutoConfig.for_model("qwen3_moe", hidden_size=64, moe_intermediate_size=48,
      num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, vocab_size=97)
model = transformers.AutoModelForCausalLM.from_config(cfg)
fast = apply_grouter(model, GrouterConfig(dynamic=True), verify=True)  # or torch.compile(model, backend="grouter")
loss = fast(torch.randint(0, 97, (2, 16)), labels=torch.randint(0, 97, (2, 16))).loss
loss.backward()
for site in grouter_reports(fast)[-1].sites: print(site.summary())  # noqa: E701
