//! Quantized weight matrices and their matrix products on the CPU.
//!
//! A [`QMatrix`] is a GGUF weight of shape `[rows = out_features, cols = in_features]`.
//! `matmul` multiplies a batch of activation rows by its transpose. Q4_1, Q5_0
//! and Q8_0 (the layer weights of the default models: candle has only scalar
//! loops for the first two) use our own AVX2 kernels below; K-quants and the
//! rest go through candle's. All products run on candle's CPU worker pool, whose size
//! [`crate::set_threads`] fixes.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QuantizedType};
use candle_core::utils::barrier_pool;
use half::f16;

use crate::error::{KernelError, Result};

/// Elements per Q8_0 / Q5_0 block.
pub const QK: usize = 32;
/// Output columns one pool work item computes in our own kernels.
const COLS_PER_ITEM: usize = 16;

/// One Q8_0 block: a scale and 32 signed bytes (34 bytes, as in GGUF).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// One Q5_0 block: a scale, the 32 high bits, and 32 low nibbles (22 bytes, as in GGUF).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// One Q4_1 block: a scale, a minimum, and 32 low nibbles (20 bytes, as in
/// GGUF); element `j` is `d · q_j + m`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// A Q8-quantized activation block with its scale already in f32 (the
/// f16-rounded value ggml stores, so products are the same). `s` is what
/// ggml's Q8_1 adds for weights with a minimum (Q4_1): the f32 scale times
/// the sum of the quants, rounded to f16.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct ActQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

enum Storage {
    /// Our own Q4_1 kernels.
    Q4_1(Vec<BlockQ4_1>),
    /// Our own Q5_0 kernels.
    Q5_0(Vec<BlockQ5_0>),
    /// Our own Q8_0 kernels.
    Q8_0(Vec<BlockQ8_0>),
    /// Everything else through candle's CPU quantized types.
    Candle(Box<dyn QuantizedType>),
    /// Plain f32 (norm-sized or test weights).
    F32(Vec<f32>),
}

/// A weight matrix `[rows, cols]` in its GGUF quantization.
pub struct QMatrix {
    rows: usize,
    cols: usize,
    dtype: GgmlDType,
    storage: Storage,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({}x{} {:?})", self.rows, self.cols, self.dtype)
    }
}

/// Bytes a tensor of `elems` elements of `dtype` occupies, or `None` when the
/// count is not a whole number of blocks.
pub fn tensor_bytes(dtype: GgmlDType, elems: usize) -> Option<usize> {
    let bs = dtype.block_size();
    if !elems.is_multiple_of(bs) {
        return None;
    }
    (elems / bs).checked_mul(dtype.type_size())
}

impl QMatrix {
    /// Wraps raw GGUF tensor bytes. `name` is for error messages.
    pub fn from_bytes(
        name: &str,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self> {
        let unsupported = || KernelError::UnsupportedTensorType {
            name: name.to_string(),
            dtype: format!("{dtype:?}"),
        };
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(KernelError::WrongShape {
                name: name.to_string(),
                found: vec![rows, cols],
                expected: vec![rows, cols.div_ceil(dtype.block_size()) * dtype.block_size()],
            });
        }
        let expected = rows
            .checked_mul(cols)
            .and_then(|e| tensor_bytes(dtype, e))
            .ok_or_else(unsupported)?;
        if bytes.len() != expected {
            return Err(KernelError::InvalidGguf {
                path: name.into(),
                reason: format!("tensor holds {} bytes, expected {expected}", bytes.len()),
            });
        }
        let storage = match dtype {
            GgmlDType::Q5_0 => {
                let n = bytes.len() / std::mem::size_of::<BlockQ5_0>();
                let mut blocks = Vec::with_capacity(n);
                for chunk in bytes.chunks_exact(std::mem::size_of::<BlockQ5_0>()) {
                    let mut qh = [0u8; 4];
                    qh.copy_from_slice(&chunk[2..6]);
                    let mut qs = [0u8; QK / 2];
                    qs.copy_from_slice(&chunk[6..22]);
                    blocks.push(BlockQ5_0 {
                        d: f16::from_le_bytes([chunk[0], chunk[1]]),
                        qh,
                        qs,
                    });
                }
                Storage::Q5_0(blocks)
            }
            GgmlDType::Q4_1 => Storage::Q4_1(
                bytes
                    .chunks_exact(std::mem::size_of::<BlockQ4_1>())
                    .map(|c| {
                        let mut qs = [0u8; QK / 2];
                        qs.copy_from_slice(&c[4..20]);
                        BlockQ4_1 {
                            d: f16::from_le_bytes([c[0], c[1]]),
                            m: f16::from_le_bytes([c[2], c[3]]),
                            qs,
                        }
                    })
                    .collect(),
            ),
            GgmlDType::Q8_0 => Storage::Q8_0(
                bytes
                    .chunks_exact(std::mem::size_of::<BlockQ8_0>())
                    .map(|c| {
                        let mut qs = [0i8; QK];
                        for (q, b) in qs.iter_mut().zip(&c[2..34]) {
                            *q = *b as i8;
                        }
                        BlockQ8_0 {
                            d: f16::from_le_bytes([c[0], c[1]]),
                            qs,
                        }
                    })
                    .collect(),
            ),
            GgmlDType::F32 => Storage::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            GgmlDType::Q4_0
            | GgmlDType::Q5_1
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::F16
            | GgmlDType::BF16 => Storage::Candle(dtype.from_data(Cow::Borrowed(bytes))),
            _ => return Err(unsupported()),
        };
        Ok(Self {
            rows,
            cols,
            dtype,
            storage,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The GGUF quantization of this matrix.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Bytes of weight data held.
    pub fn size_in_bytes(&self) -> usize {
        match &self.storage {
            Storage::Q4_1(b) => b.len() * std::mem::size_of::<BlockQ4_1>(),
            Storage::Q5_0(b) => b.len() * std::mem::size_of::<BlockQ5_0>(),
            Storage::Q8_0(b) => b.len() * std::mem::size_of::<BlockQ8_0>(),
            Storage::Candle(q) => q.storage_size_in_bytes(),
            Storage::F32(v) => v.len() * 4,
        }
    }

    /// Checks that `lhs` holds `m` input rows and `dst` room for `m` output rows.
    fn check_shapes(&self, m: usize, lhs: &[f32], dst: &[f32]) -> Result<()> {
        if lhs.len() != m * self.cols || dst.len() != m * self.rows {
            return Err(KernelError::BadInput(format!(
                "a product of {m} rows with a {}x{} matrix takes {} inputs into {} outputs, not {} into {}",
                self.rows,
                self.cols,
                m * self.cols,
                m * self.rows,
                lhs.len(),
                dst.len()
            )));
        }
        Ok(())
    }

    /// `dst[m, rows] = lhs[m, cols] · selfᵀ`.
    pub fn matmul(&self, m: usize, lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        self.check_shapes(m, lhs, dst)?;
        if m == 0 {
            return Ok(());
        }
        if Self::fused(&[self], m, lhs, &mut [&mut *dst]) {
            return Ok(());
        }
        match &self.storage {
            Storage::Q4_1(_) | Storage::Q5_0(_) | Storage::Q8_0(_) => Ok(()),
            Storage::Candle(q) => Ok(q.matmul_t((m, self.cols, self.rows), lhs, dst)?),
            Storage::F32(w) => {
                matmul_f32(m, self.cols, self.rows, lhs, w, dst);
                Ok(())
            }
        }
    }

    /// `dst_a = lhs · aᵀ` and `dst_b = lhs · bᵀ` for two matrices taking the
    /// same input: one activation quantization and one pool dispatch when
    /// both have the same one of our own types.
    pub fn matmul_pair(
        a: &Self,
        b: &Self,
        m: usize,
        lhs: &[f32],
        dst_a: &mut [f32],
        dst_b: &mut [f32],
    ) -> Result<()> {
        a.check_shapes(m, lhs, dst_a)?;
        b.check_shapes(m, lhs, dst_b)?;
        if !Self::fused(&[a, b], m, lhs, &mut [dst_a, &mut *dst_b]) {
            a.matmul(m, lhs, dst_a)?;
            b.matmul(m, lhs, dst_b)?;
        }
        Ok(())
    }

    /// Products of one input by several matrices of one of our own types
    /// in one activation quantization and one pool dispatch; `false` (and
    /// nothing done) when their types differ or are candle's.
    fn fused(ms: &[&Self], m: usize, lhs: &[f32], dsts: &mut [&mut [f32]]) -> bool {
        macro_rules! of_type {
            ($variant:ident) => {
                let blocks: Option<Vec<_>> = ms
                    .iter()
                    .map(|q| match &q.storage {
                        Storage::$variant(w) => Some(&w[..]),
                        _ => None,
                    })
                    .collect();
                if let Some(blocks) = blocks {
                    let mut parts: Vec<_> = blocks
                        .into_iter()
                        .zip(ms)
                        .zip(dsts.iter_mut())
                        .map(|((w, q), d)| (w, q.rows, &mut **d))
                        .collect();
                    matmul_q8_act(m, ms[0].cols, lhs, &mut parts);
                    return true;
                }
            };
        }
        if m == 0 {
            return false;
        }
        of_type!(Q4_1);
        of_type!(Q5_0);
        of_type!(Q8_0);
        false
    }

    /// Three products of one input (q, k and v): one activation
    /// quantization and one pool dispatch when all three have the same one
    /// of our own types; else the first two paired and the third alone.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_triple(
        a: &Self,
        b: &Self,
        c: &Self,
        m: usize,
        lhs: &[f32],
        dst_a: &mut [f32],
        dst_b: &mut [f32],
        dst_c: &mut [f32],
    ) -> Result<()> {
        a.check_shapes(m, lhs, dst_a)?;
        b.check_shapes(m, lhs, dst_b)?;
        c.check_shapes(m, lhs, dst_c)?;
        if !Self::fused(&[a, b, c], m, lhs, &mut [dst_a, &mut *dst_b, &mut *dst_c]) {
            Self::matmul_pair(a, b, m, lhs, dst_a, dst_b)?;
            c.matmul(m, lhs, dst_c)?;
        }
        Ok(())
    }

    /// Dequantizes row `row` into `out` (embedding lookup).
    pub fn row_f32(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if out.len() != self.cols {
            return Err(KernelError::BadInput(format!(
                "a row of {} values, not {}",
                out.len(),
                self.cols
            )));
        }
        if row >= self.rows {
            return Err(KernelError::BadInput(format!(
                "row {row} out of range for {} rows",
                self.rows
            )));
        }
        // one block's 32 values at a time, for our own block types
        fn blocks<B>(w: &[B], row: usize, out: &mut [f32], dequant: impl Fn(&B, &mut [f32])) {
            let bpr = out.len() / QK;
            for (b, o) in w[row * bpr..(row + 1) * bpr]
                .iter()
                .zip(out.chunks_exact_mut(QK))
            {
                dequant(b, o);
            }
        }
        match &self.storage {
            Storage::Q4_1(w) => blocks(w, row, out, dequant_q4_1),
            Storage::Q5_0(w) => blocks(w, row, out, dequant_q5_0),
            Storage::Q8_0(w) => blocks(w, row, out, |b, o| {
                let d = b.d.to_f32();
                o.iter_mut()
                    .zip(&b.qs)
                    .for_each(|(o, q)| *o = *q as f32 * d);
            }),
            Storage::F32(w) => out.copy_from_slice(&w[row * self.cols..(row + 1) * self.cols]),
            Storage::Candle(q) => {
                let rows = q.embedding(&[row as u32], self.rows, self.cols)?;
                match rows {
                    candle_core::CpuStorage::F32(v) => out.copy_from_slice(&v[..self.cols]),
                    _ => {
                        return Err(KernelError::BadInput(
                            "embedding of a quantized row did not return f32".into(),
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

fn dequant_q4_1(b: &BlockQ4_1, out: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for j in 0..QK / 2 {
        out[j] = (b.qs[j] & 0x0f) as f32 * d + m;
        out[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
    }
}

fn dequant_q5_0(b: &BlockQ5_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    let qh = u32::from_le_bytes(b.qh);
    for j in 0..QK / 2 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        let x0 = ((b.qs[j] & 0x0f) as u32 | h0) as i32 - 16;
        let x1 = ((b.qs[j] >> 4) as u32 | h1) as i32 - 16;
        out[j] = x0 as f32 * d;
        out[j + QK / 2] = x1 as f32 * d;
    }
}

/// Quantizes one activation row to Q8_0 exactly as ggml's CPU backend does
/// (scale `127 / max`, round half to even, scale stored as f16), so products
/// match llama.cpp's; `s` as its AVX2 Q8_1 quantization sets it.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [ActQ8]) {
    for (xs, o) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let d = amax / 127.0;
        o.d = f16::from_f32(d).to_f32();
        let mut sum = 0i32;
        for (q, v) in o.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        o.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

/// A raw pointer that may cross to pool workers; each worker writes disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: users guarantee that concurrent workers write disjoint ranges.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

/// Weight blocks whose dot partner is a Q8_0 activation block.
pub trait Q8Dot: Copy + Sync {
    /// Sums of one weight row with `R` activation rows. Each sum is the
    /// same [`CHAINS`] chains over the blocks combined the same way,
    /// whatever `R` is, so a row's result does not depend on the rows
    /// batched with it.
    fn dot_rows<const R: usize>(w: &[Self], ys: [&[ActQ8]; R]) -> [f32; R];
}

/// Chains a row's blocks are summed in: block `b` goes to chain `b % 4`,
/// the chains are added pairwise at the end. Few rows walk the chains side
/// by side (so each fused multiply-add need not wait on the last); many
/// rows walk them one after another (so the accumulators stay in registers);
/// the sums are the same bits either way.
pub const CHAINS: usize = 4;

/// Whether this CPU has AVX-VNNI (`vpdpbusd` on 256-bit vectors), checked
/// once; `WEFT_NO_VNNI` set turns it off (to compare the kernels).
#[cfg(target_arch = "x86_64")]
fn has_avx_vnni() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static FOUND: AtomicU8 = AtomicU8::new(0);
    match FOUND.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let yes = std::is_x86_feature_detected!("avxvnni")
                && std::env::var_os("WEFT_NO_VNNI").is_none();
            FOUND.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

/// Implements [`Q8Dot`] for a block type: its AVX-VNNI kernel where the CPU
/// has it (when there is one), its AVX2 kernel otherwise, and the scalar
/// reference without AVX2.
macro_rules! q8_dot {
    ($block:ty, $kernel:ident, $scalar:ident, $vnni:expr) => {
        impl Q8Dot for $block {
            #[inline]
            fn dot_rows<const R: usize>(w: &[Self], ys: [&[ActQ8]; R]) -> [f32; R] {
                #[cfg(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma",
                    target_feature = "f16c"
                ))]
                {
                    if $vnni && has_avx_vnni() {
                        // SAFETY: the CPU has AVX-VNNI (checked above) and AVX2.
                        unsafe { vnni::$kernel(w, ys) }
                    } else {
                        // SAFETY: AVX2, FMA and F16C are enabled at compile time (the cfg above).
                        unsafe { avx2::$kernel(w, ys) }
                    }
                }
                #[cfg(not(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma",
                    target_feature = "f16c"
                )))]
                {
                    ys.map(|y| $scalar(w, y))
                }
            }
        }
    };
}

q8_dot!(BlockQ8_0, rows_q8_0, vec_dot_q8_0_q8_0_scalar, true);
q8_dot!(BlockQ4_1, rows_q4_1, vec_dot_q4_1_q8_1_scalar, true);
q8_dot!(BlockQ5_0, rows_q5_0, vec_dot_q5_0_q8_0_scalar, false);

/// Activation rows one work item covers at most (a block that stays in cache).
const ROW_BLOCK: usize = 64;
/// Activation rows handled together, so each weight block is unpacked once per group.
const ROW_GROUP: usize = 8;

/// Products of weights whose dot type is Q8_0: the activations are quantized
/// once, then column tiles are spread over the pool; within a tile, rows go
/// in groups of [`ROW_GROUP`] over each weight row. Several matrices that take
/// the same input (`parts`: weights, output columns, destination) share the
/// quantization and one pool dispatch.
fn matmul_q8_act<W: Q8Dot>(
    m: usize,
    k: usize,
    lhs: &[f32],
    parts: &mut [(&[W], usize, &mut [f32])],
) {
    let bpr = k / QK;
    let zero = ActQ8 {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
    let mut lhs_q = vec![zero; m * bpr];
    for r in 0..m {
        quantize_row_q8_0(&lhs[r * k..(r + 1) * k], &mut lhs_q[r * bpr..(r + 1) * bpr]);
    }
    // (part, first column, first row) of every work item: row blocks outer,
    // so a worker keeps one block of quantized activations hot while it walks
    // the weight columns
    let mut items: Vec<(usize, usize, usize)> = Vec::new();
    for r0 in (0..m).step_by(ROW_BLOCK) {
        for (p, (_, n, _)) in parts.iter().enumerate() {
            items.extend((0..n.div_ceil(COLS_PER_ITEM)).map(|i| (p, i * COLS_PER_ITEM, r0)));
        }
    }
    let outs: Vec<(&[W], usize, SharedMut)> = parts
        .iter_mut()
        .map(|(w, n, d)| (*w, *n, SharedMut(d.as_mut_ptr())))
        .collect();
    let (lhs_q, items, outs) = (&lhs_q, &items, &outs);
    let y = move |r: usize| &lhs_q[r * bpr..(r + 1) * bpr];
    barrier_pool().execute_chunked(items.len(), move |range| {
        for &(p, c0, r0) in &items[range] {
            let (w, n, out) = outs[p];
            let c1 = (c0 + COLS_PER_ITEM).min(n);
            let r_end = (r0 + ROW_BLOCK).min(m);
            // SAFETY (all writes below): (r, c) of a part is written by exactly one work item.
            let put = |r: usize, c: usize, v: f32| unsafe { *out.0.add(r * n + c) = v };
            let mut r = r0;
            while r + ROW_GROUP <= r_end {
                for c in c0..c1 {
                    let ys: [&[ActQ8]; ROW_GROUP] = std::array::from_fn(|i| y(r + i));
                    let s = W::dot_rows(&w[c * bpr..(c + 1) * bpr], ys);
                    for (i, v) in s.into_iter().enumerate() {
                        put(r + i, c, v);
                    }
                }
                r += ROW_GROUP;
            }
            while r + 4 <= r_end {
                for c in c0..c1 {
                    let s = W::dot_rows(
                        &w[c * bpr..(c + 1) * bpr],
                        [y(r), y(r + 1), y(r + 2), y(r + 3)],
                    );
                    for (i, v) in s.into_iter().enumerate() {
                        put(r + i, c, v);
                    }
                }
                r += 4;
            }
            while r + 2 <= r_end {
                for c in c0..c1 {
                    let s = W::dot_rows(&w[c * bpr..(c + 1) * bpr], [y(r), y(r + 1)]);
                    put(r, c, s[0]);
                    put(r + 1, c, s[1]);
                }
                r += 2;
            }
            for r in r..r_end {
                for c in c0..c1 {
                    put(r, c, W::dot_rows(&w[c * bpr..(c + 1) * bpr], [y(r)])[0]);
                }
            }
        }
    });
}

fn matmul_f32(m: usize, k: usize, n: usize, lhs: &[f32], w: &[f32], dst: &mut [f32]) {
    for r in 0..m {
        let x = &lhs[r * k..(r + 1) * k];
        for c in 0..n {
            dst[r * n + c] = dot_f32(x, &w[c * k..(c + 1) * k]);
        }
    }
}

/// f32 dot product written so the compiler vectorizes it.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Dot product of a Q5_0 row with a Q8_0 activation row.
#[inline]
pub fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[ActQ8]) -> f32 {
    BlockQ5_0::dot_rows(x, [y])[0]
}

/// Dot product of a Q8_0 row with a Q8_0 activation row.
#[inline]
pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[ActQ8]) -> f32 {
    BlockQ8_0::dot_rows(x, [y])[0]
}

/// The reference (scalar) Q8_0 · Q8_0 dot product.
pub fn vec_dot_q8_0_q8_0_scalar(x: &[BlockQ8_0], y: &[ActQ8]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(a, b)| {
            let s: i32 =
                a.qs.iter()
                    .zip(&b.qs)
                    .map(|(p, q)| *p as i32 * *q as i32)
                    .sum();
            s as f32 * (a.d.to_f32() * b.d)
        })
        .sum()
}

/// Dot product of a Q4_1 row with a Q8 activation row.
#[inline]
pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[ActQ8]) -> f32 {
    BlockQ4_1::dot_rows(x, [y])[0]
}

/// The reference (scalar) Q4_1 · Q8_1 dot product: `d_x d_y Σ q_x q_y + m_x s_y` per block.
pub fn vec_dot_q4_1_q8_1_scalar(x: &[BlockQ4_1], y: &[ActQ8]) -> f32 {
    let mut sum = 0f32;
    for (b, q) in x.iter().zip(y) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            s += (b.qs[j] & 0x0f) as i32 * q.qs[j] as i32
                + (b.qs[j] >> 4) as i32 * q.qs[j + QK / 2] as i32;
        }
        sum += s as f32 * (b.d.to_f32() * q.d) + b.m.to_f32() * q.s;
    }
    sum
}

/// The reference (scalar) Q5_0 · Q8_0 dot product.
pub fn vec_dot_q5_0_q8_0_scalar(x: &[BlockQ5_0], y: &[ActQ8]) -> f32 {
    let mut sum = 0f32;
    for (b, q) in x.iter().zip(y) {
        let qh = u32::from_le_bytes(b.qh);
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            let x0 = ((b.qs[j] & 0x0f) as u32 | h0) as i32 - 16;
            let x1 = ((b.qs[j] >> 4) as u32 | h1) as i32 - 16;
            s += x0 * q.qs[j] as i32 + x1 * q.qs[j + QK / 2] as i32;
        }
        sum += s as f32 * (b.d.to_f32() * q.d);
    }
    sum
}

/// The kernels of one instruction set: `$feat` names the target features
/// its functions are compiled for, `$dot` how it multiplies unsigned by
/// signed bytes and sums them in fours into 32-bit lanes.
macro_rules! kernels {
    ($name:ident, $doc:literal, $feat:literal, $dot:ident) => {
        #[doc = $doc]
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        pub(super) mod $name {
            #[allow(unused_imports)]
            use super::{dot_avx2, dot_vnni};
            use super::{ActQ8, BlockQ4_1, BlockQ5_0, BlockQ8_0, CHAINS, QK};
            use std::arch::x86_64::*;

            #[inline]
            #[target_feature(enable = $feat)]
            fn hsum(acc: __m256) -> f32 {
                let hi = _mm256_extractf128_ps(acc, 1);
                let lo = _mm256_castps256_ps128(acc);
                let s = _mm_add_ps(hi, lo);
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }

            /// Spreads the 32 bits of `qh` to 32 bytes: byte j is 0x10 when bit j is set.
            #[inline]
            #[target_feature(enable = $feat)]
            fn high_bits(qh: u32) -> __m256i {
                let v = _mm256_set1_epi32(qh as i32);
                // byte j takes byte j/8 of qh
                let shuf = _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0x0000000000000000,
                );
                let bytes = _mm256_shuffle_epi8(v, shuf);
                let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
            }

            /// The 32 unsigned nibbles of a Q4_1 block, in element order.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn nibbles(qs: &[u8; QK / 2]) -> __m256i {
                let q = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
                _mm256_and_si256(
                    _mm256_set_m128i(_mm_srli_epi16(q, 4), q),
                    _mm256_set1_epi8(0x0f),
                )
            }

            /// One block's term added to a chain: `acc + d_x d_y · (x · y)`.
            #[inline]
            #[target_feature(enable = $feat)]
            fn term(acc: __m256, p: __m256i, dxy: f32) -> __m256 {
                _mm256_fmadd_ps(_mm256_set1_ps(dxy), _mm256_cvtepi32_ps(p), acc)
            }

            /// The chains combined: `(c0 + c1) + (c2 + c3)`, then the lanes.
            #[inline]
            #[target_feature(enable = $feat)]
            fn combine(c: [__m256; CHAINS]) -> f32 {
                hsum(_mm256_add_ps(
                    _mm256_add_ps(c[0], c[1]),
                    _mm256_add_ps(c[2], c[3]),
                ))
            }

            /// Sums of signed-weight blocks (Q8_0, Q5_0) with `R` rows:
            /// `unpack(block)` gives a block's 32 values and scale.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn rows_signed<const R: usize>(
                n: usize,
                ys: &[&[ActQ8]; R],
                mut unpack: impl FnMut(usize) -> (__m256i, f32),
            ) -> [f32; R] {
                let mut chains = [[_mm256_setzero_ps(); CHAINS]; R];
                let mut step = |acc: &mut [__m256; R], b: usize| {
                    let (x, dx) = unpack(b);
                    let ax = _mm256_sign_epi8(x, x);
                    for r in 0..R {
                        let y = ys[r].get_unchecked(b);
                        let yv = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                        // |x| * sign(y, x) keeps the unsigned×signed form
                        acc[r] = term(acc[r], $dot(ax, _mm256_sign_epi8(yv, x)), dx * y.d);
                    }
                };
                if R <= 2 {
                    let mut acc = [[_mm256_setzero_ps(); R]; CHAINS];
                    for b0 in (0..n).step_by(CHAINS) {
                        for (k, a) in acc.iter_mut().enumerate() {
                            if b0 + k < n {
                                step(a, b0 + k);
                            }
                        }
                    }
                    for r in 0..R {
                        chains[r] = std::array::from_fn(|k| acc[k][r]);
                    }
                } else {
                    for k in 0..CHAINS {
                        let mut acc = [_mm256_setzero_ps(); R];
                        for b in (k..n).step_by(CHAINS) {
                            step(&mut acc, b);
                        }
                        for r in 0..R {
                            chains[r][k] = acc[r];
                        }
                    }
                }
                chains.map(|c| combine(c))
            }

            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn rows_q8_0<const R: usize>(
                x: &[BlockQ8_0],
                ys: [&[ActQ8]; R],
            ) -> [f32; R] {
                let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
                rows_signed::<R>(n, &ys, |b| {
                    let bx = x.get_unchecked(b);
                    (
                        _mm256_loadu_si256(bx.qs.as_ptr() as *const __m256i),
                        bx.d.to_f32(),
                    )
                })
            }

            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn rows_q5_0<const R: usize>(
                x: &[BlockQ5_0],
                ys: [&[ActQ8]; R],
            ) -> [f32; R] {
                let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
                let low = _mm256_set1_epi8(0x0f);
                let sixteen = _mm256_set1_epi8(16);
                rows_signed::<R>(n, &ys, |b| {
                    let bx = x.get_unchecked(b);
                    let qs = _mm_loadu_si128(bx.qs.as_ptr() as *const __m128i);
                    // positions 0..16 are the low nibbles, 16..32 the high nibbles
                    let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low);
                    let q = _mm256_or_si256(nib, high_bits(u32::from_le_bytes(bx.qh)));
                    (_mm256_sub_epi8(q, sixteen), bx.d.to_f32())
                })
            }

            /// Q4_1: the nibbles are unsigned, so they meet the activations
            /// directly; the minimum adds `m · s` per block, in chains too.
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn rows_q4_1<const R: usize>(
                x: &[BlockQ4_1],
                ys: [&[ActQ8]; R],
            ) -> [f32; R] {
                let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
                let mut chains = [[_mm256_setzero_ps(); CHAINS]; R];
                let mut min_chains = [[0f32; CHAINS]; R];
                let step = |acc: &mut [__m256; R], mins: &mut [f32; R], b: usize| {
                    let bx = x.get_unchecked(b);
                    // d and m widened together: one conversion for both
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                        bx as *const BlockQ4_1 as *const i32,
                    )));
                    let (dx, mx) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
                    let xs = nibbles(&bx.qs);
                    for r in 0..R {
                        let y = ys[r].get_unchecked(b);
                        let yv = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                        acc[r] = term(acc[r], $dot(xs, yv), dx * y.d);
                        mins[r] += mx * y.s;
                    }
                };
                if R <= 2 {
                    let mut acc = [[_mm256_setzero_ps(); R]; CHAINS];
                    let mut mins = [[0f32; R]; CHAINS];
                    for b0 in (0..n).step_by(CHAINS) {
                        for (k, (a, m)) in acc.iter_mut().zip(mins.iter_mut()).enumerate() {
                            if b0 + k < n {
                                step(a, m, b0 + k);
                            }
                        }
                    }
                    for r in 0..R {
                        chains[r] = std::array::from_fn(|k| acc[k][r]);
                        min_chains[r] = std::array::from_fn(|k| mins[k][r]);
                    }
                } else {
                    for k in 0..CHAINS {
                        let mut acc = [_mm256_setzero_ps(); R];
                        let mut mins = [0f32; R];
                        for b in (k..n).step_by(CHAINS) {
                            step(&mut acc, &mut mins, b);
                        }
                        for r in 0..R {
                            chains[r][k] = acc[r];
                            min_chains[r][k] = mins[r];
                        }
                    }
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    let m = min_chains[r];
                    out[r] = combine(chains[r]) + ((m[0] + m[1]) + (m[2] + m[3]));
                }
                out
            }
        }
    };
}

/// `vpmaddubsw` then `vpmaddwd` by ones: the AVX2 form.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline(always)]
unsafe fn dot_avx2(
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// One `vpdpbusd`: the AVX-VNNI form (exact, where the AVX2 form's 16-bit
/// step could saturate).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn dot_vnni(
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
}

kernels!(
    avx2,
    "Our kernels with AVX2 and FMA.",
    "avx2,fma,f16c",
    dot_avx2
);
kernels!(
    vnni,
    "Our kernels with AVX-VNNI: one `vpdpbusd` takes the place of `vpmaddubsw` and `vpmaddwd`.",
    "avx2,fma,f16c,avxvnni",
    dot_vnni
);

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// 40 random Q5_0 weight blocks, the activations they meet, and those
    /// activations quantized to Q8_0.
    fn random_q5_0_dot() -> (Vec<BlockQ5_0>, Vec<f32>, Vec<ActQ8>) {
        let mut s = 0x1234_5678_9abc_def1u64;
        let blocks = 40;
        let x: Vec<BlockQ5_0> = (0..blocks)
            .map(|_| {
                let mut b = BlockQ5_0 {
                    d: f16::from_f32(rng(&mut s)),
                    qh: [0; 4],
                    qs: [0; 16],
                };
                for v in b.qh.iter_mut().chain(b.qs.iter_mut()) {
                    *v = (rng(&mut s) * 127.0 + 128.0) as u8;
                }
                b
            })
            .collect();
        let act: Vec<f32> = (0..blocks * QK).map(|_| rng(&mut s)).collect();
        let mut y = vec![
            ActQ8 {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            blocks
        ];
        quantize_row_q8_0(&act, &mut y);
        (x, act, y)
    }

    #[test]
    fn avx2_q5_0_matches_scalar_on_random_blocks() {
        let (x, _, y) = random_q5_0_dot();
        let fast = vec_dot_q5_0_q8_0(&x, &y);
        let slow = vec_dot_q5_0_q8_0_scalar(&x, &y);
        assert!(
            (fast - slow).abs() <= 1e-3 * slow.abs().max(1.0),
            "{fast} vs {slow}"
        );
    }

    #[test]
    fn the_q5_0_dot_agrees_with_the_dequantized_f32_product() {
        let (x, act, y) = random_q5_0_dot();
        let fast = vec_dot_q5_0_q8_0(&x, &y);
        // up to the activations' quantization
        let mut deq = vec![0f32; x.len() * QK];
        for (b, o) in x.iter().zip(deq.chunks_exact_mut(QK)) {
            dequant_q5_0(b, o);
        }
        let exact = dot_f32(&deq, &act);
        assert!(
            (fast - exact).abs() <= 0.02 * exact.abs().max(1.0),
            "{fast} vs {exact}"
        );
    }

    #[test]
    fn grouped_rows_match_the_scalar_reference_for_every_type() {
        let mut s = 99u64;
        let (rows, cols, m) = (37, 64, 6);
        // random Q4_1, Q5_0 and Q8_0 weight bytes with sane scales
        let mut q4 = Vec::new();
        let mut q5 = Vec::new();
        let mut q8 = Vec::new();
        for _ in 0..rows * cols / QK {
            q4.extend(f16::from_f32(rng(&mut s) * 0.1).to_le_bytes());
            q4.extend(f16::from_f32(rng(&mut s) * 0.5).to_le_bytes());
            q4.extend((0..16).map(|_| (rng(&mut s) * 127.0 + 128.0) as u8));
            q5.extend(f16::from_f32(rng(&mut s) * 0.1).to_le_bytes());
            q5.extend((0..20).map(|_| (rng(&mut s) * 127.0 + 128.0) as u8));
            q8.extend(f16::from_f32(rng(&mut s) * 0.1).to_le_bytes());
            q8.extend((0..32).map(|_| (rng(&mut s) * 127.0) as i8 as u8));
        }
        let x: Vec<f32> = (0..m * cols).map(|_| rng(&mut s)).collect();
        for (dtype, bytes) in [
            (GgmlDType::Q4_1, q4),
            (GgmlDType::Q5_0, q5),
            (GgmlDType::Q8_0, q8),
        ] {
            let w = QMatrix::from_bytes("w", dtype, rows, cols, &bytes).unwrap();
            let mut y = vec![0f32; m * rows];
            w.matmul(m, &x, &mut y).unwrap();
            let bpr = cols / QK;
            for r in 0..m {
                let mut xq = vec![
                    ActQ8 {
                        d: 0.0,
                        s: 0.0,
                        qs: [0; QK]
                    };
                    bpr
                ];
                quantize_row_q8_0(&x[r * cols..(r + 1) * cols], &mut xq);
                for c in 0..rows {
                    let exact = match &w.storage {
                        Storage::Q4_1(b) => {
                            vec_dot_q4_1_q8_1_scalar(&b[c * bpr..(c + 1) * bpr], &xq)
                        }
                        Storage::Q5_0(b) => {
                            vec_dot_q5_0_q8_0_scalar(&b[c * bpr..(c + 1) * bpr], &xq)
                        }
                        Storage::Q8_0(b) => {
                            vec_dot_q8_0_q8_0_scalar(&b[c * bpr..(c + 1) * bpr], &xq)
                        }
                        _ => unreachable!(),
                    };
                    let got = y[r * rows + c];
                    assert!(
                        (got - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                        "{dtype:?} ({r},{c}): {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_q4_1_product_agrees_with_the_dequantized_f32_product() {
        let mut s = 7u64;
        let (rows, cols) = (5, 128);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK {
            bytes.extend(f16::from_f32(rng(&mut s) * 0.05).to_le_bytes());
            bytes.extend(f16::from_f32(rng(&mut s) * 0.4).to_le_bytes());
            bytes.extend((0..16).map(|_| (rng(&mut s) * 127.0 + 128.0) as u8));
        }
        let w = QMatrix::from_bytes("w", GgmlDType::Q4_1, rows, cols, &bytes).unwrap();
        let x: Vec<f32> = (0..cols).map(|_| rng(&mut s)).collect();
        let mut y = vec![0f32; rows];
        w.matmul(1, &x, &mut y).unwrap();
        let mut row = vec![0f32; cols];
        for (c, got) in y.iter().enumerate() {
            w.row_f32(c, &mut row).unwrap();
            let exact = dot_f32(&row, &x);
            // up to the activations' quantization
            assert!(
                (got - exact).abs() <= 0.02 * exact.abs().max(1.0),
                "row {c}: {got} vs {exact}"
            );
        }
    }

    /// Four weight rows of random blocks of each type of our kernels, 41
    /// blocks long, and 8 activation rows.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    #[allow(clippy::type_complexity)]
    fn variant_inputs() -> (
        Vec<Vec<BlockQ4_1>>,
        Vec<Vec<BlockQ8_0>>,
        Vec<Vec<BlockQ5_0>>,
        Vec<Vec<ActQ8>>,
    ) {
        let mut s = 4242u64;
        let n = 41;
        let mut q4 = Vec::new();
        let mut q8 = Vec::new();
        let mut q5 = Vec::new();
        for _ in 0..4 {
            q4.push(
                (0..n)
                    .map(|_| BlockQ4_1 {
                        d: f16::from_f32(rng(&mut s) * 0.1),
                        m: f16::from_f32(rng(&mut s) * 0.5),
                        qs: std::array::from_fn(|_| (rng(&mut s) * 127.0 + 128.0) as u8),
                    })
                    .collect(),
            );
            q8.push(
                (0..n)
                    .map(|_| BlockQ8_0 {
                        d: f16::from_f32(rng(&mut s) * 0.1),
                        qs: std::array::from_fn(|_| (rng(&mut s) * 127.0) as i8),
                    })
                    .collect(),
            );
            q5.push(
                (0..n)
                    .map(|_| BlockQ5_0 {
                        d: f16::from_f32(rng(&mut s) * 0.1),
                        qh: std::array::from_fn(|_| (rng(&mut s) * 127.0 + 128.0) as u8),
                        qs: std::array::from_fn(|_| (rng(&mut s) * 127.0 + 128.0) as u8),
                    })
                    .collect(),
            );
        }
        let ys = (0..8)
            .map(|_| {
                let x: Vec<f32> = (0..n * QK).map(|_| rng(&mut s)).collect();
                let mut y = vec![
                    ActQ8 {
                        d: 0.0,
                        s: 0.0,
                        qs: [0; QK]
                    };
                    n
                ];
                quantize_row_q8_0(&x, &mut y);
                y
            })
            .collect();
        (q4, q8, q5, ys)
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    fn close(got: f32, want: f32) -> bool {
        (got - want).abs() <= 1e-4 * want.abs().max(1.0)
    }

    /// One kernel set with `R` rows: every sum near the scalar reference,
    /// and bit for bit the sum of the row alone (a row's result does not
    /// depend on what it is batched with).
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    fn check_rows<const R: usize>(vnni: bool) {
        let (q4, q8, q5, ys) = variant_inputs();
        let rows: [&[ActQ8]; R] = std::array::from_fn(|i| &ys[i][..]);
        for col in 0..q4.len() {
            let (w4, w8, w5) = (&q4[col][..], &q8[col][..], &q5[col][..]);
            // SAFETY: AVX2 and FMA are compiled in; VNNI only where the CPU has it.
            let (a, b, c) = unsafe {
                if vnni {
                    (
                        vnni::rows_q4_1(w4, rows),
                        vnni::rows_q8_0(w8, rows),
                        vnni::rows_q5_0(w5, rows),
                    )
                } else {
                    (
                        avx2::rows_q4_1(w4, rows),
                        avx2::rows_q8_0(w8, rows),
                        avx2::rows_q5_0(w5, rows),
                    )
                }
            };
            for r in 0..R {
                // SAFETY: as above
                let alone = unsafe {
                    if vnni {
                        (
                            vnni::rows_q4_1(w4, [rows[r]])[0],
                            vnni::rows_q8_0(w8, [rows[r]])[0],
                            vnni::rows_q5_0(w5, [rows[r]])[0],
                        )
                    } else {
                        (
                            avx2::rows_q4_1(w4, [rows[r]])[0],
                            avx2::rows_q8_0(w8, [rows[r]])[0],
                            avx2::rows_q5_0(w5, [rows[r]])[0],
                        )
                    }
                };
                let want = (
                    vec_dot_q4_1_q8_1_scalar(w4, rows[r]),
                    vec_dot_q8_0_q8_0_scalar(w8, rows[r]),
                    vec_dot_q5_0_q8_0_scalar(w5, rows[r]),
                );
                let got = (a[r], b[r], c[r]);
                assert!(
                    close(got.0, want.0),
                    "Q4_1 R={R} ({col},{r}): {} vs {}",
                    got.0,
                    want.0
                );
                assert!(
                    close(got.1, want.1),
                    "Q8_0 R={R} ({col},{r}): {} vs {}",
                    got.1,
                    want.1
                );
                assert!(
                    close(got.2, want.2),
                    "Q5_0 R={R} ({col},{r}): {} vs {}",
                    got.2,
                    want.2
                );
                assert_eq!(
                    got.0.to_bits(),
                    alone.0.to_bits(),
                    "Q4_1 R={R} depends on the batch"
                );
                assert_eq!(
                    got.1.to_bits(),
                    alone.1.to_bits(),
                    "Q8_0 R={R} depends on the batch"
                );
                assert_eq!(
                    got.2.to_bits(),
                    alone.2.to_bits(),
                    "Q5_0 R={R} depends on the batch"
                );
            }
        }
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    fn check_every_row_count(vnni: bool) {
        check_rows::<8>(vnni);
        check_rows::<4>(vnni);
        check_rows::<2>(vnni);
        check_rows::<1>(vnni);
    }

    #[test]
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    fn the_avx2_kernels_match_the_scalar_reference_at_every_row_count_and_batch_alike() {
        check_every_row_count(false);
    }

    #[test]
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    #[ignore = "needs a CPU with AVX-VNNI; scripts/test.sh runs it where the CPU has one (cargo test -p weft-kernels --lib -- --ignored vnni)"]
    fn the_vnni_kernels_match_the_scalar_reference_at_every_row_count_and_batch_alike() {
        assert!(
            std::is_x86_feature_detected!("avxvnni"),
            "this CPU has no AVX-VNNI: the test cannot run here"
        );
        check_every_row_count(true);
    }
}
