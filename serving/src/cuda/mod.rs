//! Keel's own CUDA kernels (`serving/kernels/*.cu`) for the hot paths of decoding, their CPU
//! reference implementations, and the candle ops that pick one or the other by device.
//!
//! This is the one module of the crate with `cfg(feature = "cuda")`: the references and the
//! candle ops' CPU paths always compile; the launches ([`gpu`]) and the ops' CUDA paths exist
//! only with the feature. Without it, [`cuda_kernels::KernelDevice::cuda`] returns
//! [`crate::Error::CudaUnavailable`], so callers write the same code either way.

pub(crate) mod graph;
pub(crate) mod ops;
mod reference;

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // Kernel launches and uninitialised device allocations; see SAFETY comments.
mod gpu;

/// candle's device for CUDA GPU `ordinal`.
///
/// # Errors
/// [`Error::CudaUnavailable`](crate::Error::CudaUnavailable) without the `cuda` feature;
/// [`Error::Cuda`](crate::Error::Cuda) when the device cannot be opened (no such GPU, no
/// driver).
pub(crate) fn open(ordinal: usize) -> crate::Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        candle_core::Device::new_cuda(ordinal).map_err(|e| crate::Error::Cuda {
            ordinal,
            reason: e.to_string(),
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::Error::CudaUnavailable { ordinal })
    }
}

pub mod cuda_kernels {
    //! Keel's CUDA kernels and their CPU references, on host slices.
    //!
    //! Each kernel has a reference function here ([`rms_norm_residual`], [`rope`],
    //! [`kv_write`], [`paged_attention`], [`sample`]) that states its exact semantics and
    //! runs on the CPU, and a method of the same name on [`KernelDevice`] that runs the same
    //! operation on a device: the CUDA kernel on a GPU (with the `cuda` feature), the
    //! reference on the CPU. The engine uses the same kernels on tensors it keeps on the
    //! device; this host-side API exists to test them (`gpu_check`) and to document them.
    //!
    //! Values are passed as `f32`; with [`Dtype::Bf16`] they are rounded to bf16 on entry and
    //! every output is bf16-rounded, as the bf16 kernels load and store them.
    //!
    //! ```
    //! use keel_serving::cuda_kernels::{self, Dtype, KernelDevice};
    //! # fn main() -> Result<(), keel_serving::Error> {
    //! let x = [1.0, 2.0, 3.0, 4.0];
    //! let delta = [0.5; 4];
    //! let weight = [1.0; 4];
    //! let (sum, normed) = cuda_kernels::rms_norm_residual(Dtype::F32, &x, &delta, &weight, 1e-6)?;
    //! assert_eq!(sum, [1.5, 2.5, 3.5, 4.5]);
    //! // The same kernel through a device: the CPU runs the reference, a GPU the CUDA kernel.
    //! let device = KernelDevice::cpu();
    //! assert_eq!(device.rms_norm_residual(Dtype::F32, &x, &delta, &weight, 1e-6)?.1, normed);
    //! // Without the `cuda` feature (or without a GPU) asking for one is a typed error.
    //! # #[cfg(not(feature = "cuda"))]
    //! assert!(matches!(KernelDevice::cuda(0), Err(keel_serving::Error::CudaUnavailable { .. })));
    //! # Ok(())
    //! # }
    //! ```
    pub use super::device::KernelDevice;
    pub use super::reference::{
        AttentionShape, BlockTables, Dtype, MAX_HEAD_DIM, RopeStyle, Rounding, SampleParams,
        kv_write, paged_attention, rms_norm_residual, rope, sample,
    };
}

mod device {
    //! [`KernelDevice`]: the kernels on host slices, on the CPU or a CUDA GPU.

    use candle_core::{DType, Device, Tensor};

    use super::ops::{self, backend_error, download, upload};
    use super::reference::{
        AttentionShape, BlockTables, Dtype, RopeStyle, Rounding, SampleParams, check_kv_write,
        check_rms_norm, check_rope,
    };
    #[cfg(doc)]
    use crate::error::Error;
    use crate::error::Result;

    /// Where [`KernelDevice`]'s methods run: the CPU (the reference implementations, through
    /// the same candle ops the engine uses) or a CUDA GPU (the kernels).
    ///
    /// Every method uploads its inputs, runs one kernel, waits for it and downloads the
    /// result. Out-of-place outputs are filled with NaN (token ids with `u32::MAX`) before
    /// the kernel runs, so an element a kernel fails to write shows up in a comparison.
    #[derive(Debug, Clone)]
    pub struct KernelDevice {
        device: Device,
    }

    impl KernelDevice {
        /// The CPU.
        pub fn cpu() -> Self {
            Self {
                device: Device::Cpu,
            }
        }

        /// CUDA GPU `ordinal`.
        ///
        /// # Errors
        /// [`Error::CudaUnavailable`] when the crate was built without the `cuda` feature;
        /// [`Error::Cuda`] when the device cannot be opened (no such GPU, no driver).
        pub fn cuda(ordinal: usize) -> Result<Self> {
            Ok(Self {
                device: super::open(ordinal)?,
            })
        }

        /// Whether this is a GPU.
        pub fn is_cuda(&self) -> bool {
            self.device.is_cuda()
        }

        /// Waits for all work queued on the device.
        ///
        /// # Errors
        /// [`Error::Cuda`] when the device reports a failure.
        pub fn synchronize(&self) -> Result<()> {
            self.device
                .synchronize()
                .map_err(|e| backend_error(e, &self.device))
        }

        fn up(&self, v: &[f32], shape: &[usize], dtype: Dtype) -> Result<Tensor> {
            upload(v, shape, dtype, &self.device)
        }

        /// [`rms_norm_residual`](super::reference::rms_norm_residual) on this device.
        ///
        /// # Errors
        /// As the reference; [`Error::Cuda`] or [`Error::DeviceOutOfMemory`] from the GPU.
        pub fn rms_norm_residual(
            &self,
            dtype: Dtype,
            x: &[f32],
            delta: &[f32],
            weight: &[f32],
            eps: f32,
        ) -> Result<(Vec<f32>, Vec<f32>)> {
            check_rms_norm(x.len(), delta.len(), weight.len(), eps)?;
            let rows = x.len() / weight.len();
            let shape = [rows, weight.len()];
            let both = ops::poisoned::rms_norm_residual(
                &self.up(x, &shape, dtype)?,
                &self.up(delta, &shape, dtype)?,
                &self.up(weight, &[weight.len()], dtype)?,
                eps,
            )?;
            let mut sum = download(&both)?;
            let normed = sum.split_off(x.len());
            Ok((sum, normed))
        }

        /// [`rope`](super::reference::rope) on this device.
        ///
        /// # Errors
        /// As the reference; [`Error::Cuda`] or [`Error::DeviceOutOfMemory`] from the GPU.
        #[allow(clippy::too_many_arguments)] // Mirrors the reference function.
        pub fn rope(
            &self,
            dtype: Dtype,
            x: &mut [f32],
            heads: usize,
            head_dim: usize,
            positions: &[u32],
            cos: &[f32],
            sin: &[f32],
            style: RopeStyle,
            rounding: Rounding,
        ) -> Result<()> {
            check_rope(x.len(), heads, head_dim, positions, cos.len(), sin.len())?;
            let t = self.up(x, &[positions.len(), heads, head_dim], dtype)?;
            let table = [cos.len() / (head_dim / 2), head_dim / 2];
            let cos = self.up(cos, &table, Dtype::F32)?;
            let sin = self.up(sin, &table, Dtype::F32)?;
            // Positions go up once, as the engine passes them (one device copy for every layer).
            let positions = ops::Indices::upload(positions, &self.device)?;
            ops::rope_inplace(&t, &positions, &cos, &sin, style, rounding)?;
            x.copy_from_slice(&download(&t)?);
            Ok(())
        }

        /// [`kv_write`](super::reference::kv_write) on this device.
        ///
        /// # Errors
        /// As the reference; [`Error::Cuda`] or [`Error::DeviceOutOfMemory`] from the GPU.
        pub fn kv_write(
            &self,
            dtype: Dtype,
            cache: &mut [f32],
            dim: usize,
            src: &[f32],
            slots: &[u32],
            rounding: Rounding,
        ) -> Result<()> {
            check_kv_write(cache.len(), dim, src.len(), slots)?;
            let c = self.up(cache, &[cache.len() / dim, dim], dtype)?;
            let s = self.up(src, &[slots.len(), dim], dtype)?;
            ops::kv_write(
                &c,
                &s,
                &ops::Indices::upload(slots, &self.device)?,
                rounding,
            )?;
            cache.copy_from_slice(&download(&c)?);
            Ok(())
        }

        /// [`paged_attention`](super::reference::paged_attention) on this device.
        ///
        /// # Errors
        /// As the reference; on a GPU also [`Error::KernelInput`] when the longest context
        /// does not fit the kernel's shared memory (about 12,000 positions at head size 64),
        /// and [`Error::Cuda`] or [`Error::DeviceOutOfMemory`].
        pub fn paged_attention(
            &self,
            dtype: Dtype,
            shape: &AttentionShape,
            q: &[f32],
            k_cache: &[f32],
            v_cache: &[f32],
            tables: &BlockTables,
        ) -> Result<Vec<f32>> {
            super::reference::check_paged_attention(
                shape,
                q.len(),
                k_cache.len(),
                v_cache.len(),
                tables,
            )?;
            let rows = k_cache.len() / shape.kv_dim();
            let q = self.up(q, &[tables.len(), shape.heads(), shape.head_dim()], dtype)?;
            let k = self.up(k_cache, &[rows, shape.kv_dim()], dtype)?;
            let v = self.up(v_cache, &[rows, shape.kv_dim()], dtype)?;
            // The tables go up once, as the engine passes them.
            let dt = ops::DeviceTables::upload(tables, &self.device)?;
            download(&ops::poisoned::paged_attention(
                &q,
                &k,
                &v,
                shape,
                tables,
                dt.as_ref(),
            )?)
        }

        /// [`sample`](super::reference::sample) on this device; only the ids come back.
        ///
        /// # Errors
        /// As the reference; [`Error::Cuda`] or [`Error::DeviceOutOfMemory`] from the GPU.
        pub fn sample(
            &self,
            dtype: Dtype,
            logits: &[f32],
            vocab: usize,
            params: &[SampleParams],
        ) -> Result<Vec<u32>> {
            super::reference::check_sample(logits.len(), vocab, params.len())?;
            let l = self.up(logits, &[params.len(), vocab], dtype)?;
            ops::poisoned::sample(&l, params)
        }

        /// Measures device memory bandwidth: copies a buffer of `bytes` `iters` times and
        /// returns bytes moved (read plus write) per second. For the bandwidth floor that
        /// `gpu_check` sets decode speed against.
        ///
        /// # Errors
        /// [`Error::Cuda`] or [`Error::DeviceOutOfMemory`] from the device.
        pub fn copy_bandwidth(&self, bytes: usize, iters: usize) -> Result<f64> {
            let n = (bytes / 4).max(1);
            let err = |e| backend_error(e, &self.device);
            let src = Tensor::zeros(n, DType::F32, &self.device).map_err(err)?;
            let mut keep = Vec::with_capacity(iters.max(1));
            self.synchronize()?;
            let start = std::time::Instant::now();
            for _ in 0..iters.max(1) {
                keep.push(src.copy().map_err(err)?);
            }
            self.synchronize()?;
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            drop(keep);
            Ok((2 * n * 4 * iters.max(1)) as f64 / secs)
        }
    }

    impl Default for KernelDevice {
        fn default() -> Self {
            Self::cpu()
        }
    }
}
