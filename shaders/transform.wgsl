// GeneralizedRCNNTransform on the GPU: per-channel normalize, bilinear resize
// (align_corners=False, no antialias) and zero padding, from a planar [3, H, W] RGB image in
// [0, 1] to a channels-last [Hp, Wp, 3] tensor. Order as torchvision: normalize first, then
// resize, so each of the four taps is normalised before interpolation. The per-axis source
// indices and lambdas are computed on the host with ATen's f32 arithmetic (tiny tables), so the
// only GPU rounding left is in the normalise division and the weighted sum.

struct Params {
    h: u32,        // source
    w: u32,
    oh: u32,       // resized (unpadded)
    ow: u32,
    hp: u32,       // padded
    wp: u32,
    pad0: u32,
    pad1: u32,
    mean: vec4<f32>,
    stdev: vec4<f32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> img: array<f32>;
// (i0, i1, lambda0, lambda1) per output row / column; indices are exact in f32 (< 2^24).
@group(0) @binding(2) var<storage, read> ytab: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> xtab: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn tap(c: u32, y: u32, x: u32) -> f32 {
    return (img[(c * p.h + y) * p.w + x] - p.mean[c]) / p.stdev[c];
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.hp * p.wp) {
        return;
    }
    let oy = i / p.wp;
    let ox = i % p.wp;
    if (oy >= p.oh || ox >= p.ow) {
        out[i * 3u] = 0.0;
        out[i * 3u + 1u] = 0.0;
        out[i * 3u + 2u] = 0.0;
        return;
    }
    let ty = ytab[oy];
    let tx = xtab[ox];
    let y0 = u32(ty.x);
    let y1 = u32(ty.y);
    let x0 = u32(tx.x);
    let x1 = u32(tx.y);
    for (var c = 0u; c < 3u; c++) {
        // ATen's generic CPU nesting: h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11).
        let top = tx.z * tap(c, y0, x0) + tx.w * tap(c, y0, x1);
        let bot = tx.z * tap(c, y1, x0) + tx.w * tap(c, y1, x1);
        out[i * 3u + c] = ty.z * top + ty.w * bot;
    }
}
