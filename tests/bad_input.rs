//! Bad input never panics and never half-loads: every case is an error that names the file and
//! the problem (the tensor, the byte range, the field, the limit).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use marrow::model::config::CONFIG_KEY;
use marrow::model::weights::{HostTensor, WeightStore};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn st_bytes(
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    meta: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, meta).unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn load(bytes: &[u8]) -> Result<WeightStore, String> {
    WeightStore::from_bytes(bytes, Path::new("model.safetensors")).map_err(|e| e.to_string())
}

fn small_file() -> Vec<u8> {
    st_bytes(
        &[
            (
                "backbone.fpn.inner_blocks.0.weight",
                Dtype::F32,
                vec![2, 3, 1, 1],
                f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            ),
            (
                "rpn.head.conv.bias",
                Dtype::F32,
                vec![2],
                f32_bytes(&[0.5, -0.5]),
            ),
            (
                "backbone.body.bn1.num_batches_tracked",
                Dtype::I64,
                vec![],
                7i64.to_le_bytes().to_vec(),
            ),
        ],
        None,
    )
}

#[test]
fn legacy_names_are_aliased_and_num_batches_tracked_ignored() {
    let ws = load(&small_file()).unwrap();
    let names: Vec<&str> = ws.names().collect();
    assert_eq!(
        names,
        [
            "backbone.fpn.inner_blocks.0.0.weight",
            "rpn.head.conv.0.0.bias"
        ]
    );
    assert_eq!(
        ws.get("rpn.head.conv.0.0.bias", &[2]).unwrap(),
        &[0.5, -0.5]
    );
}

#[test]
fn too_short_and_truncated_files_name_the_problem() {
    let e = load(&[1, 2, 3]).unwrap_err();
    assert!(
        e.contains("model.safetensors") && e.contains("too short"),
        "{e}"
    );
    let good = small_file();
    // header length field larger than the file
    let mut bad = good.clone();
    bad[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = load(&bad).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    // cut in the data section: the error names a tensor and its byte range
    let e = load(&good[..good.len() - 5]).unwrap_err();
    assert!(
        e.contains("tensor ") && e.contains("bytes") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn hostile_headers_are_errors() {
    let good = small_file();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    // not JSON
    let mut bad = good.clone();
    for b in &mut bad[8..8 + n] {
        *b = b'{';
    }
    assert!(load(&bad)
        .unwrap_err()
        .contains("invalid safetensors header"));
    // offsets overlapping / out of order, written by hand
    let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(&[0u8; 24]);
    assert!(load(&f).is_err());
    // shape × dtype disagreeing with the offsets
    let header = br#"{"a":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,16]}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(&[0u8; 16]);
    assert!(load(&f).is_err());
}

#[test]
fn wrong_dtype_and_nan_name_the_tensor() {
    let f = st_bytes(&[("backbone.x", Dtype::I32, vec![2], vec![0u8; 8])], None);
    let e = load(&f).unwrap_err();
    assert!(e.contains("backbone.x") && e.contains("I32"), "{e}");
    let f = st_bytes(
        &[(
            "backbone.y",
            Dtype::F32,
            vec![3],
            f32_bytes(&[1.0, f32::NAN, 2.0]),
        )],
        None,
    );
    let e = load(&f).unwrap_err();
    assert!(e.contains("backbone.y") && e.contains("element 1"), "{e}");
}

#[test]
fn duplicate_legacy_and_current_names_are_refused() {
    let f = st_bytes(
        &[
            (
                "rpn.head.conv.weight",
                Dtype::F32,
                vec![1],
                f32_bytes(&[1.0]),
            ),
            (
                "rpn.head.conv.0.0.weight",
                Dtype::F32,
                vec![1],
                f32_bytes(&[1.0]),
            ),
        ],
        None,
    );
    assert!(load(&f).unwrap_err().contains("appears twice"));
}

#[test]
fn half_precision_files_widen_exactly() {
    let vals = [0.5f32, -1.25, 3.0, 65504.0];
    let b16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bb: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f = st_bytes(
        &[
            ("backbone.h", Dtype::F16, vec![4], b16),
            ("backbone.b", Dtype::BF16, vec![4], bb),
        ],
        None,
    );
    let ws = load(&f).unwrap();
    assert_eq!(ws.get("backbone.h", &[4]).unwrap(), &vals);
    assert_eq!(ws.get("backbone.b", &[4]).unwrap()[..3], vals[..3]);
}

#[test]
fn config_metadata_errors_name_the_field() {
    let with = |json: &str| {
        let mut m = HashMap::new();
        m.insert(CONFIG_KEY.to_string(), json.to_string());
        st_bytes(
            &[("backbone.x", Dtype::F32, vec![1], f32_bytes(&[1.0]))],
            Some(m),
        )
    };
    let e = load(&with("{not json")).unwrap_err();
    assert!(e.contains(CONFIG_KEY), "{e}");
    let e = load(&with(r#"{"transform":{"min_sise":800}}"#)).unwrap_err();
    assert!(e.contains("min_sise"), "{e}");
    let e = load(&with(r#"{"format_version":99}"#)).unwrap_err();
    assert!(e.contains("format_version"), "{e}");
    let e = load(&with(r#"{"transform":{"image_std":[0.2,0.0,0.2]}}"#)).unwrap_err();
    assert!(e.contains("image_std"), "{e}");
    // Anchors: one size per FPN level, sane sizes and ratios.
    let e = load(&with(r#"{"rpn":{"anchor_sizes":[32,64,128,256]}}"#)).unwrap_err();
    assert!(
        e.contains("rpn.anchor_sizes") && e.contains("4 entries"),
        "{e}"
    );
    let e = load(&with(r#"{"rpn":{"anchor_sizes":[32,64,0,256,512]}}"#)).unwrap_err();
    assert!(e.contains("rpn.anchor_sizes") && e.contains("0"), "{e}");
    let e = load(&with(r#"{"rpn":{"aspect_ratios":[]}}"#)).unwrap_err();
    assert!(
        e.contains("rpn.aspect_ratios") && e.contains("0 entries"),
        "{e}"
    );
    let e = load(&with(r#"{"rpn":{"aspect_ratios":[0.5,1,2,3,4,5,6,7,8]}}"#)).unwrap_err();
    assert!(
        e.contains("rpn.aspect_ratios") && e.contains("9 entries"),
        "{e}"
    );
    let e = load(&with(r#"{"rpn":{"aspect_ratios":[0.5,-1,2]}}"#)).unwrap_err();
    assert!(e.contains("rpn.aspect_ratios") && e.contains("-1"), "{e}");
    let ok = load(&with(r#"{"rpn":{"anchor_sizes":[16,32,64,128,256.5]}}"#)).unwrap();
    assert_eq!(ok.config.rpn.anchor_sizes, [16.0, 32.0, 64.0, 128.0, 256.5]);
    assert_eq!(
        ok.config.rpn.aspect_ratios,
        [0.5, 1.0, 2.0],
        "default ratios kept"
    );
    let ok = load(&with(r#"{"transform":{"min_size":160}}"#)).unwrap();
    assert_eq!(ok.config.transform.min_size, 160);
    assert_eq!(
        ok.config.transform.max_size, 1333,
        "absent fields keep torchvision's defaults"
    );
}

/// The fixture model's tensors, regenerated, with one change applied.
fn seeded_with(change: impl FnOnce(&mut Vec<(String, HostTensor)>)) -> Result<(), String> {
    let dump = marrow::validate::RefDump::open(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layers.safetensors"),
    )
    .unwrap();
    let spec =
        marrow::seedgen::SeedSpec::from_json(&dump.metadata[marrow::seedgen::SEEDGEN_KEY]).unwrap();
    let mut t: Vec<(String, HostTensor)> = spec
        .generate_all()
        .into_iter()
        .filter(|(n, _, _)| n.starts_with("backbone."))
        .map(|(n, shape, data)| (n, HostTensor { shape, data }))
        .collect();
    change(&mut t);
    let ws = WeightStore::from_tensors("edited.safetensors", Default::default(), t)
        .map_err(|e| e.to_string())?;
    marrow::model::Backbone::new(common::gpu(), ws)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn architecture_mismatches_name_the_tensor() {
    let e = seeded_with(|t| t.retain(|(n, _)| n != "backbone.body.layer1.0.bn2.running_var"))
        .unwrap_err();
    assert!(
        e.contains("backbone.body.layer1.0.bn2.running_var") && e.contains("missing"),
        "{e}"
    );
    let e = seeded_with(|t| {
        let x = t
            .iter_mut()
            .find(|(n, _)| n == "backbone.body.layer1.0.conv2.weight")
            .unwrap();
        x.1 = HostTensor {
            shape: vec![64, 64, 1, 9],
            data: x.1.data.clone(),
        };
    })
    .unwrap_err();
    assert!(
        e.contains("layer1.0.conv2.weight") && e.contains("[64, 64, 3, 3]"),
        "{e}"
    );
    let e = seeded_with(|t| {
        t.push((
            "backbone.body.layer9.weight".into(),
            HostTensor {
                shape: vec![1],
                data: vec![0.0],
            },
        ))
    })
    .unwrap_err();
    assert!(e.contains("backbone.body.layer9.weight"), "{e}");
    let e = seeded_with(|t| {
        t.push((
            "classifier.fc.weight".into(),
            HostTensor {
                shape: vec![1],
                data: vec![0.0],
            },
        ))
    })
    .unwrap_err();
    assert!(e.contains("classifier.fc.weight"), "{e}");
    let e = seeded_with(|t| {
        let x = t
            .iter_mut()
            .find(|(n, _)| n == "backbone.body.layer2.0.bn1.running_var")
            .unwrap();
        x.1.data[3] = 0.0;
    })
    .unwrap_err();
    assert!(e.contains("layer2.0.bn1.running_var[3]"), "{e}");
}

fn write_tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("marrow-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn png(w: u32, h: u32, color: image::ExtendedColorType, data: &[u8]) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(data, w, h, color)
        .unwrap();
    out
}

#[test]
fn corrupt_truncated_and_foreign_images_are_errors_naming_the_file() {
    let good = png(4, 3, image::ExtendedColorType::Rgb8, &[7u8; 36]);
    for (name, bytes) in [
        ("truncated.png", &good[..good.len() / 2]),
        (
            "garbage.png",
            &b"\x89PNG\r\n\x1a\nthis is not a png at all"[..],
        ),
        ("notes.txt", &b"hello, pathologist"[..]),
        ("empty.png", &b""[..]),
    ] {
        let p = write_tmp(name, bytes);
        let e = marrow::image_io::load_rgb(&p).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    let e = marrow::image_io::load_rgb(Path::new("/nonexistent/slide.png"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/slide.png"), "{e}");
}

#[test]
fn absurd_dimensions_are_refused_before_decoding() {
    // A valid PNG header claiming 100000 × 100000 pixels, with no data behind it.
    let mut good = png(1, 1, image::ExtendedColorType::Rgb8, &[1, 2, 3]);
    good[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    good[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let p = write_tmp("huge.png", &good);
    let e = marrow::image_io::load_rgb(&p).unwrap_err().to_string();
    assert!(e.contains("huge.png"), "{e}");
}

#[test]
fn rgba_grey_and_16_bit_images_load_as_rgb() {
    // marrow refuses images under 32 px a side, so each test pattern is tiled to 32×32.
    let tile = |w: usize, px: &[u8]| -> Vec<u8> {
        let bpp = px.len() / w;
        (0..32 * 32)
            .flat_map(|i| px[(i % w) * bpp..(i % w + 1) * bpp].to_vec())
            .collect()
    };
    let hw = 32 * 32;
    let rgba = png(
        32,
        32,
        image::ExtendedColorType::Rgba8,
        &tile(2, &[255, 0, 51, 9, 0, 255, 102, 255]),
    );
    let img = marrow::image_io::load_rgb(&write_tmp("rgba.png", &rgba)).unwrap();
    assert_eq!((img.h, img.w), (32, 32));
    // planar [3, H, W], alpha dropped, x / 255 in f32
    let px = |i: usize| [img.data[i], img.data[hw + i], img.data[2 * hw + i]];
    assert_eq!(px(0), [1.0, 0.0, 51.0 / 255.0]);
    assert_eq!(px(1), [0.0, 1.0, 102.0 / 255.0]);
    let grey = png(32, 32, image::ExtendedColorType::L8, &tile(1, &[128]));
    let img = marrow::image_io::load_rgb(&write_tmp("grey.png", &grey)).unwrap();
    assert!(img.data.iter().all(|&v| v == 128.0 / 255.0));
    let g16 = png(
        32,
        32,
        image::ExtendedColorType::Rgb16,
        &tile(1, &[0xff, 0xff, 0x00, 0x00, 0x80, 0x80]),
    );
    let img = marrow::image_io::load_rgb(&write_tmp("rgb16.png", &g16)).unwrap();
    assert_eq!(img.data[0], 1.0);
    assert_eq!(img.data[hw], 0.0);
}

#[test]
fn absurd_transform_sizes_are_errors() {
    use marrow::ops::transform::resized_size;
    assert!(resized_size(0, 10, 800, 1333).is_err());
    assert!(
        resized_size(1, 100000, 800, 1333).is_err(),
        "aspect ratio too extreme to resize"
    );
}

#[test]
fn buffers_beyond_the_adapter_limit_are_errors_not_panics() {
    let g = common::gpu();
    let e = g.storage("absurd", u64::MAX / 2).unwrap_err().to_string();
    assert!(e.contains("absurd") && e.contains("limit"), "{e}");
}

#[test]
fn device_loss_is_an_error_not_a_panic() {
    use marrow::gpu::{Gpu, GpuOptions, Nhwc, Tensor};
    use marrow::ops::pool::MaxPool2d;
    // A device of our own: losing it must not disturb the other tests' shared device.
    let g = Gpu::new(&GpuOptions::default()).unwrap();
    let x = Tensor::new(&g, "x", Nhwc::new(1, 4, 4, 2)).unwrap();
    let y = Tensor::new(&g, "y", Nhwc::new(1, 2, 2, 2)).unwrap();
    let d = MaxPool2d::STEM.encode(&g, "pool", &x, &y).unwrap();
    g.run("before loss", [&d]).unwrap();
    g.device.destroy();
    let e = g.run("after loss", [&d]).unwrap_err().to_string();
    assert!(e.contains("lost"), "{e}");
    let e = g.read_back(&y.buf, 8).unwrap_err().to_string();
    assert!(e.contains("lost"), "{e}");
}

#[test]
fn unknown_adapter_is_an_error() {
    let e = marrow::gpu::Gpu::new(&marrow::gpu::GpuOptions {
        adapter: Some("no-such-gpu-9000".into()),
        allow_gl: false,
    })
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no-such-gpu-9000") && e.contains("marrow info"),
        "{e}"
    );
}

fn marrow_cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_marrow"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_without_any_vulkan_driver_says_what_to_install() {
    // No ICD: wgpu sees no Vulkan adapter. marrow must not fall back to OpenGL silently.
    let (code, err) = marrow_cli(
        &["info"],
        &[
            ("VK_ICD_FILENAMES", "/nonexistent.json"),
            ("VK_DRIVER_FILES", "/nonexistent.json"),
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("no usable GPU adapter") && err.contains("mesa-vulkan-drivers"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cli_errors_name_the_file_and_exit_2() {
    let img = write_tmp("cli-corrupt.png", b"\x89PNG\r\n\x1a\ngarbage");
    let w = write_tmp("cli-weights.safetensors", &[1, 2, 3]);
    let (code, err) = marrow_cli(
        &[
            "detect",
            img.to_str().unwrap(),
            "--weights",
            w.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cli-weights.safetensors"), "{err}");
    let (code, err) = marrow_cli(
        &["validate", "--reference", "/nonexistent/ref.safetensors"],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nonexistent/ref.safetensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
