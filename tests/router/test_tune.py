import numpy as np
import pytest
import torch

from grouter_pass.router import TokenizedCorpus, TuneConfig, balance_loss, max_violation, tune
from grouter_pass.router.tuning import expert_load
from tests.router.conftest import tiny_grouter


def zipf_corpus(n: int, seed: int) -> TokenizedCorpus:
    """A skewed token distribution: a few ids dominate, as a narrow target domain would."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 33) ** 1.2
    tokens = rng.choice(32, size=n, p=p / p.sum()).astype(np.uint16)
    return TokenizedCorpus(tokens, np.array([0, n]), 32, source="zipf")


def skewed_grouter():
    g = tiny_grouter()
    with torch.no_grad():  # push two experts' rows towards the mean hidden direction: they take most tokens
        h = g.final_hidden(torch.randint(0, 32, (8, 16))).reshape(-1, 16).mean(0)
        g.score.weight[:2] += 3 * h / h.norm()
    return g


def test_balance_loss_and_maxvio_by_hand():
    logits = torch.zeros(1, 4, 4)          # uniform P = 1/4 for each expert
    ids = torch.tensor([[[0], [0], [0], [1]]])
    # f = [3/4, 1/4, 0, 0]; sum_i P_i f_i = 1/4
    torch.testing.assert_close(balance_loss(logits, ids, 4), torch.tensor(0.25))
    load = expert_load(ids, 4)
    assert load.tolist() == [3, 1, 0, 0]
    assert max_violation(load) == pytest.approx(3 / 1 - 1)


@pytest.mark.parametrize("mode,steps,lr", [("score", 60, 2e-2), ("bias", 60, 0.0)])
def test_tuning_lowers_max_violation(mode, steps, lr):
    g = skewed_grouter()
    config = TuneConfig(mode=mode, steps=steps, batch_size=4, seq_len=32, lr=lr, bias_rate=0.05, save_every=0,
                        eval_tokens=4096)
    frozen = {k: v.clone() for k, v in g.state_dict().items()}
    tuned, result = tune(g, zipf_corpus(20000, 0), zipf_corpus(4096, 1), config, progress=False)
    assert result.max_vio_before > 1.0, result
    assert result.max_vio_after < 0.5 * result.max_vio_before, result
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, frozen[k])}
    assert changed == ({"score.weight"} if mode == "score" else {"bias"})
    assert tuned.config.use_selection_bias == (mode == "bias")


def test_tune_resume_equals_uninterrupted(tmp_path):
    config = TuneConfig(steps=8, batch_size=2, seq_len=16, lr=1e-2, save_every=2, eval_tokens=256)
    train = zipf_corpus(4000, 0)
    full, _ = tune(skewed_grouter(), train, None, config, progress=False)

    class Interrupt(Exception):
        pass

    def stop(step, loss):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        tune(skewed_grouter(), train, None, config, out_dir=tmp_path, progress=False, on_step=stop)
    resumed, _ = tune(skewed_grouter(), train, None, config, out_dir=tmp_path, progress=False)
    assert torch.equal(resumed.score.weight, full.score.weight)
