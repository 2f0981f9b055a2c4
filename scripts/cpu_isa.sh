# Sourced: `use_cpu_isa NAME` caps every CPU code path torch takes to one instruction set, so
# that a host without it is imitated: ATen's vector kernels (ATEN_CPU_CAPABILITY), MKL's BLAS
# (MKL_ENABLE_INSTRUCTIONS) and oneDNN's matmuls (ONEDNN_MAX_CPU_ISA; under "avx512" without
# AMX, whose bf16 tiles round otherwise). Capping ATen alone leaves MKL and oneDNN on the
# host's widest kernels, which is where sums differ from host to host.
use_cpu_isa() {
  case "$1" in
    default) export ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 ;;
    avx2) export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ;;
    avx512) export ATEN_CPU_CAPABILITY=avx512 MKL_ENABLE_INSTRUCTIONS=AVX512 ONEDNN_MAX_CPU_ISA=AVX512_CORE ;;
    *) echo "use_cpu_isa: expected default, avx2 or avx512; got '$1'" >&2; return 2 ;;
  esac
}
