// MultiScaleRoIAlign over the FPN levels P2..P5 (NHWC), torchvision's CPU kernel semantics
// (docs/torchvision-semantics.md §8). One invocation per (roi, output bin, channel), channel
// fastest, so the 4 bilinear taps of a sample are contiguous reads across a workgroup. The per-RoI
// geometry is recomputed by every channel's invocation: it is ~100 ALU ops against 16 loads, and
// keeping it in registers avoids a second dispatch or workgroup barriers.
//
// Exactness: the discrete decisions (level, the out-of-range cut at -1 / H, trunc, the y_lo >= H-1
// edge) must match torchvision's f32 arithmetic bit for bit, so
//  - the level is chosen by comparing the f32 box area with host-precomputed thresholds (the
//    smallest areas torch's floor(4 + log2(sqrt(a)/224) + 1e-6) sends up a level), never log2 here;
//  - divisions by the small integers (output size, grid) are corrected to the correctly rounded
//    quotient (WGSL's `/` may be 2.5 ulp off);
//  - products that C++ rounds before an add go through `opaque`, which stops the backend from
//    contracting them into an FMA (Vulkan allows contraction unless told otherwise).
// The bilinear values themselves are plain f32 (continuous; within 1e-5 of max|ref|).
//
// Prepended consts: OUT (u32, pooled size), SAMPLING (i32, > 0 fixed grid, <= 0 adaptive),
// ALIGNED (bool).

struct Params {
    h: vec4<u32>,      // per level: padded feature height
    w: vec4<u32>,      // per level: padded feature width
    scale: vec4<f32>,  // per level: spatial scale (a power of two)
    thr: vec4<f32>,    // xyz: smallest area for level index 1, 2, 3; w unused
    c: u32,            // channels
    capacity: u32,     // rows of the boxes / output buffers
    batch: u32,        // image index into the level tensors
    ones: u32,         // 0xffffffff, opaque to the compiler (see `opaque`)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> f0: array<f32>;
@group(0) @binding(2) var<storage, read> f1: array<f32>;
@group(0) @binding(3) var<storage, read> f2: array<f32>;
@group(0) @binding(4) var<storage, read> f3: array<f32>;
@group(0) @binding(5) var<storage, read> boxes: array<f32>;
@group(0) @binding(6) var<storage, read> count: array<u32>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;

fn tap(l: u32, i: u32) -> f32 {
    switch l {
        case 0u: { return f0[i]; }
        case 1u: { return f1[i]; }
        case 2u: { return f2[i]; }
        default: { return f3[i]; }
    }
}

// Forces `v` to be materialised (rounded to f32) before it is used: an AND with a runtime mask
// that is all ones cannot be folded, so a following add cannot fuse with the multiply that made v.
fn opaque(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) & p.ones);
}

// a / d rounded to nearest even, for an integer 1 <= d < 2048. q = a/d is within a few ulp; the
// residual r = a - q*d is computed exactly (q split into 12-bit halves, so every product is exact
// and an FMA gives the same result), and q + r/d then rounds to the correctly rounded quotient
// (a/d is never closer than ulp/(2d) to a rounding midpoint, far more than r/d's error).
fn div_int(a: f32, d: i32) -> f32 {
    let df = f32(d);
    let q = a / df;
    if (d < 1 || d >= 2048 || !(abs(q) <= 1.0e37)) {
        return q;
    }
    let q_hi = bitcast<f32>(bitcast<u32>(q) & 0xfffff000u);
    let q_lo = q - q_hi;
    let r = (a - q_hi * df) - q_lo * df;
    return q + r / df;
}

// One sample's bilinear value, torchvision's pre_calc rules. Level base offset `base` points at
// (batch, 0, 0, channel).
fn sample(l: u32, base: u32, yy: f32, xx: f32, hh: u32, ww: u32) -> f32 {
    let hf = f32(hh);
    let wf = f32(ww);
    // Written as !(in range) so that NaN coordinates are out of range, as torchvision's kernel.
    if (!(yy >= -1.0 && yy <= hf && xx >= -1.0 && xx <= wf)) {
        return 0.0;
    }
    var yv = select(yy, 0.0, yy <= 0.0);
    var xv = select(xx, 0.0, xx <= 0.0);
    var y_lo = u32(yv);
    var x_lo = u32(xv);
    var y_hi = y_lo + 1u;
    var x_hi = x_lo + 1u;
    if (y_lo + 1u >= hh) {
        y_lo = hh - 1u;
        y_hi = y_lo;
        yv = f32(y_lo);
    }
    if (x_lo + 1u >= ww) {
        x_lo = ww - 1u;
        x_hi = x_lo;
        xv = f32(x_lo);
    }
    let ly = yv - f32(y_lo);
    let lx = xv - f32(x_lo);
    let hy = 1.0 - ly;
    let hx = 1.0 - lx;
    let w1 = hy * hx;
    let w2 = hy * lx;
    let w3 = ly * hx;
    let w4 = ly * lx;
    let v1 = tap(l, base + (y_lo * ww + x_lo) * p.c);
    let v2 = tap(l, base + (y_lo * ww + x_hi) * p.c);
    let v3 = tap(l, base + (y_hi * ww + x_lo) * p.c);
    let v4 = tap(l, base + (y_hi * ww + x_hi) * p.c);
    return w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4;
}

fn level_get(v: vec4<u32>, l: u32) -> u32 {
    return select(select(select(v.w, v.z, l == 2u), v.y, l == 1u), v.x, l == 0u);
}

fn level_getf(v: vec4<f32>, l: u32) -> f32 {
    return select(select(select(v.w, v.z, l == 2u), v.y, l == 1u), v.x, l == 0u);
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let per_roi = OUT * OUT * p.c;
    let roi = i / per_roi;
    // Rows at or beyond the live count are left untouched.
    if (roi >= min(count[0], p.capacity)) {
        return;
    }
    let c = i % p.c;
    let bin = (i / p.c) % (OUT * OUT);
    let ph = bin / OUT;
    let pw = bin % OUT;
    let b = vec4<f32>(boxes[roi * 4u], boxes[roi * 4u + 1u], boxes[roi * 4u + 2u], boxes[roi * 4u + 3u]);

    // LevelMapper. A NaN or negative area (inverted box) has no level in torchvision (its NaN
    // level matches none), so the row is zero; tested on the bits, as WGSL may assume no NaNs.
    let area = (b.z - b.x) * (b.w - b.y);
    let abits = bitcast<u32>(area);
    if ((abits & 0x7fffffffu) > 0x7f800000u || (abits > 0x80000000u)) {
        y[i] = 0.0;
        return;
    }
    let l = u32(area >= p.thr.x) + u32(area >= p.thr.y) + u32(area >= p.thr.z);
    let hh = level_get(p.h, l);
    let ww = level_get(p.w, l);
    let scale = level_getf(p.scale, l);
    let base = p.batch * hh * ww * p.c + c;

    // torchvision's per-RoI geometry, f32 in C++ evaluation order. b * scale is exact (power of
    // two), so an FMA with the offset changes nothing.
#if ALIGNED
    let offset = 0.5;
#else
    let offset = 0.0;
#endif
    let start_w = b.x * scale - offset;
    let start_h = b.y * scale - offset;
    let end_w = b.z * scale - offset;
    let end_h = b.w * scale - offset;
    var roi_w = end_w - start_w;
    var roi_h = end_h - start_h;
#if !ALIGNED
    // std::max(roi, 1.f): NaN stays NaN.
    roi_w = select(roi_w, 1.0, roi_w < 1.0);
    roi_h = select(roi_h, 1.0, roi_h < 1.0);
#endif
    let bin_h = div_int(roi_h, i32(OUT));
    let bin_w = div_int(roi_w, i32(OUT));
    var grid_h = SAMPLING;
    var grid_w = SAMPLING;
    if (SAMPLING <= 0) {
        // C++ `int g = ceil(roi / pooled)`: the same quotient as the bin size.
        grid_h = i32(ceil(bin_h));
        grid_w = i32(ceil(bin_w));
    }
    let n = f32(max(grid_h * grid_w, 1));

    let y0 = start_h + opaque(f32(ph) * bin_h);
    let x0 = start_w + opaque(f32(pw) * bin_w);
    var acc = 0.0;
    for (var iy = 0; iy < grid_h; iy++) {
        let yy = y0 + div_int(opaque((f32(iy) + 0.5) * bin_h), grid_h);
        for (var ix = 0; ix < grid_w; ix++) {
            let xx = x0 + div_int(opaque((f32(ix) + 0.5) * bin_w), grid_w);
            acc += sample(l, base, yy, xx, hh, ww);
        }
    }
    y[i] = acc / n;
}
