"""AdamW with bitsandbytes' 8-bit block-wise states, stepped by one fused kernel on CPU.

:class:`AdamW8bitCPU` is a drop-in for bitsandbytes' ``AdamW8bit`` on CPU: the same update, the
same state and the same ``state_dict()`` layout, so a state saved by either loads into the other.
It exists for speed: bitsandbytes 0.50 steps an 8-bit tensor on CPU with about a dozen torch ops
and two C passes, each a trip through memory (``bitsandbytes/backends/cpu/ops.py``,
``_optimizer_update_8bit_blockwise_cpu``); here each block of 256 elements is dequantized,
updated and requantized in one pass, all tensors of a step in one call, on
``torch.get_num_threads()`` threads that take chunks of 64 blocks from a shared counter.
Measured on the default band (63.7M parameters, 2 threads, ``bench/results/optim_cpu.md``):
0.058 s a step against bitsandbytes' 0.60 s (10x) and torch's fused fp32 AdamW's 0.040 s (1.44x),
1.8 % of a default ``fastmid train`` step instead of 16 %.

**Update** (Loshchilov & Hutter 2019, decoupled weight decay; bias correction as in
bitsandbytes), per element, in float32, at step ``t`` (1-based)::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p * (1 - lr * wd)                                   (only when wd > 0)
    p = p + (-lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

**States** (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): tensors of at
least ``min_8bit_size`` (4096) elements keep ``m`` and ``v`` as uint8 codes of the parameter's
shape (``state1``, ``state2``), one float32 scale per block of 256 consecutive elements
(``absmax1``, ``absmax2``, shape ``[ceil(numel / 256)]``: the block's largest ``|m|`` / ``|v|``) and
a float32 code book of 256 values in ``[-1, 1]`` (``qmap1``: the signed dynamic tree map,
``qmap2``: the unsigned one; :func:`dynamic_map`). A value is ``qmap[code] * absmax[block]``.
Smaller tensors (norm weights, biases) keep float32 ``state1``/``state2`` of the parameter's shape.
``step`` is a Python int. ``state_dict()`` nests the quantization tensors under
``__bnb_optimizer_quant_state__`` as bitsandbytes does; ``param_groups`` carry bitsandbytes' keys
(``lr``, ``betas``, ``eps``, ``weight_decay``, ``alpha``, ``t_alpha``, ``t_beta3``).

**Quantization** is bitsandbytes 0.50's CPU rule (``csrc/cpu_ops.cpp``, ``quantize_cpu_impl``),
not the exact nearest code: ``x = value / absmax`` (as ``value * (1 / absmax)``) clamped to
``[-1, 1]`` selects one of 65536 uniform bins, ``k = int((x + 1) * 0.5 * 65535 + 0.5)``, and the
bin's code is the code nearest to the bin's centre ``-1 + 2k / 65535`` (:func:`quantization_lut`).
A block whose absmax is 0 gets code 0 everywhere.

**Exactness**: the ``torch`` backend performs bitsandbytes' CPU operations in the same order and
rounding: parameters, codes and scales are **bit-identical** to bitsandbytes 0.50.2's
``AdamW8bit`` on CPU (``tests/train/test_adamw8bit_cpu.py``, 20 steps, float32 and bf16
parameters). The ``native`` kernel performs the same float32 operations (ATen fuses
``add_(x, alpha=a)`` and ``addcmul_`` into one fused multiply-add, so the kernel does too) with one
exception: its square root is the correctly rounded one, while torch's float32 ``sqrt`` is MKL's
``vsSqrt``, one ulp off on about 0.7 % of inputs. The square root enters only the parameter
update, so given the same gradients the kernel's codes and scales stay bit-identical to
bitsandbytes' at every step and its parameters differ in the last bit or two where the rounding
of ``p + update`` flips (20 steps: a few elements in 10^4, within 4 ulps). Against the torch
backend with the correctly rounded square root the kernel is bit-identical (tested; and checked
at every process's first use). Gradients that are not finite give states that differ from
bitsandbytes' (both meaningless; fastmid's loop never steps on them).

**Backends**: ``native`` is the fused kernel, C with AVX-512 or AVX2 intrinsics (plain C
elsewhere, about 3x slower), compiled once per machine with the system C compiler (``$CC``,
``cc``, ``gcc`` or ``clang``; 0.3 s) into ``$FASTMID_CACHE/adamw8bit_cpu/`` (default
``~/.cache/fastmid``, keyed by source, flags, compiler and CPU) and loaded with ``ctypes``: no
torch headers, no ninja, no Python extension ABI. ``torch`` is bitsandbytes' op sequence in torch
(quantization included; 1.2x to 1.9x bitsandbytes' time). ``auto`` (default) uses ``native`` when
it builds and passes its check, else ``torch`` with one warning naming why. Parameters that are
not float32 (bf16, fp16: cast to float32 for the update and rounded back to nearest, as
bitsandbytes does), non-contiguous tensors and the small float32-state tensors always take the
torch path. CPU tensors only: on CUDA use bitsandbytes' ``AdamW8bit``.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fastmid.errors import FastmidError
from fastmid.models.loading import cache_root

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096
LUT_SIZE = 65536
# The key under which bitsandbytes' Optimizer8bit.state_dict() nests the quantization tensors,
# and the state keys it nests (bitsandbytes 0.50 optim/optimizer.py, non_castable_tensor_keys).
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
QUANT_STATE_KEYS = frozenset(
    {
        "qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1", "state2",
        "gnorm_vec", "absmax1", "absmax2", "unorm_vec",
    }
)  # fmt: skip
BACKENDS = ("auto", "native", "torch")

_log = logging.getLogger(__name__)

# The fused step. One call steps every 8-bit tensor of an optimizer step: the blocks of all tasks
# are numbered in a row and split evenly over the threads. Every float32 operation is written out
# (no -ffast-math, -ffp-contract=off) so that the result is bit-identical to bitsandbytes' torch
# ops: fmaf/_fmadd_ps exactly where ATen's add(alpha=) and addcmul fuse, plain mul/add elsewhere.
_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define BLOCK 256
#define FM_MAX_THREADS 256

typedef struct {
    float *p;
    const float *g;
    uint8_t *q1;
    uint8_t *q2;
    float *absmax1;
    float *absmax2;
    const float *code1;
    const float *code2;
    const uint8_t *lut1;  /* 65536 codes + 3 bytes of padding (4-byte gathers) */
    const uint8_t *lut2;
    int64_t n;
    float beta1, alpha1, beta2, alpha2, c2, eps, decay, step_size;
} fm_task;

static inline uint32_t fm_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float fm_float(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* NaN goes to -1 (the comparisons fail), so the table index stays in range. */
static inline uint8_t fm_code(float x, float inv, const uint8_t *lut) {
    float v = x * inv;
    v = v >= -1.0f ? v : -1.0f;
    v = v <= 1.0f ? v : 1.0f;
    return lut[(int)((v + 1.0f) * 0.5f * 65535.0f + 0.5f)];
}

static void fm_quantize(const float *x, int len, float absmax, const uint8_t *lut, uint8_t *out) {
    if (absmax == 0.0f) { memset(out, 0, (size_t)len); return; }
    const float inv = 1.0f / absmax;
    int i = 0;
#if defined(__AVX512F__)
    const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
    const __m512 half = _mm512_set1_ps(0.5f), scale = _mm512_set1_ps(65535.0f);
    for (; i + 16 <= len; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);  /* max_ps(NaN, lo) = lo */
        v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(v, hi), half), scale), half);
        const __m512i k = _mm512_cvttps_epi32(v);
        const __m512i c = _mm512_i32gather_epi32(k, (const void *)lut, 1);
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(c));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
    const __m256 half = _mm256_set1_ps(0.5f), scale = _mm256_set1_ps(65535.0f);
    const __m256i byte = _mm256_set1_epi32(0xff);
    for (; i + 8 <= len; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        v = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(v, hi), half), scale), half);
        const __m256i k = _mm256_cvttps_epi32(v);
        const __m256i c = _mm256_and_si256(_mm256_i32gather_epi32((const int *)lut, k, 1), byte);
        const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64((__m128i *)(out + i), _mm_packus_epi16(w, w));
    }
#endif
    for (; i < len; i++) out[i] = fm_code(x[i], inv, lut);
}

/* |x| as bits for the absmax: equal to the float order for non-NaN values; NaN counts as 0, as
   bitsandbytes' std::max(absmax, fabs(x)) skips it. */
static inline uint32_t fm_absbits(float x) {
    const uint32_t u = fm_bits(x) & 0x7fffffffu;
    return u <= 0x7f800000u ? u : 0u;
}

static void fm_block(const fm_task *t, int64_t b) {
    const int64_t start = b * BLOCK;
    const int len = (int)(t->n - start < BLOCK ? t->n - start : BLOCK);
    float *p = t->p + start;
    const float *g = t->g + start;
    uint8_t *q1 = t->q1 + start;
    uint8_t *q2 = t->q2 + start;
    const float *code1 = t->code1, *code2 = t->code2;
    const float a1 = t->absmax1[b], a2 = t->absmax2[b];
    const float beta1 = t->beta1, alpha1 = t->alpha1, beta2 = t->beta2, alpha2 = t->alpha2;
    const float c2 = t->c2, eps = t->eps, decay = t->decay, step_size = t->step_size;
    float m[BLOCK], v[BLOCK];
    uint32_t mx1 = 0, mx2 = 0;
    int i = 0;
#if defined(__AVX512F__)
    {
        const __m512 va1 = _mm512_set1_ps(a1), va2 = _mm512_set1_ps(a2);
        const __m512 vb1 = _mm512_set1_ps(beta1), val1 = _mm512_set1_ps(alpha1);
        const __m512 vb2 = _mm512_set1_ps(beta2), val2 = _mm512_set1_ps(alpha2);
        const __m512 vc2 = _mm512_set1_ps(c2), veps = _mm512_set1_ps(eps);
        const __m512 vdecay = _mm512_set1_ps(decay), vstep = _mm512_set1_ps(step_size);
        const __m512i absmask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
        __m512i vmx1 = _mm512_setzero_si512(), vmx2 = _mm512_setzero_si512();
        for (; i + 16 <= len; i += 16) {
            const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q1 + i)));
            const __m512i i2 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q2 + i)));
            const __m512 s1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_i32gather_ps(i1, code1, 4), va1), vb1);
            const __m512 s2 = _mm512_mul_ps(_mm512_mul_ps(_mm512_i32gather_ps(i2, code2, 4), va2), vb2);
            const __m512 gi = _mm512_loadu_ps(g + i);
            const __m512 mi = _mm512_fmadd_ps(gi, val1, s1);
            const __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(val2, gi), gi, s2);
            const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), vc2), veps);
            const __m512 pd = _mm512_mul_ps(_mm512_loadu_ps(p + i), vdecay);
            _mm512_storeu_ps(p + i, _mm512_add_ps(pd, _mm512_div_ps(_mm512_mul_ps(vstep, mi), denom)));
            _mm512_storeu_ps(m + i, mi);
            _mm512_storeu_ps(v + i, vi);
            __m512i u1 = _mm512_and_si512(_mm512_castps_si512(mi), absmask);
            __m512i u2 = _mm512_and_si512(_mm512_castps_si512(vi), absmask);
            u1 = _mm512_maskz_mov_epi32(_mm512_cmple_epu32_mask(u1, inf), u1);
            u2 = _mm512_maskz_mov_epi32(_mm512_cmple_epu32_mask(u2, inf), u2);
            vmx1 = _mm512_max_epu32(vmx1, u1);
            vmx2 = _mm512_max_epu32(vmx2, u2);
        }
        mx1 = _mm512_reduce_max_epu32(vmx1);
        mx2 = _mm512_reduce_max_epu32(vmx2);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    {
        const __m256 va1 = _mm256_set1_ps(a1), va2 = _mm256_set1_ps(a2);
        const __m256 vb1 = _mm256_set1_ps(beta1), val1 = _mm256_set1_ps(alpha1);
        const __m256 vb2 = _mm256_set1_ps(beta2), val2 = _mm256_set1_ps(alpha2);
        const __m256 vc2 = _mm256_set1_ps(c2), veps = _mm256_set1_ps(eps);
        const __m256 vdecay = _mm256_set1_ps(decay), vstep = _mm256_set1_ps(step_size);
        const __m256i absmask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
        __m256i vmx1 = _mm256_setzero_si256(), vmx2 = _mm256_setzero_si256();
        for (; i + 8 <= len; i += 8) {
            const __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q1 + i)));
            const __m256i i2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q2 + i)));
            const __m256 s1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_i32gather_ps(code1, i1, 4), va1), vb1);
            const __m256 s2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_i32gather_ps(code2, i2, 4), va2), vb2);
            const __m256 gi = _mm256_loadu_ps(g + i);
            const __m256 mi = _mm256_fmadd_ps(gi, val1, s1);
            const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(val2, gi), gi, s2);
            const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), vc2), veps);
            const __m256 pd = _mm256_mul_ps(_mm256_loadu_ps(p + i), vdecay);
            _mm256_storeu_ps(p + i, _mm256_add_ps(pd, _mm256_div_ps(_mm256_mul_ps(vstep, mi), denom)));
            _mm256_storeu_ps(m + i, mi);
            _mm256_storeu_ps(v + i, vi);
            __m256i u1 = _mm256_and_si256(_mm256_castps_si256(mi), absmask);
            __m256i u2 = _mm256_and_si256(_mm256_castps_si256(vi), absmask);
            u1 = _mm256_and_si256(u1, _mm256_cmpeq_epi32(_mm256_min_epu32(u1, inf), u1));
            u2 = _mm256_and_si256(u2, _mm256_cmpeq_epi32(_mm256_min_epu32(u2, inf), u2));
            vmx1 = _mm256_max_epu32(vmx1, u1);
            vmx2 = _mm256_max_epu32(vmx2, u2);
        }
        uint32_t l1[8], l2[8];
        _mm256_storeu_si256((__m256i *)l1, vmx1);
        _mm256_storeu_si256((__m256i *)l2, vmx2);
        for (int j = 0; j < 8; j++) {
            mx1 = mx1 > l1[j] ? mx1 : l1[j];
            mx2 = mx2 > l2[j] ? mx2 : l2[j];
        }
    }
#endif
    for (; i < len; i++) {
        const float gi = g[i];
        const float mi = fmaf(gi, alpha1, code1[q1[i]] * a1 * beta1);
        const float vi = fmaf(alpha2 * gi, gi, code2[q2[i]] * a2 * beta2);
        const float denom = sqrtf(vi) / c2 + eps;
        p[i] = p[i] * decay + (step_size * mi) / denom;
        m[i] = mi;
        v[i] = vi;
        const uint32_t u1 = fm_absbits(mi), u2 = fm_absbits(vi);
        mx1 = mx1 > u1 ? mx1 : u1;
        mx2 = mx2 > u2 ? mx2 : u2;
    }
    t->absmax1[b] = fm_float(mx1);
    t->absmax2[b] = fm_float(mx2);
    fm_quantize(m, len, fm_float(mx1), t->lut1, q1);
    fm_quantize(v, len, fm_float(mx2), t->lut2, q2);
}

/* Threads take chunks of blocks from a shared counter: a thread whose core is busy with another
   process takes fewer, so the step does not wait for it (blocks are independent: the result
   does not depend on who steps which). */
#define FM_CHUNK 64

typedef struct {
    const fm_task *tasks;
    const int64_t *first;
    int ntasks;
    int64_t total;
    int64_t next;
} fm_work;

static void *fm_run(void *arg) {
    fm_work *w = (fm_work *)arg;
    for (;;) {
        const int64_t b0 = __atomic_fetch_add(&w->next, FM_CHUNK, __ATOMIC_RELAXED);
        if (b0 >= w->total) break;
        const int64_t b1 = b0 + FM_CHUNK < w->total ? b0 + FM_CHUNK : w->total;
        int lo = 0, hi = w->ntasks - 1;  /* the last task whose first block is <= b0 */
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (w->first[mid] <= b0) lo = mid; else hi = mid - 1;
        }
        int k = lo;
        for (int64_t b = b0; b < b1; b++) {
            while (b >= w->first[k + 1]) k++;
            fm_block(&w->tasks[k], b - w->first[k]);
        }
    }
    return 0;
}

/* 512: AVX-512 path, 256: AVX2 + FMA path, 0: plain C. */
int fm_isa(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

/* first: ntasks + 1 int64 of scratch (the first global block of each task). */
int fm_adamw8bit_step(const fm_task *tasks, int ntasks, int64_t *first, int nthreads) {
    first[0] = 0;
    for (int k = 0; k < ntasks; k++) first[k + 1] = first[k] + (tasks[k].n + BLOCK - 1) / BLOCK;
    fm_work work = {tasks, first, ntasks, first[ntasks], 0};
    const int64_t chunks = (work.total + FM_CHUNK - 1) / FM_CHUNK;
    if (nthreads > FM_MAX_THREADS) nthreads = FM_MAX_THREADS;
    if (nthreads > chunks) nthreads = (int)chunks;
    if (nthreads < 1) nthreads = 1;
    pthread_t threads[FM_MAX_THREADS];
    int started[FM_MAX_THREADS];
    for (int i = 1; i < nthreads; i++)
        started[i] = pthread_create(&threads[i], 0, fm_run, &work) == 0;
    fm_run(&work);  /* this thread works too; a thread that failed to start is not needed */
    for (int i = 1; i < nthreads; i++)
        if (started[i]) pthread_join(threads[i], 0);
    return 0;
}
"""

# -ffp-contract=off: no multiply-add fusion beyond the written fmaf/_fmadd_ps (bit-exactness);
# -fno-math-errno lets sqrtf be the instruction. Never -ffast-math.
_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
# Tried in order: the host's vector extensions first, plain C if the compiler refuses the flag.
_ARCH_FLAGS: tuple[tuple[str, ...], ...] = (("-march=native",), ())


class _Task(ctypes.Structure):
    """``fm_task`` of :data:`_C_SOURCE` (same field order and types)."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in
          ("p", "g", "q1", "q2", "absmax1", "absmax2", "code1", "code2", "lut1", "lut2")),
        ("n", ctypes.c_int64),
        *((name, ctypes.c_float) for name in
          ("beta1", "alpha1", "beta2", "alpha2", "c2", "eps", "decay", "step_size")),
    ]  # fmt: skip


class NativeKernelError(FastmidError, RuntimeError):
    """The fused kernel cannot be built or loaded here (the reason in one line)."""


class _Native:
    """The loaded library: ``step(tasks, threads)`` and the vector width it was built for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.fm_adamw8bit_step.argtypes = [
            ctypes.POINTER(_Task),
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int,
        ]
        self.lib.fm_adamw8bit_step.restype = ctypes.c_int
        self.lib.fm_isa.restype = ctypes.c_int
        self.isa = {512: "avx512", 256: "avx2"}.get(self.lib.fm_isa(), "c")

    def step(self, tasks: list[_Task], threads: int) -> None:
        """Step every task; ctypes releases the GIL for the call."""
        array = (_Task * len(tasks))(*tasks)
        first = (ctypes.c_int64 * (len(tasks) + 1))()
        self.lib.fm_adamw8bit_step(array, len(tasks), first, max(1, int(threads)))


_native_lock = threading.Lock()
_native: _Native | None = None
_native_error: str | None = None


def _compiler() -> str | None:
    """The C compiler: ``$CC`` (its first word), else the first of ``cc``, ``gcc``, ``clang`` on
    ``PATH``."""
    cc = os.environ.get("CC", "").split()
    candidates = cc[:1] or ["cc", "gcc", "clang"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def _machine_identity() -> str:
    """What decides which instructions ``-march=native`` may use: the CPU's model and flags
    (Linux ``/proc/cpuinfo``), else what ``platform`` knows. Part of the cache key, so a cache on
    a disk shared by different machines never hands one machine another's instructions."""
    parts = [platform.system(), platform.machine(), platform.processor()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                parts.append(line)
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _build(compiler: str, folder: Path) -> Path:
    """Compile :data:`_C_SOURCE` into ``folder`` (atomically: a temporary file renamed), or
    return the library built before with the same source, compiler and machine.

    Raises:
        NativeKernelError: the compiler failed with every flag set (its first error line).
    """
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        version = []
    key = hashlib.sha256(
        "\0".join(
            [
                _C_SOURCE,
                *_CFLAGS,
                *map(" ".join, _ARCH_FLAGS),
                compiler,
                *version,
                _machine_identity(),
            ]
        ).encode()
    ).hexdigest()[:20]
    target = folder / f"adamw8bit_cpu-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    error = "no output"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        source = Path(tmp) / "adamw8bit_cpu.c"
        source.write_text(_C_SOURCE)
        for arch in _ARCH_FLAGS:
            out = Path(tmp) / "lib.so"
            try:
                done = subprocess.run(
                    [compiler, *_CFLAGS, *arch, str(source), "-o", str(out)],
                    capture_output=True, text=True, timeout=300,
                )  # fmt: skip
            except (OSError, subprocess.SubprocessError) as exc:
                error = str(exc)
                continue
            if done.returncode == 0 and out.is_file():
                os.replace(out, target)  # another process may have won the race: same bytes
                return target
            error = next((x for x in done.stderr.splitlines() if "error" in x), done.stderr[:200])
    raise NativeKernelError(
        f"{Path(compiler).name} failed to build the 8-bit AdamW kernel: {error}"
    )


def native_kernel() -> _Native:
    """The fused kernel, built and checked once per process (thread-safe).

    Built into ``cache_root() / "adamw8bit_cpu"``; where that folder is not writable, into a
    temporary folder for this process. Before first use the kernel steps a small problem
    (:func:`_self_check`) and must match the ``torch`` backend (on the correctly rounded square
    root) bit for bit.

    Raises:
        NativeKernelError: no C compiler, the build failed, the library does not load, or it
            disagrees with the torch backend (one line; the same error on every later call).
    """
    global _native, _native_error
    with _native_lock:
        if _native is not None:
            return _native
        if _native_error is not None:
            raise NativeKernelError(_native_error)
        try:
            compiler = _compiler()
            if compiler is None:
                raise NativeKernelError("no C compiler found ($CC, cc, gcc or clang)")
            try:
                path = _build(compiler, cache_root() / "adamw8bit_cpu")
            except OSError:  # read-only or full cache: a private folder, removed once loaded
                with tempfile.TemporaryDirectory(prefix="fastmid-adamw8bit-") as tmp:
                    native = _Native(_build(compiler, Path(tmp)))
            else:
                native = _Native(path)
            problem = _self_check(native)
            if problem:
                raise NativeKernelError(f"the 8-bit AdamW kernel ({native.path}) {problem}")
        except NativeKernelError as exc:
            _native_error = str(exc)
            raise
        except OSError as exc:  # the library does not load
            _native_error = f"the 8-bit AdamW kernel does not load: {exc}"
            raise NativeKernelError(_native_error) from None
        _native = native
        return native


def native_status() -> str:
    """One line: the kernel in use (``native (avx512) <path>``) or why the torch backend runs."""
    try:
        native = native_kernel()
    except NativeKernelError as exc:
        return f"torch ({exc})"
    return f"native ({native.isa}) {native.path}"


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' dynamic tree code book (``create_dynamic_map(signed, 7, 8)``, the same torch
    float32 operations, so the same values).

    Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning": a sign bit (signed
    map only), a run of zero bits that sets the decimal exponent (``10**-6 .. 10**0``), a one bit,
    and the remaining bits a linear fraction in ``[0.1, 1]``. 256 sorted values in ``[-1, 1]``
    (signed: ``-0.99297 .. 1``, with ``0`` at index 127) or ``[0, 1]`` (unsigned).

    Returns:
        float32 ``[256]``.
    """
    data: list[float] = []
    non_sign_bits, max_exponent_bits = 7, 7  # total_bits 8: no extra linear items
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def quantization_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes 0.50's CPU quantization table of a code book (``build_quantize_lut``).

    Entry ``k`` is the first index ``i`` with ``0.5 * (code[i] + code[i + 1]) >= -1 + 2k / 65535``
    (255 if none): for a sorted code book, the code nearest the centre of uniform bin ``k``.
    Computed with the same float32 operations as bitsandbytes.

    Args:
        code: float32 ``[256]``.

    Returns:
        uint8 ``[65536]``.
    """
    code = code.detach().to(torch.float32).reshape(-1).cpu()
    if code.numel() != 256:
        raise ValueError(f"a code book has 256 values, not {code.numel()}")
    mid = 0.5 * (code[:-1] + code[1:])
    centres = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    # bitsandbytes advances one index while the midpoint is below the centre; the running max of
    # the midpoints gives the same first index for any code book, sorted or not.
    return torch.searchsorted(torch.cummax(mid, 0).values, centres, side="left").to(torch.uint8)


def _as_blocks(flat: torch.Tensor) -> torch.Tensor:
    """``[blocks, 256]`` view of a flat tensor (zero-padded copy when the last block is partial)."""
    if flat.numel() % BLOCK_SIZE:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK_SIZE))
    return flat.view(-1, BLOCK_SIZE)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, lut: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 8-bit quantization, bitsandbytes 0.50's CPU rule (module docstring), in torch.

    Args:
        x: float32, any shape, blocks of 256 consecutive elements in memory order.
        code: float32 ``[256]`` code book.
        lut: :func:`quantization_lut` of ``code`` (computed when omitted).

    Returns:
        ``(codes, absmax)``: uint8 of ``x``'s shape and float32 ``[ceil(numel / 256)]``, the
        block's largest ``|x|`` (code 0 everywhere in a block whose absmax is 0).
    """
    lut = quantization_lut(code) if lut is None else lut[:LUT_SIZE]
    n = x.numel()
    blocks = _as_blocks(x.detach().reshape(-1).to(torch.float32))
    # max |x| without a copy of |x|; abs_ turns a -0.0 into bitsandbytes' +0.0
    absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).abs_()
    scaled = blocks * torch.ones_like(absmax).div_(absmax)[:, None]  # x * (1 / absmax)
    scaled.clamp_(-1.0, 1.0)
    # (x + 1) * 0.5 rounds as 0.5 * x + 0.5 in one fused step (halving is exact), and the fused
    # t * 65535 + 0.5 floors as the two-step one at every bin edge (checked exhaustively near all
    # 65535 edges): two passes instead of four, the same bins.
    half = torch.tensor(0.5)
    k = torch.add(half, torch.add(half, scaled, alpha=0.5), alpha=LUT_SIZE - 1)
    k = k.to(torch.int32).clamp_(0, LUT_SIZE - 1)  # NaN becomes 0, as -1 in the kernel
    codes = lut.index_select(0, k.view(-1)).view(-1, BLOCK_SIZE)
    codes[absmax == 0] = 0
    return codes.view(-1)[:n].view(x.shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor
) -> torch.Tensor:
    """``code[codes] * absmax[block]`` in float32, of ``codes``' shape."""
    n = codes.numel()
    values = _as_blocks(code.index_select(0, codes.reshape(-1).to(torch.int32)))
    return values.mul_(absmax[:, None]).view(-1)[:n].view(codes.shape)


class AdamW8bitCPU(torch.optim.Optimizer):
    """bitsandbytes' ``AdamW8bit`` for CPU tensors, with a fused step (module docstring).

    Same constructor arguments and defaults as ``bitsandbytes.optim.AdamW8bit`` (``amsgrad``,
    ``optim_bits``, ``args``, ``is_paged`` aside), plus ``backend``.

    Args:
        params: parameters or param-group dicts (``weight_decay`` etc. per group).
        lr: learning rate.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to ``sqrt(v) / sqrt(1 - beta2**t)``.
        weight_decay: decoupled weight decay (``p *= 1 - lr * wd``), >= 0.
        min_8bit_size: tensors with fewer elements keep float32 states.
        backend: ``auto``, ``native`` or ``torch`` (module docstring).

    Raises:
        ValueError: a hyperparameter out of range, an unknown backend, or a parameter that is not
            on the CPU.
        NativeKernelError: ``backend="native"`` where the kernel cannot be built.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = MIN_8BIT_SIZE,
        backend: str = "auto",
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        # bitsandbytes' group keys, so that its optimizer reads these groups and vice versa
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=0.0,
            t_alpha=None, t_beta3=None,
        )  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type != "cpu":
                    raise ValueError(
                        f"AdamW8bitCPU steps CPU tensors only, not {p.device.type}; use "
                        "bitsandbytes' AdamW8bit there"
                    )
        self.min_8bit_size = int(min_8bit_size)
        self.backend = backend
        # One code book of each kind shared by every tensor, as bitsandbytes' name2qmap.
        self._qmaps = {"dynamic": dynamic_map(signed=True), "udynamic": dynamic_map(signed=False)}
        self._luts: dict[bytes, torch.Tensor] = {}
        if backend == "native":
            native_kernel()

    # ---- state --------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """bitsandbytes' ``Optimizer2State.init_state`` for ``optim_bits=8``."""
        state["step"] = 0
        if p.numel() < self.min_8bit_size:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32)
            return
        blocks = -(-p.numel() // BLOCK_SIZE)
        state["state1"] = torch.zeros_like(
            p, dtype=torch.uint8, memory_format=torch.contiguous_format
        )
        state["qmap1"] = self._qmaps["dynamic"]
        state["state2"] = torch.zeros_like(
            p, dtype=torch.uint8, memory_format=torch.contiguous_format
        )
        state["qmap2"] = self._qmaps["udynamic"]
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` with the quantization tensors of each parameter
        nested under ``__bnb_optimizer_quant_state__`` (bitsandbytes' layout). The tensors are
        the live ones, not copies (as torch and bitsandbytes do)."""
        state_dict = super().state_dict()
        state_dict["state"] = {
            k: dict(v) if isinstance(v, dict) else v for k, v in state_dict["state"].items()
        }
        for entry in state_dict["state"].values():
            if isinstance(entry, dict):
                quant = {k: entry.pop(k) for k in [k for k in entry if k in QUANT_STATE_KEYS]}
                if quant:
                    entry[QUANT_STATE_KEY] = quant
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of this class or of bitsandbytes' ``AdamW8bit`` (nested or not).

        The state is deep-copied (tensors shared inside it, such as the code books, stay
        shared), tensors are moved to their parameter's device without changing dtype, and every
        tensor is checked against its parameter before anything live changes.

        Raises:
            ValueError: another number of groups or parameters, or a state tensor whose dtype,
                shape or size does not fit its parameter (named by index and key).
        """
        state_dict = copy.deepcopy(state_dict)
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups, strict=True)
        ):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
        params = [p for g in groups for p in g["params"]]
        saved_ids = [i for s in saved_groups for i in s["params"]]
        id_map = dict(zip(saved_ids, params, strict=True))
        state: dict[Any, dict[str, Any]] = {}
        for index, entry in state_dict["state"].items():
            if index not in id_map or not isinstance(entry, dict):
                continue
            p = id_map[index]
            entry = dict(entry)
            entry.update(entry.pop(QUANT_STATE_KEY, None) or {})
            for key, value in list(entry.items()):
                if isinstance(value, torch.Tensor):
                    if key == "step":
                        entry[key] = int(value.item())
                    elif key not in QUANT_STATE_KEYS and value.is_floating_point():
                        entry[key] = value.to(device=p.device, dtype=p.dtype)
                    else:
                        entry[key] = value.to(device=p.device)
            problem = _state_problem(entry, p)
            if problem:
                raise ValueError(f"state {index}: {problem}")
            state[p] = entry
        param_groups = [
            {**s, "params": g["params"]} for g, s in zip(groups, saved_groups, strict=True)
        ]
        self.__setstate__({"state": state, "param_groups": param_groups})

    # ---- step ---------------------------------------------------------------------------------

    def _lut(self, code: torch.Tensor) -> torch.Tensor:
        """The kernel's table of ``code``: :func:`quantization_lut` plus 3 padding bytes (the
        kernel reads 4 bytes at an index and keeps one). Cached by the code book's values."""
        key = code.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()
        lut = self._luts.get(key)
        if lut is None:
            if len(self._luts) >= 8:  # code books only change by loading a state
                self._luts.clear()
            lut = torch.cat([quantization_lut(code), torch.zeros(3, dtype=torch.uint8)])
            self._luts[key] = lut
        return lut

    def _use_native(self) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "native":
            native_kernel()
            return True
        try:
            native_kernel()
        except NativeKernelError as exc:
            if not getattr(self, "_warned", False):
                _log.warning("AdamW8bitCPU runs on torch ops (slower): %s", exc)
                self._warned = True
            return False
        return True

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW step for every parameter with a gradient (module docstring).

        Raises:
            RuntimeError: a sparse gradient.
            ValueError: a state tensor that does not fit its parameter (replaced after loading).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        native = self._use_native()
        tasks: list[_Task] = []
        for group in self.param_groups:
            lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            beta1, beta2 = (float(b) for b in group["betas"][:2])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bitCPU does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                t = state["step"]
                if state["state1"].dtype == torch.float32:
                    _step_32bit(p, state, lr, beta1, beta2, eps, wd, t)
                    continue
                problem = _state_problem(state, p)
                if problem:
                    raise ValueError(f"AdamW8bitCPU state of a {tuple(p.shape)} tensor: {problem}")
                luts = (self._lut(state["qmap1"]), self._lut(state["qmap2"]))
                if native and _native_ready(p):
                    tasks.append(_task(p, p.grad, state, luts, lr, beta1, beta2, eps, wd, t))
                else:
                    _step_8bit_torch(p, state, luts, lr, beta1, beta2, eps, wd, t)
        if tasks:
            native_kernel().step(tasks, torch.get_num_threads())
        return loss


def _task(
    p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
    luts: tuple[torch.Tensor, torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
    wd: float, t: int,
) -> _Task:  # fmt: skip
    """One kernel task over live memory (the caller keeps every tensor alive through the call).
    The scalars become float32 (ctypes rounds to nearest) as ATen rounds Python scalars."""
    return _Task(
        p.data_ptr(), grad.data_ptr(),
        state["state1"].data_ptr(), state["state2"].data_ptr(),
        state["absmax1"].data_ptr(), state["absmax2"].data_ptr(),
        state["qmap1"].data_ptr(), state["qmap2"].data_ptr(),
        luts[0].data_ptr(), luts[1].data_ptr(),
        p.numel(),
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2**t), eps,
        1.0 - lr * wd if wd > 0.0 else 1.0,  # x * 1.0f is x: the same as skipping the decay
        -lr / (1.0 - beta1**t),
    )  # fmt: skip


def _self_check(native: _Native) -> str | None:
    """Step two small tensors (a partial last block, a block whose states become 0, weight decay
    and none; two threads) at steps 1 and 7 with ``native`` and with the torch backend on the correctly
    rounded square root; what differs, or None when every parameter, code and scale is
    bit-identical."""
    gen = torch.Generator().manual_seed(0)
    code1, code2 = dynamic_map(signed=True), dynamic_map(signed=False)
    luts = tuple(
        torch.cat([quantization_lut(c), torch.zeros(3, dtype=torch.uint8)]) for c in (code1, code2)
    )
    cases = []
    # 71 + 2 blocks: two chunks of the kernel's work queue, the second crossing into tensor 2
    for n, wd in ((70 * BLOCK_SIZE + 37, 0.1), (2 * BLOCK_SIZE, 0.0)):
        blocks = -(-n // BLOCK_SIZE)
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 1e-2
        g[BLOCK_SIZE : 2 * BLOCK_SIZE] = 0.0
        state = {
            "state1": torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen),
            "state2": torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen),
            "absmax1": torch.rand(blocks, generator=gen) * 1e-2,
            "absmax2": torch.rand(blocks, generator=gen) * 1e-4,
            "qmap1": code1, "qmap2": code2,
        }  # fmt: skip
        state["absmax1"][1] = state["absmax2"][1] = 0.0  # block 1's m and v become exactly 0
        cases.append((p, g, state, wd))
    for t in (1, 7):
        ours, theirs = [], []
        for p, g, state, wd in cases:
            copies = [(p.clone(), g, {k: v.clone() for k, v in state.items()}) for _ in range(2)]
            ours.append(copies[0])
            theirs.append(copies[1])
            q, _g, st = copies[1]
            q.grad = g
            _step_8bit_torch(q, st, luts, 1e-3, 0.9, 0.999, 1e-8, wd, t, exact_sqrt=True)
        native.step(
            [_task(q, g, st, luts, 1e-3, 0.9, 0.999, 1e-8, wd, t)
             for (q, g, st), (_p, _g, _s, wd) in zip(ours, cases, strict=True)],
            2,
        )  # fmt: skip
        for (q0, _g0, st0), (q1, _g1, st1) in zip(ours, theirs, strict=True):
            pairs = [("parameter", q0, q1)] + [(k, st0[k], st1[k]) for k in st0]
            for key, a, b in pairs:
                a = a.view(torch.int32) if a.dtype == torch.float32 else a
                b = b.view(torch.int32) if b.dtype == torch.float32 else b
                if not torch.equal(a, b):
                    return f"differs from the torch backend in '{key}' at step {t}"
    return None


def _native_ready(p: torch.Tensor) -> bool:
    """The kernel reads float32 contiguous parameter and gradient memory directly."""
    g = p.grad
    return (
        p.dtype == torch.float32 and g.dtype == torch.float32
        and p.is_contiguous() and g.is_contiguous() and g.device.type == "cpu"
    )  # fmt: skip


def _state_problem(state: dict[str, Any], p: torch.Tensor) -> str | None:
    """What is wrong with ``state`` for parameter ``p`` (the kernel reads raw memory), or None."""
    if "state1" not in state or "state2" not in state:
        return "no state1/state2"
    if not isinstance(state.get("step", 0), int):
        return f"step is a {type(state['step']).__name__}, not an int"
    s1 = state["state1"]
    if not isinstance(s1, torch.Tensor) or s1.dtype not in (torch.uint8, torch.float32):
        return "state1 is not a uint8 or float32 tensor"
    need: dict[str, tuple[torch.dtype, int]] = {
        "state1": (s1.dtype, p.numel()),
        "state2": (s1.dtype, p.numel()),
    }
    if s1.dtype == torch.uint8:
        blocks = -(-p.numel() // BLOCK_SIZE)
        need |= {
            "absmax1": (torch.float32, blocks), "absmax2": (torch.float32, blocks),
            "qmap1": (torch.float32, 256), "qmap2": (torch.float32, 256),
        }  # fmt: skip
    for key, (dtype, numel) in need.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            return f"'{key}' is missing"
        if value.dtype != dtype or value.numel() != numel or value.device.type != "cpu":
            return (
                f"'{key}' is {value.dtype} [{value.numel()}] on {value.device.type}, needs "
                f"{dtype} [{numel}] on cpu"
            )
        if key.startswith("state") and tuple(value.shape) != tuple(p.shape):
            return f"'{key}' has shape {tuple(value.shape)}, its parameter's is {tuple(p.shape)}"
        if not value.is_contiguous():
            state[key] = value.contiguous()
    return None


def _step_32bit(
    p: torch.Tensor, state: dict[str, Any], lr: float, beta1: float, beta2: float, eps: float,
    wd: float, t: int,
) -> None:  # fmt: skip
    """bitsandbytes 0.50's ``_optimizer_update_32bit_cpu`` for ``adam``, op for op (float32
    states of tensors under ``min_8bit_size``)."""
    g = p.grad.float()
    p32 = p.data.float()
    s1, s2 = state["state1"], state["state2"]
    s1.mul_(beta1).add_(g, alpha=1.0 - beta1)
    s2.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**t
    correction2 = math.sqrt(1.0 - beta2**t)
    if wd > 0.0:
        p32.mul_(1.0 - lr * wd)
    update = s1 / (s2.sqrt() + eps * correction2)
    p32.add_(update, alpha=-lr * correction2 / correction1)
    if p32 is not p.data:
        p.data.copy_(p32)


def _step_8bit_torch(
    p: torch.Tensor, state: dict[str, Any], luts: tuple[torch.Tensor, torch.Tensor], lr: float,
    beta1: float, beta2: float, eps: float, wd: float, t: int, exact_sqrt: bool = False,
) -> None:  # fmt: skip
    """bitsandbytes 0.50's ``_optimizer_update_8bit_blockwise_cpu`` for ``adam``, op for op, with
    this module's (identical) quantization: the ``torch`` backend, and the path of parameters
    the kernel does not take. ``exact_sqrt``: the correctly rounded square root instead of
    torch's, which makes this the kernel's exact reference."""
    s1 = dequantize_blockwise(state["state1"], state["absmax1"], state["qmap1"])
    s2 = dequantize_blockwise(state["state2"], state["absmax2"], state["qmap2"])
    g = p.grad.float()
    p32 = p.data.float()
    s1.mul_(beta1).add_(g, alpha=1.0 - beta1)
    s2.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**t
    correction2 = math.sqrt(1.0 - beta2**t)
    # torch.sqrt of float32 is MKL's vsSqrt, within 1 ulp (bitsandbytes' result); the float64
    # square root rounded to float32 is the correctly rounded one, the kernel's sqrtf.
    root = s2.double().sqrt().float() if exact_sqrt else s2.sqrt()
    denom = (root / correction2).add_(eps)
    if wd > 0.0:
        p32.mul_(1.0 - lr * wd)
    p32.addcdiv_(s1, denom, value=-lr / correction1)
    if p32 is not p.data:
        p.data.copy_(p32)
    for which, value, lut in (("1", s1, luts[0]), ("2", s2, luts[1])):
        codes, absmax = quantize_blockwise(value, state[f"qmap{which}"], lut[:LUT_SIZE])
        state[f"state{which}"].copy_(codes)
        state[f"absmax{which}"].copy_(absmax)
