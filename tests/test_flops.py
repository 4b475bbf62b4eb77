"""flops.py: the Gflops of the released models match the paper, and cross-attention's extra cost."""

import pytest

import flops

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ Gflops as the paper counts them
@pytest.mark.parametrize("name", list(flops.PAPER_GFLOPS))
def test_gflops_match_the_paper(name):
    """Table 4 of the paper, every config (built on the meta device: about a second each)."""
    params, gflops = flops.params_and_gflops(flops.model_args_for(name, input_size=32))
    assert round(gflops, 2) == flops.PAPER_GFLOPS[name]  # the table's figure to its last digit


def test_cross_attention_costs_about_15_percent_more():
    table = flops.rows(["DiT-S/2"], ["adaLN-Zero", "cross-attention", "in-context"])
    change = {row["block"]: row["vs_adaln_zero"] for row in table}
    assert change["adaLN-Zero"] == 0 and 0.13 < change["cross-attention"] < 0.17
    assert 0 < change["in-context"] < 0.01  # two more tokens than 256
    assert "| DiT-S/2 | adaLN-Zero | 32.96M | 6.06 | +0.0% | 6.06 |" in flops.markdown(table)
