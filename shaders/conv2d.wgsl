// Convolution as implicit GEMM over channels-last (NHWC) activations. No im2col is materialised:
// each workgroup gathers its A tile straight from the input with the conv's index arithmetic.
//
//   GEMM view:  Y[m, n] = sum_k A[m, k] * W[k, n]
//     m = (image, oy, ox)            M = N*OH*OW output pixels
//     k = (ky, kx, ci)               K = KH*KW*CIN     (weights repacked to [K, COUT] at load time)
//     n = output channel             COUT
//
// Epilogue (fused): + bias (BatchNorm folded into W and bias at load), + residual, ReLU.
//   RES_MODE 0: none
//   RES_MODE 1: residual of the output's shape (ResNet identity / downsample branch)
//   RES_MODE 2: nearest-upsampled residual [N, RH, RW, COUT] (FPN top-down merge), with ATen's
//               legacy "nearest" index rule: identity, exact 2x (dst >> 1), else
//               min(floor(dst * f32(in/out)), in - 1) with the scale computed on the host.
//
// Prepended consts (one pipeline per variant): KH, KW, STRIDE, PAD, CIN, COUT, RELU, RES_MODE.
//
// Tiling: a 64x64 output tile per workgroup of 16x16 threads, each thread a 4x4 register block;
// K is walked in steps of 16 through workgroup memory stored as vec4 so the inner loop is four
// vec4 FMAs per k. Larger register blocks matter more than shared-memory reuse on lavapipe, and
// the 4x4 vec4 block keeps register pressure modest on real GPUs.

struct Params {
    n: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    m: u32,
    rh: u32,
    rw: u32,
    scale_h: f32,
    scale_w: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
#if RESIDUAL
@group(0) @binding(5) var<storage, read> res: array<f32>;
#endif

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const KTOT: u32 = KH * KW * CIN;

// [k][m/4] and [k][n/4]: one vec4 holds four consecutive rows (A) or columns (B).
var<workgroup> As: array<vec4<f32>, 256>;
var<workgroup> Bs: array<vec4<f32>, 256>;

fn load_x(base: u32, iy: i32, ix: i32, ci: u32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return x[base + (u32(iy) * p.w + u32(ix)) * CIN + ci];
}

fn nearest_src(dst: u32, src_len: u32, dst_len: u32, scale: f32) -> u32 {
    if (dst_len == src_len) {
        return dst;
    }
    if (dst_len == 2u * src_len) {
        return dst >> 1u;
    }
    return min(u32(floor(f32(dst) * scale)), src_len - 1u);
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tid = lid.y * 16u + lid.x;
    let m0 = wid.x * BM;
    let n0 = wid.y * BN;
    let ohw = p.oh * p.ow;

    // A loader: this thread fills rows 4*(tid%16) .. +3 of the tile at k-offset tid/16.
    let a_k = tid / 16u;
    let a_m = (tid % 16u) * 4u;
    var a_base: array<u32, 4>;
    var a_iy: array<i32, 4>;
    var a_ix: array<i32, 4>;
    var a_ok: array<bool, 4>;
    for (var r = 0u; r < 4u; r++) {
        let gm = m0 + a_m + r;
        a_ok[r] = gm < p.m;
        let g = min(gm, p.m - 1u);
        let img = g / ohw;
        let rem = g % ohw;
        let oy = rem / p.ow;
        let ox = rem % p.ow;
        a_base[r] = img * p.h * p.w * CIN;
        a_iy[r] = i32(oy * STRIDE) - i32(PAD);
        a_ix[r] = i32(ox * STRIDE) - i32(PAD);
    }
    // B loader: row tid/16, columns 4*(tid%16) .. +3.
    let b_k = tid / 16u;
    let b_n = n0 + (tid % 16u) * 4u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < KTOT; k0 += BK) {
        let k = k0 + a_k;
        var av = vec4<f32>(0.0);
        if (k < KTOT) {
            let tap = k / CIN;
            let ci = k % CIN;
            let ky = i32(tap / KW);
            let kx = i32(tap % KW);
            if (a_ok[0]) { av.x = load_x(a_base[0], a_iy[0] + ky, a_ix[0] + kx, ci); }
            if (a_ok[1]) { av.y = load_x(a_base[1], a_iy[1] + ky, a_ix[1] + kx, ci); }
            if (a_ok[2]) { av.z = load_x(a_base[2], a_iy[2] + ky, a_ix[2] + kx, ci); }
            if (a_ok[3]) { av.w = load_x(a_base[3], a_iy[3] + ky, a_ix[3] + kx, ci); }
        }
        As[a_k * 16u + tid % 16u] = av;

        let kb = k0 + b_k;
        var bv = vec4<f32>(0.0);
        if (kb < KTOT) {
            let row = kb * COUT;
            if (b_n + 3u < COUT) {
                bv = vec4<f32>(wt[row + b_n], wt[row + b_n + 1u], wt[row + b_n + 2u], wt[row + b_n + 3u]);
            } else {
                if (b_n < COUT) { bv.x = wt[row + b_n]; }
                if (b_n + 1u < COUT) { bv.y = wt[row + b_n + 1u]; }
                if (b_n + 2u < COUT) { bv.z = wt[row + b_n + 2u]; }
            }
        }
        Bs[b_k * 16u + tid % 16u] = bv;
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            let a = As[kk * 16u + lid.y];
            let b = Bs[kk * 16u + lid.x];
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }
        workgroupBarrier();
    }

    let n = n0 + lid.x * 4u;
    if (n >= COUT) {
        return;
    }
    var bvec = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (n + j < COUT) { bvec[j] = bias[n + j]; }
    }
    var accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + lid.y * 4u + i;
        if (m >= p.m) {
            break;
        }
        var v = accs[i] + bvec;
#if RESIDUAL
        var ridx = m * COUT;
        if (RES_MODE == 2u) {
            let img = m / ohw;
            let rem = m % ohw;
            let sy = nearest_src(rem / p.ow, p.rh, p.oh, p.scale_h);
            let sx = nearest_src(rem % p.ow, p.rw, p.ow, p.scale_w);
            ridx = ((img * p.rh + sy) * p.rw + sx) * COUT;
        }
        for (var j = 0u; j < 4u; j++) {
            if (n + j < COUT) { v[j] += res[ridx + n + j]; }
        }
#endif
        if (RELU) {
            v = max(v, vec4<f32>(0.0));
        }
        let o = m * COUT + n;
        for (var j = 0u; j < 4u; j++) {
            if (n + j < COUT) { y[o + j] = v[j]; }
        }
    }
}
