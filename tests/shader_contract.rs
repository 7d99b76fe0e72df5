//! The Rust↔WGSL contract of every kernel variant the ops compile, checked without a GPU (but for
//! the last test, which uses the adapter to build the fixture model).
//!
//! The variants come from the ops themselves ([`all_variants`]: each op module's `variants()`).
//! Each is composed exactly as the runtime composes it ([`wgsl::compose`]: the const header, the
//! `#if` preprocessor, the `#include`s), parsed and validated by naga (the compiler inside wgpu),
//! and then:
//!
//! - (a) bindings: every resource the entry point uses at `@group(0) @binding(i)` is what the op
//!   binds there (its `KernelIo`): the params uniform at 0, the storage buffers at 1, 2, … in
//!   order, with the same WGSL name and access (`read` / `read_write`); the op binds nothing the
//!   entry point does not use (an auto layout drops such a binding, and binding it fails);
//! - (b) params: the uniform's WGSL struct equals the Rust params struct (`params_struct!`): the
//!   same name and size, and every field's name, offset, size and type, in order;
//! - (c) portability: the variant translates to SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12) with
//!   the options wgpu's backends use, so a Metal or DX12 user never meets a translation failure
//!   that lavapipe could not show.
//!
//! Also: every `.wgsl` file and every `@compute` entry point in `shaders/` is covered by some
//! variant; the checker itself fails on a swapped binding, a reordered params field and a wrong
//! access (so a passing run means something); and the conv and pool variants the ops list include
//! every one the model builder really compiles for the fixture model.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use marrow::gpu::wgsl;
use marrow::ops::contract::{
    all_variants, Access, Binding, FieldLayout, HostTy, KernelIo, KernelVariant, Scalar,
    StructLayout,
};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};

/// A variant compiled by naga.
struct Compiled {
    source: String,
    module: naga::Module,
    info: ModuleInfo,
    entry: usize,
}

/// A resource the entry point uses.
struct Used {
    group: u32,
    binding: u32,
    name: String,
    access: Access,
    ty: naga::Handle<naga::Type>,
    /// The WGSL name of its type (the params struct's name for the uniform).
    ty_name: String,
}

fn label(v: &KernelVariant) -> String {
    let consts: Vec<String> = v.consts.iter().map(|(k, c)| format!("{k}={c:?}")).collect();
    format!(
        "{} `{}` [{}]",
        v.io.kernel.name,
        v.io.kernel.entry,
        consts.join(" ")
    )
}

fn compile(v: &KernelVariant) -> Result<Compiled, String> {
    let source =
        wgsl::compose(v.io.kernel.source, &v.consts).map_err(|e| format!("preprocessor: {e}"))?;
    let module = naga::front::wgsl::parse_str(&source)
        .map_err(|e| format!("WGSL parse error:\n{}", e.emit_to_string(&source)))?;
    // No optional capabilities: the ops request no device features for these kernels.
    let info = Validator::new(ValidationFlags::all(), Capabilities::default())
        .validate(&module)
        .map_err(|e| format!("naga validation error:\n{}", e.emit_to_string(&source)))?;
    let entry = module
        .entry_points
        .iter()
        .position(|e| e.name == v.io.kernel.entry)
        .ok_or_else(|| {
            let have: Vec<&str> = module
                .entry_points
                .iter()
                .map(|e| e.name.as_str())
                .collect();
            format!(
                "no entry point `{}` in this variant (it has {have:?})",
                v.io.kernel.entry
            )
        })?;
    if module.entry_points[entry].stage != naga::ShaderStage::Compute {
        return Err(format!(
            "entry point `{}` is not a compute shader",
            v.io.kernel.entry
        ));
    }
    Ok(Compiled {
        source,
        module,
        info,
        entry,
    })
}

/// The resources the entry point uses (what wgpu's auto layout contains), by naga's analysis.
fn used_resources(c: &Compiled) -> Result<Vec<Used>, String> {
    let fi = c.info.get_entry_point(c.entry);
    let mut out = Vec::new();
    for (h, var) in c.module.global_variables.iter() {
        let Some(rb) = &var.binding else { continue };
        if fi[h].is_empty() {
            continue;
        }
        let name = var.name.clone().unwrap_or_default();
        let access = match var.space {
            naga::AddressSpace::Uniform => Access::Uniform,
            naga::AddressSpace::Storage { access } => {
                if access.contains(naga::StorageAccess::STORE) {
                    Access::ReadWrite
                } else {
                    Access::Read
                }
            }
            other => {
                return Err(format!(
                    "`{name}` at @group({}) @binding({}) is a {other:?} resource; the ops bind \
                     only a uniform and storage buffers",
                    rb.group, rb.binding
                ))
            }
        };
        out.push(Used {
            group: rb.group,
            binding: rb.binding,
            name,
            access,
            ty: var.ty,
            ty_name: c.module.types[var.ty].name.clone().unwrap_or_default(),
        });
    }
    Ok(out)
}

fn access_str(a: Access) -> &'static str {
    match a {
        Access::Uniform => "uniform",
        Access::Read => "storage, read",
        Access::ReadWrite => "storage, read_write",
    }
}

/// (a): the op's bindings against the resources the entry point uses.
fn check_bindings(v: &KernelVariant, used: &[Used]) -> Vec<String> {
    let mut errs = Vec::new();
    let mut want: BTreeMap<u32, (String, Access)> = BTreeMap::new();
    if let Some(p) = &v.io.params {
        want.insert(0, (format!("params {}", p.name), Access::Uniform));
    }
    match v.io.storage_for(&v.consts) {
        Ok(storage) => {
            for (i, b) in storage.iter().enumerate() {
                want.insert(i as u32 + 1, (b.name.to_string(), b.access));
            }
        }
        Err(e) => errs.push(e.to_string()),
    }
    let mut have: BTreeMap<u32, (String, Access)> = BTreeMap::new();
    for u in used {
        if u.group != 0 {
            errs.push(format!(
                "`{}` is in @group({}); the ops bind group 0 only",
                u.name, u.group
            ));
            continue;
        }
        let name = if u.access == Access::Uniform {
            format!("params {}", u.ty_name)
        } else {
            u.name.clone()
        };
        have.insert(u.binding, (name, u.access));
    }
    let keys: BTreeSet<u32> = want.keys().chain(have.keys()).copied().collect();
    for i in keys {
        match (want.get(&i), have.get(&i)) {
            (Some((wn, wa)), Some((hn, ha))) => {
                let name_ok = if *wa == Access::Uniform {
                    true // the struct itself is compared field by field in check_params
                } else {
                    wn == hn
                };
                if !name_ok || wa != ha {
                    errs.push(format!(
                        "@binding({i}): the shader has `var<{}> {hn}`, the op binds `{wn}` as \
                         <{}>",
                        access_str(*ha),
                        access_str(*wa)
                    ));
                }
            }
            (None, Some((hn, ha))) => errs.push(format!(
                "@binding({i}): the shader uses `var<{}> {hn}`, the op binds nothing there",
                access_str(*ha)
            )),
            (Some((wn, wa)), None) => errs.push(format!(
                "@binding({i}): the op binds `{wn}` as <{}>, the entry point uses no resource \
                 there (an auto layout drops it, and binding it fails)",
                access_str(*wa)
            )),
            (None, None) => {}
        }
    }
    errs
}

/// A WGSL type of a uniform struct member as (scalar, array dims), with the array strides the Rust
/// side implies checked.
fn wgsl_host_ty(module: &naga::Module, ty: naga::Handle<naga::Type>) -> Result<HostTy, String> {
    let scalar = |s: naga::Scalar| -> Result<Scalar, String> {
        match (s.kind, s.width) {
            (naga::ScalarKind::Uint, 4) => Ok(Scalar::U32),
            (naga::ScalarKind::Sint, 4) => Ok(Scalar::I32),
            (naga::ScalarKind::Float, 4) => Ok(Scalar::F32),
            _ => Err(format!("unsupported scalar {s:?}")),
        }
    };
    match &module.types[ty].inner {
        naga::TypeInner::Scalar(s) => Ok(HostTy {
            scalar: scalar(*s)?,
            dims: Vec::new(),
        }),
        naga::TypeInner::Vector { size, scalar: s } => Ok(HostTy {
            scalar: scalar(*s)?,
            dims: vec![*size as u8 as usize],
        }),
        naga::TypeInner::Array {
            base,
            size: naga::ArraySize::Constant(n),
            stride,
        } => {
            let mut t = wgsl_host_ty(module, *base)?;
            let packed = 4 * t.dims.iter().product::<usize>() as u32;
            if *stride != packed {
                return Err(format!(
                    "array stride {stride} bytes, a Rust array of {} is packed at {packed}",
                    HostTy {
                        scalar: t.scalar,
                        dims: t.dims.clone()
                    }
                ));
            }
            t.dims.insert(0, n.get() as usize);
            Ok(t)
        }
        other => Err(format!("unsupported member type {other:?}")),
    }
}

/// (b): the WGSL params struct against the Rust one.
fn check_params(v: &KernelVariant, c: &Compiled, used: &[Used]) -> Vec<String> {
    let Some(layout) = &v.io.params else {
        return Vec::new();
    };
    let Some(u) = used
        .iter()
        .find(|u| u.access == Access::Uniform && u.group == 0 && u.binding == 0)
    else {
        return Vec::new(); // reported by check_bindings
    };
    let ty = &c.module.types[u.ty];
    let wname = u.ty_name.clone();
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        return vec![format!(
            "the uniform `{}` is not a struct; the op writes a {}",
            u.name, layout.name
        )];
    };
    let mut errs = Vec::new();
    let who = format!("params: WGSL `struct {wname}` vs Rust `{}`", layout.name);
    if wname != layout.name {
        errs.push(format!("{who}: the struct names differ"));
    }
    if *span as usize != layout.size {
        errs.push(format!(
            "{who}: WGSL size {span} bytes, Rust size_of {} bytes",
            layout.size
        ));
    }
    let n = members.len().max(layout.fields.len());
    for i in 0..n {
        match (members.get(i), layout.fields.get(i)) {
            (Some(m), Some(f)) => {
                let mname = m.name.clone().unwrap_or_default();
                let msize = c.module.types[m.ty].inner.size(c.module.to_ctx()) as usize;
                let mty = wgsl_host_ty(&c.module, m.ty);
                let fty = (f.ty)();
                let mut diffs = Vec::new();
                if mname != f.name {
                    diffs.push(format!("name `{mname}` vs `{}`", f.name));
                }
                if m.offset as usize != f.offset {
                    diffs.push(format!("offset {} vs {}", m.offset, f.offset));
                }
                if msize != f.size {
                    diffs.push(format!("size {msize} vs {}", f.size));
                }
                match &mty {
                    Ok(t) if *t != fty => diffs.push(format!("type {t} vs {fty}")),
                    Ok(_) => {}
                    Err(e) => diffs.push(e.clone()),
                }
                if !diffs.is_empty() {
                    errs.push(format!(
                        "{who}: field {i} (WGSL `{mname}`, Rust `{}`): {} (WGSL vs Rust)",
                        f.name,
                        diffs.join(", ")
                    ));
                }
            }
            (Some(m), None) => errs.push(format!(
                "{who}: WGSL field {i} `{}` at offset {} has no Rust field",
                m.name.as_deref().unwrap_or(""),
                m.offset
            )),
            (None, Some(f)) => errs.push(format!(
                "{who}: Rust field {i} `{}` at offset {} has no WGSL field",
                f.name, f.offset
            )),
            (None, None) => {}
        }
    }
    errs
}

/// (c): SPIR-V, MSL and HLSL, with the bounds-check policy wgpu uses without robust access.
fn check_translations(v: &KernelVariant, c: &Compiled, used: &[Used]) -> Vec<String> {
    let entry = v.io.kernel.entry.to_string();
    let policies = naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::Restrict,
        buffer: naga::proc::BoundsCheckPolicy::Restrict,
        image_load: naga::proc::BoundsCheckPolicy::Restrict,
        binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
    };
    let mut errs = Vec::new();

    let spv_options = naga::back::spv::Options {
        bounds_check_policies: policies,
        ..Default::default()
    };
    let spv_pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.clone(),
    };
    match naga::back::spv::write_vec(&c.module, &c.info, &spv_options, Some(&spv_pipeline)) {
        Ok(words) if words.is_empty() => errs.push("SPIR-V: empty module".into()),
        Ok(_) => {}
        Err(e) => errs.push(format!("SPIR-V: {e}")),
    }

    // Metal: explicit buffer slots per resource and a sizes buffer, as wgpu's Metal backend
    // passes them (no fake bindings); MSL 2.0, the oldest a supported macOS has.
    let mut resources = naga::back::msl::BindingMap::new();
    for (slot, u) in used.iter().enumerate() {
        resources.insert(
            naga::ResourceBinding {
                group: u.group,
                binding: u.binding,
            },
            naga::back::msl::BindTarget {
                buffer: Some(slot as u8),
                mutable: u.access == Access::ReadWrite,
                ..Default::default()
            },
        );
    }
    let msl_options = naga::back::msl::Options {
        lang_version: (2, 0),
        per_entry_point_map: BTreeMap::from([(
            entry.clone(),
            naga::back::msl::EntryPointResources {
                resources,
                immediates_buffer: None,
                sizes_buffer: Some(used.len() as u8),
            },
        )]),
        fake_missing_bindings: false,
        bounds_check_policies: policies,
        zero_initialize_workgroup_memory: true,
        ..Default::default()
    };
    let msl_pipeline = naga::back::msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, entry.clone())),
        ..Default::default()
    };
    if let Err(e) = naga::back::msl::write_string(&c.module, &c.info, &msl_options, &msl_pipeline) {
        errs.push(format!("MSL: {e}"));
    }

    // DX12: shader model 5.1, the lowest wgpu's DX12 backend accepts (FXC).
    let hlsl_options = naga::back::hlsl::Options {
        shader_model: naga::back::hlsl::ShaderModel::V5_1,
        ..Default::default()
    };
    let hlsl_pipeline = naga::back::hlsl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, entry)),
    };
    let mut hlsl = String::new();
    if let Err(e) = naga::back::hlsl::Writer::new(&mut hlsl, &hlsl_options, &hlsl_pipeline)
        .write(&c.module, &c.info, None)
    {
        errs.push(format!("HLSL: {e}"));
    }
    errs
}

/// Every contract problem of one variant (empty: it holds).
fn check(v: &KernelVariant) -> Vec<String> {
    let c = match compile(v) {
        Ok(c) => c,
        Err(e) => return vec![e],
    };
    let used = match used_resources(&c) {
        Ok(u) => u,
        Err(e) => return vec![e],
    };
    let mut errs = check_bindings(v, &used);
    errs.extend(check_params(v, &c, &used));
    errs.extend(check_translations(v, &c, &used));
    if !errs.is_empty() && std::env::var_os("MARROW_CONTRACT_SOURCE").is_some() {
        errs.push(format!("composed source:\n{}", c.source));
    }
    errs
}

#[test]
fn every_kernel_variant_honours_the_contract_and_translates() {
    let variants = all_variants();
    assert!(!variants.is_empty());
    let t = std::time::Instant::now();
    let mut failures = Vec::new();
    for v in &variants {
        let errs = check(v);
        if !errs.is_empty() {
            failures.push(format!("{}:\n  - {}", label(v), errs.join("\n  - ")));
        }
    }
    let entries: BTreeSet<(&str, &str)> = variants
        .iter()
        .map(|v| (v.io.kernel.name, v.io.kernel.entry))
        .collect();
    let files: BTreeSet<&str> = variants.iter().map(|v| v.io.kernel.source).collect();
    eprintln!(
        "shader contract: {} variants of {} entry points in {} shader files: bindings, params \
         layouts, SPIR-V / MSL / HLSL checked in {:.1} s",
        variants.len(),
        entries.len(),
        files.len(),
        t.elapsed().as_secs_f64()
    );
    let mut per_kernel: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &variants {
        *per_kernel.entry(v.io.kernel.name).or_default() += 1;
    }
    eprintln!("  per kernel: {per_kernel:?}");
    assert!(
        failures.is_empty(),
        "{} of {} kernel variants break the Rust↔WGSL contract (set MARROW_CONTRACT_SOURCE=1 to \
         print the composed WGSL):\n{}",
        failures.len(),
        variants.len(),
        failures.join("\n")
    );
}

/// The `@compute` entry points named in a WGSL source.
fn compute_entries(source: &str) -> Vec<String> {
    source
        .split("@compute")
        .skip(1)
        .filter_map(|rest| {
            let after = rest.split("fn ").nth(1)?;
            Some(after.split('(').next()?.trim().to_string())
        })
        .collect()
}

#[test]
fn every_shader_file_and_entry_point_is_covered() {
    let variants = all_variants();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut missing = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        let mine: BTreeSet<&str> = variants
            .iter()
            .filter(|v| v.io.kernel.source == text)
            .map(|v| v.io.kernel.entry)
            .collect();
        if mine.is_empty() {
            missing.push(format!(
                "shaders/{name}: no op lists a variant of it (add the op's `variants()` to \
                 ops::contract::all_variants)"
            ));
            continue;
        }
        for e in compute_entries(&text) {
            if !mine.contains(e.as_str()) {
                missing.push(format!("shaders/{name}: entry point `{e}` has no variant"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// A variant of `entry` with its storage bindings or params layout changed.
fn mutant(
    entry: &str,
    storage: impl FnOnce(&mut Vec<Binding>),
    fields: impl FnOnce(&mut Vec<FieldLayout>),
) -> KernelVariant {
    let v = all_variants()
        .into_iter()
        .find(|v| v.io.kernel.entry == entry)
        .unwrap();
    let mut s = v.io.storage.to_vec();
    storage(&mut s);
    let params = v.io.params.map(|p| {
        let mut f = p.fields.to_vec();
        fields(&mut f);
        StructLayout {
            fields: Box::leak(f.into_boxed_slice()),
            ..p
        }
    });
    KernelVariant::new(
        KernelIo {
            storage: Box::leak(s.into_boxed_slice()),
            params,
            ..v.io
        },
        v.consts,
    )
}

#[test]
fn the_checker_catches_swapped_bindings_reordered_fields_and_wrong_access() {
    let intact = mutant("rpn_decode", |_| {}, |_| {});
    assert_eq!(check(&intact), Vec::<String>::new());

    // Two storage buffers swapped on the Rust side (the same as swapping them in the WGSL).
    let errs = check(&mutant("rpn_decode", |s| s.swap(1, 2), |_| {}));
    assert!(
        errs.iter().any(|e| e.starts_with("@binding(2)"))
            && errs.iter().any(|e| e.starts_with("@binding(3)")),
        "{errs:#?}"
    );
    // A read buffer declared read_write.
    let errs = check(&mutant(
        "rpn_decode",
        |s| s[0] = Binding::read_write(s[0].name),
        |_| {},
    ));
    assert!(
        errs.iter()
            .any(|e| e.starts_with("@binding(1)") && e.contains("read_write")),
        "{errs:#?}"
    );
    // A buffer the shader does not have.
    let errs = check(&mutant(
        "rpn_decode",
        |s| s.push(Binding::read("extra")),
        |_| {},
    ));
    assert!(errs.iter().any(|e| e.contains("`extra`")), "{errs:#?}");
    // Two params fields in the other order (their offsets exchanged, as a reordered Rust struct
    // would have them).
    let errs = check(&mutant(
        "rpn_decode",
        |_| {},
        |f| {
            let (a, b) = (f[1].offset, f[2].offset);
            f[1].offset = b;
            f[2].offset = a;
        },
    ));
    assert!(
        errs.iter()
            .any(|e| e.contains("field 1") && e.contains("offset")),
        "{errs:#?}"
    );
    // A renamed field.
    let errs = check(&mutant("rpn_decode", |_| {}, |f| f[0].name = "levle"));
    assert!(errs.iter().any(|e| e.contains("`levle`")), "{errs:#?}");
    // A field of the wrong type (u32 where WGSL has f32).
    let errs = check(&mutant(
        "rpn_decode",
        |_| {},
        |f| {
            let clip = f.iter_mut().find(|f| f.name == "clip").unwrap();
            clip.ty = <u32 as marrow::ops::contract::HostType>::host_ty;
        },
    ));
    assert!(
        errs.iter().any(|e| e.contains("type f32 vs u32")),
        "{errs:#?}"
    );
}

/// The conv and pool variants the ops list (their share of the variants checked above) include
/// every one the model builder compiles for the test fixture model (ResNet-50, FPN 64, box head
/// 1024, 4 classes, rebuilt from its seed): the graphs of the body + FPN, the RPN head and the box
/// MLP, each layer with the tile it runs with. The adapter is used only to upload the weights.
#[test]
fn listed_conv_and_pool_variants_cover_the_fixture_model() {
    use marrow::model::backbone::BackboneBuilder;
    use marrow::model::graph::{Graph, Op};
    use marrow::model::heads::{BoxMlp, RpnHead};
    use marrow::ops::{conv, pool};

    let gpu = common::gpu();
    let dump = marrow::validate::RefDump::open(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/image_land_120x160.safetensors"),
    )
    .unwrap();
    let ws = dump.seeded_weights().unwrap().unwrap();
    let body = BackboneBuilder::new(gpu, &ws).unwrap();
    let f = body.arch.fpn_channels;
    let mut graphs = vec![body.full().unwrap()];
    let mut g = Graph::default();
    let levels: Vec<_> = (0..5).map(|i| g.input(&format!("p{i}"))).collect();
    RpnHead::load(gpu, &ws, f).unwrap().add(&mut g, &levels);
    graphs.push(g);
    let mut g = Graph::default();
    let rois = g.input("rois");
    BoxMlp::load(gpu, &ws, f, 7).unwrap().add(&mut g, rois);
    graphs.push(g);

    let listed = |v: Vec<KernelVariant>| -> BTreeSet<String> {
        v.iter().map(|v| format!("{:?}", v.consts)).collect()
    };
    let (convs, pools) = (listed(conv::variants()), listed(pool::variants()));
    let mut nodes = 0;
    let mut missing = Vec::new();
    for node in graphs.iter().flat_map(|g| &g.nodes) {
        nodes += 1;
        let (consts, list) = match &node.op {
            Op::Conv { op, .. } => (format!("{:?}", op.consts(op.tile())), &convs),
            Op::Pool { op } => (format!("{:?}", op.consts()), &pools),
            // The detector's graphs are convolutions and pools only; the refinement head's
            // graph is covered by the refine and linalg families' own variants.
            _ => continue,
        };
        if !list.contains(&consts) {
            missing.push(format!("{}: {consts}", node.name));
        }
    }
    assert!(nodes > 50, "only {nodes} nodes built");
    assert!(
        missing.is_empty(),
        "layers the model compiles but no op lists in variants():\n{}",
        missing.join("\n")
    );
}
