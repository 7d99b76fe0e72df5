//! The one thin module that owns the wgpu surface: adapter choice, device limits and features,
//! buffers, the pipeline cache, dispatch recording, submission, read-back and GPU timing.
//! Everything above this module (ops, model) speaks in [`Gpu`], [`Kernel`], [`Dispatch`] and
//! [`wgpu::Buffer`] only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

pub use wgpu::Buffer;

mod cache;
mod tensor;
pub use cache::{PipelineCacheReport, PipelineCacheSetting, SHADER_SOURCES};
pub use tensor::{Nhwc, Tensor};
pub mod wgsl;
use wgsl::preprocess;

thread_local! {
    static CREATED_BYTES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Bytes of the storage and staging buffers ([`Gpu::storage`], [`Gpu::upload`],
/// [`Gpu::staging`]) this thread has created so far, on any device; it only grows. The
/// difference around a call is what that call allocated: memory-accounting tests compare a
/// plan's own byte count with it.
pub fn bytes_created_on_this_thread() -> u64 {
    CREATED_BYTES.with(|c| c.get())
}

fn count_created(bytes: u64) {
    CREATED_BYTES.with(|c| c.set(c.get() + bytes));
}

/// How to choose the adapter.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// An adapter index (as listed by `marrow info`) or a case-insensitive substring of its name.
    /// Falls back to the `MARROW_ADAPTER` environment variable.
    pub adapter: Option<String>,
    /// Accept an OpenGL/GLES adapter. Off by default: wgpu silently picks OpenGL on llvmpipe when
    /// no Vulkan driver is installed, which is far slower and lacks storage-buffer limits we need.
    pub allow_gl: bool,
}

/// What `marrow info` prints and what every report carries.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterReport {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub vendor: u32,
    pub device: u32,
    /// True for a CPU implementation (lavapipe / llvmpipe / WARP / SwiftShader).
    pub software: bool,
}

/// Optional capabilities the engine uses when present, with a plain path when absent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GpuCaps {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub max_storage_binding: u64,
    pub max_buffer_size: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
}

/// A WGSL kernel family: one `.wgsl` file from `shaders/` and one entry point.
/// Variants are made by prepending `const NAME: TYPE = VALUE;` lines (see [`Gpu::pipeline`]).
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
}

/// One recorded compute dispatch: a pipeline, its bind group and a grid.
#[derive(Clone)]
pub struct Dispatch {
    pub label: String,
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
}

/// (kernel name, entry point, `const` header): one compiled variant.
type PipelineKey = (&'static str, &'static str, String);

/// A kernel variant to compile ahead of use ([`Gpu::prepare_pipelines`]).
pub type Variant = (Kernel, Vec<(&'static str, ConstVal)>);

/// Where pipeline-creation time went (for `--timings`): every variant this process compiled.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PipelineStats {
    /// Distinct variants compiled (shader module + compute pipeline each).
    pub created: usize,
    /// Seconds inside shader-module and pipeline creation, summed over threads.
    pub create_secs: f64,
    /// Wall-clock seconds of [`Gpu::prepare_pipelines`] calls (parallel compilation).
    pub prepare_wall_secs: f64,
    /// Requests answered from the in-memory map (a variant asked for again).
    pub reused: usize,
    /// Per kernel family: (name, variants, seconds), most seconds first.
    pub per_kernel: Vec<(String, usize, f64)>,
    /// The on-disk cache.
    pub disk: PipelineCacheReport,
}

impl std::fmt::Display for PipelineStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pipelines: {} created in {:.3} s",
            self.created, self.create_secs
        )?;
        if self.prepare_wall_secs > 0.0 {
            write!(f, " ({:.3} s wall, in parallel)", self.prepare_wall_secs)?;
        }
        write!(f, ", {} reused", self.reused)?;
        let top: Vec<String> = self
            .per_kernel
            .iter()
            .take(4)
            .map(|(n, c, s)| format!("{n} {c} in {s:.3} s"))
            .collect();
        if !top.is_empty() {
            write!(f, " ({})", top.join(", "))?;
        }
        let d = &self.disk;
        match (&d.path, d.enabled) {
            (Some(p), true) => write!(
                f,
                "; pipeline cache {} ({} bytes loaded in {:.3} s{})",
                p.display(),
                d.loaded_bytes,
                d.load_secs,
                if d.saved_bytes > 0 {
                    format!(", {} bytes saved", d.saved_bytes)
                } else {
                    String::new()
                }
            )?,
            _ => write!(
                f,
                "; pipeline cache off ({})",
                d.off_reason.as_deref().unwrap_or("unknown")
            )?,
        }
        if let Some(w) = &d.warning {
            write!(f, "; warning: {w}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct StatsInner {
    created: usize,
    create_secs: f64,
    prepare_wall_secs: f64,
    reused: usize,
    per_kernel: HashMap<&'static str, (usize, f64)>,
}

/// The attached on-disk cache: the driver object, where it is saved, and its key.
struct DiskCache {
    cache: wgpu::PipelineCache,
    path: PathBuf,
    key: [u8; 32],
    /// SHA-256 of the driver data last loaded or saved: a save of the same data writes nothing.
    last: Mutex<Option<[u8; 32]>>,
}

pub struct Gpu {
    // Kept alive for the adapter's and device's lifetime.
    _instance: wgpu::Instance,
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub report: AdapterReport,
    pub caps: GpuCaps,
    pub limits: wgpu::Limits,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    stats: Mutex<StatsInner>,
    disk: Option<DiskCache>,
    disk_report: Mutex<PipelineCacheReport>,
    lost: Arc<AtomicBool>,
    lost_reason: Arc<Mutex<String>>,
    uncaptured: Arc<Mutex<Option<String>>>,
}

fn backend_mask(allow_gl: bool) -> wgpu::Backends {
    let from_env = wgpu::Backends::from_env();
    let mut b =
        from_env.unwrap_or(wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12);
    if allow_gl {
        b |= wgpu::Backends::GL;
    } else if from_env.is_none() {
        b.remove(wgpu::Backends::GL);
    }
    b
}

fn report_of(info: &wgpu::AdapterInfo) -> AdapterReport {
    let lname = info.name.to_lowercase();
    let software = info.device_type == wgpu::DeviceType::Cpu
        || ["llvmpipe", "lavapipe", "swiftshader", "warp", "software"]
            .iter()
            .any(|s| lname.contains(s));
    AdapterReport {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        vendor: info.vendor,
        device: info.device,
        software,
    }
}

/// Lists every adapter wgpu can see on the allowed backends (for `marrow info`).
pub fn list_adapters(allow_gl: bool) -> Vec<AdapterReport> {
    let instance = new_instance(allow_gl);
    pollster::block_on(instance.enumerate_adapters(backend_mask(allow_gl)))
        .iter()
        .map(|a| report_of(&a.get_info()))
        .collect()
}

fn new_instance(allow_gl: bool) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backend_mask(allow_gl);
    wgpu::Instance::new(desc)
}

fn rank(info: &wgpu::AdapterInfo) -> u32 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl Gpu {
    /// Opens the best adapter (discrete > integrated > virtual > CPU), or the one `opts` names,
    /// with the on-disk pipeline cache the environment asks for ([`PipelineCacheSetting::FromEnv`]).
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        Gpu::with_pipeline_cache(opts, &PipelineCacheSetting::FromEnv)
    }

    /// [`Gpu::new`] with an explicit on-disk pipeline cache setting (tests, `--no-cache`).
    pub fn with_pipeline_cache(opts: &GpuOptions, cache: &PipelineCacheSetting) -> Result<Gpu> {
        let instance = new_instance(opts.allow_gl);
        let adapters = pollster::block_on(instance.enumerate_adapters(backend_mask(opts.allow_gl)));
        let adapters: Vec<wgpu::Adapter> = adapters
            .into_iter()
            .filter(|a| opts.allow_gl || a.get_info().backend != wgpu::Backend::Gl)
            .collect();
        if adapters.is_empty() {
            return Err(Error::NoAdapter(
                "no Vulkan, Metal or DX12 adapter found. On Linux without a GPU install Mesa's \
                 software Vulkan driver (Debian: apt-get install mesa-vulkan-drivers), or pass \
                 --allow-gl to accept an OpenGL adapter"
                    .into(),
            ));
        }
        let selector = opts
            .adapter
            .clone()
            .or_else(|| std::env::var("MARROW_ADAPTER").ok())
            .filter(|s| !s.is_empty());
        let adapter = match selector {
            Some(sel) => {
                let found = if let Ok(i) = sel.parse::<usize>() {
                    adapters.into_iter().nth(i)
                } else {
                    let l = sel.to_lowercase();
                    adapters
                        .into_iter()
                        .find(|a| a.get_info().name.to_lowercase().contains(&l))
                };
                found.ok_or_else(|| {
                    Error::NoAdapter(format!(
                        "no adapter matches {sel:?}; `marrow info` lists them"
                    ))
                })?
            }
            None => {
                let mut v = adapters;
                v.sort_by_key(|a| rank(&a.get_info()));
                v.into_iter().next().expect("non-empty")
            }
        };
        let info = adapter.get_info();
        let report = report_of(&info);
        let have = adapter.features();
        let want = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::PIPELINE_CACHE;
        let features = have & want;
        // The adapter's real limits: wgpu's defaults cap storage bindings at 128 MiB and buffers at
        // 256 MiB, and full-size FPN levels and conv weights approach those.
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("marrow device"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Gpu(format!("requesting a device from {}: {e}", info.name)))?;

        let lost = Arc::new(AtomicBool::new(false));
        let lost_reason = Arc::new(Mutex::new(String::new()));
        {
            let lost = lost.clone();
            let lost_reason = lost_reason.clone();
            device.set_device_lost_callback(move |reason, msg| {
                lost.store(true, Ordering::SeqCst);
                *lost_reason.lock().unwrap_or_else(|e| e.into_inner()) =
                    format!("{reason:?}: {msg}");
            });
        }
        let uncaptured = Arc::new(Mutex::new(None));
        {
            let slot = uncaptured.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
                if s.is_none() {
                    *s = Some(e.to_string());
                }
            }));
        }
        let caps = GpuCaps {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            max_storage_binding: limits.max_storage_buffer_binding_size as u64,
            max_buffer_size: limits.max_buffer_size,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
        };
        let (disk, disk_report) = open_disk_cache(&device, &info, features, cache);
        Ok(Gpu {
            _instance: instance,
            adapter,
            device,
            queue,
            report,
            caps,
            limits,
            pipelines: Mutex::new(HashMap::new()),
            stats: Mutex::new(StatsInner::default()),
            disk,
            disk_report: Mutex::new(disk_report),
            lost,
            lost_reason,
            uncaptured,
        })
    }

    /// Device loss or an uncaptured error becomes an `Err` here; called after every wait.
    pub fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            let why = self
                .lost_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(Error::DeviceLost(why));
        }
        if let Some(e) = self
            .uncaptured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            if e.to_lowercase().contains("out of memory") {
                return Err(Error::OutOfMemory(e));
            }
            return Err(Error::Gpu(e));
        }
        Ok(())
    }

    /// A storage buffer of `bytes` bytes (rounded up to 4, at least 4), checked against the
    /// device's binding limit so that an absurd input is an error, not a wgpu panic.
    pub fn storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let size = bytes.max(4).div_ceil(4) * 4;
        if size > self.caps.max_storage_binding || size > self.caps.max_buffer_size {
            return Err(Error::TooLarge(format!(
                "{label}: {size} bytes exceeds this adapter's storage binding limit of {} bytes",
                self.caps.max_storage_binding.min(self.caps.max_buffer_size)
            )));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::OutOfMemory(format!("{label} ({size} bytes): {e}")));
        }
        count_created(size);
        Ok(buf)
    }

    /// A storage buffer initialised from `data`.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buf = self.storage(label, bytes.len() as u64)?;
        if !bytes.is_empty() {
            self.queue.write_buffer(&buf, 0, bytes);
        }
        Ok(buf)
    }

    /// A small uniform buffer holding kernel parameters (shapes are uniforms, not constants, where
    /// they change per image).
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, data: &T) -> wgpu::Buffer {
        let bytes = bytemuck::bytes_of(data);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (bytes.len() as u64).div_ceil(16) * 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buf, 0, bytes);
        buf
    }

    /// The compiled pipeline for `kernel` with `consts` prepended as WGSL `const` declarations.
    /// Cached by (kernel, entry, consts). A WGSL error is reported with the kernel's name and
    /// variant.
    pub fn pipeline(
        &self,
        kernel: &Kernel,
        consts: &[(&str, ConstVal)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let header = const_header(consts);
        let key = (kernel.name, kernel.entry, header);
        if let Some(p) = self.lock_pipelines().get(&key) {
            self.lock_stats().reused += 1;
            return Ok(p.clone());
        }
        let p = self.compile(kernel, consts, &key.2)?;
        // Another thread may have compiled the same variant meanwhile: keep the first.
        Ok(self.lock_pipelines().entry(key).or_insert(p).clone())
    }

    /// Compiles the variants not compiled yet on up to `threads` threads (pipeline creation is
    /// where a driver compiles; wgpu's device is shared across threads), so that building the
    /// first plan finds them all. Duplicates in `variants` are compiled once. Returns how many
    /// were compiled.
    pub fn prepare_pipelines(&self, variants: &[Variant], threads: usize) -> Result<usize> {
        let t = Instant::now();
        let mut todo: Vec<(&Variant, String)> = Vec::new();
        {
            let have = self.lock_pipelines();
            let mut seen = std::collections::HashSet::new();
            for v in variants {
                let header = const_header(&v.1);
                let key = (v.0.name, v.0.entry, header.clone());
                if !have.contains_key(&key) && seen.insert(key) {
                    todo.push((v, header));
                }
            }
        }
        let n = todo.len();
        if n == 0 {
            return Ok(0);
        }
        let threads = threads.clamp(1, n);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((v, header)) = todo.get(i) else {
                break;
            };
            match self.compile(&v.0, &v.1, header) {
                Ok(p) => {
                    self.lock_pipelines()
                        .entry((v.0.name, v.0.entry, header.clone()))
                        .or_insert(p);
                }
                Err(e) => {
                    first_err
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                    break;
                }
            }
        };
        if threads == 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(work);
                }
            });
        }
        self.lock_stats().prepare_wall_secs += t.elapsed().as_secs_f64();
        match first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Creates one variant's shader module and pipeline (with the on-disk cache), timed.
    fn compile(
        &self,
        kernel: &Kernel,
        consts: &[(&str, ConstVal)],
        header: &str,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let t = Instant::now();
        let label = if header.is_empty() {
            kernel.name.to_string()
        } else {
            format!("{}[{}]", kernel.name, header.replace('\n', " ").trim())
        };
        let body = preprocess(kernel.source, consts).map_err(|message| Error::Shader {
            kernel: label.clone(),
            message,
        })?;
        let source = format!("{header}{body}");
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: None,
                module: &module,
                entry_point: Some(kernel.entry),
                compilation_options: Default::default(),
                cache: self.disk.as_ref().map(|d| &d.cache),
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader {
                kernel: label,
                message: e.to_string(),
            });
        }
        let secs = t.elapsed().as_secs_f64();
        let mut st = self.lock_stats();
        st.created += 1;
        st.create_secs += secs;
        let k = st.per_kernel.entry(kernel.name).or_default();
        k.0 += 1;
        k.1 += secs;
        Ok(Arc::new(pipeline))
    }

    fn lock_pipelines(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>> {
        self.pipelines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_stats(&self) -> std::sync::MutexGuard<'_, StatsInner> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of pipelines compiled so far (the cache's size; tests check reuse).
    pub fn pipeline_count(&self) -> usize {
        self.lock_pipelines().len()
    }

    /// Pipeline-creation counts and seconds so far, per kernel family, and what happened to the
    /// on-disk cache. Its `Display` is one line for `--timings`.
    pub fn pipeline_stats(&self) -> PipelineStats {
        let st = self.lock_stats();
        let mut per_kernel: Vec<(String, usize, f64)> = st
            .per_kernel
            .iter()
            .map(|(n, (c, s))| (n.to_string(), *c, *s))
            .collect();
        per_kernel.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        PipelineStats {
            created: st.created,
            create_secs: st.create_secs,
            prepare_wall_secs: st.prepare_wall_secs,
            reused: st.reused,
            per_kernel,
            disk: self.pipeline_cache_report(),
        }
    }

    /// What happened to the on-disk pipeline cache so far.
    pub fn pipeline_cache_report(&self) -> PipelineCacheReport {
        self.disk_report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes the driver's pipeline cache to disk (atomically) if it changed since it was loaded
    /// or last saved; call it after the first image and at exit. Never fails: a cache that cannot
    /// be written costs only start-up time next run, so the problem is returned as a warning (and
    /// kept in [`Gpu::pipeline_cache_report`]). Returns the file written, if any.
    pub fn save_pipeline_cache(&self) -> std::result::Result<Option<PathBuf>, String> {
        let Some(d) = &self.disk else {
            return Ok(None);
        };
        if self.lost.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let Some(data) = d.cache.get_data() else {
            return Ok(None);
        };
        let sum = cache::sha256(&data);
        let mut last = d.last.lock().unwrap_or_else(|e| e.into_inner());
        if *last == Some(sum) || data.is_empty() {
            return Ok(None);
        }
        match cache::write_atomic(&d.path, &cache::encode(&d.key, &data)) {
            Ok(()) => {
                *last = Some(sum);
                cache::remove_stale(&d.path);
                self.disk_report
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .saved_bytes = data.len() as u64;
                Ok(Some(d.path.clone()))
            }
            Err(e) => {
                let w = format!(
                    "could not write the pipeline cache {}: {e}",
                    d.path.display()
                );
                self.disk_report
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .warning = Some(w.clone());
                Err(w)
            }
        }
    }

    /// Records one dispatch. Binding 0 is `params` when given (a uniform); the storage buffers
    /// follow at bindings 1, 2, … in the order of `buffers`, as every kernel in `shaders/` declares.
    pub fn dispatch(
        &self,
        label: impl Into<String>,
        pipeline: &Arc<wgpu::ComputePipeline>,
        params: Option<&wgpu::Buffer>,
        buffers: &[&wgpu::Buffer],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let label = label.into();
        let max = self.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::TooLarge(format!(
                "{label}: grid {workgroups:?} exceeds the adapter's {max} workgroups per dimension"
            )));
        }
        let layout = pipeline.get_bind_group_layout(0);
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        if let Some(p) = params {
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: p.as_entire_binding(),
            });
        }
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&label),
            layout: &layout,
            entries: &entries,
        });
        Ok(Dispatch {
            label,
            pipeline: pipeline.clone(),
            bind_group,
            workgroups,
        })
    }

    /// Records `dispatches` into one compute pass (wgpu inserts the storage barriers between
    /// dispatches) and submits them in one submission; waits for completion.
    pub fn run<'a>(
        &self,
        label: &str,
        dispatches: impl IntoIterator<Item = &'a Dispatch>,
    ) -> Result<()> {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes: None,
            });
            for d in dispatches {
                if d.workgroups.contains(&0) {
                    continue;
                }
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
            }
        }
        self.queue.submit([enc.finish()]);
        self.wait()
    }

    /// Blocks until all submitted work is done; device loss / errors become `Err`.
    pub fn wait(&self) -> Result<()> {
        let r = self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(Duration::from_secs(600)),
        });
        self.check()?;
        r.map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        Ok(())
    }

    /// Times each dispatch in its own pass with timestamp queries (GPU time, seconds). Falls back
    /// to wall clock around submit+wait of each dispatch when the adapter has no timestamps.
    pub fn time_dispatches(&self, dispatches: &[&Dispatch]) -> Result<Vec<f64>> {
        if !self.caps.timestamps {
            let mut out = Vec::with_capacity(dispatches.len());
            for d in dispatches {
                let t = std::time::Instant::now();
                self.run(&d.label, [*d])?;
                out.push(t.elapsed().as_secs_f64());
            }
            return Ok(out);
        }
        let n = dispatches.len() as u32 * 2;
        let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("marrow timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: n.max(2),
        });
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("marrow timestamp resolve"),
            size: n.max(2) as u64 * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("marrow timed dispatches"),
            });
        for (i, d) in dispatches.iter().enumerate() {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&d.label),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &qs,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            if !d.workgroups.contains(&0) {
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
            }
        }
        enc.resolve_query_set(&qs, 0..n, &resolve, 0);
        self.queue.submit([enc.finish()]);
        let raw: Vec<u64> = self.read_back_pod(&resolve, n as usize)?;
        let period = self.queue.get_timestamp_period() as f64 * 1e-9;
        Ok(raw
            .chunks(2)
            .map(|c| c[1].saturating_sub(c[0]) as f64 * period)
            .collect())
    }

    /// Copies `count` f32 values from the start of `buf` to the host.
    pub fn read_back(&self, buf: &wgpu::Buffer, count: usize) -> Result<Vec<f32>> {
        self.read_back_pod(buf, count)
    }

    /// Reads several buffers back with one copy submission and one map: the single read-back at
    /// the end of an image. `parts` are (buffer, bytes from its start).
    pub fn read_back_many(&self, parts: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>> {
        let total: u64 = parts.iter().map(|(_, b)| b.div_ceil(4) * 4).sum();
        let staging = self.staging("marrow read-back staging (batched)", total);
        self.read_back_via(&staging, parts)
    }

    /// A mappable buffer of at least `bytes` for [`Gpu::read_back_via`]; a plan keeps one so the
    /// per-image read-back allocates nothing.
    pub fn staging(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        let size = bytes.max(4).div_ceil(4) * 4;
        count_created(size);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// [`Gpu::read_back_many`] through a caller-owned staging buffer.
    pub fn read_back_via(
        &self,
        staging: &wgpu::Buffer,
        parts: &[(&wgpu::Buffer, u64)],
    ) -> Result<Vec<Vec<u8>>> {
        let sizes: Vec<u64> = parts.iter().map(|(_, b)| b.div_ceil(4) * 4).collect();
        let total: u64 = sizes.iter().sum();
        if total > staging.size() {
            return Err(Error::Gpu(format!(
                "read-back of {total} bytes into a {}-byte staging buffer",
                staging.size()
            )));
        }
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("marrow read-back (batched)"),
            });
        let mut off = 0;
        for ((buf, _), sz) in parts.iter().zip(&sizes) {
            if *sz > 0 {
                enc.copy_buffer_to_buffer(buf, 0, staging, off, Some(*sz));
            }
            off += sz;
        }
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("read-back callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("mapping the read-back buffer: {e}")))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("mapping the read-back buffer: {e}")))?;
        let mut out = Vec::with_capacity(parts.len());
        let mut off = 0usize;
        for ((_, bytes), sz) in parts.iter().zip(&sizes) {
            out.push(view[off..off + *bytes as usize].to_vec());
            off += *sz as usize;
        }
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Copies `count` plain values of type `T` from the start of `buf` to the host.
    pub fn read_back_pod<T: bytemuck::Pod>(
        &self,
        buf: &wgpu::Buffer,
        count: usize,
    ) -> Result<Vec<T>> {
        let bytes = (count * std::mem::size_of::<T>()) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let mut parts = self.read_back_many(&[(buf, bytes)])?;
        Ok(bytemuck::pod_collect_to_vec(
            &parts.pop().unwrap_or_default(),
        ))
    }
}

/// The `const` declarations that make a variant (also its cache key).
fn const_header(consts: &[(&str, ConstVal)]) -> String {
    let mut header = String::new();
    for (k, v) in consts {
        header.push_str(&format!("const {k}: {} = {};\n", v.ty(), v.lit()));
    }
    header
}

/// Opens the on-disk pipeline cache for this device, if the setting, the backend and the
/// device's features allow one. A missing file is a first run; an unusable one is a warning.
fn open_disk_cache(
    device: &wgpu::Device,
    info: &wgpu::AdapterInfo,
    features: wgpu::Features,
    setting: &PipelineCacheSetting,
) -> (Option<DiskCache>, PipelineCacheReport) {
    let mut report = PipelineCacheReport::default();
    let dir = match setting.resolve() {
        Ok(d) => d,
        Err(why) => {
            report.off_reason = Some(why);
            return (None, report);
        }
    };
    if !features.contains(wgpu::Features::PIPELINE_CACHE) {
        report.off_reason = Some(format!("{:?} backend has no pipeline cache", info.backend));
        return (None, report);
    }
    let key = cache::cache_key(info);
    let Some(path) = cache::cache_file(&dir, info, &key) else {
        report.off_reason = Some(format!(
            "wgpu keeps no pipeline cache for the {:?} backend",
            info.backend
        ));
        return (None, report);
    };
    report.path = Some(path.clone());
    let t = Instant::now();
    let bytes = match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            report.warning = Some(format!(
                "ignoring the pipeline cache {}: {e}",
                path.display()
            ));
            None
        }
    };
    let payload = match &bytes {
        Some(b) => match cache::decode(&key, b) {
            Ok(p) => Some(p),
            Err(why) => {
                report.warning = Some(format!(
                    "ignoring the pipeline cache {}: {why}; it will be rebuilt",
                    path.display()
                ));
                None
            }
        },
        None => None,
    };
    let create = |data: Option<&[u8]>| {
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        // SAFETY: `data` is what `PipelineCache::get_data` returned for an adapter with the same
        // wgpu cache key (the file name) and the same driver (the envelope's key), checked for
        // integrity by its SHA-256; wgpu validates its own header and falls back on a mismatch.
        let c = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("marrow pipeline cache"),
                data,
                fallback: true,
            })
        };
        (c, pollster::block_on(scope.pop()))
    };
    let mut last = None;
    let cache = match payload {
        Some(p) => match create(Some(p)) {
            (c, None) => {
                report.loaded_bytes = p.len() as u64;
                last = Some(cache::sha256(p));
                c
            }
            (_, Some(e)) => {
                let e = e
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                report.warning = Some(format!(
                    "ignoring the pipeline cache {}: wgpu rejected it ({e}); it will be rebuilt",
                    path.display()
                ));
                match create(None) {
                    (c, None) => c,
                    (_, Some(e)) => {
                        report.off_reason = Some(format!("creating a pipeline cache failed: {e}"));
                        return (None, report);
                    }
                }
            }
        },
        None => match create(None) {
            (c, None) => c,
            (_, Some(e)) => {
                report.off_reason = Some(format!("creating a pipeline cache failed: {e}"));
                return (None, report);
            }
        },
    };
    report.load_secs = t.elapsed().as_secs_f64();
    report.enabled = true;
    if let Some(w) = &report.warning {
        eprintln!("warning: {w}");
    }
    (
        Some(DiskCache {
            cache,
            path,
            key,
            last: Mutex::new(last),
        }),
        report,
    )
}

/// A value for a WGSL `const` declaration in a kernel variant.
#[derive(Debug, Clone, Copy)]
pub enum ConstVal {
    U32(u32),
    I32(i32),
    Bool(bool),
    F32(f32),
}

impl ConstVal {
    fn ty(&self) -> &'static str {
        match self {
            ConstVal::U32(_) => "u32",
            ConstVal::I32(_) => "i32",
            ConstVal::Bool(_) => "bool",
            ConstVal::F32(_) => "f32",
        }
    }
    fn lit(&self) -> String {
        match self {
            ConstVal::U32(v) => format!("{v}u"),
            ConstVal::I32(v) => format!("{v}i"),
            ConstVal::Bool(v) => format!("{v}"),
            // Rust prints the shortest decimal that round-trips to the same f32, and WGSL rounds
            // an f32 literal correctly, so the constant is bit-exact. (naga does not accept
            // bitcast in const expressions.)
            ConstVal::F32(v) => format!("{v:?}f"),
        }
    }
}
