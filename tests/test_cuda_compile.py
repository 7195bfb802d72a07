"""Every torch-free CUDA kernel file (kernels/*.cu) compiles for sm_80 and sm_90 with
-Werror all-warnings (what scripts/check_cuda_compile.sh checks by hand; here the builds are
shared with the SASS tests through tests/cuda_build.py). Skips without nvcc."""
from pathlib import Path

import pytest

from cuda_build import KERNELS, cubin

FILES = sorted(p.stem for p in KERNELS.glob("*.cu"))


def test_there_are_kernels():
    assert {"masked_patch_attention", "patch_recon_loss", "pgd_step"} <= set(FILES)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", FILES)
def test_kernel_file_compiles(name, arch):
    path, report = cubin(name, arch)
    assert Path(path).stat().st_size > 0
    assert "error" not in report.lower()
