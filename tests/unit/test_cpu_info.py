"""Path choice from a CPU's own flags: the kernel build, and the dtype `auto` runs in.

The flags are those of the machine kinds our sessions land on (an AMD EPYC with AVX2 only, an Intel
Xeon with AVX-512 F/BW/VL/VNNI but no bf16 and no AMX, an AMD EPYC with AVX-512 VNNI and
AVX512-BF16) and of a CPU with AVX512-BF16 and AMX, so each machine checks the choice the others
would make.
"""

from __future__ import annotations

import pytest
import torch

from heron.cpu_info import CpuInfo, choose_isa
from heron.models.loader import choose_dtype

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx"
AMD_EPYC_AVX2 = f"{BASE} rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy abm sse4a misalignsse 3dnowprefetch bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves"
INTEL_XEON_AVX512 = f"{BASE} pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch fsgsbase bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves arat avx512_vnni md_clear arch_capabilities"
AMD_EPYC_AVX512_BF16 = f"{BASE} mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm"
SAPPHIRE_RAPIDS = f"{INTEL_XEON_AVX512} avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8 avx_vnni"
AVX_ONLY = f"{BASE} pni ssse3 sse4_1 sse4_2 popcnt avx"


def cpu(flags: str, model: str = "Test CPU", machine: str = "x86_64") -> CpuInfo:
    text = f"processor\t: 0\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: avx512f\n"
    return CpuInfo.parse(text, machine)


def never_probe() -> float:
    raise AssertionError("the bf16 probe must not run here")


def test_parse_reads_the_first_processor():
    info = cpu(AMD_EPYC_AVX2, model="AMD  EPYC   7B13")
    assert info.model_name == "AMD EPYC 7B13"
    assert "avx2" in info.flags and "avx512f" not in info.flags  # processor 1's line is not read


def test_amd_epyc_with_avx2_only_runs_the_avx2_build_in_float32():
    info = cpu(AMD_EPYC_AVX2)
    assert info.kernel_isas == ("avx2",) and not info.native_bf16
    isa, reason = choose_isa(info)
    assert isa == "avx2" and "avx512" in reason
    for quantized in (True, False):
        dtype, _ = choose_dtype("auto", torch.device("cpu"), quantized_kernels=quantized, cpu=info, bf16_speedup=never_probe)
        assert dtype == torch.float32


def test_intel_xeon_with_avx512_vnni_but_no_bf16_runs_the_avx512_build_in_float32():
    info = cpu(INTEL_XEON_AVX512)
    assert info.kernel_isas == ("avx512", "avx2")
    assert not info.native_bf16  # oneDNN would say bf16 is "supported" here: it emulates it
    assert choose_isa(info)[0] == "avx512"
    assert choose_isa(info, "avx2") == ("avx2", "avx2, forced by HERON_CPU_ISA")
    # GGUF weights in the kernels' types, and a float checkpoint: float32 both, no probe run.
    for quantized in (True, False):
        dtype, reason = choose_dtype("auto", torch.device("cpu"), quantized_kernels=quantized, cpu=info, bf16_speedup=never_probe)
        assert dtype == torch.float32, reason


def test_native_bf16_is_picked_only_when_measured_faster():
    info = cpu(SAPPHIRE_RAPIDS)
    assert info.native_bf16 and choose_isa(info)[0] == "avx512"
    # Quantized GGUF matrices run Heron's kernels, which take float32: no bf16, no probe.
    assert choose_dtype("auto", torch.device("cpu"), quantized_kernels=True, cpu=info, bf16_speedup=never_probe)[0] == torch.float32
    fast, reason = choose_dtype("auto", torch.device("cpu"), cpu=info, bf16_speedup=lambda: 3.2)
    assert fast == torch.bfloat16 and "3.20x" in reason
    slow, reason = choose_dtype("auto", torch.device("cpu"), cpu=info, bf16_speedup=lambda: 1.05)
    assert slow == torch.float32 and "1.05x" in reason


def test_amd_epyc_with_avx512_bf16_runs_the_avx512_build_and_bf16_only_for_float_chat_models():
    info = cpu(AMD_EPYC_AVX512_BF16)
    assert info.kernel_isas == ("avx512", "avx2") and info.native_bf16
    assert choose_isa(info)[0] == "avx512"
    cpu_device = torch.device("cpu")
    # The GGUF's quantized matrices run the kernels: float32, no probe.
    assert choose_dtype("auto", cpu_device, quantized_kernels=True, cpu=info, bf16_speedup=never_probe)[0] == torch.float32
    # An embedding model stays float32 even where bf16 would be faster: its vectors must not
    # depend on what they were batched with.
    dtype, reason = choose_dtype("auto", cpu_device, embedding=True, cpu=info, bf16_speedup=never_probe)
    assert dtype == torch.float32 and "embedding" in reason
    assert choose_dtype("auto", cpu_device, cpu=info, bf16_speedup=lambda: 1.6)[0] == torch.bfloat16
    assert choose_dtype("bfloat16", cpu_device, embedding=True, cpu=info, bf16_speedup=never_probe)[0] == torch.bfloat16


def test_cpus_without_avx2_or_not_x86_run_no_kernels():
    assert cpu(AVX_ONLY).kernel_isas == ()
    isa, reason = choose_isa(cpu(AVX_ONLY))
    assert isa is None and "avx2" in reason and "fma" in reason
    arm = cpu("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics", machine="aarch64")
    assert arm.kernel_isas == () and not arm.native_bf16
    assert choose_isa(arm) == (None, "CPU kernels off: not x86-64 on Test CPU")


@pytest.mark.parametrize("requested", ["avx512", "AVX512"])
def test_forcing_a_build_the_cpu_cannot_run_falls_back(requested):
    isa, reason = choose_isa(cpu(AMD_EPYC_AVX2), requested)
    assert isa == "avx2" and "cannot run" in reason


def test_an_unknown_build_name_falls_back_to_the_best():
    isa, reason = choose_isa(cpu(INTEL_XEON_AVX512), "sse2")
    assert isa == "avx512" and "sse2" in reason


def test_explicit_dtypes_are_taken_and_unknown_ones_refused():
    info = cpu(AMD_EPYC_AVX2)
    assert choose_dtype("bfloat16", torch.device("cpu"), cpu=info, bf16_speedup=never_probe)[0] == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("float8", torch.device("cpu"), cpu=info)


def test_this_machine_reads_its_own_flags():
    info = CpuInfo.read()
    assert info.model_name and isinstance(info.flags, frozenset)
    assert info.describe().startswith(info.model_name)
