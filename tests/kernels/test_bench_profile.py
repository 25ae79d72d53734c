"""The profiling command's CPU paths: report parsing and refusing to run without CUDA."""

import pytest
import torch

from lmcore.bench import profile

RAW = '''"ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread","sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"
"","","usecond","register/thread","%","ratio","ratio"
"0","_fwd_kernel","585.5","168","54.1","0.90","1.25"
"1","cudnn_fwd","481.0","168","69.0","0.10","0.30"
'''


def test_ncu_summary_names_time_pipes_and_stalls():
    text = profile.ncu_summary(RAW)
    first, second = text.split("== ")[1:]
    assert first.startswith("_fwd_kernel") and "ms 0.586" in first and "regs 168" in first
    assert "pipe_tensor_op_hmma 54.1%" in first
    assert first.index("wait 1.25") < first.index("barrier 0.90")  # the largest stall first
    assert second.startswith("cudnn_fwd") and "ms 0.481" in second
    assert profile.ncu_summary("no report here") == "no kernels in the ncu report\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_profile_needs_cuda_and_checks_arguments(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        profile.main(["--configs", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        profile.main(["--seq", "0"])
    assert not list(tmp_path.iterdir())
