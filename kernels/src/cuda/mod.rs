//! The CUDA backend (feature `cuda`).
//!
//! cudarc loads the driver (`libcuda`) and NVRTC at run time, so weft builds
//! with this feature on a machine with no CUDA toolkit, and the binary runs
//! on any machine with a driver. Our kernels are CUDA C in this directory,
//! compiled for the device on first use.
//!
//! [`Gpu`] opens a device (with a clear error when there is no driver or no
//! such device) and compiles the kernels; [`CudaModel`] runs the whole
//! model's forward on it for the engine (see [`crate::DeviceForward`]).
//!
//! NVRTC is found by the driver's usual library names; `WEFT_NVRTC` may
//! name the library file instead (for instance the one in PyPI's
//! `nvidia-cuda-nvrtc` wheel).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::error::{KernelError, Result};

mod model;

pub use model::{CudaModel, CudaOptions};

/// The kernels' CUDA C source.
const ELEMENTWISE: &str = include_str!("elementwise.cu");
/// The forward's kernels.
const MODEL: &str = include_str!("model.cu");
/// Every kernel, by name.
const KERNELS: &[&str] = &[
    "rms_norm",
    "gelu_tanh",
    "argmax_rows",
    "embed_rows",
    "rms_norm_rows",
    "qk_norm_rope",
    "kv_store",
    "attention",
    "gelu_mul",
    "to_bf16",
    "gather_rows",
    "top_of_rows",
];
/// Threads per block of the row kernels (a power of two).
const ROW_THREADS: u32 = 256;

fn unavailable(reason: impl Into<String>) -> KernelError {
    KernelError::BackendUnavailable {
        backend: "cuda",
        reason: reason.into(),
    }
}

fn device_error(what: &str, e: impl std::fmt::Display) -> KernelError {
    let e = e.to_string();
    if e.contains("OUT_OF_MEMORY") || e.contains("ALLOC_FAILED") {
        return KernelError::DeviceOutOfMemory(format!("{what}: {e}"));
    }
    KernelError::BadInput(format!("CUDA {what}: {e}"))
}

/// Loads the NVRTC named by `WEFT_NVRTC`, if set, and the builtins
/// library beside it, so that the lookups by the usual names (cudarc's,
/// and NVRTC's own) find them already loaded.
fn preload_nvrtc() -> Result<()> {
    match std::env::var_os("WEFT_NVRTC") {
        Some(path) => load_nvrtc(std::path::Path::new(&path)),
        None => Ok(()),
    }
}

/// Loads the NVRTC library at `path` (and the builtins library beside it)
/// for the kernels' compilation, in place of the one the usual library
/// names would find.
pub fn load_nvrtc(path: &std::path::Path) -> Result<()> {
    let path = path.to_path_buf();
    let mut libs: Vec<std::path::PathBuf> = path
        .parent()
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so") && !n.contains(".alt."))
        })
        .collect();
    libs.push(path);
    for lib in libs {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(lib.as_os_str().as_bytes())
            .map_err(|_| unavailable("WEFT_NVRTC holds a NUL byte"))?;
        // SAFETY: dlopen with a valid C string; the handle stays open for
        // the life of the process on purpose.
        #[allow(unsafe_code)]
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            return Err(unavailable(format!(
                "{} could not be loaded",
                lib.display()
            )));
        }
    }
    Ok(())
}

/// Compiles weft's kernels to PTX with NVRTC. Needs NVRTC only: no driver
/// and no device.
pub fn compile_kernels() -> Result<Ptx> {
    preload_nvrtc()?;
    // SAFETY: only asks the dynamic loader whether NVRTC can be opened
    #[allow(unsafe_code)]
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !nvrtc {
        return Err(unavailable(
            "NVRTC (libnvrtc.so) could not be loaded: weft compiles its CUDA kernels at run time (WEFT_NVRTC may name the library)",
        ));
    }
    let src = format!("{ELEMENTWISE}\n{MODEL}");
    cudarc::nvrtc::compile_ptx(src).map_err(|e| device_error("kernel compilation", e))
}

/// What a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its ordinal.
    pub ordinal: usize,
    /// Its name, as the driver gives it.
    pub name: String,
    /// Its memory in bytes.
    pub total_memory: usize,
    /// Its compute capability (major, minor).
    pub capability: (i32, i32),
}

/// An open CUDA device with weft's kernels loaded.
pub struct Gpu {
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: HashMap<&'static str, CudaFunction>,
    blas: Arc<CudaBlas>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

/// Whether this machine has a CUDA driver at all (without touching it
/// further).
pub fn driver_present() -> bool {
    // SAFETY: only asks the dynamic loader whether libcuda can be opened
    #[allow(unsafe_code)]
    unsafe {
        cudarc::driver::sys::is_culib_present()
    }
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for it. No driver,
    /// no such device, or no NVRTC is a [`KernelError::BackendUnavailable`]
    /// that says which.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(unavailable(
                "no CUDA driver on this machine (libcuda.so could not be loaded)",
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| unavailable(format!("the CUDA driver failed: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!(
                "no CUDA device {ordinal} (this machine has {count})"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("opening CUDA device {ordinal}: {e}")))?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(|e| device_error("name", e))?,
            total_memory: ctx.total_mem().map_err(|e| device_error("memory", e))?,
            capability: ctx
                .compute_capability()
                .map_err(|e| device_error("capability", e))?,
        };
        let ptx = compile_kernels()?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| device_error("module load", e))?;
        let mut kernels = HashMap::new();
        for &name in KERNELS {
            let f = module
                .load_function(name)
                .map_err(|e| device_error(name, e))?;
            kernels.insert(name, f);
        }
        // SAFETY: weft does all of its work on this context on the one
        // stream made below, so cudarc need not order streams by events
        // (and a stream being captured into a graph must not wait on them).
        #[allow(unsafe_code)]
        unsafe {
            ctx.disable_event_tracking()
        };
        let stream = ctx.new_stream().map_err(|e| device_error("stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| device_error("cuBLAS", e))?;
        Ok(Self {
            ctx,
            stream,
            kernels,
            blas: Arc::new(blas),
            info,
        })
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Device memory free and in all, in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| device_error("memory info", e))
    }

    /// Device-to-device copy bandwidth in bytes per second, counting the
    /// bytes read and the bytes written: the memory-bandwidth bar for a
    /// step that reads its weights and cache once.
    pub fn copy_bandwidth(&self) -> Result<f64> {
        let n = 256usize << 20; // 1 GiB of f32
        let s = &self.stream;
        let src = s
            .alloc_zeros::<f32>(n)
            .map_err(|e| device_error("allocation", e))?;
        let mut dst = s
            .alloc_zeros::<f32>(n)
            .map_err(|e| device_error("allocation", e))?;
        s.memcpy_dtod(&src, &mut dst)
            .map_err(|e| device_error("copy", e))?;
        s.synchronize().map_err(|e| device_error("copy", e))?;
        let rounds = 10;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            s.memcpy_dtod(&src, &mut dst)
                .map_err(|e| device_error("copy", e))?;
        }
        s.synchronize().map_err(|e| device_error("copy", e))?;
        Ok((2 * 4 * n * rounds) as f64 / t.elapsed().as_secs_f64())
    }

    fn kernel(&self, name: &str) -> &CudaFunction {
        self.kernels
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is listed in KERNELS"))
    }

    fn rows(x: &[f32], cols: usize) -> Result<u32> {
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(KernelError::BadInput(format!(
                "{} values are not rows of {cols}",
                x.len()
            )));
        }
        u32::try_from(x.len() / cols).map_err(|_| KernelError::BadInput("too many rows".into()))
    }

    /// RMS-normalizes each row of `x` (rows of `w.len()`) and scales it by
    /// `w`, on the device.
    pub fn rms_norm(&self, x: &mut [f32], w: &[f32], eps: f32) -> Result<()> {
        let rows = Self::rows(x, w.len())?;
        let s = &self.stream;
        let mut dx = s.clone_htod(x).map_err(|e| device_error("copy", e))?;
        let dw = s.clone_htod(w).map_err(|e| device_error("copy", e))?;
        let cols = w.len() as i32;
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: ROW_THREADS * 4,
        };
        let mut b = s.launch_builder(self.kernel("rms_norm"));
        b.arg(&mut dx).arg(&dw).arg(&cols).arg(&eps);
        // SAFETY: the kernel's signature is (float*, const float*, int,
        // float); dx holds rows × cols values and dw cols, as launched.
        #[allow(unsafe_code)]
        unsafe { b.launch(cfg) }.map_err(|e| device_error("rms_norm", e))?;
        let out = s.clone_dtoh(&dx).map_err(|e| device_error("copy", e))?;
        x.copy_from_slice(&out);
        Ok(())
    }

    /// GELU (tanh approximation) of every value, on the device.
    pub fn gelu_tanh(&self, x: &mut [f32]) -> Result<()> {
        let s = &self.stream;
        let mut dx = s.clone_htod(x).map_err(|e| device_error("copy", e))?;
        let n = x.len();
        let cfg = LaunchConfig::for_num_elems(n as u32);
        let mut b = s.launch_builder(self.kernel("gelu_tanh"));
        b.arg(&mut dx).arg(&n);
        // SAFETY: (float*, size_t) with n values in dx.
        #[allow(unsafe_code)]
        unsafe { b.launch(cfg) }.map_err(|e| device_error("gelu_tanh", e))?;
        let out = s.clone_dtoh(&dx).map_err(|e| device_error("copy", e))?;
        x.copy_from_slice(&out);
        Ok(())
    }

    /// The index of each row's largest value (the lowest on ties), on the
    /// device: greedy sampling without copying logits back.
    pub fn argmax_rows(&self, x: &[f32], cols: usize) -> Result<Vec<u32>> {
        let rows = Self::rows(x, cols)?;
        let s = &self.stream;
        let dx = s.clone_htod(x).map_err(|e| device_error("copy", e))?;
        let mut out = s
            .alloc_zeros::<u32>(rows as usize)
            .map_err(|e| device_error("alloc", e))?;
        let cols = cols as i32;
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: ROW_THREADS * 8,
        };
        let mut b = s.launch_builder(self.kernel("argmax_rows"));
        b.arg(&dx).arg(&cols).arg(&mut out);
        // SAFETY: (const float*, int, unsigned*) with rows × cols values in
        // dx and rows slots in out.
        #[allow(unsafe_code)]
        unsafe { b.launch(cfg) }.map_err(|e| device_error("argmax_rows", e))?;
        s.clone_dtoh(&out).map_err(|e| device_error("copy", e))
    }
}
