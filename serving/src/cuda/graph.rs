//! Captured decode steps: a batch of sequences that each decode one token runs as one CUDA
//! graph launch instead of several hundred kernel launches.
//!
//! A graph replays the kernels and the device addresses it was captured with, so everything a
//! step changes lives in fixed device buffers that the step refills before the launch: the
//! token ids, positions, cache slots, block tables and context lengths. The block tables are
//! padded to a width bucket (a power of two of blocks), and the attention launch sizes its
//! shared memory for the bucket's whole capacity, so one graph serves every step whose batch
//! has the same number of sequences and fits the bucket.
//!
//! The first step of a shape runs eagerly (its result is the step's result) with candle's
//! host-to-device cache on, which stores the small parameter uploads candle's own kernels make;
//! then the same work is captured with nothing executed. A failed capture leaves the stream out
//! of capture mode, turns graphs off for the model and says why ([`DecodeGraphs::disabled`]);
//! the engine goes on eagerly. On the CPU (tests) there is no capture: a "replay" runs the
//! step again over the same fixed buffers, which checks that the buffers carry everything.

use candle_core::{DType, Device, Tensor};

use super::ops::{self, DeviceTables, Indices};
use super::reference::BlockTables;
use crate::error::{Error, Result};

/// Graphs kept per model; the least recently used goes when a new shape needs room.
const CAPACITY: usize = 16;

/// What one captured graph serves: the batch size, the padded table width, and the cache it
/// writes into (by the identity of layer 0's key tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GraphKey {
    pub(crate) sequences: usize,
    pub(crate) width: usize,
    pub(crate) cache: candle_core::TensorId,
}

/// A step's input token ids: host values, or a contiguous u32 tensor on the model's device that
/// an earlier step's sampler wrote (pipelined decode), which is never read back to feed it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StepIds<'a> {
    Host(&'a [u32]),
    Device(&'a Tensor),
}

impl StepIds<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Host(ids) => ids.len(),
            Self::Device(ids) => ids.elem_count(),
        }
    }
}

/// One decode step's inputs: a token per sequence with its position and cache slot, and the
/// sequences' block tables with their context lengths. Everything but the token ids is on the
/// host.
#[derive(Debug)]
pub(crate) struct DecodeInputs<'a> {
    pub(crate) tokens: StepIds<'a>,
    pub(crate) positions: &'a [u32],
    pub(crate) slots: &'a [u32],
    pub(crate) tables: &'a [(Vec<u32>, usize)],
    pub(crate) block_size: usize,
}

/// The fixed buffers a captured step reads, as the forward pass takes them.
#[derive(Debug)]
pub(crate) struct StepBuffers {
    pub(crate) ids: Tensor,
    pub(crate) positions: Indices,
    pub(crate) slots: Indices,
    pub(crate) tables: BlockTables,
    pub(crate) on_device: DeviceTables,
}

struct Entry {
    key: GraphKey,
    ids: Tensor,
    positions: Tensor,
    slots: Tensor,
    flat: Tensor,
    lens: Tensor,
    /// The captured launch and the logits tensor it writes (a GPU); `None` on the CPU.
    #[cfg(feature = "cuda")]
    graph: Option<(super::gpu::Graph, Tensor)>,
    /// The step clock when this shape last ran (least recently used goes first).
    used: u64,
    /// Whether this shape has run before (its first run counts as the capture).
    ran: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("key", &self.key).finish()
    }
}

/// Counters of the graph cache, for tests and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GraphStats {
    /// Shapes captured (or, on the CPU, set up).
    pub(crate) captures: u64,
    /// Steps served by an existing graph.
    pub(crate) replays: u64,
}

/// The captured decode steps of one model on one device.
#[derive(Debug, Default)]
pub(crate) struct DecodeGraphs {
    entries: Vec<Entry>,
    clock: u64,
    stats: GraphStats,
    disabled: Option<String>,
}

/// The table width bucket for `blocks` blocks: the next power of two (at least 1).
pub(crate) fn width_bucket(blocks: usize) -> usize {
    blocks.max(1).next_power_of_two()
}

impl DecodeGraphs {
    /// Why graphs were turned off, if a capture failed.
    pub(crate) fn disabled(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    pub(crate) fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Runs one decode step through the graph for its shape, capturing it first if needed.
    /// `run` is the model's forward pass over a step's buffers, returning `[sequences, vocab]`
    /// logits; it must read nothing that changes between steps except through the buffers.
    /// Returns `None` when graphs are off (the caller runs the step eagerly).
    ///
    /// # Errors
    /// The forward pass's errors, and [`Error::Cuda`] from a failed copy or launch. A failed
    /// capture is not an error: the step's eager result comes back and graphs turn off.
    pub(crate) fn step(
        &mut self,
        device: &Device,
        key: GraphKey,
        inputs: &DecodeInputs<'_>,
        run: &dyn Fn(&StepBuffers) -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        if self.disabled.is_some() {
            return Ok(None);
        }
        let n = key.sequences;
        if inputs.tokens.len() != n
            || inputs.positions.len() != n
            || inputs.slots.len() != n
            || inputs.tables.len() != n
        {
            return Err(Error::Execution {
                reason: format!(
                    "a decode graph of {n} sequences got {} tokens, {} positions, {} slots and {} tables",
                    inputs.tokens.len(),
                    inputs.positions.len(),
                    inputs.slots.len(),
                    inputs.tables.len()
                ),
            });
        }
        let refs: Vec<(&[u32], usize)> = inputs
            .tables
            .iter()
            .map(|(t, len)| (t.as_slice(), *len))
            .collect();
        let tables = BlockTables::with_width(&refs, inputs.block_size, key.width)?;
        self.clock += 1;
        let at = match self.entries.iter().position(|e| e.key == key) {
            Some(at) => at,
            None => {
                if self.entries.len() >= CAPACITY {
                    let oldest = (0..self.entries.len())
                        .min_by_key(|&i| self.entries[i].used)
                        .unwrap_or(0);
                    self.entries.swap_remove(oldest);
                }
                self.entries.push(Entry::new(device, key)?);
                self.entries.len() - 1
            }
        };
        let entry = &mut self.entries[at];
        entry.used = self.clock;
        entry.fill(inputs, &tables)?;
        let buffers = entry.buffers(inputs, tables)?;
        #[cfg(feature = "cuda")]
        if let Some((graph, logits)) = &entry.graph {
            graph.0.launch().map_err(|e| Error::Cuda {
                ordinal: ordinal(device),
                reason: format!("launching a captured decode step: {e}"),
            })?;
            self.stats.replays += 1;
            // The graph's output is rewritten by its next launch: hand out a copy.
            return logits
                .copy()
                .map(Some)
                .map_err(|e| ops::backend_error(e, device));
        }
        if !device.is_cuda() {
            // No capture on the CPU: run the step again over the same fixed buffers.
            if entry.ran {
                self.stats.replays += 1;
            } else {
                self.stats.captures += 1;
            }
            entry.ran = true;
            return run(&buffers).map(Some);
        }
        #[cfg(feature = "cuda")]
        {
            let warm = {
                // candle's cache of small host-to-device parameter uploads: on while a step is
                // warmed up and captured, since an upload during capture must hit it (a fresh
                // one cannot be replayed).
                let _cache = match device {
                    Device::Cuda(d) => Some(d.enable_cuda_graph_htod_cache()),
                    _ => None,
                };
                let warm = run(&buffers)?;
                device
                    .synchronize()
                    .map_err(|e| ops::backend_error(e, device))?;
                warm
            };
            match capture(device, &buffers, run) {
                Ok(captured) => {
                    entry.graph = Some(captured);
                    entry.ran = true;
                    self.stats.captures += 1;
                }
                Err(why) => {
                    self.disabled = Some(why);
                    self.entries.clear();
                }
            }
            Ok(Some(warm))
        }
        #[cfg(not(feature = "cuda"))]
        Ok(None)
    }
}

impl Entry {
    fn new(device: &Device, key: GraphKey) -> Result<Self> {
        let n = key.sequences;
        let zeros = |len: usize| {
            Tensor::zeros(len.max(1), DType::U32, device).map_err(|e| ops::backend_error(e, device))
        };
        Ok(Self {
            key,
            ids: zeros(n)?,
            positions: zeros(n)?,
            slots: zeros(n)?,
            flat: zeros(n * key.width)?,
            lens: zeros(n)?,
            #[cfg(feature = "cuda")]
            graph: None,
            used: 0,
            ran: false,
        })
    }

    /// Copies a step's inputs into the fixed buffers (queued after every earlier launch): the
    /// host's values with one host-to-device copy each, and ids already on the device with a
    /// device-to-device copy, so a pipelined step never reads them back.
    fn fill(&self, inputs: &DecodeInputs<'_>, tables: &BlockTables) -> Result<()> {
        match inputs.tokens {
            StepIds::Host(ids) => ops::write_u32(&self.ids, ids)?,
            StepIds::Device(ids) => ops::copy_u32(&self.ids, ids)?,
        }
        ops::write_u32(&self.positions, inputs.positions)?;
        ops::write_u32(&self.slots, inputs.slots)?;
        ops::write_u32(&self.flat, tables.flat())?;
        ops::write_u32(&self.lens, tables.context_lens())
    }

    fn buffers(&self, inputs: &DecodeInputs<'_>, tables: BlockTables) -> Result<StepBuffers> {
        let n = self.key.sequences;
        let ids = self
            .ids
            .narrow(0, 0, n)
            .map_err(|e| ops::backend_error(e, self.ids.device()))?;
        Ok(StepBuffers {
            ids,
            positions: Indices::on_device(inputs.positions, &self.positions)?,
            slots: Indices::on_device(inputs.slots, &self.slots)?,
            on_device: DeviceTables {
                flat: self.flat.clone(),
                lens: self.lens.clone(),
                capacity: self.key.width * inputs.block_size,
            },
            tables,
        })
    }
}

#[cfg(feature = "cuda")]
fn ordinal(device: &Device) -> usize {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}

/// Captures `run` over `buffers` on the device's stream: nothing executes; the result is the
/// instantiated graph and the logits tensor its launches write. Every failure ends the
/// capture before returning, so the stream is usable again.
#[cfg(feature = "cuda")]
fn capture(
    device: &Device,
    buffers: &StepBuffers,
    run: &dyn Fn(&StepBuffers) -> Result<Tensor>,
) -> std::result::Result<(super::gpu::Graph, Tensor), String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return Err("graphs need a CUDA device".into());
    };
    let stream = cuda.cuda_stream();
    let _cache = cuda.enable_cuda_graph_htod_cache();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| format!("beginning a capture: {e}"))?;
    let result = run(buffers);
    // End the capture whatever happened, so the stream leaves capture mode.
    let graph = stream.end_capture(
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    let logits = result.map_err(|e| format!("the decode step failed while captured: {e}"))?;
    match graph {
        Ok(Some(g)) => Ok((super::gpu::Graph(g), logits)),
        Ok(None) => Err("the capture recorded nothing".into()),
        Err(e) => Err(format!("ending the capture: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_whose_inputs_disagree_with_its_shape_is_a_typed_error() {
        let mut g = DecodeGraphs::default();
        let ids = Tensor::zeros(1, DType::U32, &Device::Cpu).unwrap();
        let key = GraphKey {
            sequences: 2,
            width: 1,
            cache: ids.id(),
        };
        let tables = vec![(vec![0u32], 1usize)];
        let inputs = DecodeInputs {
            tokens: StepIds::Host(&[1, 2]),
            positions: &[0, 0],
            slots: &[0, 4],
            tables: &tables,
            block_size: 4,
        };
        let run = |_: &StepBuffers| -> Result<Tensor> { panic!("must not run") };
        assert!(matches!(
            g.step(&Device::Cpu, key, &inputs, &run),
            Err(Error::Execution { .. })
        ));
        // A table narrower than its context needs is refused before anything runs.
        let tables = vec![(vec![0u32], 9usize), (vec![1u32], 1usize)];
        let inputs = DecodeInputs {
            tables: &tables,
            ..inputs
        };
        assert!(matches!(
            g.step(&Device::Cpu, key, &inputs, &run),
            Err(Error::KernelInput { .. })
        ));
        assert_eq!(g.stats(), GraphStats::default());
    }

    #[test]
    fn width_buckets_are_powers_of_two() {
        assert_eq!(width_bucket(0), 1);
        assert_eq!(width_bucket(1), 1);
        assert_eq!(width_bucket(3), 4);
        assert_eq!(width_bucket(8), 8);
        assert_eq!(width_bucket(9), 16);
    }
}
