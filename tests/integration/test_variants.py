"""Expert implementations and dtypes beyond the default: transformers' ``batched_mm`` (including
GPT-OSS's transposed, biased, interleaved form) and bf16 models (``torch._grouped_mm``)."""

import pytest
import torch

from grouter_pass import GrouterConfig, apply_grouter, grouter_reports
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids
from grouter_pass.testing.parity import check_parity, exact_ops


def parity(model_type, **kwargs):
    model = tiny_hf_moe(model_type, **kwargs).train()
    compiled = []
    result = check_parity(model, {"input_ids": tiny_token_ids()}, expect_ops=exact_ops(2),
                          compile_fn=lambda m: compiled.append(apply_grouter(m, GrouterConfig(compiler="aot_eager")))
                          or compiled[-1])
    return result, grouter_reports(compiled[0])[-1]


@pytest.mark.parametrize("model_type", ["gpt_oss"])  # Mixtral's batched_mm is a row of the support matrix
def test_batched_mm_experts(model_type):
    result, report = parity(model_type, experts_implementation="batched_mm")
    assert [s.experts.style for s in report.rewritten] == ["batched_mm", "batched_mm"]
    assert result.max_rel() <= 1e-5, result.summary()


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_bf16_models(model_type):
    """bf16 experts run through ``torch._grouped_mm``; routers score in fp32. Both sides compute in
    bf16, so they agree to bf16 rounding, not bitwise."""
    result, report = parity(model_type, dtype=torch.bfloat16)
    assert len(report.rewritten) == 2
    assert report.rewritten[0].experts.compute_dtype == torch.bfloat16
    assert result.output.max_rel <= 2e-2, result.summary()
    assert result.max_rel("grads") <= 5e-2, result.summary()
