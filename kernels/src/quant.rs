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
use tile::{Q4Kx8, Q4_1x8, Q5_0x8, Q6Kx8, Q8_0x8, TileGroup, Tiled, TILE_ROWS};

pub mod tile;

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

impl BlockQ8_0 {
    /// Decodes one block from its 34 GGUF bytes.
    pub fn read(c: &[u8]) -> Self {
        let c: &[u8; 34] = c[..34].try_into().expect("a whole block");
        BlockQ8_0 {
            d: f16::from_le_bytes([c[0], c[1]]),
            qs: std::array::from_fn(|i| c[2 + i] as i8),
        }
    }
}

impl BlockQ5_0 {
    /// Decodes one block from its 22 GGUF bytes.
    pub fn read(c: &[u8]) -> Self {
        let c: &[u8; 22] = c[..22].try_into().expect("a whole block");
        BlockQ5_0 {
            d: f16::from_le_bytes([c[0], c[1]]),
            qh: [c[2], c[3], c[4], c[5]],
            qs: std::array::from_fn(|i| c[6 + i]),
        }
    }
}

impl BlockQ4_1 {
    /// Decodes one block from its 20 GGUF bytes.
    pub fn read(c: &[u8]) -> Self {
        let c: &[u8; 20] = c[..20].try_into().expect("a whole block");
        BlockQ4_1 {
            d: f16::from_le_bytes([c[0], c[1]]),
            m: f16::from_le_bytes([c[2], c[3]]),
            qs: std::array::from_fn(|i| c[4 + i]),
        }
    }
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
    /// For weights the VNNI kernels make unsigned by an offset (128 for
    /// Q8_0, 16 for Q5_0): minus the offset times the sum of each 4 quants,
    /// the start of each 32-bit lane's sum; 0 for the other types.
    pub off: [i32; 8],
}

/// Elements per K-quant super-block (Q4_K, Q6_K, and their Q8_K activations).
pub const QK_K: usize = 256;

/// One Q4_K block as repacked at load: GGUF's 12 bytes of packed 6-bit
/// scales and minimums are unpacked to a byte each (148 bytes against
/// GGUF's 144), so the kernels spend no time on them. Element `e` of
/// sub-block `j` (32 elements) is `d · sc[j] · q_e − dmin · m[j]`; the
/// nibbles of sub-blocks `2i` and `2i + 1` share `qs[32i..32i + 32]`, low
/// then high.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub sc: [u8; 8],
    pub m: [u8; 8],
    pub qs: [u8; QK_K / 2],
}

/// One Q6_K block (210 bytes, as in GGUF): the low nibbles, the two high
/// bits, a signed scale per 16 elements, and the super-block scale.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// A Q8_K activation block: an f32 scale, 256 signed bytes, and the sums
/// of each 16 of them (which the K-quants' minimums and offsets meet).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct ActQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ6K {
    /// A block from its 210 GGUF bytes.
    pub fn read(c: &[u8]) -> Self {
        let mut b = BlockQ6K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; QK_K / 16],
            d: f16::from_le_bytes([c[208], c[209]]),
        };
        b.ql.copy_from_slice(&c[..128]);
        b.qh.copy_from_slice(&c[128..192]);
        for (s, v) in b.scales.iter_mut().zip(&c[192..208]) {
            *s = *v as i8;
        }
        b
    }
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 148);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
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
    /// Our own Q4_K kernels (repacked at load).
    Q4K(Vec<BlockQ4K>),
    /// Our own Q6_K kernels.
    Q6K(Vec<BlockQ6K>),
    /// Everything else through candle's CPU quantized types.
    Candle(Box<dyn QuantizedType>),
    /// Plain f32 (norm-sized or test weights).
    F32(Vec<f32>),
    /// Q8_0 repacked 8 rows to a group, for the tiled kernels.
    Q8_0x8(Vec<Q8_0x8>),
    /// Q5_0 repacked 8 rows to a group.
    Q5_0x8(Vec<Q5_0x8>),
    /// Q4_1 repacked 8 rows to a group.
    Q4_1x8(Vec<Q4_1x8>),
    /// Q4_K repacked 8 rows to a group.
    Q4Kx8(Vec<Q4Kx8>),
    /// Q6_K repacked 8 rows to a group.
    Q6Kx8(Vec<Q6Kx8>),
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
        // Rows in whole groups of 8 are repacked for the tiled kernels,
        // straight from the file's bytes (no row-major copy in between).
        let bpr = cols / QK;
        let tiled = rows.is_multiple_of(TILE_ROWS) && !row_kernels();
        fn block<'a, B: 'a>(bytes: &'a [u8], read: fn(&[u8]) -> B) -> impl Fn(usize) -> B + 'a {
            let size = std::mem::size_of::<B>();
            move |i| read(&bytes[i * size..(i + 1) * size])
        }
        fn blocks<B>(bytes: &[u8], read: fn(&[u8]) -> B) -> Vec<B> {
            bytes
                .chunks_exact(std::mem::size_of::<B>())
                .map(read)
                .collect()
        }
        let storage = match dtype {
            GgmlDType::Q5_0 if tiled => {
                Storage::Q5_0x8(tile::repack_q5_0(rows, bpr, block(bytes, BlockQ5_0::read)))
            }
            GgmlDType::Q5_0 => Storage::Q5_0(blocks(bytes, BlockQ5_0::read)),
            GgmlDType::Q4_1 if tiled => {
                Storage::Q4_1x8(tile::repack_q4_1(rows, bpr, block(bytes, BlockQ4_1::read)))
            }
            GgmlDType::Q4_1 => Storage::Q4_1(blocks(bytes, BlockQ4_1::read)),
            GgmlDType::Q8_0 if tiled => {
                Storage::Q8_0x8(tile::repack_q8_0(rows, bpr, block(bytes, BlockQ8_0::read)))
            }
            GgmlDType::Q8_0 => Storage::Q8_0(blocks(bytes, BlockQ8_0::read)),
            GgmlDType::Q4K if tiled => {
                Storage::Q4Kx8(tile::k_quant::repack_q4_k(rows, cols / QK_K, |i| {
                    repack_q4_k(&bytes[i * 144..(i + 1) * 144])
                }))
            }
            GgmlDType::Q6K if tiled => Storage::Q6Kx8(tile::k_quant::repack_q6_k(
                rows,
                cols / QK_K,
                block(bytes, BlockQ6K::read),
            )),
            // With the row kernels (`WEFT_ROW_KERNELS=1`), the K-quants go
            // through candle's, unless `WEFT_OWN_K_QUANTS=1` asks for ours.
            GgmlDType::Q4K if own_k_quants() => {
                Storage::Q4K(bytes.chunks_exact(144).map(repack_q4_k).collect())
            }
            GgmlDType::Q6K if own_k_quants() => Storage::Q6K(blocks(bytes, BlockQ6K::read)),
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
            Storage::Q4K(b) => b.len() * std::mem::size_of::<BlockQ4K>(),
            Storage::Q6K(b) => b.len() * std::mem::size_of::<BlockQ6K>(),
            Storage::Candle(q) => q.storage_size_in_bytes(),
            Storage::F32(v) => v.len() * 4,
            Storage::Q8_0x8(g) => std::mem::size_of_val(&g[..]),
            Storage::Q5_0x8(g) => std::mem::size_of_val(&g[..]),
            Storage::Q4_1x8(g) => std::mem::size_of_val(&g[..]),
            Storage::Q4Kx8(g) => std::mem::size_of_val(&g[..]),
            Storage::Q6Kx8(g) => std::mem::size_of_val(&g[..]),
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
            Storage::Q4_1(_)
            | Storage::Q5_0(_)
            | Storage::Q8_0(_)
            | Storage::Q4K(_)
            | Storage::Q6K(_)
            | Storage::Q8_0x8(_)
            | Storage::Q5_0x8(_)
            | Storage::Q4_1x8(_)
            | Storage::Q4Kx8(_)
            | Storage::Q6Kx8(_) => Ok(()),
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
        // repacked matrices of any of the 32-element types share one
        // quantization, and so do the K-quants
        let tiled: Option<Vec<Tiled<'_>>> = ms
            .iter()
            .map(|q| match &q.storage {
                Storage::Q8_0x8(g) => Some(Tiled::Q8_0(&g[..])),
                Storage::Q5_0x8(g) => Some(Tiled::Q5_0(&g[..])),
                Storage::Q4_1x8(g) => Some(Tiled::Q4_1(&g[..])),
                Storage::Q4Kx8(g) => Some(Tiled::Q4K(&g[..])),
                Storage::Q6Kx8(g) => Some(Tiled::Q6K(&g[..])),
                _ => None,
            })
            .collect();
        let tiled = tiled.filter(|t| t.iter().all(|w| w.k_quant() == t[0].k_quant()));
        if let Some(tiled) = tiled {
            let mut parts: Vec<_> = tiled
                .into_iter()
                .zip(dsts.iter_mut())
                .map(|(w, d)| (w, &mut **d))
                .collect();
            tile::matmul(m, ms[0].cols, lhs, &mut parts);
            return true;
        }
        of_type!(Q4_1);
        of_type!(Q5_0);
        of_type!(Q8_0);
        of_type!(Q4K);
        of_type!(Q6K);
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
        fn blocks<B: Q8Dot>(
            w: &[B],
            row: usize,
            out: &mut [f32],
            dequant: impl Fn(&B, &mut [f32]),
        ) {
            let bpr = out.len() / B::ELEMS;
            for (b, o) in w[row * bpr..(row + 1) * bpr]
                .iter()
                .zip(out.chunks_exact_mut(B::ELEMS))
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
            Storage::Q4K(w) => blocks(w, row, out, dequant_q4_k),
            Storage::Q6K(w) => blocks(w, row, out, dequant_q6_k),
            Storage::F32(w) => out.copy_from_slice(&w[row * self.cols..(row + 1) * self.cols]),
            Storage::Q8_0x8(g) => group_row(g, row, out),
            Storage::Q5_0x8(g) => group_row(g, row, out),
            Storage::Q4_1x8(g) => group_row(g, row, out),
            Storage::Q4Kx8(g) => group_row(g, row, out),
            Storage::Q6Kx8(g) => group_row(g, row, out),
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

/// Whether Q4_K and Q6_K weights load into our own kernels: in this
/// crate's tests, or with `WEFT_OWN_K_QUANTS=1` (for the benchmark); else
/// candle's, whose sums give llama.cpp's greedy tokens on Gemma.
/// Row `row` of a repacked matrix, dequantized block by block.
fn group_row<G: TileGroup>(groups: &[G], row: usize, out: &mut [f32]) {
    let bpr = out.len() / G::ELEMS;
    let (g, r) = (row / TILE_ROWS, row % TILE_ROWS);
    for (b, o) in groups[g * bpr..(g + 1) * bpr]
        .iter()
        .zip(out.chunks_exact_mut(G::ELEMS))
    {
        b.dequant_row(r, o);
    }
}

/// Whether Q8_0, Q5_0 and Q4_1 weights stay row by row for the row
/// kernels instead of being repacked for the tiled ones (`tile`), the
/// default. `WEFT_ROW_KERNELS=1` keeps the row kernels, for benchmarks that
/// set the two side by side; unit tests always take the tiled ones.
/// Which kernels the Q8_0, Q5_0 and Q4_1 weights loaded now run: `tiled`
/// (the default) or `rows` (`WEFT_ROW_KERNELS=1`).
pub fn kernels_name() -> &'static str {
    if row_kernels() {
        "rows"
    } else {
        "tiled"
    }
}

fn row_kernels() -> bool {
    static ROWS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !cfg!(test) && *ROWS.get_or_init(|| std::env::var("WEFT_ROW_KERNELS").is_ok_and(|v| v == "1"))
}

fn own_k_quants() -> bool {
    cfg!(test) || std::env::var_os("WEFT_OWN_K_QUANTS").is_some_and(|v| v == "1")
}

/// A GGUF Q4_K block (144 bytes) with its 6-bit scales and minimums
/// unpacked, as llama.cpp's `get_scale_min_k4` reads them.
fn repack_q4_k(c: &[u8]) -> BlockQ4K {
    let q = &c[4..16];
    let mut b = BlockQ4K {
        d: f16::from_le_bytes([c[0], c[1]]),
        dmin: f16::from_le_bytes([c[2], c[3]]),
        sc: [0; 8],
        m: [0; 8],
        qs: [0; QK_K / 2],
    };
    for j in 0..8 {
        (b.sc[j], b.m[j]) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        };
    }
    b.qs.copy_from_slice(&c[16..144]);
    b
}

/// The 4-bit value of element `e` of a Q4_K block.
#[inline]
fn q4_k_value(b: &BlockQ4K, e: usize) -> u8 {
    let byte = b.qs[32 * (e / 64) + e % 32];
    if (e / 32).is_multiple_of(2) {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

/// The 6-bit value (0..64, before the offset of 32) of element `e` of a
/// Q6_K block, and its scale.
#[inline]
fn q6_k_value(b: &BlockQ6K, e: usize) -> (i32, i32) {
    let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
    let ql = b.ql[64 * h + 32 * (k % 2) + l];
    let lo = if k < 2 { ql & 0x0f } else { ql >> 4 };
    let hi = (b.qh[32 * h + l] >> (2 * k)) & 3;
    (
        (lo | (hi << 4)) as i32,
        b.scales[8 * h + 2 * k + l / 16] as i32,
    )
}

fn dequant_q4_k(b: &BlockQ4K, out: &mut [f32]) {
    let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
    for (e, o) in out.iter_mut().enumerate() {
        let j = e / 32;
        *o = d * b.sc[j] as f32 * q4_k_value(b, e) as f32 - dmin * b.m[j] as f32;
    }
}

fn dequant_q6_k(b: &BlockQ6K, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (e, o) in out.iter_mut().enumerate() {
        let (q, sc) = q6_k_value(b, e);
        *o = d * sc as f32 * (q - 32) as f32;
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
        o.off = [0; 8];
    }
}

/// [`quantize_row_q8_0`] with `off` for weights offset by `O` (see
/// [`ActQ8::off`]).
pub fn quantize_row_q8_0_offset<const O: i32>(x: &[f32], out: &mut [ActQ8]) {
    quantize_row_q8_0(x, out);
    for o in out.iter_mut() {
        for (l, q) in o.off.iter_mut().zip(o.qs.chunks_exact(4)) {
            *l = -O * q.iter().map(|v| *v as i32).sum::<i32>();
        }
    }
}

/// Quantizes one activation row to Q8_K exactly as ggml does (scale
/// `−127 / max` where `max` is the value of largest magnitude, round half
/// to even, the scale kept in f32), with the sums of each 16.
pub fn quantize_row_q8_k(x: &[f32], out: &mut [ActQ8K]) {
    for (xs, o) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *o = ZERO_Q8K;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, v) in o.qs.iter_mut().zip(xs) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, qs) in o.bsums.iter_mut().zip(o.qs.chunks_exact(16)) {
            *s = qs.iter().map(|q| *q as i16).sum();
        }
        o.d = 1.0 / iscale;
    }
}

/// The reference (scalar) Q4_K · Q8_K dot product: per block,
/// `d d_y Σ_j sc_j (q · y)_j − dmin d_y Σ_j m_j (Σ y)_j`.
pub fn vec_dot_q4_k_q8_k_scalar(x: &[BlockQ4K], y: &[ActQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..8 {
            let s: i32 = (32 * j..32 * j + 32)
                .map(|e| q4_k_value(b, e) as i32 * a.qs[e] as i32)
                .sum();
            sumi += s * b.sc[j] as i32;
        }
        let summ: i32 = (0..8)
            .map(|j| b.m[j] as i32 * (a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32))
            .sum();
        sum += b.d.to_f32() * a.d * sumi as f32 - b.dmin.to_f32() * a.d * summ as f32;
    }
    sum
}

/// The reference (scalar) Q6_K · Q8_K dot product: per block,
/// `d d_y Σ_e sc_e (q_e − 32) y_e`.
pub fn vec_dot_q6_k_q8_k_scalar(x: &[BlockQ6K], y: &[ActQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in x.iter().zip(y) {
        let sumi: i32 = (0..QK_K)
            .map(|e| {
                let (q, sc) = q6_k_value(b, e);
                sc * (q - 32) * a.qs[e] as i32
            })
            .sum();
        sum += b.d.to_f32() * a.d * sumi as f32;
    }
    sum
}

/// Activation rows from which a product quantizes its input on every thread.
const QUANTIZE_SPLIT: usize = 16;

/// A raw pointer to activation blocks that may cross to pool workers; each
/// worker writes disjoint rows.
#[derive(Clone, Copy)]
pub(crate) struct SharedPtr<T>(pub(crate) *mut T);
// SAFETY: users guarantee that concurrent workers write disjoint ranges.
unsafe impl<T: Send> Send for SharedPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedPtr<T> {}

/// A raw pointer that may cross to pool workers; each worker writes disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: users guarantee that concurrent workers write disjoint ranges.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

/// Weight blocks whose dot partner is a quantized activation block
/// ([`ActQ8`] for the 32-element types, [`ActQ8K`] for the K-quants).
pub trait Q8Dot: Copy + Sync {
    /// The activation block this weight block meets.
    type Act: Copy + Sync + Send;
    /// Elements per block.
    const ELEMS: usize;
    /// An all-zero activation block.
    const ZERO: Self::Act;
    /// Quantizes one activation row as llama.cpp does for this type.
    fn quantize(x: &[f32], out: &mut [Self::Act]);
    /// Sums of one weight row with `R` activation rows on the chosen
    /// [`CpuPath`]. Each sum is the same [`CHAINS`] chains over the blocks
    /// combined the same way, whatever `R` is, so a row's result does not
    /// depend on the rows batched with it.
    #[inline]
    fn dot_rows<const R: usize>(w: &[Self], ys: [&[Self::Act]; R]) -> [f32; R] {
        Self::dot_rows_on(cpu_path(), w, ys)
    }
    /// [`Q8Dot::dot_rows`] on `path`, which the CPU must have.
    fn dot_rows_on<const R: usize>(path: CpuPath, w: &[Self], ys: [&[Self::Act]; R]) -> [f32; R];
}

/// Chains a row's blocks are summed in: block `b` goes to chain `b % 4`,
/// the chains are added pairwise at the end. Few rows walk the chains side
/// by side (so each fused multiply-add need not wait on the last); many
/// rows walk them one after another (so the accumulators stay in registers);
/// the sums are the same bits either way.
pub const CHAINS: usize = 4;

/// The instruction sets our kernels are built for, chosen once at run time
/// from what the CPU reports. Every path gives the same tokens: the integer
/// parts of the products are exact on each, and the float parts are summed
/// in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuPath {
    /// Plain Rust loops (the scalar reference), for any architecture.
    Portable,
    /// AVX2 and FMA: `vpmaddubsw` and `vpmaddwd` for the byte products.
    Avx2,
    /// AVX-VNNI: one `vpdpbusd` for both (and `vpdpwssd` for the scaled sums).
    AvxVnni,
    /// AVX-512 F/BW/VL with AVX-512 VNNI: the VNNI instructions in their
    /// EVEX form, with 32 vector registers.
    Avx512Vnni,
}

impl CpuPath {
    /// Every path, slowest first.
    pub const ALL: [CpuPath; 4] = [
        CpuPath::Portable,
        CpuPath::Avx2,
        CpuPath::AvxVnni,
        CpuPath::Avx512Vnni,
    ];

    /// The name `WEFT_CPU_PATH` takes and the logs and `/metrics` show.
    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Portable => "portable",
            CpuPath::Avx2 => "avx2",
            CpuPath::AvxVnni => "avx-vnni",
            CpuPath::Avx512Vnni => "avx512-vnni",
        }
    }

    /// The path called `name`.
    pub fn from_name(name: &str) -> Option<CpuPath> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether this build and this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            CpuPath::Portable => true,
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma",
                target_feature = "f16c"
            ))]
            CpuPath::Avx2 => true,
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma",
                target_feature = "f16c"
            ))]
            CpuPath::AvxVnni => std::is_x86_feature_detected!("avxvnni"),
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma",
                target_feature = "f16c"
            ))]
            CpuPath::Avx512Vnni => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512vnni")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The paths this build and CPU can run, slowest first.
    pub fn supported() -> Vec<CpuPath> {
        Self::ALL.into_iter().filter(|p| p.is_supported()).collect()
    }

    /// The fastest supported path.
    pub fn best() -> CpuPath {
        *Self::supported()
            .last()
            .expect("the portable path is always there")
    }
}

impl std::fmt::Display for CpuPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The path chosen: 0 until chosen, else 1 + its index in [`CpuPath::ALL`].
static CHOSEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Chooses the kernels' path from `WEFT_CPU_PATH` (a [`CpuPath::name`]),
/// or the fastest the CPU has when it is unset. A name that is unknown or
/// that this CPU cannot run is an error naming the paths it can. Call it
/// once at start; [`cpu_path`] calls it when nobody did (and takes the
/// fastest path on an error).
pub fn init_cpu_path() -> Result<CpuPath> {
    let path = match std::env::var("WEFT_CPU_PATH") {
        Err(_) => CpuPath::best(),
        Ok(name) => {
            let can = CpuPath::supported()
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ");
            let p = CpuPath::from_name(name.trim()).ok_or_else(|| {
                KernelError::BadInput(format!(
                    "WEFT_CPU_PATH={name} names no kernel path; this CPU can run {can}"
                ))
            })?;
            if !p.is_supported() {
                return Err(KernelError::BadInput(format!(
                    "WEFT_CPU_PATH={name}: this CPU cannot run it; it can run {can}"
                )));
            }
            p
        }
    };
    set_cpu_path(path)?;
    Ok(path)
}

/// Sets the kernels' path (benchmarks compare them in one process); an
/// error when the CPU cannot run it.
pub fn set_cpu_path(path: CpuPath) -> Result<()> {
    if !path.is_supported() {
        return Err(KernelError::BadInput(format!(
            "this CPU cannot run the {path} kernels"
        )));
    }
    let i = CpuPath::ALL.iter().position(|p| *p == path).unwrap_or(0);
    CHOSEN.store(i as u8 + 1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The kernels' path (chosen by [`init_cpu_path`] on first use).
#[inline]
pub fn cpu_path() -> CpuPath {
    match CHOSEN.load(std::sync::atomic::Ordering::Relaxed) {
        0 => init_cpu_path().unwrap_or_else(|_| {
            let best = CpuPath::best();
            let _ = set_cpu_path(best);
            best
        }),
        i => CpuPath::ALL[i as usize - 1],
    }
}

/// Implements [`Q8Dot`] for a block type. `$kernel` is its kernel in each
/// x86 module (`avx2`, `vnni`, `avx512`); `$scalar` the reference, which
/// is the portable path.
macro_rules! q8_dot {
    ($block:ty, $act:ty, $elems:expr, $zero:expr, $quantize:path, $kernel:ident, $scalar:ident) => {
        impl Q8Dot for $block {
            type Act = $act;
            const ELEMS: usize = $elems;
            const ZERO: $act = $zero;

            fn quantize(x: &[f32], out: &mut [$act]) {
                $quantize(x, out)
            }

            #[inline]
            fn dot_rows_on<const R: usize>(
                path: CpuPath,
                w: &[Self],
                ys: [&[$act]; R],
            ) -> [f32; R] {
                #[cfg(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma",
                    target_feature = "f16c"
                ))]
                {
                    match path {
                        // SAFETY: AVX2, FMA and F16C are enabled at compile
                        // time (the cfg above); the other paths are chosen
                        // only where `CpuPath::is_supported` found them.
                        CpuPath::Avx2 => return unsafe { avx2::$kernel(w, ys) },
                        CpuPath::AvxVnni => return unsafe { vnni::$kernel(w, ys) },
                        CpuPath::Avx512Vnni => return unsafe { avx512::$kernel(w, ys) },
                        CpuPath::Portable => {}
                    }
                }
                let _ = path;
                ys.map(|y| $scalar(w, y))
            }
        }
    };
}

const ZERO_Q8: ActQ8 = ActQ8 {
    d: 0.0,
    s: 0.0,
    qs: [0; QK],
    off: [0; 8],
};
const ZERO_Q8K: ActQ8K = ActQ8K {
    d: 0.0,
    qs: [0; QK_K],
    bsums: [0; QK_K / 16],
};

q8_dot!(
    BlockQ8_0,
    ActQ8,
    QK,
    ZERO_Q8,
    quantize_row_q8_0_offset::<128>,
    rows_q8_0,
    vec_dot_q8_0_q8_0_scalar
);
q8_dot!(
    BlockQ4_1,
    ActQ8,
    QK,
    ZERO_Q8,
    quantize_row_q8_0,
    rows_q4_1,
    vec_dot_q4_1_q8_1_scalar
);
q8_dot!(
    BlockQ5_0,
    ActQ8,
    QK,
    ZERO_Q8,
    quantize_row_q8_0_offset::<16>,
    rows_q5_0,
    vec_dot_q5_0_q8_0_scalar
);
q8_dot!(
    BlockQ4K,
    ActQ8K,
    QK_K,
    ZERO_Q8K,
    quantize_row_q8_k,
    rows_q4_k,
    vec_dot_q4_k_q8_k_scalar
);
q8_dot!(
    BlockQ6K,
    ActQ8K,
    QK_K,
    ZERO_Q8K,
    quantize_row_q8_k,
    rows_q6_k,
    vec_dot_q6_k_q8_k_scalar
);

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
    let bpr = k / W::ELEMS;
    let mut lhs_q = vec![W::ZERO; m * bpr];
    if m >= QUANTIZE_SPLIT {
        // a prefill chunk's rows are quantized on every thread
        let out = SharedPtr(lhs_q.as_mut_ptr());
        barrier_pool().execute_chunked(m, move |range| {
            let out = out;
            for r in range {
                // SAFETY: each row's blocks are written by exactly one work item.
                let row = unsafe { std::slice::from_raw_parts_mut(out.0.add(r * bpr), bpr) };
                W::quantize(&lhs[r * k..(r + 1) * k], row);
            }
        });
    } else {
        for r in 0..m {
            W::quantize(&lhs[r * k..(r + 1) * k], &mut lhs_q[r * bpr..(r + 1) * bpr]);
        }
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
                    let ys: [&[W::Act]; ROW_GROUP] = std::array::from_fn(|i| y(r + i));
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

/// Dot product of a Q5_0 row with a Q8_0 activation row quantized by
/// `quantize_row_q8_0_offset::<16>` (as [`Q8Dot::quantize`] does).
#[inline]
pub fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[ActQ8]) -> f32 {
    BlockQ5_0::dot_rows(x, [y])[0]
}

/// Dot product of a Q8_0 row with a Q8_0 activation row quantized by
/// `quantize_row_q8_0_offset::<128>` (as [`Q8Dot::quantize`] does).
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
    ($name:ident, $doc:literal, $feat:literal, $dot:ident, $madd_acc:ident, $signed:ident, $dpbusd_acc:ident) => {
        #[doc = $doc]
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        pub(super) mod $name {
            #[allow(unused_imports)]
            use super::{dot_avx2, dot_avx512, dot_vnni};
            #[allow(unused_imports)]
            use super::{dpbusd_acc_avx2, dpbusd_acc_avx512, dpbusd_acc_vnni};
            #[allow(unused_imports)]
            use super::{madd_acc_avx2, madd_acc_avx512, madd_acc_vnni};
            use super::{ActQ8, ActQ8K, BlockQ4K, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8_0};
            use super::{CHAINS, QK};

            /// Whether signed weights are summed by offset ([`rows_offset`]).
            const OFFSET: bool = matches!(stringify!($signed).as_bytes(), b"rows_offset");
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

            /// The chains of `R` rows over `n` blocks: `step(acc, b)` adds
            /// block `b`'s term of every row to `acc`. Few rows walk the
            /// chains side by side (so each fused multiply-add need not wait
            /// on the last), many one after another (so the accumulators stay
            /// in registers); the sums are the same bits either way.
            #[inline]
            #[target_feature(enable = $feat)]
            fn walk<const R: usize>(
                n: usize,
                mut step: impl FnMut(&mut [__m256; R], usize),
            ) -> [[__m256; CHAINS]; R] {
                let mut chains = [[_mm256_setzero_ps(); CHAINS]; R];
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
                chains
            }

            #[allow(dead_code)]
            /// Sums of signed-weight blocks (Q8_0, Q5_0) with `R` rows:
            /// `unpack(block)` gives a block's 32 values and scale.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn rows_signed<const R: usize>(
                n: usize,
                ys: &[&[ActQ8]; R],
                dot: impl Fn(__m256i, __m256i) -> __m256i,
                mut unpack: impl FnMut(usize) -> (__m256i, f32),
            ) -> [f32; R] {
                walk::<R>(n, |acc, b| {
                    let (x, dx) = unpack(b);
                    let ax = _mm256_sign_epi8(x, x);
                    for r in 0..R {
                        let y = ys[r].get_unchecked(b);
                        let yv = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                        // |x| * sign(y, x) keeps the unsigned×signed form
                        acc[r] = term(acc[r], dot(ax, _mm256_sign_epi8(yv, x)), dx * y.d);
                    }
                })
                .map(|c| combine(c))
            }

            /// Sums of signed-weight blocks with `R` rows by offset:
            /// `unpack(block)` gives a block's 32 values plus the offset
            /// (unsigned) and its scale; each lane starts from the
            /// activations' `off`, so one `vpdpbusd` per row and block gives
            /// exactly the lanes of [`rows_signed`].
            #[allow(dead_code)]
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn rows_offset<const R: usize>(
                n: usize,
                ys: &[&[ActQ8]; R],
                _dot: impl Fn(__m256i, __m256i) -> __m256i,
                mut unpack: impl FnMut(usize) -> (__m256i, f32),
            ) -> [f32; R] {
                walk::<R>(n, |acc, b| {
                    let (xu, dx) = unpack(b);
                    for r in 0..R {
                        let y = ys[r].get_unchecked(b);
                        let yv = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                        let off = _mm256_loadu_si256(y.off.as_ptr() as *const __m256i);
                        acc[r] = term(acc[r], $dpbusd_acc(off, xu, yv), dx * y.d);
                    }
                })
                .map(|c| combine(c))
            }

            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn rows_q8_0<const R: usize>(
                x: &[BlockQ8_0],
                ys: [&[ActQ8]; R],
            ) -> [f32; R] {
                let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
                // + 128 where the offset form runs
                let flip = _mm256_set1_epi8(if OFFSET { -128 } else { 0 });
                $signed::<R>(
                    n,
                    &ys,
                    |u, s| $dot(u, s),
                    |b| {
                        let bx = x.get_unchecked(b);
                        let q = _mm256_loadu_si256(bx.qs.as_ptr() as *const __m256i);
                        (_mm256_xor_si256(q, flip), bx.d.to_f32())
                    },
                )
            }

            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn rows_q5_0<const R: usize>(
                x: &[BlockQ5_0],
                ys: [&[ActQ8]; R],
            ) -> [f32; R] {
                let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
                let low = _mm256_set1_epi8(0x0f);
                // the offset form keeps the values unsigned (0..32)
                let sixteen = _mm256_set1_epi8(if OFFSET { 0 } else { 16 });
                $signed::<R>(
                    n,
                    &ys,
                    |u, s| $dot(u, s),
                    |b| {
                        let bx = x.get_unchecked(b);
                        let qs = _mm_loadu_si128(bx.qs.as_ptr() as *const __m128i);
                        // positions 0..16 are the low nibbles, 16..32 the high nibbles
                        let nib =
                            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low);
                        let q = _mm256_or_si256(nib, high_bits(u32::from_le_bytes(bx.qh)));
                        (_mm256_sub_epi8(q, sixteen), bx.d.to_f32())
                    },
                )
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

            /// Q4_K: each sub-block's byte products are scaled by its 6-bit
            /// scale in the 16-bit to 32-bit step; the minimums meet the
            /// activations' sums of 16.
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn rows_q4_k<const R: usize>(
                x: &[BlockQ4K],
                ys: [&[ActQ8K]; R],
            ) -> [f32; R] {
                let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
                let low = _mm256_set1_epi8(0x0f);
                // m0 m0 m1 m1 … m7 m7 from bytes 8..16 of `sc` then `m`
                let dup = _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
                walk::<R>(n, |acc, b| {
                    let bx = x.get_unchecked(b);
                    let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                        bx as *const BlockQ4K as *const i32,
                    )));
                    let (d, dmin) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)));
                    let scm = _mm_loadu_si128(bx.sc.as_ptr() as *const __m128i);
                    let mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scm, dup));
                    let mut sumi = [_mm256_setzero_si256(); R];
                    for i in 0..4 {
                        let v = _mm256_loadu_si256(bx.qs.as_ptr().add(32 * i) as *const __m256i);
                        let halves = [
                            _mm256_and_si256(v, low),
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                        ];
                        for (h, q) in halves.into_iter().enumerate() {
                            let j = 2 * i + h;
                            let sc = _mm256_set1_epi16(bx.sc[j] as i16);
                            for r in 0..R {
                                let y = ys[r].get_unchecked(b);
                                let yv =
                                    _mm256_loadu_si256(y.qs.as_ptr().add(32 * j) as *const __m256i);
                                sumi[r] = $madd_acc(sumi[r], _mm256_maddubs_epi16(q, yv), sc);
                            }
                        }
                    }
                    for r in 0..R {
                        let y = ys[r].get_unchecked(b);
                        let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                        let summ = _mm256_madd_epi16(bs, mins);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * y.d),
                            _mm256_cvtepi32_ps(sumi[r]),
                            acc[r],
                        );
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_set1_ps(-dmin * y.d),
                            _mm256_cvtepi32_ps(summ),
                            acc[r],
                        );
                    }
                })
                .map(|c| combine(c))
            }

            /// Q6_K: the 6-bit values meet the activations unsigned, each
            /// 16's products scaled by its signed scale; the offset of 32
            /// comes off through the activations' sums of 16.
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn rows_q6_k<const R: usize>(
                x: &[BlockQ6K],
                ys: [&[ActQ8K]; R],
            ) -> [f32; R] {
                let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
                let low = _mm256_set1_epi8(0x0f);
                let high = _mm256_set1_epi8(0x30);
                // a 32-bit unit's first 16 bits to the low lane, its second to the high
                let spread = _mm256_set_epi8(
                    3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0,
                    1, 0, 1, 0, 1, 0,
                );
                walk::<R>(n, |acc, b| {
                    let bx = x.get_unchecked(b);
                    let d = bx.d.to_f32();
                    let s16 =
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(bx.scales.as_ptr() as *const __m128i));
                    let mut sumi = [_mm256_setzero_si256(); R];
                    for h in 0..2 {
                        let ql0 = _mm256_loadu_si256(bx.ql.as_ptr().add(64 * h) as *const __m256i);
                        let ql1 =
                            _mm256_loadu_si256(bx.ql.as_ptr().add(64 * h + 32) as *const __m256i);
                        let qh = _mm256_loadu_si256(bx.qh.as_ptr().add(32 * h) as *const __m256i);
                        let q = [
                            _mm256_or_si256(
                                _mm256_and_si256(ql0, low),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 4), high),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(ql1, low),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 2), high),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                                _mm256_and_si256(qh, high),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2), high),
                            ),
                        ];
                        for (k, qk) in q.into_iter().enumerate() {
                            let kk = 4 * h + k;
                            // scale 2kk on the first 16 elements, 2kk + 1 on the next
                            let sc = _mm256_shuffle_epi8(
                                _mm256_permutevar8x32_epi32(s16, _mm256_set1_epi32(kk as i32)),
                                spread,
                            );
                            for r in 0..R {
                                let y = ys[r].get_unchecked(b);
                                let yv = _mm256_loadu_si256(
                                    y.qs.as_ptr().add(32 * kk) as *const __m256i
                                );
                                sumi[r] = $madd_acc(sumi[r], _mm256_maddubs_epi16(qk, yv), sc);
                            }
                        }
                    }
                    for r in 0..R {
                        let y = ys[r].get_unchecked(b);
                        let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                        let off = _mm256_slli_epi32(_mm256_madd_epi16(bs, s16), 5);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * y.d),
                            _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[r], off)),
                            acc[r],
                        );
                    }
                })
                .map(|c| combine(c))
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

/// `acc + vpmaddwd(a, b)`: the AVX2 form.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline(always)]
unsafe fn madd_acc_avx2(
    acc: std::arch::x86_64::__m256i,
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
}

/// One `vpdpwssd`: the AVX-VNNI form of [`madd_acc_avx2`] (the same sums).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn madd_acc_vnni(
    acc: std::arch::x86_64::__m256i,
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpwssd_avx_epi32(acc, a, b)
}

/// One `vpdpbusd` in its AVX-512 VNNI (EVEX) form.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot_avx512(
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

/// One `vpdpwssd` in its AVX-512 VNNI (EVEX) form.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
fn madd_acc_avx512(
    acc: std::arch::x86_64::__m256i,
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpwssd_epi32(acc, a, b)
}

/// `acc + vpmaddubsw·vpmaddwd(u, s)`: not exact where a pair of products
/// passes 16 bits, which is why the AVX2 kernels sum signed weights with
/// `rows_signed` and never call this.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[allow(dead_code)]
#[inline(always)]
unsafe fn dpbusd_acc_avx2(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_add_epi32(acc, dot_avx2(u, s))
}

/// One `vpdpbusd` with its accumulator (AVX-VNNI).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn dpbusd_acc_vnni(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpbusd_avx_epi32(acc, u, s)
}

/// One `vpdpbusd` with its accumulator (AVX-512 VNNI).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dpbusd_acc_avx512(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpbusd_epi32(acc, u, s)
}

kernels!(
    avx2,
    "Our kernels with AVX2 and FMA.",
    "avx2,fma,f16c",
    dot_avx2,
    madd_acc_avx2,
    rows_signed,
    dpbusd_acc_avx2
);
kernels!(
    vnni,
    "Our kernels with AVX-VNNI: one `vpdpbusd` takes the place of `vpmaddubsw` and `vpmaddwd` (signed weights made unsigned by an offset the activations take off), one `vpdpwssd` of `vpmaddwd` and the add.",
    "avx2,fma,f16c,avxvnni",
    dot_vnni,
    madd_acc_vnni,
    rows_offset,
    dpbusd_acc_vnni
);
kernels!(
    avx512,
    "Our kernels with AVX-512 VNNI: the AVX-VNNI kernels' instructions in their EVEX form, with 32 vector registers for the accumulators and unpacked weights.",
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_avx512,
    madd_acc_avx512,
    rows_offset,
    dpbusd_acc_avx512
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
                qs: [0; QK],
                off: [0; 8]
            };
            blocks
        ];
        quantize_row_q8_0_offset::<16>(&act, &mut y);
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
                        qs: [0; QK],
                        off: [0; 8]
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

    /// Random blocks of every type of our kernels.
    struct Blocks {
        s: u64,
    }

    impl Blocks {
        fn byte(&mut self) -> u8 {
            (rng(&mut self.s) * 127.0 + 128.0) as u8
        }
        fn scale(&mut self, k: f32) -> f16 {
            f16::from_f32(rng(&mut self.s) * k)
        }
        fn q4_1(&mut self) -> BlockQ4_1 {
            BlockQ4_1 {
                d: self.scale(0.1),
                m: self.scale(0.5),
                qs: std::array::from_fn(|_| self.byte()),
            }
        }
        fn q8_0(&mut self) -> BlockQ8_0 {
            BlockQ8_0 {
                d: self.scale(0.1),
                qs: std::array::from_fn(|_| self.byte() as i8),
            }
        }
        fn q5_0(&mut self) -> BlockQ5_0 {
            BlockQ5_0 {
                d: self.scale(0.1),
                qh: std::array::from_fn(|_| self.byte()),
                qs: std::array::from_fn(|_| self.byte()),
            }
        }
        /// GGUF's 144 bytes of a Q4_K block.
        fn q4_k_bytes(&mut self) -> Vec<u8> {
            let mut b = Vec::with_capacity(144);
            b.extend(self.scale(0.01).to_le_bytes());
            b.extend(self.scale(0.01).to_le_bytes());
            b.extend((0..140).map(|_| self.byte()));
            b
        }
        fn q4_k(&mut self) -> BlockQ4K {
            repack_q4_k(&self.q4_k_bytes())
        }
        fn q6_k(&mut self) -> BlockQ6K {
            BlockQ6K {
                ql: std::array::from_fn(|_| self.byte()),
                qh: std::array::from_fn(|_| self.byte()),
                scales: std::array::from_fn(|_| self.byte() as i8),
                d: self.scale(0.01),
            }
        }
        fn act(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| rng(&mut self.s)).collect()
        }
    }

    /// `ys` quantized for `W`.
    fn quantized<W: Q8Dot>(x: &[f32]) -> Vec<W::Act> {
        let mut out = vec![W::ZERO; x.len() / W::ELEMS];
        W::quantize(x, &mut out);
        out
    }

    fn close(got: f32, want: f32) -> bool {
        (got - want).abs() <= 1e-4 * want.abs().max(1.0)
    }

    /// Four weight rows of `n` random blocks and 8 activation rows: on
    /// `path`, with `R` rows at a time, every sum near the scalar
    /// reference and bit for bit the sum of the row alone.
    fn check_type<W: Q8Dot, const R: usize>(
        path: CpuPath,
        what: &str,
        n: usize,
        mut block: impl FnMut(&mut Blocks) -> W,
        scalar: impl Fn(&[W], &[W::Act]) -> f32,
    ) {
        let mut g = Blocks { s: 4242 };
        let ws: Vec<Vec<W>> = (0..4)
            .map(|_| (0..n).map(|_| block(&mut g)).collect())
            .collect();
        let ys: Vec<Vec<W::Act>> = (0..8)
            .map(|_| quantized::<W>(&g.act(n * W::ELEMS)))
            .collect();
        let rows: [&[W::Act]; R] = std::array::from_fn(|i| &ys[i][..]);
        for (col, w) in ws.iter().enumerate() {
            let got = W::dot_rows_on(path, w, rows);
            if path != CpuPath::Portable {
                // the SIMD paths sum the same lanes in the same order
                let avx2 = W::dot_rows_on(CpuPath::Avx2, w, rows);
                assert_eq!(
                    got.map(f32::to_bits),
                    avx2.map(f32::to_bits),
                    "{what} on {path}, R={R}: not the AVX2 path's bits"
                );
            }
            for r in 0..R {
                let alone = W::dot_rows_on(path, w, [rows[r]])[0];
                let want = scalar(w, rows[r]);
                assert!(
                    close(got[r], want),
                    "{what} on {path}, R={R} ({col},{r}): {} vs {want}",
                    got[r]
                );
                assert_eq!(
                    got[r].to_bits(),
                    alone.to_bits(),
                    "{what} on {path}, R={R}: a row's sum depends on its batch"
                );
            }
        }
    }

    fn check_every_row_count<W: Q8Dot>(
        path: CpuPath,
        what: &str,
        n: usize,
        mut block: impl FnMut(&mut Blocks) -> W,
        scalar: impl Fn(&[W], &[W::Act]) -> f32 + Copy,
    ) {
        check_type::<W, 8>(path, what, n, &mut block, scalar);
        check_type::<W, 4>(path, what, n, &mut block, scalar);
        check_type::<W, 2>(path, what, n, &mut block, scalar);
        check_type::<W, 1>(path, what, n, &mut block, scalar);
    }

    /// Every type's kernel on `path` (41 blocks of 32, 7 of 256).
    fn check_path(path: CpuPath) {
        assert!(
            path.is_supported(),
            "this CPU cannot run the {path} kernels: the test cannot run here"
        );
        check_every_row_count(path, "Q4_1", 41, Blocks::q4_1, vec_dot_q4_1_q8_1_scalar);
        check_every_row_count(path, "Q8_0", 41, Blocks::q8_0, vec_dot_q8_0_q8_0_scalar);
        check_every_row_count(path, "Q5_0", 41, Blocks::q5_0, vec_dot_q5_0_q8_0_scalar);
        check_every_row_count(path, "Q4_K", 7, Blocks::q4_k, vec_dot_q4_k_q8_k_scalar);
        check_every_row_count(path, "Q6_K", 7, Blocks::q6_k, vec_dot_q6_k_q8_k_scalar);
    }

    #[test]
    #[cfg_attr(
        not(all(target_arch = "x86_64", target_feature = "avx2")),
        ignore = "an x86-64 build with AVX2 runs it"
    )]
    fn the_avx2_kernels_match_the_scalar_reference_at_every_row_count_and_batch_alike() {
        check_path(CpuPath::Avx2);
    }

    #[test]
    #[ignore = "needs a CPU with AVX-VNNI; scripts/test.sh runs it where the CPU has one (cargo test -p weft-kernels --lib -- --ignored kernels_match)"]
    fn the_avx_vnni_kernels_match_the_scalar_reference_at_every_row_count_and_batch_alike() {
        check_path(CpuPath::AvxVnni);
    }

    #[test]
    #[ignore = "needs a CPU with AVX-512 F/BW/VL and VNNI; scripts/test.sh runs it where the CPU has them (cargo test -p weft-kernels --lib -- --ignored kernels_match)"]
    fn the_avx512_vnni_kernels_match_the_scalar_reference_at_every_row_count_and_batch_alike() {
        check_path(CpuPath::Avx512Vnni);
    }

    /// Candle's dequantization of GGUF bytes of `dtype`, an independent
    /// reading of the format.
    fn candle_dequant(dtype: GgmlDType, bytes: &[u8], elems: usize) -> Vec<f32> {
        let q = dtype.from_data(Cow::Borrowed(bytes));
        match q.dequantize(elems).unwrap() {
            candle_core::CpuStorage::F32(v) => v,
            _ => unreachable!("dequantize gives f32"),
        }
    }

    #[test]
    fn q4_k_repacked_at_load_dequantizes_as_candle_reads_the_gguf_bytes() {
        let mut g = Blocks { s: 77 };
        let (rows, cols) = (3, 2 * QK_K);
        let bytes: Vec<u8> = (0..rows * cols / QK_K)
            .flat_map(|_| g.q4_k_bytes())
            .collect();
        let w = QMatrix::from_bytes("w", GgmlDType::Q4K, rows, cols, &bytes).unwrap();
        let want = candle_dequant(GgmlDType::Q4K, &bytes, rows * cols);
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            w.row_f32(r, &mut row).unwrap();
            for (c, (a, b)) in row.iter().zip(&want[r * cols..]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "({r},{c}): {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn q6_k_dequantizes_as_candle_reads_the_gguf_bytes() {
        let mut g = Blocks { s: 78 };
        let (rows, cols) = (3, 2 * QK_K);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK_K {
            bytes.extend((0..208).map(|_| g.byte()));
            bytes.extend(g.scale(0.01).to_le_bytes());
        }
        let w = QMatrix::from_bytes("w", GgmlDType::Q6K, rows, cols, &bytes).unwrap();
        let want = candle_dequant(GgmlDType::Q6K, &bytes, rows * cols);
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            w.row_f32(r, &mut row).unwrap();
            for (c, (a, b)) in row.iter().zip(&want[r * cols..]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "({r},{c}): {a} vs {b}"
                );
            }
        }
    }

    /// `matmul` of a K-quant matrix against the f32 product of its
    /// dequantized rows with the dequantized Q8_K activations (the same
    /// sum up to float rounding).
    fn check_k_product(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) {
        let w = QMatrix::from_bytes("w", dtype, rows, cols, bytes).unwrap();
        let mut g = Blocks { s: 5 };
        let m = 19;
        let x = g.act(m * cols);
        let mut y = vec![0f32; m * rows];
        w.matmul(m, &x, &mut y).unwrap();
        let mut x_deq = Vec::with_capacity(x.len());
        for b in quantized::<BlockQ4K>(&x) {
            x_deq.extend(b.qs.iter().map(|q| *q as f32 * b.d));
        }
        let mut row = vec![0f32; cols];
        for c in 0..rows {
            w.row_f32(c, &mut row).unwrap();
            let scale: f32 = row.iter().map(|v| v.abs()).sum::<f32>() / cols as f32;
            for r in 0..m {
                let exact = dot_f32(&row, &x_deq[r * cols..(r + 1) * cols]);
                let got = y[r * rows + c];
                assert!(
                    (got - exact).abs() <= 1e-4 * exact.abs().max(scale),
                    "{dtype:?} ({r},{c}): {got} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn the_q4_k_product_agrees_with_the_dequantized_f32_product() {
        let mut g = Blocks { s: 11 };
        let (rows, cols) = (9, 3 * QK_K);
        let bytes: Vec<u8> = (0..rows * cols / QK_K)
            .flat_map(|_| g.q4_k_bytes())
            .collect();
        check_k_product(GgmlDType::Q4K, &bytes, rows, cols);
    }

    #[test]
    fn the_q6_k_product_agrees_with_the_dequantized_f32_product() {
        let mut g = Blocks { s: 12 };
        let (rows, cols) = (9, 3 * QK_K);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK_K {
            bytes.extend((0..208).map(|_| g.byte()));
            bytes.extend(g.scale(0.01).to_le_bytes());
        }
        check_k_product(GgmlDType::Q6K, &bytes, rows, cols);
    }

    #[test]
    fn q8_k_quantization_maps_the_largest_magnitude_to_minus_127_and_sums_each_16() {
        let mut g = Blocks { s: 13 };
        let mut x = g.act(2 * QK_K);
        x[300] = 3.0;
        let q = quantized::<BlockQ4K>(&x);
        assert_eq!(q[1].qs[300 - QK_K], -127);
        assert!((q[1].d - -3.0 / 127.0).abs() < 1e-7);
        for b in &q {
            for (i, s) in b.bsums.iter().enumerate() {
                let want: i16 = b.qs[16 * i..16 * i + 16].iter().map(|v| *v as i16).sum();
                assert_eq!(*s, want);
            }
        }
        let zero = quantized::<BlockQ4K>(&[0.0; QK_K]);
        assert_eq!(zero[0].d, 0.0);
        assert!(zero[0].qs.iter().all(|v| *v == 0));
    }

    #[test]
    fn an_unknown_or_unsupported_cpu_path_is_refused_by_name() {
        assert!(CpuPath::from_name("avx9000").is_none());
        for p in CpuPath::ALL {
            assert_eq!(CpuPath::from_name(p.name()), Some(p));
            if !p.is_supported() {
                assert!(
                    set_cpu_path(p).is_err(),
                    "{p} was taken on a CPU without it"
                );
            }
        }
        assert!(CpuPath::supported().contains(&CpuPath::Portable));
        assert!(CpuPath::best().is_supported());
    }
}
