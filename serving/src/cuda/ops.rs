//! The kernels as candle ops: the CPU path runs the reference, the CUDA path (with the `cuda`
//! feature) launches the kernel. The functions here validate first and return typed errors, so
//! the ops themselves only ever see inputs the kernels accept.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, InplaceOp1, InplaceOp2, InplaceOp3, Layout,
    Shape, Tensor,
};

use super::reference::{
    self, AttentionShape, BlockTables, Dtype, RopeStyle, Rounding, SampleParams, input_error,
};
use crate::error::{Error, Result};

/// Turns a candle failure into ours, keeping the device and spotting GPU out-of-memory.
pub(crate) fn backend_error(e: candle_core::Error, device: &Device) -> Error {
    let reason = e.to_string();
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } if reason.contains("OUT_OF_MEMORY") => {
            Error::DeviceOutOfMemory {
                ordinal: gpu_id,
                reason,
            }
        }
        candle_core::DeviceLocation::Cuda { gpu_id } => Error::Cuda {
            ordinal: gpu_id,
            reason,
        },
        _ => Error::Execution { reason },
    }
}

/// The kernel dtype of `t`, which must be a contiguous f32 or bf16 tensor.
fn kernel_dtype(kernel: &'static str, what: &str, t: &Tensor) -> Result<Dtype> {
    if !t.is_contiguous() {
        return Err(input_error(kernel, format!("{what} is not contiguous")));
    }
    match t.dtype() {
        DType::F32 => Ok(Dtype::F32),
        DType::BF16 => Ok(Dtype::Bf16),
        other => Err(input_error(
            kernel,
            format!("{what} has dtype {other:?}; the kernels take f32 or bf16"),
        )),
    }
}

/// Checks that every tensor has the dtype of the first and lives on the same device.
fn same_dtype(kernel: &'static str, tensors: &[(&str, &Tensor)]) -> Result<Dtype> {
    let (first_name, first) = tensors[0];
    let dtype = kernel_dtype(kernel, first_name, first)?;
    for (name, t) in &tensors[1..] {
        if kernel_dtype(kernel, name, t)? != dtype {
            return Err(input_error(
                kernel,
                format!(
                    "{name} is {:?} but {first_name} is {:?}",
                    t.dtype(),
                    first.dtype()
                ),
            ));
        }
        if !t.device().same_device(first.device()) {
            return Err(input_error(
                kernel,
                format!("{name} and {first_name} are on different devices"),
            ));
        }
    }
    Ok(dtype)
}

fn dtype_of(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Index values a kernel reads (positions, cache slots): the host copy, which the checks and
/// the CPU references read, and optionally the same values as a u32 tensor on the device, which
/// a GPU launch then reads instead of uploading its own copy. The engine uploads each of a
/// step's index arrays once for all its layers, and a captured CUDA graph replays against the
/// fixed device tensors it was captured with ([`Indices::on_device`]).
#[derive(Debug, Clone)]
pub(crate) struct Indices {
    host: std::sync::Arc<[u32]>,
    device: Option<Tensor>,
}

impl Indices {
    /// Host values only: a GPU launch uploads them itself.
    pub(crate) fn host(values: &[u32]) -> Self {
        Self {
            host: values.into(),
            device: None,
        }
    }

    /// `values`, uploaded once to `device` when it is a GPU (host only on the CPU).
    pub(crate) fn upload(values: &[u32], device: &Device) -> Result<Self> {
        let mut out = Self::host(values);
        if device.is_cuda() && !values.is_empty() {
            out.device = Some(
                Tensor::from_slice(values, values.len(), device)
                    .map_err(|e| backend_error(e, device))?,
            );
        }
        Ok(out)
    }

    /// `values` together with `tensor`, a u32 tensor that holds the same values on the device
    /// (the caller copied them there). Its first `values.len()` elements are what a launch reads.
    pub(crate) fn on_device(values: &[u32], tensor: &Tensor) -> Result<Self> {
        if tensor.dtype() != DType::U32
            || !tensor.is_contiguous()
            || tensor.elem_count() < values.len()
        {
            return Err(input_error(
                "indices",
                format!(
                    "a device index tensor must be contiguous u32 with at least {} elements, not {:?} {:?}",
                    values.len(),
                    tensor.dtype(),
                    tensor.dims()
                ),
            ));
        }
        Ok(Self {
            host: values.into(),
            device: Some(tensor.clone()),
        })
    }

    pub(crate) fn values(&self) -> &[u32] {
        &self.host
    }

    /// The values a launch reads: the device tensor's first `values().len()` elements when there
    /// is one (on the CPU this reads it back, so the CPU references follow exactly the data a GPU
    /// launch would), else the host values.
    fn current(&self) -> candle_core::Result<std::borrow::Cow<'_, [u32]>> {
        match &self.device {
            Some(t) => Ok(std::borrow::Cow::Owned(u32_prefix(t, self.host.len())?)),
            None => Ok(std::borrow::Cow::Borrowed(&self.host)),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn device(&self) -> Option<&Tensor> {
        self.device.as_ref()
    }
}

/// The first `n` values of a contiguous u32 tensor, on the host.
fn u32_prefix(t: &Tensor, n: usize) -> candle_core::Result<Vec<u32>> {
    let mut v = t.flatten_all()?.to_vec1::<u32>()?;
    if v.len() < n {
        candle_core::bail!("an index tensor holds {} values, not {n}", v.len());
    }
    v.truncate(n);
    Ok(v)
}

/// Copies `values` into the first elements of `t`, a contiguous u32 tensor on any device, in
/// place (on a GPU one host-to-device copy on the tensor's stream, ordered after every launch
/// queued before it). The engine refills the fixed inputs of a captured CUDA graph this way.
pub(crate) fn write_u32(t: &Tensor, values: &[u32]) -> Result<()> {
    if t.dtype() != DType::U32 || !t.is_contiguous() || t.elem_count() < values.len() {
        return Err(input_error(
            "write_u32",
            format!(
                "{} values do not fit a {:?} tensor of shape {:?}",
                values.len(),
                t.dtype(),
                t.dims()
            ),
        ));
    }
    if values.is_empty() {
        return Ok(());
    }
    t.inplace_op1(&HostCopy {
        values: values.to_vec(),
    })
    .map_err(|e| backend_error(e, t.device()))
}

/// A batch's block tables and context lengths as u32 tensors on the device, for
/// [`paged_attention`]: `flat` is `[sequences, width]` (the host [`BlockTables`]' layout) and
/// `lens` `[sequences]`. `capacity` is the longest context the launch sizes its shared memory
/// for; a captured graph fixes it (with the width) so that every replay fits.
#[derive(Debug, Clone)]
pub(crate) struct DeviceTables {
    pub(crate) flat: Tensor,
    pub(crate) lens: Tensor,
    pub(crate) capacity: usize,
}

impl DeviceTables {
    /// Uploads `tables` to `device` (`None` on the CPU, where the reference reads the host
    /// tables), sized for their own longest context.
    pub(crate) fn upload(tables: &BlockTables, device: &Device) -> Result<Option<Self>> {
        if !device.is_cuda() {
            return Ok(None);
        }
        let err = |e| backend_error(e, device);
        Ok(Some(Self {
            flat: Tensor::from_slice(tables.flat(), tables.flat().len(), device).map_err(err)?,
            lens: Tensor::from_slice(tables.context_lens(), tables.len(), device).map_err(err)?,
            capacity: tables.max_context(),
        }))
    }

    fn check(&self, tables: &BlockTables) -> Result<()> {
        let ok = |t: &Tensor, n: usize| {
            t.dtype() == DType::U32 && t.is_contiguous() && t.elem_count() >= n
        };
        if !ok(&self.flat, tables.flat().len())
            || !ok(&self.lens, tables.len())
            || self.capacity < tables.max_context()
        {
            return Err(input_error(
                "paged_attention",
                format!(
                    "device tables ({:?}, {:?}, capacity {}) do not hold {} sequences of width {} and contexts up to {}",
                    self.flat.dims(),
                    self.lens.dims(),
                    self.capacity,
                    tables.len(),
                    tables.width(),
                    tables.max_context()
                ),
            ));
        }
        Ok(())
    }
}

/// Fused residual add and RMSNorm ([`reference::rms_norm_residual`]) of `[rows, hidden]`
/// tensors; returns `(x + delta, normed)`. One launch on a GPU.
pub(crate) fn rms_norm_residual(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let both = rms_norm_both(x, delta, weight, eps, false)?;
    let split = |i| both.get(i).map_err(|e| backend_error(e, x.device()));
    Ok((split(0)?, split(1)?))
}

/// The op's raw `[2, rows, hidden]` output.
fn rms_norm_both(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
    poison: bool,
) -> Result<Tensor> {
    same_dtype(
        "rms_norm_residual",
        &[("x", x), ("delta", delta), ("weight", weight)],
    )?;
    reference::check_rms_norm(x.elem_count(), delta.elem_count(), weight.elem_count(), eps)?;
    if x.dims() != delta.dims() {
        return Err(input_error(
            "rms_norm_residual",
            format!(
                "x {:?} and delta {:?} differ in shape",
                x.dims(),
                delta.dims()
            ),
        ));
    }
    x.apply_op3_no_bwd(delta, weight, &RmsNormResidual { eps, poison })
        .map_err(|e| backend_error(e, x.device()))
}

/// Rotary embedding in place on `x` (`[tokens, heads, head_dim]`, f32 or bf16) with `[rows,
/// head_dim / 2]` f32 tables ([`reference::rope`]).
pub(crate) fn rope_inplace(
    x: &Tensor,
    indices: &Indices,
    cos: &Tensor,
    sin: &Tensor,
    style: RopeStyle,
    rounding: Rounding,
) -> Result<()> {
    const K: &str = "rope";
    kernel_dtype(K, "x", x)?;
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t.dtype() != DType::F32 || !t.is_contiguous() {
            return Err(input_error(
                K,
                format!("{name} must be a contiguous f32 table"),
            ));
        }
    }
    let positions = indices.values();
    let (tokens, heads, head_dim) = x
        .dims3()
        .map_err(|_| input_error(K, format!("x has shape {:?}, not 3-d", x.dims())))?;
    if tokens != positions.len() {
        return Err(input_error(
            K,
            format!("{tokens} tokens but {} positions", positions.len()),
        ));
    }
    reference::check_rope(
        x.elem_count(),
        heads,
        head_dim,
        positions,
        cos.elem_count(),
        sin.elem_count(),
    )?;
    let op = Rope {
        positions: indices.clone(),
        heads,
        head_dim,
        style,
        rounding,
    };
    x.inplace_op3(cos, sin, &op)
        .map_err(|e| backend_error(e, x.device()))
}

/// Writes rows of `src` (`[tokens, dim]`) into `cache` (`[rows, dim]`) at `slots`
/// ([`reference::kv_write`]).
pub(crate) fn kv_write(
    cache: &Tensor,
    src: &Tensor,
    indices: &Indices,
    rounding: Rounding,
) -> Result<()> {
    let slots = indices.values();
    same_dtype("kv_write", &[("cache", cache), ("src", src)])?;
    let dim = cache.dims().last().copied().unwrap_or(0);
    reference::check_kv_write(cache.elem_count(), dim, src.elem_count(), slots)?;
    let op = KvWrite {
        slots: indices.clone(),
        dim,
        rounding,
    };
    cache
        .inplace_op2(src, &op)
        .map_err(|e| backend_error(e, cache.device()))
}

/// Decode attention over the paged caches ([`reference::paged_attention`]); returns
/// `[sequences, heads * head_dim]`. A GPU launch reads `device`'s copy of the tables when given
/// one (else it uploads `tables` itself).
pub(crate) fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    shape: &AttentionShape,
    tables: &BlockTables,
    device: Option<&DeviceTables>,
) -> Result<Tensor> {
    attention_inner(q, k_cache, v_cache, shape, tables, device, false)
}

/// Threads per block of the attention kernel (4 warps).
pub(crate) const ATTENTION_THREADS: u32 = 128;
/// Shared memory a block may use without opting in to more (48 KiB on every CUDA GPU).
const SHARED_LIMIT: usize = 48 * 1024;
/// The most blocks in a grid's y or z dimension.
const MAX_GRID_Y: usize = 65_535;

/// Shared memory of one attention block: the scores, 32 reduction slots, and one partial
/// output per warp.
pub(crate) fn attention_shared_bytes(head_dim: usize, max_context: usize) -> usize {
    (max_context + 32 + (ATTENTION_THREADS as usize / 32) * head_dim) * 4
}

/// Whether one attention launch can hold contexts of up to `capacity` positions.
pub(crate) fn attention_fits(head_dim: usize, capacity: usize) -> bool {
    attention_shared_bytes(head_dim, capacity) <= SHARED_LIMIT
}

fn attention_inner(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    shape: &AttentionShape,
    tables: &BlockTables,
    device: Option<&DeviceTables>,
    poison: bool,
) -> Result<Tensor> {
    const K: &str = "paged_attention";
    same_dtype(
        "paged_attention",
        &[("q", q), ("k_cache", k_cache), ("v_cache", v_cache)],
    )?;
    reference::check_paged_attention(
        shape,
        q.elem_count(),
        k_cache.elem_count(),
        v_cache.elem_count(),
        tables,
    )?;
    if let Some(d) = device {
        d.check(tables)?;
    }
    if q.device().is_cuda() {
        // The GPU kernel keeps every score of a sequence in shared memory.
        let capacity = device.map_or(tables.max_context(), |d| d.capacity);
        let bytes = attention_shared_bytes(shape.head_dim(), capacity);
        if bytes > SHARED_LIMIT {
            return Err(input_error(
                K,
                format!(
                    "a context of {capacity} positions needs {bytes} bytes of shared memory; the kernel has {SHARED_LIMIT}"
                ),
            ));
        }
        if tables.len() > MAX_GRID_Y {
            return Err(input_error(
                K,
                format!("{} sequences exceed {MAX_GRID_Y} per launch", tables.len()),
            ));
        }
    }
    let op = PagedAttention {
        shape: *shape,
        tables: tables.clone(),
        device: device.cloned(),
        poison,
    };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
        .map_err(|e| backend_error(e, q.device()))
}

/// Picks one token per row of `logits` (`[rows, vocab]`) ([`reference::sample`]); only the
/// ids come back to the host. The engine uses it for requests without penalties or
/// log-probabilities on the kernel path (`Model::forward_step`); gpu_check uses the poisoned
/// variant.
pub(crate) fn sample(logits: &Tensor, params: &[SampleParams]) -> Result<Vec<u32>> {
    read_u32(&sample_on_device(logits, params)?)
}

/// [`sample`] without the read-back: the picked ids stay on the logits' device as a `[rows]`
/// u32 tensor. On a GPU this only queues the kernel (its parameters go up with an asynchronous
/// host-to-device copy); nothing waits for the device. Pipelined decode feeds these ids to the
/// next step device to device and reads them with [`read_u32`] later.
pub(crate) fn sample_on_device(logits: &Tensor, params: &[SampleParams]) -> Result<Tensor> {
    sample_inner(logits, params, false)
}

fn sample_inner(logits: &Tensor, params: &[SampleParams], poison: bool) -> Result<Tensor> {
    kernel_dtype("sample", "logits", logits)?;
    let vocab = logits.dims().last().copied().unwrap_or(0);
    reference::check_sample(logits.elem_count(), vocab, params.len())?;
    let op = Sample {
        params: params.to_vec(),
        vocab,
        poison,
    };
    logits
        .apply_op1_no_bwd(&op)
        .map_err(|e| backend_error(e, logits.device()))
}

/// The values of a u32 tensor on the host. On a GPU this waits for every launch queued on the
/// tensor's stream so far (candle's device-to-host copy is synchronous).
pub(crate) fn read_u32(t: &Tensor) -> Result<Vec<u32>> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<u32>())
        .map_err(|e| backend_error(e, t.device()))
}

/// Where a model's picked ids are read back: on a GPU, a pool of page-locked host buffers
/// ([`start_read`]); nothing on the CPU.
#[derive(Debug, Default)]
pub(crate) struct Readback {
    #[cfg(feature = "cuda")]
    pool: std::sync::Arc<super::gpu::Readback>,
}

/// Picked ids on their way to the host ([`start_read`]).
#[derive(Debug)]
pub(crate) enum IdsRead {
    /// Read when asked: on the CPU the values are already there.
    Now(Tensor),
    /// On a GPU: a copy queued right behind the step that picked them, into page-locked
    /// memory; waiting for it waits for that step only, not for steps launched after it.
    #[cfg(feature = "cuda")]
    Queued(super::gpu::PendingIds),
}

/// Starts reading `ids` (a u32 tensor a step's sampler wrote) back to the host. On a GPU the
/// copy is queued now, on the stream right behind the step, and nothing waits; so a step
/// launched after this call does not delay [`IdsRead::wait`]. If the queued copy cannot be set
/// up (page-locked memory refused), the read falls back to candle's synchronous copy at
/// [`IdsRead::wait`], which then also waits for whatever was launched after it.
pub(crate) fn start_read(ids: &Tensor, readback: &Readback) -> IdsRead {
    #[cfg(feature = "cuda")]
    if ids.device().is_cuda()
        && let Ok(pending) = super::gpu::start_readback(ids, &readback.pool)
    {
        return IdsRead::Queued(pending);
    }
    let _ = readback;
    IdsRead::Now(ids.clone())
}

impl IdsRead {
    /// The ids on the host: on a GPU, once the step that picked them has finished.
    pub(crate) fn wait(&self) -> Result<Vec<u32>> {
        match self {
            Self::Now(ids) => read_u32(ids),
            #[cfg(feature = "cuda")]
            Self::Queued(pending) => pending.wait().map_err(|e| Error::Execution {
                reason: format!("reading picked token ids back from the GPU: {e}"),
            }),
        }
    }
}

/// Copies `src`, a contiguous u32 tensor of at most `dst`'s length on the same device, into
/// the first elements of `dst`, in place. On a GPU this is one device-to-device copy kernel
/// queued on the stream (candle's `slice_set`), ordered after the launch that wrote `src`;
/// nothing crosses to the host and nothing waits. A captured decode step's fixed ids buffer is
/// refilled this way from the previous step's sampled ids (pipelined decode).
pub(crate) fn copy_u32(dst: &Tensor, src: &Tensor) -> Result<()> {
    let ok = |t: &Tensor| t.dtype() == DType::U32 && t.is_contiguous() && t.rank() == 1;
    if !ok(dst) || !ok(src) || src.elem_count() > dst.elem_count() {
        return Err(input_error(
            "copy_u32",
            format!(
                "a {:?} {:?} tensor does not fit the first elements of a {:?} {:?} tensor (both must be contiguous 1-d u32)",
                src.dtype(),
                src.dims(),
                dst.dtype(),
                dst.dims()
            ),
        ));
    }
    if !src.device().same_device(dst.device()) {
        return Err(input_error(
            "copy_u32",
            "the source and destination are on different devices".into(),
        ));
    }
    if src.elem_count() == 0 {
        return Ok(());
    }
    dst.slice_set(src, 0, 0)
        .map_err(|e| backend_error(e, dst.device()))
}

/// The same ops with their outputs filled with NaN (or `u32::MAX`) before the kernel runs, so
/// a kernel that skips an element fails the comparison with the reference. For `gpu_check`.
pub(crate) mod poisoned {
    use super::*;

    /// [`super::rms_norm_residual`] with a poisoned output, as one `[2, rows, hidden]` tensor.
    pub(crate) fn rms_norm_residual(
        x: &Tensor,
        delta: &Tensor,
        weight: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        rms_norm_both(x, delta, weight, eps, true)
    }

    /// [`super::paged_attention`] with a poisoned output.
    pub(crate) fn paged_attention(
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        shape: &AttentionShape,
        tables: &BlockTables,
        device: Option<&DeviceTables>,
    ) -> Result<Tensor> {
        attention_inner(q, k_cache, v_cache, shape, tables, device, true)
    }

    /// [`super::sample`] with a poisoned output.
    pub(crate) fn sample(logits: &Tensor, params: &[SampleParams]) -> Result<Vec<u32>> {
        read_u32(&sample_inner(logits, params, true)?)
    }
}

// --- CPU paths: copy out of candle's storage, run the reference, copy back ---

/// The contiguous values of `s` under `l` as f32, and their dtype.
fn cpu_values(kernel: &str, s: &CpuStorage, l: &Layout) -> candle_core::Result<(Dtype, Vec<f32>)> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{kernel}: input is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok((Dtype::F32, v[a..b].to_vec())),
        CpuStorage::BF16(v) => Ok((Dtype::Bf16, v[a..b].iter().map(|x| x.to_f32()).collect())),
        other => Err(candle_core::Error::Msg(format!(
            "{kernel}: unsupported dtype {:?}",
            other.dtype()
        ))),
    }
}

fn cpu_storage(dtype: Dtype, v: Vec<f32>) -> CpuStorage {
    match dtype {
        Dtype::F32 => CpuStorage::F32(v),
        Dtype::Bf16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
    }
}

/// Writes `v` back over the contiguous region of `s` under `l`.
fn cpu_store(kernel: &str, s: &mut CpuStorage, l: &Layout, v: &[f32]) -> candle_core::Result<()> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{kernel}: output is not contiguous")))?;
    match s {
        CpuStorage::F32(dst) => dst[a..b].copy_from_slice(v),
        CpuStorage::BF16(dst) => {
            for (d, x) in dst[a..b].iter_mut().zip(v) {
                *d = half::bf16::from_f32(*x);
            }
        }
        other => {
            return Err(candle_core::Error::Msg(format!(
                "{kernel}: unsupported dtype {:?}",
                other.dtype()
            )));
        }
    }
    Ok(())
}

fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Output `[2, rows, hidden]`: the new residual, then the normalised rows.
pub(crate) struct RmsNormResidual {
    pub(crate) eps: f32,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) poison: bool,
}

impl CustomOp3 for RmsNormResidual {
    fn name(&self) -> &'static str {
        "keel-rms-norm-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dtype, x) = cpu_values(self.name(), s1, l1)?;
        let (_, delta) = cpu_values(self.name(), s2, l2)?;
        let (_, w) = cpu_values(self.name(), s3, l3)?;
        let (mut sum, normed) =
            reference::rms_norm_residual(dtype, &x, &delta, &w, self.eps).map_err(to_candle)?;
        sum.extend(normed);
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((cpu_storage(dtype, sum), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::gpu::rms_norm_residual(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// In place on `[tokens, heads, head_dim]`, with the cos and sin tables as sources.
pub(crate) struct Rope {
    pub(crate) positions: Indices,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) style: RopeStyle,
    pub(crate) rounding: Rounding,
}

impl InplaceOp3 for Rope {
    fn name(&self) -> &'static str {
        "keel-rope"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        cos: &CpuStorage,
        cos_l: &Layout,
        sin: &CpuStorage,
        sin_l: &Layout,
    ) -> candle_core::Result<()> {
        let (dtype, mut x) = cpu_values(self.name(), dst, dst_l)?;
        let (_, cos) = cpu_values(self.name(), cos, cos_l)?;
        let (_, sin) = cpu_values(self.name(), sin, sin_l)?;
        reference::rope(
            dtype,
            &mut x,
            self.heads,
            self.head_dim,
            &self.positions.current()?,
            &cos,
            &sin,
            self.style,
            self.rounding,
        )
        .map_err(to_candle)?;
        cpu_store(self.name(), dst, dst_l, &x)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        cos: &candle_core::CudaStorage,
        cos_l: &Layout,
        sin: &candle_core::CudaStorage,
        sin_l: &Layout,
    ) -> candle_core::Result<()> {
        super::gpu::rope(self, dst, dst_l, [(cos, cos_l), (sin, sin_l)])
    }
}

/// In place on the cache `[rows, dim]`, with the new rows as the source.
pub(crate) struct KvWrite {
    pub(crate) slots: Indices,
    pub(crate) dim: usize,
    pub(crate) rounding: Rounding,
}

impl InplaceOp2 for KvWrite {
    fn name(&self) -> &'static str {
        "keel-kv-write"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (dtype, mut cache) = cpu_values(self.name(), dst, dst_l)?;
        let (_, src) = cpu_values(self.name(), src, src_l)?;
        reference::kv_write(
            dtype,
            &mut cache,
            self.dim,
            &src,
            &self.slots.current()?,
            self.rounding,
        )
        .map_err(to_candle)?;
        cpu_store(self.name(), dst, dst_l, &cache)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        super::gpu::kv_write(self, dst, dst_l, [(src, src_l)])
    }
}

/// `(q, k_cache, v_cache)` to `[sequences, heads * head_dim]`.
pub(crate) struct PagedAttention {
    pub(crate) shape: AttentionShape,
    pub(crate) tables: BlockTables,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) device: Option<DeviceTables>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) poison: bool,
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "keel-paged-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dtype, q) = cpu_values(self.name(), s1, l1)?;
        let (_, k) = cpu_values(self.name(), s2, l2)?;
        let (_, v) = cpu_values(self.name(), s3, l3)?;
        // With a device copy of the tables, attend through its contents (on the CPU the copy
        // is a CPU tensor), as the GPU launch would.
        let read;
        let tables = match &self.device {
            Some(d) => {
                let (n, width) = (self.tables.len(), self.tables.width());
                let flat = u32_prefix(&d.flat, n * width)?;
                let lens = u32_prefix(&d.lens, n)?;
                read = BlockTables::from_parts(flat, width, lens, self.shape.block_size())
                    .map_err(to_candle)?;
                &read
            }
            None => &self.tables,
        };
        let out = reference::paged_attention(dtype, &self.shape, &q, &k, &v, tables)
            .map_err(to_candle)?;
        let shape = Shape::from((
            self.tables.len(),
            self.shape.heads() * self.shape.head_dim(),
        ));
        Ok((cpu_storage(dtype, out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::gpu::paged_attention(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// In place on a u32 tensor: its first `values.len()` elements become `values`.
pub(crate) struct HostCopy {
    pub(crate) values: Vec<u32>,
}

impl InplaceOp1 for HostCopy {
    fn name(&self) -> &'static str {
        "keel-write-u32"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("write_u32: the tensor is not contiguous")
        };
        match s {
            CpuStorage::U32(dst) if b - a >= self.values.len() => {
                dst[a..a + self.values.len()].copy_from_slice(&self.values);
                Ok(())
            }
            _ => candle_core::bail!(
                "write_u32: not a u32 tensor of {} values",
                self.values.len()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        super::gpu::host_copy(self, s, l)
    }
}

/// `[rows, vocab]` logits to `[rows]` u32 token ids.
pub(crate) struct Sample {
    pub(crate) params: Vec<SampleParams>,
    pub(crate) vocab: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) poison: bool,
}

impl CustomOp1 for Sample {
    fn name(&self) -> &'static str {
        "keel-sample"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dtype, logits) = cpu_values(self.name(), s, l)?;
        let ids = reference::sample(dtype, &logits, self.vocab, &self.params).map_err(to_candle)?;
        let n = ids.len();
        Ok((CpuStorage::U32(ids), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::gpu::sample(self, s, l)
    }
}

/// Uploads host values as a tensor of `dtype` on `device` (for tests and `gpu_check`).
pub(crate) fn upload(
    values: &[f32],
    shape: &[usize],
    dtype: Dtype,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_slice(values, shape, device)
        .and_then(|t| t.to_dtype(dtype_of(dtype)))
        .map_err(|e| backend_error(e, device))
}

/// Downloads a tensor's values as f32.
pub(crate) fn download(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| backend_error(e, t.device()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        upload(v, shape, Dtype::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn cpu_ops_match_the_reference() {
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let d: Vec<f32> = (0..8).map(|i| (i as f32).sin()).collect();
        let w = [1.0, 0.5, 2.0, -1.0];
        let (sum, normed) =
            rms_norm_residual(&t(&x, &[2, 4]), &t(&d, &[2, 4]), &t(&w, &[4]), 1e-5).unwrap();
        let (rs, rn) = reference::rms_norm_residual(Dtype::F32, &x, &d, &w, 1e-5).unwrap();
        assert_eq!(download(&sum).unwrap(), rs);
        assert_eq!(download(&normed).unwrap(), rn);
        assert_eq!(sum.dims(), &[2, 4]);

        let cache = t(&[0.0; 12], &[4, 3]);
        kv_write(
            &cache,
            &t(&[1.0, 2.0, 3.0], &[1, 3]),
            &Indices::host(&[2]),
            Rounding::None,
        )
        .unwrap();
        assert_eq!(
            download(&cache).unwrap(),
            [0., 0., 0., 0., 0., 0., 1., 2., 3., 0., 0., 0.]
        );
        assert!(matches!(
            kv_write(
                &cache,
                &t(&[1.0, 2.0, 3.0], &[1, 3]),
                &Indices::host(&[4]),
                Rounding::None
            ),
            Err(Error::CacheIndexOutOfRange {
                index: 4,
                limit: 4,
                ..
            })
        ));

        let ids = sample(&t(&[0.0, 3.0, 1.0], &[1, 3]), &[SampleParams::greedy()]).unwrap();
        assert_eq!(ids, [1]);
    }

    #[test]
    fn a_device_copy_of_indices_is_what_the_op_reads() {
        // The CPU reference follows the device tensor, as a GPU launch would: slot 1 here, not
        // the host's 3 (the caller promised they agree; this shows which one is read).
        let cache = t(&[0.0; 8], &[4, 2]);
        let dev_slots = Tensor::from_slice(&[1u32, 9], 2, &Device::Cpu).unwrap();
        let idx = Indices::on_device(&[3], &dev_slots).unwrap();
        kv_write(&cache, &t(&[5.0, 6.0], &[1, 2]), &idx, Rounding::None).unwrap();
        assert_eq!(download(&cache).unwrap(), [0., 0., 5., 6., 0., 0., 0., 0.]);
        // Refilling the device copy in place changes what the next launch reads.
        write_u32(&dev_slots, &[2]).unwrap();
        kv_write(&cache, &t(&[7.0, 8.0], &[1, 2]), &idx, Rounding::None).unwrap();
        assert_eq!(download(&cache).unwrap(), [0., 0., 5., 6., 7., 8., 0., 0.]);
        // Bad device copies and refills are typed errors.
        let f = t(&[0.0; 2], &[2]);
        assert!(matches!(
            Indices::on_device(&[1], &f),
            Err(Error::KernelInput { .. })
        ));
        assert!(matches!(
            Indices::on_device(&[1, 2, 3], &dev_slots),
            Err(Error::KernelInput { .. })
        ));
        assert!(matches!(
            write_u32(&dev_slots, &[1, 2, 3]),
            Err(Error::KernelInput { .. })
        ));
        assert!(matches!(
            write_u32(&f, &[1]),
            Err(Error::KernelInput { .. })
        ));
    }

    #[test]
    fn sampled_ids_stay_on_the_device_and_copy_into_a_fixed_buffer() {
        let logits = t(&[0.0, 3.0, 1.0, 5.0, 0.0, 1.0], &[2, 3]);
        let ids = sample_on_device(&logits, &[SampleParams::greedy(); 2]).unwrap();
        assert_eq!((ids.dtype(), ids.dims()), (DType::U32, &[2][..]));
        assert_eq!(read_u32(&ids).unwrap(), [1, 0]);
        // Into the first elements of a longer buffer; the rest is left alone.
        let buffer = Tensor::from_slice(&[7u32, 7, 7], 3, &Device::Cpu).unwrap();
        copy_u32(&buffer, &ids).unwrap();
        assert_eq!(read_u32(&buffer).unwrap(), [1, 0, 7]);
        // A source longer than the buffer, or of another dtype or rank, is a typed error.
        let short = Tensor::from_slice(&[0u32], 1, &Device::Cpu).unwrap();
        let wide = Tensor::from_slice(&[0u32, 1], (1, 2), &Device::Cpu).unwrap();
        for (dst, src) in [(&short, &ids), (&buffer, &logits), (&buffer, &wide)] {
            assert!(matches!(copy_u32(dst, src), Err(Error::KernelInput { .. })));
        }
    }

    #[test]
    fn mismatched_dtypes_are_typed_errors() {
        let a = t(&[1.0; 4], &[1, 4]);
        let b = a.to_dtype(DType::BF16).unwrap();
        assert!(matches!(
            rms_norm_residual(&a, &b, &t(&[1.0; 4], &[4]), 1e-5),
            Err(Error::KernelInput { .. })
        ));
        let ints = Tensor::from_slice(&[1u32, 2], (1, 2), &Device::Cpu).unwrap();
        assert!(matches!(
            sample(&ints, &[SampleParams::greedy()]),
            Err(Error::KernelInput { .. })
        ));
    }
}
