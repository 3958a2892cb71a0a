//! Kernel launches (the `cuda` feature): loads the PTX that build.rs compiled through candle's
//! per-device module cache and launches each kernel on the tensors' stream. The only `unsafe`
//! in the crate's CUDA code is here, one block per launch or uninitialised allocation.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor, WithDType, bail};

use super::ops::{
    ATTENTION_THREADS, HostCopy, Indices, KvWrite, PagedAttention, RmsNormResidual, Rope, Sample,
};

const RMS_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
const ROPE: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
const KV_CACHE: &str = include_str!(concat!(env!("OUT_DIR"), "/kv_cache.ptx"));
const PAGED_ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const SAMPLING: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));

/// Threads per block for the element-wise kernels (rope, KV write).
const ELEMENTWISE_THREADS: u32 = 256;
/// Threads per block (one block per sequence) for sampling.
const SAMPLE_THREADS: u32 = 512;
/// Grid cap for the grid-stride kernels; each thread loops over the rest.
const MAX_BLOCKS: usize = 65_535;

/// The kernel-name suffix of a dtype.
fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("keel kernels take f32 or bf16, not {other:?}"),
    }
}

fn int(x: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("{what} {x} exceeds i32")))
}

/// The contiguous part of `s` that `l` describes.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("keel kernels take contiguous tensors")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// Index values for a launch: the device tensor the engine uploaded once for the step (or
/// that a captured graph replays against), else a fresh upload of the host values.
enum IndexSource {
    Tensor(Tensor),
    Fresh(CudaSlice<u32>),
}

impl IndexSource {
    fn new(dev: &CudaDevice, values: &[u32], device: Option<&Tensor>) -> candle_core::Result<Self> {
        match device {
            Some(t) => Ok(Self::Tensor(t.clone())),
            None => Ok(Self::Fresh(dev.clone_htod(values)?)),
        }
    }

    fn of(dev: &CudaDevice, idx: &Indices) -> candle_core::Result<Self> {
        Self::new(dev, idx.values(), idx.device())
    }

    /// Runs `f` with a view of the first `n` values.
    fn with<R>(
        &self,
        n: usize,
        f: impl FnOnce(&CudaView<'_, u32>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        match self {
            Self::Fresh(s) => f(&s.slice(..n)),
            Self::Tensor(t) => {
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cuda(cs) = &*storage else {
                    bail!("a device index tensor is not on the GPU")
                };
                let Some((a, b)) = layout.contiguous_offsets() else {
                    bail!("a device index tensor is not contiguous")
                };
                if b - a < n {
                    bail!("a device index tensor holds {} values, not {n}", b - a)
                }
                f(&cs.as_cuda_slice::<u32>()?.slice(a..a + n))
            }
        }
    }
}

/// A fresh output of `n` elements, filled with `poison` first when asked so that elements a
/// kernel fails to write are visible.
fn output<T: CudaDType + WithDType + DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
    poison: Option<T>,
) -> candle_core::Result<CudaSlice<T>> {
    match poison {
        Some(p) => dev.clone_htod(&vec![p; n][..]),
        // SAFETY: every element of the output is written by the kernel launched right after
        // (each launch below covers all `n` elements; gpu_check verifies this with poisoned
        // outputs), and nothing reads it before that launch on the same stream.
        None => unsafe { dev.alloc::<T>(n) },
    }
}

fn grid_stride(total: usize) -> LaunchConfig {
    let blocks = total
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn rms_norm_residual(
    op: &RmsNormResidual,
    x: (&CudaStorage, &Layout),
    delta: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match x.0.dtype() {
        DType::F32 => rms_typed::<f32>(op, x, delta, w),
        DType::BF16 => rms_typed::<half::bf16>(op, x, delta, w),
        other => bail!("rms_norm_residual: unsupported dtype {other:?}"),
    }
}

fn rms_typed<T: CudaDType + WithDType + DeviceRepr>(
    op: &RmsNormResidual,
    x: (&CudaStorage, &Layout),
    delta: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let hidden = w.1.shape().elem_count();
    let n = x.1.shape().elem_count();
    let rows = n / hidden;
    let (xv, dv, wv) = (
        view::<T>(x.0, x.1)?,
        view::<T>(delta.0, delta.1)?,
        view::<T>(w.0, w.1)?,
    );
    let mut out = output::<T>(&dev, 2 * n, op.poison.then(|| T::from_f64(f64::NAN)))?;
    let f = dev.get_or_load_custom_func(
        &format!("rms_norm_residual_{}", suffix(T::DTYPE)?),
        "keel_rms_norm",
        RMS_NORM,
    )?;
    let (rows_i, hidden_i) = (int(rows, "rows")?, int(hidden, "hidden")?);
    let threads = (hidden.div_ceil(32) * 32).clamp(32, 1024) as u32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = f.builder();
    b.arg(&xv).arg(&dv).arg(&wv).arg(&mut out);
    b.arg(&rows_i).arg(&hidden_i).arg(&op.eps);
    // SAFETY: the argument list matches `rms_norm_residual_*` in kernels/rms_norm.cu (three
    // input pointers, the output, rows, hidden, eps). ops::rms_norm_residual checked that x and
    // delta hold `rows * hidden` elements and w `hidden`, all of dtype T; `out` holds
    // `2 * rows * hidden`. One block per row (rows fits a grid dimension: it is at most
    // i32::MAX), a multiple of 32 threads at most 1024 as block_sum requires, and all access is
    // within those bounds. The views borrow the storages until the launch is queued, and
    // candle's stream orders it after their producers.
    unsafe { b.launch(cfg) }.w()?;
    let mut dims = vec![2];
    dims.extend_from_slice(x.1.dims());
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
}

pub(crate) fn rope(
    op: &Rope,
    dst: &mut CudaStorage,
    dst_l: &Layout,
    srcs: [(&CudaStorage, &Layout); 2],
) -> candle_core::Result<()> {
    match dst.dtype() {
        DType::F32 => rope_typed::<f32>(op, dst, dst_l, srcs),
        DType::BF16 => rope_typed::<half::bf16>(op, dst, dst_l, srcs),
        other => bail!("rope: unsupported dtype {other:?}"),
    }
}

fn rope_typed<T: CudaDType + WithDType + DeviceRepr>(
    op: &Rope,
    dst: &mut CudaStorage,
    dst_l: &Layout,
    [cos, sin]: [(&CudaStorage, &Layout); 2],
) -> candle_core::Result<()> {
    let dev = dst.device().clone();
    let tokens = op.positions.values().len();
    let total = tokens * op.heads * (op.head_dim / 2);
    let pos = IndexSource::of(&dev, &op.positions)?;
    let (cv, sv) = (view::<f32>(cos.0, cos.1)?, view::<f32>(sin.0, sin.1)?);
    let f =
        dev.get_or_load_custom_func(&format!("rope_{}", suffix(T::DTYPE)?), "keel_rope", ROPE)?;
    let Some((a, b_end)) = dst_l.contiguous_offsets() else {
        bail!("rope: x is not contiguous")
    };
    let mut x = dst.as_cuda_slice_mut::<T>()?.slice_mut(a..b_end);
    let (tokens_i, heads_i, dim_i) = (
        int(tokens, "tokens")?,
        int(op.heads, "heads")?,
        int(op.head_dim, "head_dim")?,
    );
    let (style, rounding) = (op.style.code(), op.rounding.code());
    pos.with(tokens, |pos| {
        let mut b = f.builder();
        b.arg(&mut x).arg(pos).arg(&cv).arg(&sv);
        b.arg(&tokens_i)
            .arg(&heads_i)
            .arg(&dim_i)
            .arg(&style)
            .arg(&rounding);
        // SAFETY: the arguments match `rope_*` in kernels/rope.cu. ops::rope_inplace checked that
        // x holds tokens * heads * head_dim elements of T (head_dim even), that cos and sin are f32
        // tables of equal length, a multiple of head_dim / 2, and that every position is below
        // their row count, so each thread's index (< tokens * heads * head_dim / 2, grid-stride)
        // reads and writes in bounds; `pos` holds exactly the checked positions (the first
        // `tokens` values of the step's device copy, or a fresh upload of them). It lives until the
        // end of this function, after the launch is queued on the same stream that frees it.
        unsafe { b.launch(grid_stride(total)) }.w()?;
        Ok(())
    })
}

pub(crate) fn kv_write(
    op: &KvWrite,
    dst: &mut CudaStorage,
    dst_l: &Layout,
    srcs: [(&CudaStorage, &Layout); 1],
) -> candle_core::Result<()> {
    match dst.dtype() {
        DType::F32 => kv_typed::<f32>(op, dst, dst_l, srcs),
        DType::BF16 => kv_typed::<half::bf16>(op, dst, dst_l, srcs),
        other => bail!("kv_write: unsupported dtype {other:?}"),
    }
}

fn kv_typed<T: CudaDType + WithDType + DeviceRepr>(
    op: &KvWrite,
    dst: &mut CudaStorage,
    dst_l: &Layout,
    [src]: [(&CudaStorage, &Layout); 1],
) -> candle_core::Result<()> {
    let dev = dst.device().clone();
    let tokens = op.slots.values().len();
    let slots = IndexSource::of(&dev, &op.slots)?;
    let sv = view::<T>(src.0, src.1)?;
    let f = dev.get_or_load_custom_func(
        &format!("kv_write_{}", suffix(T::DTYPE)?),
        "keel_kv_cache",
        KV_CACHE,
    )?;
    let Some((a, b_end)) = dst_l.contiguous_offsets() else {
        bail!("kv_write: cache is not contiguous")
    };
    let mut cache = dst.as_cuda_slice_mut::<T>()?.slice_mut(a..b_end);
    let (tokens_i, dim_i, rounding) = (
        int(tokens, "tokens")?,
        int(op.dim, "dim")?,
        op.rounding.code(),
    );
    slots.with(tokens, |slots| {
        let mut b = f.builder();
        b.arg(&mut cache).arg(&sv).arg(slots);
        b.arg(&tokens_i).arg(&dim_i).arg(&rounding);
        // SAFETY: the arguments match `kv_write_*` in kernels/kv_cache.cu. ops::kv_write checked
        // that src holds tokens * dim elements, that the cache is whole rows of dim, and that every
        // slot is below the cache's row count and distinct, so every write lands in bounds and no
        // two threads write the same element; `slots` holds exactly the checked slots (as in
        // `rope`). It outlives the queued launch (same stream).
        unsafe { b.launch(grid_stride(tokens * op.dim)) }.w()?;
        Ok(())
    })
}

pub(crate) fn paged_attention(
    op: &PagedAttention,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match q.0.dtype() {
        DType::F32 => attention_typed::<f32>(op, q, k, v),
        DType::BF16 => attention_typed::<half::bf16>(op, q, k, v),
        other => bail!("paged_attention: unsupported dtype {other:?}"),
    }
}

fn attention_typed<T: CudaDType + WithDType + DeviceRepr>(
    op: &PagedAttention,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = q.0.device().clone();
    let s = &op.shape;
    let seqs = op.tables.len();
    let n = seqs * s.heads() * s.head_dim();
    let (tables, lens, scores_len) = match &op.device {
        Some(d) => (
            IndexSource::new(&dev, op.tables.flat(), Some(&d.flat))?,
            IndexSource::new(&dev, op.tables.context_lens(), Some(&d.lens))?,
            d.capacity,
        ),
        None => (
            IndexSource::new(&dev, op.tables.flat(), None)?,
            IndexSource::new(&dev, op.tables.context_lens(), None)?,
            op.tables.max_context(),
        ),
    };
    let (qv, kv, vv) = (
        view::<T>(q.0, q.1)?,
        view::<T>(k.0, k.1)?,
        view::<T>(v.0, v.1)?,
    );
    let mut out = output::<T>(&dev, n, op.poison.then(|| T::from_f64(f64::NAN)))?;
    let f = dev.get_or_load_custom_func(
        &format!("paged_attention_{}", suffix(T::DTYPE)?),
        "keel_paged_attention",
        PAGED_ATTENTION,
    )?;
    let shared = super::ops::attention_shared_bytes(s.head_dim(), scores_len);
    let args = (
        int(s.heads(), "heads")?,
        int(s.kv_heads(), "kv_heads")?,
        int(s.head_dim(), "head_dim")?,
        int(s.block_size(), "block_size")?,
        int(op.tables.width(), "table width")?,
        int(scores_len, "context")?,
    );
    let (scale, rounding) = (s.scale(), s.probability_rounding().code());
    let cfg = LaunchConfig {
        grid_dim: (s.heads() as u32, seqs as u32, 1),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let (nt, nl) = (op.tables.flat().len(), seqs);
    tables.with(nt, |tables| {
        lens.with(nl, |lens| {
            let mut b = f.builder();
            b.arg(&mut out)
                .arg(&qv)
                .arg(&kv)
                .arg(&vv)
                .arg(tables)
                .arg(lens);
            b.arg(&args.0)
                .arg(&args.1)
                .arg(&args.2)
                .arg(&args.3)
                .arg(&args.4)
                .arg(&args.5);
            b.arg(&scale).arg(&rounding);
            // SAFETY: the arguments match `paged_attention_*` in kernels/paged_attention.cu.
            // ops::paged_attention checked that q holds seqs * heads * head_dim elements, that both
            // caches are whole blocks of block_size rows of kv_heads * head_dim, that every block a
            // sequence reads (the first ceil(len / block_size) of its row of `tables`, which has
            // `width` entries) is inside the cache, that heads is a multiple of kv_heads, that
            // head_dim <= 256 (the kernel's per-lane accumulators), and that the shared memory asked for
            // (max context scores + 32 + warps * head_dim floats) fits the default 48 KiB. The grid is
            // (heads, seqs), with seqs <= 65535 checked there too.
            // The tables and lengths are the checked host values (the step's device copy of them,
            // whose capacity ops::paged_attention checked covers the longest context and sized the
            // shared memory from, or a fresh upload); they outlive the queued launch.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })
    })?;
    let shape = Shape::from((seqs, s.heads() * s.head_dim()));
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

pub(crate) fn sample(
    op: &Sample,
    s: &CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    match s.dtype() {
        DType::F32 => sample_typed::<f32>(op, s, l),
        DType::BF16 => sample_typed::<half::bf16>(op, s, l),
        other => bail!("sample: unsupported dtype {other:?}"),
    }
}

fn sample_typed<T: CudaDType + WithDType + DeviceRepr>(
    op: &Sample,
    s: &CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let rows = op.params.len();
    let words: Vec<u32> = op.params.iter().flat_map(|p| p.words()).collect();
    let params = dev.clone_htod(&words[..])?;
    let logits = view::<T>(s, l)?;
    let mut out = output::<u32>(&dev, rows, op.poison.then_some(u32::MAX))?;
    let f = dev.get_or_load_custom_func(
        &format!("sample_{}", suffix(T::DTYPE)?),
        "keel_sampling",
        SAMPLING,
    )?;
    let vocab = int(op.vocab, "vocab")?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = f.builder();
    b.arg(&logits).arg(&params).arg(&mut out).arg(&vocab);
    // SAFETY: the arguments match `sample_*` in kernels/sampling.cu. ops::sample checked that
    // the logits are rows * vocab elements of T; `params` holds 5 words per row and `out` one
    // id per row. One block per row (grid x allows 2^31 - 1), 512 threads (a multiple of 32,
    // as block_reduce requires); thread 0 of each block writes its row's id. `params` outlives
    // the queued launch.
    unsafe { b.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
}

pub(crate) fn host_copy(
    op: &HostCopy,
    dst: &mut CudaStorage,
    l: &Layout,
) -> candle_core::Result<()> {
    let dev = dst.device().clone();
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("write_u32: the tensor is not contiguous")
    };
    let n = op.values.len();
    if b - a < n {
        bail!("write_u32: {n} values do not fit {} elements", b - a)
    }
    let mut slice = dst.as_cuda_slice_mut::<u32>()?.slice_mut(a..a + n);
    dev.memcpy_htod(&op.values[..], &mut slice)
}

/// A captured CUDA graph that can move to the engine's model thread.
pub(crate) struct Graph(pub(crate) candle_core::cuda_backend::cudarc::driver::CudaGraph);

// SAFETY: a graph exec is a driver handle that any thread may launch or destroy once its
// context is current (cudarc binds the context on each call); the engine moves the model, and
// with it the graphs, to the model thread and uses them only there, behind `&mut`.
unsafe impl Send for Graph {}

/// Page-locked host buffers that picked ids are copied into without waiting for the stream,
/// kept for reuse: allocating page-locked memory costs far more than a step's copy.
#[derive(Debug, Default)]
pub(crate) struct Readback {
    free: std::sync::Mutex<Vec<PinnedHostSlice<u32>>>,
}

impl Readback {
    fn take(&self, n: usize) -> Option<PinnedHostSlice<u32>> {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = free.iter().position(|b| b.len() >= n)?;
        Some(free.swap_remove(at))
    }

    fn give(&self, buf: PinnedHostSlice<u32>) {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        free.push(buf);
    }
}

/// Picked ids on their way to the host: a device-to-host copy queued on the stream right
/// behind the step that picked them, into a page-locked buffer, so the copy is asynchronous and
/// [`PendingIds::wait`] waits on the copy's own event, not on the stream: steps launched after
/// it keep the GPU busy meanwhile. The buffer goes back to its [`Readback`] when this drops.
#[derive(Debug)]
pub(crate) struct PendingIds {
    buf: Option<PinnedHostSlice<u32>>,
    n: usize,
    home: std::sync::Arc<Readback>,
}

/// Queues the copy of `ids` (a contiguous u32 tensor on the GPU) to the host.
pub(crate) fn start_readback(
    ids: &Tensor,
    home: &std::sync::Arc<Readback>,
) -> candle_core::Result<PendingIds> {
    let (storage, layout) = ids.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("picked ids are not on the GPU")
    };
    let src = view::<u32>(cs, layout)?;
    let n = src.len();
    let stream = cs.device().cuda_stream();
    let mut buf = match home.take(n) {
        Some(buf) => buf,
        // SAFETY: the buffer's contents are unset until the copy below writes its first `n`
        // elements, and only those are ever read, by `PendingIds::wait`, after it waits for
        // the copy's event. Flags 0: plain page-locked memory (write-combined memory is slow
        // for the host to read).
        None => unsafe {
            stream
                .context()
                .alloc_pinned_with_flags::<u32>(n.max(64).next_power_of_two(), 0)
        }
        .w()?,
    };
    // `buf` holds at least `n` elements (`take` and the allocation both ensure it), as the
    // copy requires; it records the buffer's event on the stream after the copy. A failed
    // copy hands the buffer back to the pool.
    if let Err(e) = stream.memcpy_dtoh(&src, &mut buf).w() {
        home.give(buf);
        return Err(e);
    }
    Ok(PendingIds {
        buf: Some(buf),
        n,
        home: home.clone(),
    })
}

impl PendingIds {
    /// The ids, once the copy (and so the step that picked them) has finished.
    pub(crate) fn wait(&self) -> candle_core::Result<Vec<u32>> {
        let Some(buf) = &self.buf else {
            bail!("picked ids were already handed back")
        };
        let host = buf.as_slice().w()?;
        match host.get(..self.n) {
            Some(ids) => Ok(ids.to_vec()),
            None => bail!(
                "a read-back buffer of {} ids holds fewer than {}",
                host.len(),
                self.n
            ),
        }
    }
}

impl Drop for PendingIds {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // A later copy into it waits for this one's event first (cudarc orders uses of a
            // page-locked buffer through its event).
            self.home.give(buf);
        }
    }
}
