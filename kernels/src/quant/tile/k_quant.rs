//! Q4_K and Q6_K repacked eight rows at a time, and their products tiled
//! across token rows.
//!
//! A super-block holds 256 elements of a row in 8 sub-blocks of 32. At
//! load, the 8 rows' super-blocks at one position become one group
//! ([`Q4Kx8`], [`Q6Kx8`]): the row scales side by side, and for each
//! sub-block 8 vectors of 32 bytes, vector `j` holding elements
//! `4j..4j + 4` of the sub-block for each of the 8 rows (4 bytes a row).
//! Two sub-blocks share the bytes of one vector, one in each nibble; Q6_K's
//! two high bits of 4 sub-blocks share one more. Nothing is lost: a group
//! holds exactly the bits of its 8 blocks (Q4_K's 6-bit scales one to a
//! byte, as the row kernels hold them).
//!
//! The activations are Q8_K, as ggml quantizes them for these types, in
//! element order: vector `j` of a sub-block meets the 4 activation bytes
//! `4j..4j + 4` broadcast to every lane, and lane `r` sums row `r`. The
//! products of a sub-block are summed in 16 bits (exact: below 2^15 for
//! the ranges here) and then multiplied by the rows' sub-block scales in
//! one `vpmaddwd`, so each super-block's sum is an exact integer per row,
//! and one multiply-add by the 8 row scales (times the activation scale)
//! adds it to 8 outputs at once, as [`super`] does for 32-element blocks.
//!
//! Every path runs the same integer sums and the same float operations in
//! the same order as the scalar reference, so all give the same bits. The
//! x86 paths all run the AVX2 instructions: VNNI's `vpdpbusd` would fuse
//! two of them, but these kernels are checked bit for bit only on the
//! machines the tests run on.

use half::f16;

use super::{regroup, TileGroup, TILE_ROWS};
use crate::quant::{
    q4_k_value, q6_k_value, quantize_row_q8_k, BlockQ4K, BlockQ6K, CpuPath, QK_K, ZERO_Q8K,
};

/// Sub-blocks of 32 elements in a super-block.
const SUBS: usize = QK_K / 32;

/// A Q8_K activation block for the tiled kernels: the quants and scale of
/// [`quantize_row_q8_k`], the sums of each 16 quants (`b16`) and of each
/// 32 (`b32`), which the Q6_K offsets and Q4_K minimums meet.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct ActK {
    pub qs: [i8; QK_K],
    pub d: f32,
    pub b16: [i16; QK_K / 16],
    pub b32: [i16; SUBS],
}

/// An all-zero activation block.
pub const ZERO_ACT_K: ActK = ActK {
    qs: [0; QK_K],
    d: 0.0,
    b16: [0; QK_K / 16],
    b32: [0; SUBS],
};

/// Quantizes one activation row (a multiple of 256 long) for the tiled
/// K-quant kernels.
pub fn quantize_row(x: &[f32], out: &mut [ActK]) {
    let mut q = [ZERO_Q8K];
    for (xs, o) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        quantize_row_q8_k(xs, &mut q);
        o.qs = q[0].qs;
        o.d = q[0].d;
        o.b16 = q[0].bsums;
        for (s, b) in o.b32.iter_mut().enumerate() {
            *b = o.b16[2 * s] + o.b16[2 * s + 1];
        }
    }
}

/// Eight Q4_K rows' super-blocks. Element `l` of sub-block `s` of row `r`
/// is `d[r] · sc[s][r] · q − dmin[r] · m`, where `m` is
/// `mp[s / 2][2r + s % 2]` and `q` the nibble (low for even `s`, high for
/// odd) of byte `32 j + 4 r + e` of `qs[s / 2]`, `l = 4 j + e`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q4Kx8 {
    pub d: [f16; TILE_ROWS],
    pub dmin: [f16; TILE_ROWS],
    pub sc: [[u8; TILE_ROWS]; SUBS],
    pub mp: [[u8; 2 * TILE_ROWS]; SUBS / 2],
    pub qs: [[u8; 32 * TILE_ROWS]; SUBS / 2],
}

/// Eight Q6_K rows' super-blocks. Element `l = 4 j + e` of sub-block `s`
/// of row `r` is `d[r] · sc · (q − 32)`: `sc` is `sp[s][2r + l / 16]`, and
/// `q`'s low 4 bits are the nibble (low for even `s`) of byte
/// `32 j + 4 r + e` of `ql[s / 2]`, its high 2 bits at bits `2 (s % 4)` of
/// the same byte of `qh[s / 4]`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q6Kx8 {
    pub d: [f16; TILE_ROWS],
    pub sp: [[i8; 2 * TILE_ROWS]; SUBS],
    pub ql: [[u8; 32 * TILE_ROWS]; SUBS / 2],
    pub qh: [[u8; 32 * TILE_ROWS]; SUBS / 4],
}

const _: () = assert!(std::mem::size_of::<Q4Kx8>() == 8 * 148);
const _: () = assert!(std::mem::size_of::<Q6Kx8>() == 8 * 210);

/// The byte of a repacked sub-block vector array holding element `l` of
/// row `r`.
#[inline]
const fn at(r: usize, l: usize) -> usize {
    32 * (l / 4) + 4 * r + l % 4
}

/// Repacks `rows` Q4_K rows (a multiple of 8) of `bpr` super-blocks each.
pub fn repack_q4_k(
    rows: usize,
    bpr: usize,
    block: impl Fn(usize) -> BlockQ4K + Sync,
) -> Vec<Q4Kx8> {
    regroup(rows, bpr, block, |b| {
        let mut g = Q4Kx8 {
            d: b.map(|b| b.d),
            dmin: b.map(|b| b.dmin),
            sc: [[0; TILE_ROWS]; SUBS],
            mp: [[0; 2 * TILE_ROWS]; SUBS / 2],
            qs: [[0; 32 * TILE_ROWS]; SUBS / 2],
        };
        for (r, b) in b.iter().enumerate() {
            for s in 0..SUBS {
                g.sc[s][r] = b.sc[s];
                g.mp[s / 2][2 * r + s % 2] = b.m[s];
                for l in 0..32 {
                    g.qs[s / 2][at(r, l)] |= q4_k_value(b, 32 * s + l) << (4 * (s % 2));
                }
            }
        }
        g
    })
}

/// Repacks `rows` Q6_K rows (a multiple of 8) of `bpr` super-blocks each.
pub fn repack_q6_k(
    rows: usize,
    bpr: usize,
    block: impl Fn(usize) -> BlockQ6K + Sync,
) -> Vec<Q6Kx8> {
    regroup(rows, bpr, block, |b| {
        let mut g = Q6Kx8 {
            d: b.map(|b| b.d),
            sp: [[0; 2 * TILE_ROWS]; SUBS],
            ql: [[0; 32 * TILE_ROWS]; SUBS / 2],
            qh: [[0; 32 * TILE_ROWS]; SUBS / 4],
        };
        for (r, b) in b.iter().enumerate() {
            for s in 0..SUBS {
                for l in 0..32 {
                    let (q, sc) = q6_k_value(b, 32 * s + l);
                    let q = q as u8;
                    g.sp[s][2 * r + l / 16] = sc as i8;
                    g.ql[s / 2][at(r, l)] |= (q & 0x0f) << (4 * (s % 2));
                    g.qh[s / 4][at(r, l)] |= (q >> 4) << (2 * (s % 4));
                }
            }
        }
        g
    })
}

impl Q4Kx8 {
    /// Row `r`'s 4-bit value of element `l` of sub-block `s`.
    #[inline]
    fn value(&self, r: usize, s: usize, l: usize) -> i32 {
        ((self.qs[s / 2][at(r, l)] >> (4 * (s % 2))) & 0x0f) as i32
    }

    /// Row `r`'s minimum of sub-block `s`.
    #[inline]
    fn min(&self, r: usize, s: usize) -> i32 {
        self.mp[s / 2][2 * r + s % 2] as i32
    }
}

impl Q6Kx8 {
    /// Row `r`'s 6-bit value (0..64) of element `l` of sub-block `s`.
    #[inline]
    fn value(&self, r: usize, s: usize, l: usize) -> i32 {
        let lo = (self.ql[s / 2][at(r, l)] >> (4 * (s % 2))) & 0x0f;
        let hi = (self.qh[s / 4][at(r, l)] >> (2 * (s % 4))) & 3;
        (lo | (hi << 4)) as i32
    }
}

/// The scalar reference's walk: `sums(group, row, act)` gives a
/// super-block's exact integer sum and (for Q4_K) its minimums' sum.
#[inline]
fn scalar<G, const T: usize>(
    w: &[G],
    ys: [&[ActK]; T],
    sums: impl Fn(&G, usize, &ActK) -> (f32, i32, Option<(f32, i32)>),
) -> [[f32; TILE_ROWS]; T] {
    let n = ys.iter().fold(w.len(), |n, y| n.min(y.len()));
    let mut out = [[0f32; TILE_ROWS]; T];
    for (t, y) in ys.iter().enumerate() {
        for (b, g) in w.iter().enumerate().take(n) {
            let a = &y[b];
            for (r, acc) in out[t].iter_mut().enumerate() {
                let (d, isum, min) = sums(g, r, a);
                *acc = (d * a.d).mul_add(isum as f32, *acc);
                if let Some((dmin, msum)) = min {
                    *acc = (dmin * -a.d).mul_add(msum as f32, *acc);
                }
            }
        }
    }
    out
}

impl TileGroup for Q4Kx8 {
    type Act = ActK;
    const ELEMS: usize = QK_K;

    fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let (d, dmin) = (self.d[r].to_f32(), self.dmin[r].to_f32());
        for (e, o) in out.iter_mut().enumerate().take(QK_K) {
            let (s, l) = (e / 32, e % 32);
            *o = d * self.sc[s][r] as f32 * self.value(r, s, l) as f32
                - dmin * self.min(r, s) as f32;
        }
    }

    fn tile_scalar<const T: usize>(w: &[Self], ys: [&[ActK]; T]) -> [[f32; TILE_ROWS]; T] {
        scalar(w, ys, |g, r, a| {
            let mut isum = 0i32;
            let mut msum = 0i32;
            for s in 0..SUBS {
                let dot: i32 = (0..32)
                    .map(|l| g.value(r, s, l) * a.qs[32 * s + l] as i32)
                    .sum();
                isum += g.sc[s][r] as i32 * dot;
                msum += g.min(r, s) * a.b32[s] as i32;
            }
            (g.d[r].to_f32(), isum, Some((g.dmin[r].to_f32(), msum)))
        })
    }

    #[inline]
    fn tile_on<const T: usize>(
        path: CpuPath,
        w: &[Self],
        ys: [&[ActK]; T],
    ) -> [[f32; TILE_ROWS]; T] {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        if path != CpuPath::Portable {
            // SAFETY: AVX2, FMA and F16C are enabled at compile time.
            return unsafe { avx2::tile_q4_k(w, ys) };
        }
        let _ = path;
        Self::tile_scalar(w, ys)
    }
}

impl TileGroup for Q6Kx8 {
    type Act = ActK;
    const ELEMS: usize = QK_K;

    fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let d = self.d[r].to_f32();
        for (e, o) in out.iter_mut().enumerate().take(QK_K) {
            let (s, l) = (e / 32, e % 32);
            let sc = self.sp[s][2 * r + l / 16] as f32;
            *o = d * sc * (self.value(r, s, l) - 32) as f32;
        }
    }

    fn tile_scalar<const T: usize>(w: &[Self], ys: [&[ActK]; T]) -> [[f32; TILE_ROWS]; T] {
        scalar(w, ys, |g, r, a| {
            let isum: i32 = (0..QK_K)
                .map(|e| {
                    let (s, l) = (e / 32, e % 32);
                    let sc = g.sp[s][2 * r + l / 16] as i32;
                    sc * (g.value(r, s, l) - 32) * a.qs[e] as i32
                })
                .sum();
            (g.d[r].to_f32(), isum, None)
        })
    }

    #[inline]
    fn tile_on<const T: usize>(
        path: CpuPath,
        w: &[Self],
        ys: [&[ActK]; T],
    ) -> [[f32; TILE_ROWS]; T] {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        if path != CpuPath::Portable {
            // SAFETY: AVX2, FMA and F16C are enabled at compile time.
            return unsafe { avx2::tile_q6_k(w, ys) };
        }
        let _ = path;
        Self::tile_scalar(w, ys)
    }
}

/// The tiled K-quant kernels with AVX2 and FMA.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx2 {
    use super::{ActK, Q4Kx8, Q6Kx8, SUBS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// The 4 bytes at `p` in every lane.
    #[inline(always)]
    unsafe fn bcast(p: *const i8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// The 8 f16 row scales widened.
    #[inline(always)]
    unsafe fn scales(d: &[half::f16; TILE_ROWS]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i))
    }

    #[inline(always)]
    unsafe fn store<const T: usize>(acc: [__m256; T]) -> [[f32; TILE_ROWS]; T] {
        let mut out = [[0f32; TILE_ROWS]; T];
        for (o, a) in out.iter_mut().zip(acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), a);
        }
        out
    }

    /// Vector `j` of a repacked sub-block array.
    #[inline(always)]
    unsafe fn load(v: &[u8; 256], j: usize) -> __m256i {
        _mm256_loadu_si256(v.as_ptr().add(32 * j) as *const __m256i)
    }

    /// Nibble `half` (0 low, 1 high) of each byte of `v`'s 8 vectors.
    #[inline(always)]
    unsafe fn nibbles(v: &[u8; 256], half: usize) -> [__m256i; 8] {
        let low = _mm256_set1_epi8(0x0f);
        std::array::from_fn(|j| {
            let q = load(v, j);
            if half == 0 {
                _mm256_and_si256(q, low)
            } else {
                _mm256_and_si256(_mm256_srli_epi16(q, 4), low)
            }
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q4_k<const T: usize>(
        w: &[Q4Kx8],
        ys: [&[ActK]; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let n = ys.iter().fold(w.len(), |n, y| n.min(y.len()));
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..n {
            let g = w.get_unchecked(b);
            let mut isum = [_mm256_setzero_si256(); T];
            for s in 0..SUBS {
                let x = nibbles(&g.qs[s / 2], s % 2);
                // each row's scale in both 16-bit halves of its lane
                let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(g.sc[s].as_ptr() as *const __m128i));
                let sc = _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16));
                for t in 0..T {
                    let a = ys[t].get_unchecked(b).qs.as_ptr().add(32 * s);
                    // 8 products of nibbles by bytes: below 8 · 2 · 15 · 127 < 2^15
                    let mut p = _mm256_maddubs_epi16(x[0], bcast(a));
                    for (j, xj) in x.iter().enumerate().skip(1) {
                        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(*xj, bcast(a.add(4 * j))));
                    }
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, sc));
                }
            }
            let dw = scales(&g.d);
            let mw = scales(&g.dmin);
            let mp: [__m256i; SUBS / 2] = std::array::from_fn(|i| {
                _mm256_cvtepu8_epi16(_mm_loadu_si128(g.mp[i].as_ptr() as *const __m128i))
            });
            for t in 0..T {
                let a = ys[t].get_unchecked(b);
                let mut msum = _mm256_setzero_si256();
                for (i, m) in mp.iter().enumerate() {
                    let pair = bcast(a.b32.as_ptr().add(2 * i) as *const i8);
                    msum = _mm256_add_epi32(msum, _mm256_madd_epi16(*m, pair));
                }
                let sd = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                acc[t] = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(isum[t]), acc[t]);
                let sm = _mm256_mul_ps(mw, _mm256_set1_ps(-a.d));
                acc[t] = _mm256_fmadd_ps(sm, _mm256_cvtepi32_ps(msum), acc[t]);
            }
        }
        store(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q6_k<const T: usize>(
        w: &[Q6Kx8],
        ys: [&[ActK]; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let n = ys.iter().fold(w.len(), |n, y| n.min(y.len()));
        let high = _mm256_set1_epi8(0x30);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..n {
            let g = w.get_unchecked(b);
            let mut isum = [_mm256_setzero_si256(); T];
            for s in 0..SUBS {
                let lo = nibbles(&g.ql[s / 2], s % 2);
                let x: [__m256i; 8] = std::array::from_fn(|j| {
                    let h = load(&g.qh[s / 4], j);
                    // bits 2 (s % 4) and up of each byte to bits 4 and 5
                    let h = match s % 4 {
                        0 => _mm256_slli_epi16(h, 4),
                        1 => _mm256_slli_epi16(h, 2),
                        2 => h,
                        _ => _mm256_srli_epi16(h, 2),
                    };
                    _mm256_or_si256(lo[j], _mm256_and_si256(h, high))
                });
                // lane r: the row's two scales of this sub-block, as i16
                let sp = _mm256_cvtepi8_epi16(_mm_loadu_si128(g.sp[s].as_ptr() as *const __m128i));
                let sa = _mm256_blend_epi16(sp, _mm256_slli_epi32(sp, 16), 0xaa);
                let sb = _mm256_blend_epi16(sp, _mm256_srli_epi32(sp, 16), 0x55);
                // 32 times the scales, for the offset of 32 in every value
                let sp32 = _mm256_slli_epi16(sp, 5);
                for t in 0..T {
                    let act = ys[t].get_unchecked(b);
                    let a = act.qs.as_ptr().add(32 * s);
                    // two products of values below 64 by bytes: below 2 · 2 · 63 · 127 < 2^15
                    let pair = |j: usize| {
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(x[j], bcast(a.add(4 * j))),
                            _mm256_maddubs_epi16(x[j + 1], bcast(a.add(4 * j + 4))),
                        )
                    };
                    let first = _mm256_add_epi32(
                        _mm256_madd_epi16(pair(0), sa),
                        _mm256_madd_epi16(pair(2), sa),
                    );
                    let second = _mm256_add_epi32(
                        _mm256_madd_epi16(pair(4), sb),
                        _mm256_madd_epi16(pair(6), sb),
                    );
                    let sums = bcast(act.b16.as_ptr().add(2 * s) as *const i8);
                    let offset = _mm256_madd_epi16(sp32, sums);
                    isum[t] = _mm256_add_epi32(
                        isum[t],
                        _mm256_sub_epi32(_mm256_add_epi32(first, second), offset),
                    );
                }
            }
            let dw = scales(&g.d);
            for t in 0..T {
                let a = ys[t].get_unchecked(b);
                let sd = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                acc[t] = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(isum[t]), acc[t]);
            }
        }
        store(acc)
    }
}
