//! Weights repacked eight rows at a time, and their products tiled across
//! token rows.
//!
//! At load, every 8 rows of a Q8_0, Q5_0 or Q4_1 matrix become one group
//! per 32-element block ([`Q8_0x8`], [`Q5_0x8`], [`Q4_1x8`]): the 8 row
//! scales side by side, then the values in 4-byte runs, one run per row, so
//! that one 32-byte vector holds 4 elements of each of the 8 rows. Nothing
//! is lost: each group holds exactly the bytes of its 8 blocks, reordered.
//!
//! A product then meets each such vector with 4 activation bytes broadcast
//! to all 8 lanes, and every 32-bit lane sums one weight row: after a
//! block, lane `r` holds row `r`'s exact integer dot product with the
//! activation block, and one multiply-add by the 8 row scales (times the
//! activation scale) adds the block to 8 outputs at once. No horizontal sum
//! is ever taken. Each unpacked weight block serves up to [`TILE_TOKENS`]
//! token rows before the next is read.
//!
//! Every output is the integer block sums added block after block, in
//! order, into one f32 accumulator: `acc = fma(d_w · d_a, isum, acc)` (and
//! `acc = fma(m_w, s_a, acc)` for Q4_1's minimum). The scalar reference
//! ([`CpuPath::Portable`]) does the same operations, so every path gives the
//! same bits, and a token row's result does not depend on the rows computed
//! beside it.
//!
//! The activations are quantized to Q8_0 as for the row kernels, with the
//! 32 quants of each block permuted ([`ActT`]): run `j` holds elements
//! `j, 8 + j, 16 + j, 24 + j`, the weights' runs hold the same elements,
//! and then the Q5_0 high bits of run `j` sit at bit `j` of each byte of
//! the block's 32-bit `qh`.

use candle_core::utils::barrier_pool;
use half::f16;

use super::{
    cpu_path, quantize_row_q8_0, ActQ8, BlockQ4_1, BlockQ5_0, BlockQ8_0, CpuPath, SharedMut,
    SharedPtr, QK, QK_K,
};

pub mod k_quant;
pub use k_quant::{Q4Kx8, Q6Kx8};

/// Weight rows per repacked group (the lanes of one vector of i32).
pub const TILE_ROWS: usize = 8;
/// Token rows one unpacked weight block serves at most.
pub const TILE_TOKENS: usize = 8;
/// Groups a thread walks for every token tile before going on, so the
/// weights it reads stay in its cache while the activations stream by.
const GROUP_CHUNK: usize = 16;
/// Token rows from which the activations are quantized on every thread.
const QUANTIZE_SPLIT: usize = 16;

/// The byte of a block's permuted quants that holds element `k`: element
/// `8e + j` is byte `e` of run `j`.
#[inline]
pub const fn permuted(k: usize) -> usize {
    4 * (k % 8) + k / 8
}

/// A Q8_0 activation block for the tiled kernels: the quants of
/// [`quantize_row_q8_0`] in the permuted order, its f32 scale `d`, ggml's
/// Q8_1 term `s` (for Q4_1) and the sum of the quants (for the offsets).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct ActT {
    pub qp: [i8; QK],
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    _pad: i32,
}

/// An all-zero activation block.
pub const ZERO_ACT: ActT = ActT {
    qp: [0; QK],
    d: 0.0,
    s: 0.0,
    sum: 0,
    _pad: 0,
};

/// Quantizes one activation row for the tiled kernels.
pub fn quantize_row(x: &[f32], out: &mut [ActT]) {
    let mut q = [ActQ8 {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
        off: [0; 8],
    }];
    for (xs, o) in x.chunks_exact(QK).zip(out.iter_mut()) {
        quantize_row_q8_0(xs, &mut q);
        let a = &q[0];
        for (k, v) in a.qs.iter().enumerate() {
            o.qp[permuted(k)] = *v;
        }
        o.d = a.d;
        o.s = a.s;
        o.sum = a.qs.iter().map(|v| *v as i32).sum();
        o._pad = 0;
    }
}

/// Eight Q8_0 rows' blocks: `qs[32 j + 4 r + e]` is element `8e + j` of row `r`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q8_0x8 {
    pub d: [f16; TILE_ROWS],
    pub qs: [i8; QK * TILE_ROWS],
}

/// Eight Q5_0 rows' blocks: `qh[r]` is row `r`'s high bits as in GGUF; byte
/// `32 i + 4 r + e` of `qs` holds the low nibbles of elements `8e + 2i`
/// (low half) and `8e + 2i + 1` (high half) of row `r`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q5_0x8 {
    pub d: [f16; TILE_ROWS],
    pub qh: [u32; TILE_ROWS],
    pub qs: [u8; QK / 2 * TILE_ROWS],
}

/// Eight Q4_1 rows' blocks, nibbles laid out as in [`Q5_0x8`].
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q4_1x8 {
    pub d: [f16; TILE_ROWS],
    pub m: [f16; TILE_ROWS],
    pub qs: [u8; QK / 2 * TILE_ROWS],
}

const _: () = assert!(std::mem::size_of::<Q8_0x8>() == 8 * 34);
const _: () = assert!(std::mem::size_of::<Q5_0x8>() == 8 * 22);
const _: () = assert!(std::mem::size_of::<Q4_1x8>() == 8 * 20);

/// Reorders row-major blocks (`rows` rows of `bpr` blocks, block `i` read by
/// `block(i)`, so the caller can decode them straight from the file's bytes)
/// into groups: group `g · bpr + b` is block `b` of rows `8g..8g + 8`.
fn regroup<B, G: Send>(
    rows: usize,
    bpr: usize,
    block: impl Fn(usize) -> B + Sync,
    pack: impl Fn([B; TILE_ROWS]) -> G + Sync,
) -> Vec<G> {
    let n = rows / TILE_ROWS * bpr;
    let mut out: Vec<G> = Vec::with_capacity(n);
    let dst = SharedPtr(out.as_mut_ptr());
    // the pool's threads each pack a share of the groups
    let dst = &dst;
    barrier_pool().execute_chunked(n, |range| {
        for i in range {
            let (g, b) = (i / bpr, i % bpr);
            let group = pack(std::array::from_fn(|r| {
                block((g * TILE_ROWS + r) * bpr + b)
            }));
            // SAFETY: `i < n` is within the capacity, and each index is
            // written by exactly one worker.
            unsafe { dst.0.add(i).write(group) };
        }
    });
    // SAFETY: every index below `n` was written above.
    unsafe { out.set_len(n) };
    out
}

/// Nibble byte `32 i + 4 r + e` from row `r`'s 32 values (each below 16).
fn pack_nibbles(vals: &[[u8; QK]; TILE_ROWS]) -> [u8; QK / 2 * TILE_ROWS] {
    let mut qs = [0u8; QK / 2 * TILE_ROWS];
    for (r, v) in vals.iter().enumerate() {
        for i in 0..4 {
            for e in 0..4 {
                let lo = v[8 * e + 2 * i] & 0x0f;
                let hi = v[8 * e + 2 * i + 1] & 0x0f;
                qs[32 * i + 4 * r + e] = lo | (hi << 4);
            }
        }
    }
    qs
}

/// The low nibbles of a Q5_0 or Q4_1 block in element order.
fn nibbles_of(qs: &[u8; QK / 2]) -> [u8; QK] {
    std::array::from_fn(|k| {
        if k < QK / 2 {
            qs[k] & 0x0f
        } else {
            qs[k - QK / 2] >> 4
        }
    })
}

/// Repacks `rows` Q8_0 rows (a multiple of 8) of `bpr` blocks each.
pub fn repack_q8_0(
    rows: usize,
    bpr: usize,
    block: impl Fn(usize) -> BlockQ8_0 + Sync,
) -> Vec<Q8_0x8> {
    regroup(rows, bpr, block, |rows| {
        let mut qs = [0i8; QK * TILE_ROWS];
        for (r, b) in rows.iter().enumerate() {
            for (k, v) in b.qs.iter().enumerate() {
                qs[32 * (k % 8) + 4 * r + k / 8] = *v;
            }
        }
        Q8_0x8 {
            d: rows.map(|b| b.d),
            qs,
        }
    })
}

/// Repacks `rows` Q5_0 rows (a multiple of 8) of `bpr` blocks each.
pub fn repack_q5_0(
    rows: usize,
    bpr: usize,
    block: impl Fn(usize) -> BlockQ5_0 + Sync,
) -> Vec<Q5_0x8> {
    regroup(rows, bpr, block, |rows| Q5_0x8 {
        d: rows.map(|b| b.d),
        qh: rows.map(|b| u32::from_le_bytes(b.qh)),
        qs: pack_nibbles(&rows.map(|b| nibbles_of(&b.qs))),
    })
}

/// Repacks `rows` Q4_1 rows (a multiple of 8) of `bpr` blocks each.
pub fn repack_q4_1(
    rows: usize,
    bpr: usize,
    block: impl Fn(usize) -> BlockQ4_1 + Sync,
) -> Vec<Q4_1x8> {
    regroup(rows, bpr, block, |rows| Q4_1x8 {
        d: rows.map(|b| b.d),
        m: rows.map(|b| b.m),
        qs: pack_nibbles(&rows.map(|b| nibbles_of(&b.qs))),
    })
}

/// Element `k`'s low nibble of row `r` in a repacked nibble array.
#[inline]
fn nibble(qs: &[u8; QK / 2 * TILE_ROWS], r: usize, k: usize) -> u8 {
    let (e, j) = (k / 8, k % 8);
    let byte = qs[32 * (j / 2) + 4 * r + e];
    if j % 2 == 0 {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

/// A repacked weight group type.
pub trait TileGroup: Copy + Sync + Send {
    /// The activation block its products take.
    type Act: Copy + Sync + Send;
    /// Elements of a row in one group's block.
    const ELEMS: usize;
    /// Writes row `r`'s [`TileGroup::ELEMS`] dequantized values of this
    /// group's block.
    fn dequant_row(&self, r: usize, out: &mut [f32]);
    /// The scalar reference of [`TileGroup::tile_on`]: `T` token rows'
    /// sums over `w` (one group's blocks along a row), 8 rows each.
    fn tile_scalar<const T: usize>(w: &[Self], ys: [&[Self::Act]; T]) -> [[f32; TILE_ROWS]; T];
    /// [`TileGroup::tile_scalar`] on `path`, which the CPU must have.
    fn tile_on<const T: usize>(
        path: CpuPath,
        w: &[Self],
        ys: [&[Self::Act]; T],
    ) -> [[f32; TILE_ROWS]; T];
}

impl Q8_0x8 {
    /// Row `r`'s exact integer dot product with activation block `a`.
    fn integer_dot(&self, r: usize, a: &ActT) -> i32 {
        (0..QK)
            .map(|k| self.qs[32 * (k % 8) + 4 * r + k / 8] as i32 * a.qp[permuted(k)] as i32)
            .sum()
    }
}

impl TileGroup for Q8_0x8 {
    type Act = ActT;
    const ELEMS: usize = QK;

    fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let d = self.d[r].to_f32();
        for (k, o) in out.iter_mut().enumerate().take(QK) {
            *o = self.qs[32 * (k % 8) + 4 * r + k / 8] as f32 * d;
        }
    }

    fn tile_scalar<const T: usize>(w: &[Self], ys: [&[ActT]; T]) -> [[f32; TILE_ROWS]; T] {
        scalar(w, ys, |g, r, a| {
            (g.d[r].to_f32() * a.d, g.integer_dot(r, a), None)
        })
    }

    #[inline]
    fn tile_on<const T: usize>(
        path: CpuPath,
        w: &[Self],
        ys: [&[ActT]; T],
    ) -> [[f32; TILE_ROWS]; T] {
        dispatch!(path, tile_q8_0, w, ys)
    }
}

impl TileGroup for Q5_0x8 {
    type Act = ActT;
    const ELEMS: usize = QK;

    fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let d = self.d[r].to_f32();
        for (k, o) in out.iter_mut().enumerate().take(QK) {
            *o = (self.value(r, k) - 16) as f32 * d;
        }
    }

    fn tile_scalar<const T: usize>(w: &[Self], ys: [&[ActT]; T]) -> [[f32; TILE_ROWS]; T] {
        scalar(w, ys, |g, r, a| {
            (g.d[r].to_f32() * a.d, g.integer_dot(r, a), None)
        })
    }

    #[inline]
    fn tile_on<const T: usize>(
        path: CpuPath,
        w: &[Self],
        ys: [&[ActT]; T],
    ) -> [[f32; TILE_ROWS]; T] {
        dispatch!(path, tile_q5_0, w, ys)
    }
}

impl Q5_0x8 {
    /// Row `r`'s element `k` as stored (0..32, 16 above its value).
    fn value(&self, r: usize, k: usize) -> i32 {
        (nibble(&self.qs, r, k) as u32 | ((self.qh[r] >> k) & 1) << 4) as i32
    }

    /// Row `r`'s exact integer dot product with activation block `a`.
    fn integer_dot(&self, r: usize, a: &ActT) -> i32 {
        (0..QK)
            .map(|k| (self.value(r, k) - 16) * a.qp[permuted(k)] as i32)
            .sum()
    }
}

impl Q4_1x8 {
    /// Row `r`'s exact integer dot product with activation block `a`.
    fn integer_dot(&self, r: usize, a: &ActT) -> i32 {
        (0..QK)
            .map(|k| nibble(&self.qs, r, k) as i32 * a.qp[permuted(k)] as i32)
            .sum()
    }
}

impl TileGroup for Q4_1x8 {
    type Act = ActT;
    const ELEMS: usize = QK;

    fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let (d, m) = (self.d[r].to_f32(), self.m[r].to_f32());
        for (k, o) in out.iter_mut().enumerate().take(QK) {
            *o = nibble(&self.qs, r, k) as f32 * d + m;
        }
    }

    fn tile_scalar<const T: usize>(w: &[Self], ys: [&[ActT]; T]) -> [[f32; TILE_ROWS]; T] {
        scalar(w, ys, |g, r, a| {
            (
                g.d[r].to_f32() * a.d,
                g.integer_dot(r, a),
                Some(g.m[r].to_f32()),
            )
        })
    }

    #[inline]
    fn tile_on<const T: usize>(
        path: CpuPath,
        w: &[Self],
        ys: [&[ActT]; T],
    ) -> [[f32; TILE_ROWS]; T] {
        dispatch!(path, tile_q4_1, w, ys)
    }
}

/// The scalar reference: `term(group, row, act)` gives a block's scale
/// product, exact integer sum and (for Q4_1) the row's minimum, which
/// meets the activation's `s`.
#[inline]
fn scalar<G, const T: usize>(
    w: &[G],
    ys: [&[ActT]; T],
    term: impl Fn(&G, usize, &ActT) -> (f32, i32, Option<f32>),
) -> [[f32; TILE_ROWS]; T] {
    let n = ys.iter().fold(w.len(), |n, y| n.min(y.len()));
    let mut out = [[0f32; TILE_ROWS]; T];
    for (t, y) in ys.iter().enumerate() {
        for (b, g) in w.iter().enumerate().take(n) {
            let a = &y[b];
            for (r, acc) in out[t].iter_mut().enumerate() {
                let (sc, isum, min) = term(g, r, a);
                *acc = sc.mul_add(isum as f32, *acc);
                if let Some(m) = min {
                    *acc = m.mul_add(a.s, *acc);
                }
            }
        }
    }
    out
}

/// Calls `$kernel` of the module for `$path` (the scalar reference for
/// the portable path).
macro_rules! dispatch {
    ($path:expr, $kernel:ident, $w:expr, $ys:expr) => {{
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        {
            match $path {
                // SAFETY: AVX2, FMA and F16C are enabled at compile time
                // (the cfg above); the other paths are chosen only where
                // `CpuPath::is_supported` found them.
                CpuPath::Avx2 => return unsafe { avx2::$kernel($w, $ys) },
                CpuPath::AvxVnni => return unsafe { vnni::$kernel($w, $ys) },
                CpuPath::Avx512Vnni => return unsafe { avx512::$kernel($w, $ys) },
                CpuPath::Portable => {}
            }
        }
        let _ = $path;
        Self::tile_scalar($w, $ys)
    }};
}
use dispatch;

/// The tiled kernels for one instruction set. `$dot4` is
/// `acc + Σ u·s` over each 4 bytes (u unsigned, s signed, exact for the
/// inputs given); `$small4` sums four such products of small weights
/// (below 32) at once.
macro_rules! tiles {
    ($name:ident, $doc:literal, $feat:literal, $dot4:ident, $small4:ident) => {
        #[doc = $doc]
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        pub(super) mod $name {
            #[allow(unused_imports)]
            use super::{dot4_avx2, dot4_avx512, dot4_vnni};
            #[allow(unused_imports)]
            use super::{small4_avx2, small4_avx512, small4_vnni};
            use super::{ActT, Q4_1x8, Q5_0x8, Q8_0x8, TILE_ROWS};
            use std::arch::x86_64::*;

            /// 4 activation bytes of run `j` in every lane.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn run(a: &ActT, j: usize) -> __m256i {
                _mm256_set1_epi32(std::ptr::read_unaligned(
                    a.qp.as_ptr().add(4 * j) as *const i32
                ))
            }

            /// The 8 rows' integer sums of a block of small (below 32)
            /// unsigned runs `x` with activation block `a`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn small_sum(x: &[__m256i; 8], a: &ActT) -> __m256i {
                let isum = $small4(
                    _mm256_setzero_si256(),
                    [x[0], x[1], x[2], x[3]],
                    [run(a, 0), run(a, 1), run(a, 2), run(a, 3)],
                );
                $small4(
                    isum,
                    [x[4], x[5], x[6], x[7]],
                    [run(a, 4), run(a, 5), run(a, 6), run(a, 7)],
                )
            }

            /// The 8 f16 row scales widened.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn scales(d: &[half::f16; TILE_ROWS]) -> __m256 {
                _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i))
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn store<const T: usize>(acc: [__m256; T]) -> [[f32; TILE_ROWS]; T] {
                let mut out = [[0f32; TILE_ROWS]; T];
                for (o, a) in out.iter_mut().zip(acc) {
                    _mm256_storeu_ps(o.as_mut_ptr(), a);
                }
                out
            }

            /// Unpacks a block's 4 nibble vectors into 8 runs (0..16).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn nibble_runs(qs: &[u8; 128]) -> [__m256i; 8] {
                let low = _mm256_set1_epi8(0x0f);
                let mut v = [_mm256_setzero_si256(); 8];
                for i in 0..4 {
                    let q = _mm256_loadu_si256(qs.as_ptr().add(32 * i) as *const __m256i);
                    v[2 * i] = _mm256_and_si256(q, low);
                    v[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
                }
                v
            }

            /// Signed runs: `|w|` and `w` for the sign of the activations.
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn tile_q8_0<const T: usize>(
                w: &[Q8_0x8],
                ys: [&[ActT]; T],
            ) -> [[f32; TILE_ROWS]; T] {
                let n = ys.iter().fold(w.len(), |n, y| n.min(y.len()));
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..n {
                    let g = w.get_unchecked(b);
                    let dw = scales(&g.d);
                    let x: [__m256i; 8] = std::array::from_fn(|j| {
                        _mm256_loadu_si256(g.qs.as_ptr().add(32 * j) as *const __m256i)
                    });
                    let ax = x.map(|v| _mm256_sign_epi8(v, v));
                    for t in 0..T {
                        let a = ys[t].get_unchecked(b);
                        let mut isum = _mm256_setzero_si256();
                        for j in 0..8 {
                            let s = _mm256_sign_epi8(run(a, j), x[j]);
                            isum = $dot4(isum, ax[j], s);
                        }
                        let sc = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                        acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(isum), acc[t]);
                    }
                }
                store(acc)
            }

            /// Runs of 0..32 with the high bits; 16 comes off through the
            /// activations' sum.
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn tile_q5_0<const T: usize>(
                w: &[Q5_0x8],
                ys: [&[ActT]; T],
            ) -> [[f32; TILE_ROWS]; T] {
                let n = ys.iter().fold(w.len(), |n, y| n.min(y.len()));
                let bit4 = _mm256_set1_epi8(0x10);
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..n {
                    let g = w.get_unchecked(b);
                    let dw = scales(&g.d);
                    let qh = _mm256_loadu_si256(g.qh.as_ptr() as *const __m256i);
                    // bit j of each byte of qh is run j's high bit: moved to bit 4
                    let hb = [
                        _mm256_slli_epi32(qh, 4),
                        _mm256_slli_epi32(qh, 3),
                        _mm256_slli_epi32(qh, 2),
                        _mm256_slli_epi32(qh, 1),
                        qh,
                        _mm256_srli_epi32(qh, 1),
                        _mm256_srli_epi32(qh, 2),
                        _mm256_srli_epi32(qh, 3),
                    ];
                    let nib = nibble_runs(&g.qs);
                    let x: [__m256i; 8] = std::array::from_fn(|j| {
                        _mm256_or_si256(nib[j], _mm256_and_si256(hb[j], bit4))
                    });
                    for t in 0..T {
                        let a = ys[t].get_unchecked(b);
                        let isum = small_sum(&x, a);
                        let isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(16 * a.sum));
                        let sc = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                        acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(isum), acc[t]);
                    }
                }
                store(acc)
            }

            /// Nibble runs; the minimum meets the activations' `s`.
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn tile_q4_1<const T: usize>(
                w: &[Q4_1x8],
                ys: [&[ActT]; T],
            ) -> [[f32; TILE_ROWS]; T] {
                let n = ys.iter().fold(w.len(), |n, y| n.min(y.len()));
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..n {
                    let g = w.get_unchecked(b);
                    let dw = scales(&g.d);
                    let mw = scales(&g.m);
                    let x = nibble_runs(&g.qs);
                    for t in 0..T {
                        let a = ys[t].get_unchecked(b);
                        let isum = small_sum(&x, a);
                        let sc = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                        acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(isum), acc[t]);
                        acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s), acc[t]);
                    }
                }
                store(acc)
            }
        }
    };
}

/// `acc + vpmaddwd(vpmaddubsw(u, s), 1)`: exact where `|u · s|` pairs stay
/// within 16 bits, as they do for `|w| ≤ 127` and `|a| ≤ 127`.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline(always)]
unsafe fn dot4_avx2(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
    )
}

/// Four `vpmaddubsw` summed in 16 bits, then one `vpmaddwd`: exact for
/// weights below 32 (each pair at most 2 · 31 · 127, four such 31,496).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline(always)]
unsafe fn small4_avx2(
    acc: std::arch::x86_64::__m256i,
    u: [std::arch::x86_64::__m256i; 4],
    s: [std::arch::x86_64::__m256i; 4],
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let p01 = _mm256_add_epi16(
        _mm256_maddubs_epi16(u[0], s[0]),
        _mm256_maddubs_epi16(u[1], s[1]),
    );
    let p23 = _mm256_add_epi16(
        _mm256_maddubs_epi16(u[2], s[2]),
        _mm256_maddubs_epi16(u[3], s[3]),
    );
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_add_epi16(p01, p23), _mm256_set1_epi16(1)),
    )
}

/// One `vpdpbusd` (AVX-VNNI).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn dot4_vnni(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpbusd_avx_epi32(acc, u, s)
}

/// Four `vpdpbusd`, one after another.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn small4_vnni(
    acc: std::arch::x86_64::__m256i,
    u: [std::arch::x86_64::__m256i; 4],
    s: [std::arch::x86_64::__m256i; 4],
) -> std::arch::x86_64::__m256i {
    u.into_iter()
        .zip(s)
        .fold(acc, |acc, (u, s)| dot4_vnni(acc, u, s))
}

/// One `vpdpbusd` (AVX-512 VNNI, EVEX form).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot4_avx512(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpbusd_epi32(acc, u, s)
}

/// Four `vpdpbusd`, one after another.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
fn small4_avx512(
    acc: std::arch::x86_64::__m256i,
    u: [std::arch::x86_64::__m256i; 4],
    s: [std::arch::x86_64::__m256i; 4],
) -> std::arch::x86_64::__m256i {
    u.into_iter()
        .zip(s)
        .fold(acc, |acc, (u, s)| dot4_avx512(acc, u, s))
}

tiles!(
    avx2,
    "The tiled kernels with AVX2 and FMA (`vpmaddubsw`, `vpmaddwd`).",
    "avx2,fma,f16c",
    dot4_avx2,
    small4_avx2
);
tiles!(
    vnni,
    "The tiled kernels with AVX-VNNI: one `vpdpbusd` per run.",
    "avx2,fma,f16c,avxvnni",
    dot4_vnni,
    small4_vnni
);
tiles!(
    avx512,
    "The tiled kernels with AVX-512 VNNI's `vpdpbusd` (EVEX form).",
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot4_avx512,
    small4_avx512
);

/// One repacked matrix in a product: its groups (`rows / 8` groups of
/// `bpr` blocks each).
pub(crate) enum Tiled<'a> {
    Q8_0(&'a [Q8_0x8]),
    Q5_0(&'a [Q5_0x8]),
    Q4_1(&'a [Q4_1x8]),
    Q4K(&'a [Q4Kx8]),
    Q6K(&'a [Q6Kx8]),
}

impl Tiled<'_> {
    /// Whether its products take Q8_K activations (super-blocks of 256)
    /// rather than Q8_0 ones.
    pub(crate) fn k_quant(&self) -> bool {
        matches!(self, Tiled::Q4K(_) | Tiled::Q6K(_))
    }

    fn blocks(&self) -> usize {
        match self {
            Tiled::Q8_0(g) => g.len(),
            Tiled::Q5_0(g) => g.len(),
            Tiled::Q4_1(g) => g.len(),
            Tiled::Q4K(g) => g.len(),
            Tiled::Q6K(g) => g.len(),
        }
    }
}

/// `T` token rows starting at `t0` over group `g` of `w`, on `path`,
/// written to `out` (`n` columns per row).
#[inline]
#[allow(clippy::too_many_arguments)]
fn tile_into<G: TileGroup, const T: usize>(
    path: CpuPath,
    w: &[G],
    g: usize,
    bpr: usize,
    acts: &[G::Act],
    t0: usize,
    out: SharedMut,
    n: usize,
) {
    let ys: [&[G::Act]; T] = std::array::from_fn(|i| &acts[(t0 + i) * bpr..(t0 + i + 1) * bpr]);
    let sums = G::tile_on(path, &w[g * bpr..(g + 1) * bpr], ys);
    for (i, s) in sums.iter().enumerate() {
        // SAFETY: row t0 + i, columns 8g..8g + 8 belong to this group, which
        // exactly one thread computes; the caller checked the bounds.
        unsafe {
            std::ptr::copy_nonoverlapping(
                s.as_ptr(),
                out.0.add((t0 + i) * n + g * TILE_ROWS),
                TILE_ROWS,
            )
        };
    }
}

/// Token rows `t0..t1` over group `g`, in tiles of 8, 4, 2 and 1.
#[allow(clippy::too_many_arguments)]
fn rows_into<G: TileGroup>(
    path: CpuPath,
    w: &[G],
    g: usize,
    bpr: usize,
    acts: &[G::Act],
    t0: usize,
    t1: usize,
    out: SharedMut,
    n: usize,
) {
    let mut t = t0;
    while t + TILE_TOKENS <= t1 {
        tile_into::<G, TILE_TOKENS>(path, w, g, bpr, acts, t, out, n);
        t += TILE_TOKENS;
    }
    if t + 4 <= t1 {
        tile_into::<G, 4>(path, w, g, bpr, acts, t, out, n);
        t += 4;
    }
    if t + 2 <= t1 {
        tile_into::<G, 2>(path, w, g, bpr, acts, t, out, n);
        t += 2;
    }
    if t < t1 {
        tile_into::<G, 1>(path, w, g, bpr, acts, t, out, n);
    }
}

/// The `m` rows of `lhs` (`k` columns each) quantized by `quantize` into
/// blocks of `elems`, on every thread when there are enough rows.
fn quantize_rows<A: Copy + Send>(
    m: usize,
    k: usize,
    elems: usize,
    lhs: &[f32],
    zero: A,
    quantize: fn(&[f32], &mut [A]),
) -> Vec<A> {
    let bpr = k / elems;
    let mut acts = vec![zero; m * bpr];
    let pool = barrier_pool();
    let threads = pool.n_workers() + 1;
    if m >= QUANTIZE_SPLIT && threads > 1 {
        let ptr = SharedPtr(acts.as_mut_ptr());
        pool.execute(move |tid| {
            let ptr = ptr;
            let (r0, r1) = (m * tid / threads, m * (tid + 1) / threads);
            for r in r0..r1 {
                // SAFETY: row r's blocks are written by this thread alone.
                let row = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(r * bpr), bpr) };
                quantize(&lhs[r * k..(r + 1) * k], row);
            }
        });
    } else {
        for r in 0..m {
            quantize(&lhs[r * k..(r + 1) * k], &mut acts[r * bpr..(r + 1) * bpr]);
        }
    }
    acts
}

/// `dst = lhs · wᵀ` for every part (all taking the same `m × k` input, and
/// all Q8_0-activated types or all K-quants): the activations are
/// quantized once, then one parallel region splits all parts' groups
/// statically over the threads; a thread walks its groups
/// [`GROUP_CHUNK`] at a time, each chunk over every tile of token rows.
pub(crate) fn matmul(m: usize, k: usize, lhs: &[f32], parts: &mut [(Tiled<'_>, &mut [f32])]) {
    let path = cpu_path();
    let k_quants = parts.first().is_some_and(|(w, _)| w.k_quant());
    assert!(
        parts.iter().all(|(w, _)| w.k_quant() == k_quants),
        "the parts of one tiled product take one kind of activations"
    );
    let (acts, acts_k) = if k_quants {
        let zero = k_quant::ZERO_ACT_K;
        (
            Vec::new(),
            quantize_rows(m, k, QK_K, lhs, zero, k_quant::quantize_row),
        )
    } else {
        (
            quantize_rows(m, k, QK, lhs, ZERO_ACT, quantize_row),
            Vec::new(),
        )
    };
    let bpr = k / if k_quants { QK_K } else { QK };
    // every part's groups, one after another
    let mut starts = Vec::with_capacity(parts.len() + 1);
    let mut total = 0;
    for (w, dst) in parts.iter() {
        starts.push(total);
        let groups = w.blocks() / bpr.max(1);
        assert_eq!(
            dst.len(),
            m * groups * TILE_ROWS,
            "a tiled product's output"
        );
        total += groups;
    }
    starts.push(total);
    let outs: Vec<(&Tiled<'_>, SharedMut, usize)> = parts
        .iter_mut()
        .map(|(w, d)| {
            let n = d.len() / m.max(1);
            (&*w, SharedMut(d.as_mut_ptr()), n)
        })
        .collect();
    let (acts, acts_k, starts, outs) = (&acts[..], &acts_k[..], &starts[..], &outs[..]);
    let work = move |g0: usize, g1: usize| {
        for c0 in (g0..g1).step_by(GROUP_CHUNK) {
            let c1 = (c0 + GROUP_CHUNK).min(g1);
            for t0 in (0..m).step_by(TILE_TOKENS) {
                let t1 = (t0 + TILE_TOKENS).min(m);
                for flat in c0..c1 {
                    let p = starts.partition_point(|s| *s <= flat) - 1;
                    let (w, out, n) = outs[p];
                    let g = flat - starts[p];
                    match w {
                        Tiled::Q8_0(w) => rows_into(path, w, g, bpr, acts, t0, t1, out, n),
                        Tiled::Q5_0(w) => rows_into(path, w, g, bpr, acts, t0, t1, out, n),
                        Tiled::Q4_1(w) => rows_into(path, w, g, bpr, acts, t0, t1, out, n),
                        Tiled::Q4K(w) => rows_into(path, w, g, bpr, acts_k, t0, t1, out, n),
                        Tiled::Q6K(w) => rows_into(path, w, g, bpr, acts_k, t0, t1, out, n),
                    }
                }
            }
        }
    };
    let pool = barrier_pool();
    let threads = pool.n_workers() + 1;
    if threads == 1 || total < 2 {
        work(0, total);
    } else {
        pool.execute(move |tid| work(total * tid / threads, total * (tid + 1) / threads));
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::quant::BlockQ6K;
    use crate::quant::QMatrix;

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn half(&mut self, k: f32) -> [u8; 2] {
            f16::from_f32(self.unit() * k).to_le_bytes()
        }
    }

    /// GGUF bytes of `elems` random elements of `dtype` (every byte value,
    /// -128 among the Q8_0 quants and the Q6_K scales).
    fn gguf_blocks(dtype: GgmlDType, elems: usize, rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..elems / dtype.block_size() {
            match dtype {
                GgmlDType::Q8_0 => {
                    out.extend(rng.half(0.02));
                    out.extend((0..32).map(|_| rng.byte()));
                }
                GgmlDType::Q5_0 => {
                    out.extend(rng.half(0.05));
                    out.extend((0..20).map(|_| rng.byte()));
                }
                GgmlDType::Q4_1 => {
                    out.extend(rng.half(0.05));
                    out.extend(rng.half(0.4));
                    out.extend((0..16).map(|_| rng.byte()));
                }
                GgmlDType::Q4K => {
                    out.extend(rng.half(0.01));
                    out.extend(rng.half(0.02));
                    out.extend((0..140).map(|_| rng.byte()));
                }
                GgmlDType::Q6K => {
                    out.extend((0..208).map(|_| rng.byte()));
                    out.extend(rng.half(0.002));
                }
                _ => unreachable!("only the repacked types"),
            }
        }
        out
    }

    const TYPES: [GgmlDType; 5] = [
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ];

    fn random_acts(rows: usize, cols: usize, rng: &mut Rng) -> (Vec<f32>, Vec<ActT>) {
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.unit() * 2.0).collect();
        let mut a = vec![ZERO_ACT; rows * cols / QK];
        for (xr, ar) in x.chunks_exact(cols).zip(a.chunks_exact_mut(cols / QK)) {
            quantize_row(xr, ar);
        }
        (x, a)
    }

    fn random_acts_k(rows: usize, cols: usize, rng: &mut Rng) -> (Vec<f32>, Vec<k_quant::ActK>) {
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.unit() * 2.0).collect();
        let mut a = vec![k_quant::ZERO_ACT_K; rows * cols / QK_K];
        for (xr, ar) in x.chunks_exact(cols).zip(a.chunks_exact_mut(cols / QK_K)) {
            k_quant::quantize_row(xr, ar);
        }
        (x, a)
    }

    /// `path`'s kernels against the scalar reference at every tile height,
    /// bit for bit, on random groups of every type.
    fn check_path(path: CpuPath) {
        assert!(
            path.is_supported(),
            "this CPU cannot run the {path} kernels: the test cannot run here"
        );
        fn tiles<G: TileGroup>(path: CpuPath, w: &[G], a: &[G::Act], bpr: usize, what: &str) {
            fn one<G: TileGroup, const T: usize>(
                path: CpuPath,
                w: &[G],
                a: &[G::Act],
                bpr: usize,
                what: &str,
            ) {
                let ys: [&[G::Act]; T] = std::array::from_fn(|i| &a[i * bpr..(i + 1) * bpr]);
                let got = G::tile_on(path, w, ys);
                let want = G::tile_scalar(w, ys);
                for t in 0..T {
                    for r in 0..TILE_ROWS {
                        assert_eq!(
                            got[t][r].to_bits(),
                            want[t][r].to_bits(),
                            "{what} on {path}, {T} token rows: row {t}, column {r}: {} vs {}",
                            got[t][r],
                            want[t][r]
                        );
                    }
                }
            }
            one::<G, 1>(path, w, a, bpr, what);
            one::<G, 2>(path, w, a, bpr, what);
            one::<G, 4>(path, w, a, bpr, what);
            one::<G, 8>(path, w, a, bpr, what);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let bpr = 37;
        let (_, a) = random_acts(8, bpr * QK, &mut rng);
        let kbpr = 5;
        let (_, ak) = random_acts_k(8, kbpr * QK_K, &mut rng);
        for dtype in TYPES {
            let elems = TILE_ROWS * bpr * QK;
            match dtype {
                GgmlDType::Q8_0 => {
                    let bytes = gguf_blocks(dtype, elems, &mut rng);
                    let b: Vec<BlockQ8_0> = bytes.chunks_exact(34).map(BlockQ8_0::read).collect();
                    tiles(
                        path,
                        &repack_q8_0(TILE_ROWS, bpr, |i| b[i]),
                        &a,
                        bpr,
                        "Q8_0",
                    );
                }
                GgmlDType::Q5_0 => {
                    let bytes = gguf_blocks(dtype, elems, &mut rng);
                    let b: Vec<BlockQ5_0> = bytes.chunks_exact(22).map(BlockQ5_0::read).collect();
                    tiles(
                        path,
                        &repack_q5_0(TILE_ROWS, bpr, |i| b[i]),
                        &a,
                        bpr,
                        "Q5_0",
                    );
                }
                GgmlDType::Q4_1 => {
                    let bytes = gguf_blocks(dtype, elems, &mut rng);
                    let b: Vec<BlockQ4_1> = bytes.chunks_exact(20).map(BlockQ4_1::read).collect();
                    tiles(
                        path,
                        &repack_q4_1(TILE_ROWS, bpr, |i| b[i]),
                        &a,
                        bpr,
                        "Q4_1",
                    );
                }
                GgmlDType::Q4K => {
                    let bytes = gguf_blocks(dtype, TILE_ROWS * kbpr * QK_K, &mut rng);
                    let b: Vec<_> = bytes
                        .chunks_exact(144)
                        .map(crate::quant::repack_q4_k)
                        .collect();
                    let w = k_quant::repack_q4_k(TILE_ROWS, kbpr, |i| b[i]);
                    tiles(path, &w, &ak, kbpr, "Q4_K");
                }
                _ => {
                    let bytes = gguf_blocks(dtype, TILE_ROWS * kbpr * QK_K, &mut rng);
                    let b: Vec<_> = bytes.chunks_exact(210).map(BlockQ6K::read).collect();
                    let w = k_quant::repack_q6_k(TILE_ROWS, kbpr, |i| b[i]);
                    tiles(path, &w, &ak, kbpr, "Q6_K");
                }
            }
        }
    }

    #[test]
    #[cfg_attr(
        not(all(target_arch = "x86_64", target_feature = "avx2")),
        ignore = "an x86-64 build with AVX2 runs it"
    )]
    fn the_avx2_kernels_tiled_match_the_scalar_reference_bit_for_bit() {
        check_path(CpuPath::Avx2);
    }

    #[test]
    #[ignore = "needs a CPU with AVX-VNNI; scripts/test.sh runs it where the CPU has one (cargo test -p weft-kernels --lib -- --ignored the_avx_vnni_kernels)"]
    fn the_avx_vnni_kernels_tiled_match_the_scalar_reference_bit_for_bit() {
        check_path(CpuPath::AvxVnni);
    }

    #[test]
    #[ignore = "needs a CPU with AVX-512 F/BW/VL and VNNI; scripts/test.sh runs it where the CPU has them (cargo test -p weft-kernels --lib -- --ignored the_avx512_vnni_kernels)"]
    fn the_avx512_vnni_kernels_tiled_match_the_scalar_reference_bit_for_bit() {
        check_path(CpuPath::Avx512Vnni);
    }

    #[test]
    fn repacking_keeps_every_value_of_every_row() {
        let mut rng = Rng(41);
        let (rows, cols) = (16, 512);
        for dtype in TYPES {
            let bytes = gguf_blocks(dtype, rows * cols, &mut rng);
            let want = match dtype
                .from_data(Cow::Borrowed(&bytes[..]))
                .dequantize(rows * cols)
                .unwrap()
            {
                candle_core::CpuStorage::F32(v) => v,
                _ => unreachable!("dequantize gives f32"),
            };
            let w = QMatrix::from_bytes("w", dtype, rows, cols, &bytes).unwrap();
            // Q4_K's 12 bytes of 6-bit scales and minimums take 16 unpacked
            let held = match dtype {
                GgmlDType::Q4K => bytes.len() / 144 * 148,
                _ => bytes.len(),
            };
            assert_eq!(w.size_in_bytes(), held, "{dtype:?} repacked size");
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.row_f32(r, &mut row).unwrap();
                assert_eq!(row, want[r * cols..(r + 1) * cols], "{dtype:?} row {r}");
            }
        }
    }

    #[test]
    fn the_tiled_product_agrees_with_the_dequantized_f32_product() {
        let mut rng = Rng(7);
        let (rows, cols, m) = (24, 768, 11);
        for dtype in TYPES {
            let bytes = gguf_blocks(dtype, rows * cols, &mut rng);
            let w = QMatrix::from_bytes("w", dtype, rows, cols, &bytes).unwrap();
            let (x, _) = random_acts(m, cols, &mut rng);
            let mut y = vec![0f32; m * rows];
            w.matmul(m, &x, &mut y).unwrap();
            let mut row = vec![0f32; cols];
            for c in 0..rows {
                w.row_f32(c, &mut row).unwrap();
                for t in 0..m {
                    let exact: f64 = row
                        .iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    let scale: f64 = row
                        .iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let got = y[t * rows + c] as f64;
                    // up to the activations' 8-bit quantization
                    assert!(
                        (got - exact).abs() <= 0.02 * scale.max(1e-3),
                        "{dtype:?} token {t}, column {c}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_token_rows_products_do_not_depend_on_the_rows_beside_it() {
        let mut rng = Rng(99);
        let (rows, cols, m) = (32, 512, 13);
        for dtype in TYPES {
            let bytes = gguf_blocks(dtype, rows * cols, &mut rng);
            let w = QMatrix::from_bytes("w", dtype, rows, cols, &bytes).unwrap();
            let (x, _) = random_acts(m, cols, &mut rng);
            let mut all = vec![0f32; m * rows];
            w.matmul(m, &x, &mut all).unwrap();
            for t in 0..m {
                let mut alone = vec![0f32; rows];
                w.matmul(1, &x[t * cols..(t + 1) * cols], &mut alone)
                    .unwrap();
                assert_eq!(
                    alone,
                    all[t * rows..(t + 1) * rows],
                    "{dtype:?}: token row {t} alone and in a batch of {m}"
                );
            }
        }
    }

    /// Three products of one input through `matmul_triple` against each
    /// alone, bit for bit.
    fn check_fused(parts: [(GgmlDType, usize); 3], cols: usize, seed: u64) {
        let mut rng = Rng(seed);
        let m = 9;
        let ws: Vec<QMatrix> = parts
            .into_iter()
            .map(|(dt, rows)| {
                let bytes = gguf_blocks(dt, rows * cols, &mut rng);
                QMatrix::from_bytes("w", dt, rows, cols, &bytes).unwrap()
            })
            .collect();
        let (x, _) = random_acts(m, cols, &mut rng);
        let mut fused: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows()]).collect();
        let [a, b, c] = &mut fused[..] else {
            unreachable!("three outputs")
        };
        QMatrix::matmul_triple(&ws[0], &ws[1], &ws[2], m, &x, a, b, c).unwrap();
        for (w, got) in ws.iter().zip(&fused) {
            let mut alone = vec![0f32; m * w.rows()];
            w.matmul(m, &x, &mut alone).unwrap();
            assert_eq!(&alone, got, "{:?} fused with the others", w.dtype());
        }
    }

    #[test]
    fn products_of_several_types_sharing_an_input_match_each_alone() {
        use GgmlDType::*;
        check_fused([(Q5_0, 16), (Q8_0, 8), (Q4_1, 24)], 64, 5);
    }

    #[test]
    fn k_quant_products_sharing_an_input_match_each_alone() {
        use GgmlDType::*;
        check_fused([(Q4K, 16), (Q6K, 8), (Q4K, 24)], 512, 6);
    }

    #[test]
    fn a_k_quant_beside_a_32_element_type_on_one_input_matches_each_alone() {
        use GgmlDType::*;
        check_fused([(Q5_0, 16), (Q6K, 8), (Q8_0, 24)], 256, 8);
    }
}
