"""benchmarks/sinklora.py: the per-part breakdown of a training step sorts real CUDA kernel names into their parts;
`--cuda_graph` adds the fixed-slot decode peers."""

import pytest

from tests.launch import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("sinklora")


@pytest.mark.parametrize(
    "kernel, part",
    [
        ("_fwd_kernel", "attention"),
        ("_bwd_dkdv_kernel", "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x64x64_4x1x1_kernel0_0", "attention"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmuls (projections, MLP, LM head)"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_execute_segment_k_off_kernel", "matmuls"),
        ("void at::native::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>", "loss"),
        ("void at::native::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>", "loss"),
        ("liger_cross_entropy_kernel", "loss"),
        (
            "void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>",
            "optimizer",
        ),
        ("_rms_norm_forward_kernel", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::BFloat16>>", "other"),
    ],
)
def test_kernel_names_fall_into_their_parts(bench, kernel, part):
    assert bench.kernel_part(kernel).startswith(part)


def test_cuda_graph_adds_fixed_slot_peers_after_each_evicting_cache(bench):
    selected = ["full_sdpa", "h2o_0.2", "window_0.2"]
    assert bench.generation_peers(selected, cuda_graph=False) == selected
    assert bench.generation_peers(selected, cuda_graph=True) == [
        "full_sdpa",
        "h2o_0.2",
        "h2o_0.2+slots",
        "h2o_0.2+graph",
        "window_0.2",
        "window_0.2+slots",
        "window_0.2+graph",
    ]
